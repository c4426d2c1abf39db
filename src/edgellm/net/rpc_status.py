"""Error kinds on the gRPC wire: a node's half (`abort_with`) and a caller's half (`error_from`) of one table.

A node answers each kind of `edgellm.errors` with one status; the caller turns each status back into the same
kind. The node also marks every status it sets itself (trailing metadata `x-edgellm-kind`), so the caller can
tell a node that answered "a peer behind me failed" from a node it could not reach, and a node at its limits from
a message over gRPC's size cap (both UNAVAILABLE, and both RESOURCE_EXHAUSTED, unmarked when gRPC sets them).

| raised on the node | status | raised at the caller |
|---|---|---|
| `InputError` | INVALID_ARGUMENT | `ConfigError` |
| `SessionError` | NOT_FOUND | `SessionError` |
| other `PeerError` (relayed from a peer behind the node) | UNAVAILABLE, marked | `RemoteError` naming the node that failed |
| (nothing: the node is down or slow) | UNAVAILABLE or DEADLINE_EXCEEDED | `NodeUnreachable` |
| `BusyError` | RESOURCE_EXHAUSTED, marked | `BusyError` |
| (nothing: a message over the size cap) | RESOURCE_EXHAUSTED | `ConfigError` |
| anything else: a bug, logged with its traceback on the node | INTERNAL | `RemoteError`: the node's internal error |
| (a wrong deployment token) | UNAUTHENTICATED | `AuthError` |

A failure a node only relays (an error its own call to a peer behind it raised, from `error_from`) keeps its kind
and its message: the node answers with the message of the node where it began (`EdgellmError.origin`) and the
nodes that relayed it so far (trailing metadata `x-edgellm-relays`), and the caller adds the node it called. So a
token a server refused two hops away reaches `edgellm run` as `node edge2 at ... refused the deployment token: ...
(relayed by node edge1 at ..., then node device at ...)`, not as a nest of "node X refused the request: node Y
...", and a downstream node that is down never reads as if the device were.
"""

from __future__ import annotations

import json
import logging
from typing import NoReturn

import grpc
from grpc import StatusCode

from edgellm.errors import BusyError, ConfigError, EdgellmError, InputError, PeerError, SessionError

log = logging.getLogger(__name__)

KIND_HEADER = "x-edgellm-kind"
RELAYS_HEADER = "x-edgellm-relays"  # a relayed failure: JSON list of the nodes that passed it on


class NodeUnreachable(PeerError):
    """A node did not answer within the deadline, or refused the connection."""


class RemoteError(PeerError):
    """A node failed: an internal error there, a failure of a peer behind it, or a reply that does not decode."""


class AuthError(InputError):
    """A node refused the call's deployment token.

    An `InputError`, not a `PeerError`: the token is part of the deployment's configuration, and retrying with
    the same one can never succeed; the user fixes the topology (or the token's file or variable).
    """


# Order matters: a SessionError is also a PeerError, an AuthError (a peer behind the node refused its token) an
# InputError.
_STATUSES: tuple[tuple[type[EdgellmError], StatusCode, str], ...] = (
    (AuthError, StatusCode.INVALID_ARGUMENT, "auth"),
    (InputError, StatusCode.INVALID_ARGUMENT, "input"),
    (SessionError, StatusCode.NOT_FOUND, "session"),
    (PeerError, StatusCode.UNAVAILABLE, "peer"),
    (BusyError, StatusCode.RESOURCE_EXHAUSTED, "busy"),
)


def status_for(exc: BaseException) -> tuple[StatusCode, str]:
    """The status a node answers `exc` with, and its kind's name (for the mark)."""
    for kind, status, name in _STATUSES:
        if isinstance(exc, kind):
            return status, name
    return StatusCode.INTERNAL, "internal"


def abort_with(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    """End the call with `exc`'s status and message; an internal error (a bug) is logged here, on the node."""
    status, kind = status_for(exc)
    details = str(exc)
    metadata = [(KIND_HEADER, kind)]
    if status == StatusCode.INTERNAL:
        log.error("request failed (a bug)", exc_info=exc)
        details = f"{type(exc).__name__}: {exc}"
    elif isinstance(exc, EdgellmError) and exc.origin is not None:  # relayed: the caller adds this node
        details = exc.origin
        metadata.append((RELAYS_HEADER, json.dumps(list(exc.relays))))
    context.set_trailing_metadata(tuple(metadata))
    context.abort(status, details)
    raise AssertionError("unreachable: context.abort raises")


def error_from(exc: grpc.RpcError, where: str) -> EdgellmError:
    """The error a caller raises for a failed call to the node `where` ("node NAME at ADDRESS")."""
    code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
    metadata = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
    relays = _relays(metadata.get(RELAYS_HEADER))
    if relays is not None:
        return _relayed(code, metadata.get(KIND_HEADER), details, (*relays, where))
    error = _own_error(code, details, where, KIND_HEADER in metadata)
    error.origin = str(error)
    return error


def _own_error(code: StatusCode, details: str, where: str, marked: bool) -> EdgellmError:
    """The error for a failure of the node `where` itself (or of the call to it)."""
    if code == StatusCode.INVALID_ARGUMENT:
        return ConfigError(f"{where} refused the request: {details}")
    if code == StatusCode.NOT_FOUND:
        return SessionError(f"{where}: {details}")
    if code == StatusCode.UNAUTHENTICATED:
        return AuthError(f"{where} refused the deployment token: {details}")
    if code == StatusCode.RESOURCE_EXHAUSTED:
        if marked:
            return BusyError(f"{where} is busy: {details}")
        return ConfigError(f"{where}: a message exceeds the size limit (max_message_bytes): {details}")
    if code in (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED):
        if marked:
            return RemoteError(f"{where} relayed a failure of a peer behind it: {details}")
        return NodeUnreachable(f"{where} is unreachable ({code.name.lower()}): {details}")
    if code == StatusCode.INTERNAL and marked:
        return RemoteError(f"{where} failed with an internal error (a bug; its log has the traceback): {details}")
    return RemoteError(f"{where} answered {code.name}: {details}")


def _relays(header: object) -> tuple[str, ...] | None:
    """The nodes that relayed a failure so far, from `RELAYS_HEADER`; None when the header is absent or garbled."""
    if not isinstance(header, str):
        return None
    try:
        relays = json.loads(header)
    except ValueError:
        return None
    if not isinstance(relays, list) or not all(isinstance(r, str) for r in relays):
        return None
    return tuple(relays)


def _relayed(code: StatusCode, kind: object, origin: str, relays: tuple[str, ...]) -> EdgellmError:
    """A failure that began at another node (`origin` names it), of the same kind, with its path."""
    kinds: dict[StatusCode, type[EdgellmError]] = {
        StatusCode.INVALID_ARGUMENT: AuthError if kind == "auth" else ConfigError,
        StatusCode.NOT_FOUND: SessionError,
        StatusCode.RESOURCE_EXHAUSTED: BusyError,
    }
    error = kinds.get(code, RemoteError)(f"{origin} (relayed by {', then '.join(relays)})")
    error.origin, error.relays = origin, relays
    return error
