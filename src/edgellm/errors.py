"""Errors by whose fault they are. The CLI maps each kind to an exit code once (`edgellm.cli.main`), printing the
message as one line; the gRPC transport maps each kind to a status code and back once (`edgellm.net.rpc_status`).
Any other exception is a bug (internal).

| kind | who fixes it | exit code | gRPC status |
|---|---|---|---|
| `InputError` (`ConfigError`, `ModelError`, `WireError`, `AuthError`) | the user: arguments, files, topology | 2 | INVALID_ARGUMENT |
| `PeerError` (`SessionError`, `NodeUnreachable`, `RemoteError`, ...) | nobody here: a peer or the network failed; retry or fail over | 3 | UNAVAILABLE (NOT_FOUND for sessions) |
| `BusyError` | nobody: the node is at a limit; back off and retry | 4 | RESOURCE_EXHAUSTED |
| anything else | edgellm: a bug | 1 | INTERNAL |

A request a peer sends that can never be served (a malformed frame, a bad route) is bad input from the
receiving node's point of view: `InputError`, and the sender gets it back as a `ConfigError`. A failed child
process (`ProcessFailed`: a node or training client edgellm started) is a `PeerError` that exits with the
child's own code where that names a kind.
"""

from __future__ import annotations


class EdgellmError(Exception):
    """Base class of the errors edgellm expects (not bugs); `exit_code` is what the CLI exits with.

    An error a node answered a call with (`edgellm.net.rpc_status.error_from`) also says where the failure began:
    `origin` is the failure's own message, naming the node where it happened, and `relays` the nodes that passed
    it on towards this caller, the nearest to the failure first (empty when the called node failed itself). A
    node relays them in turn, so a failure deep in a chain reaches the user as one line naming the failing node.
    """

    exit_code = 1
    origin: str | None = None
    relays: tuple[str, ...] = ()


class InputError(EdgellmError, ValueError):
    """Bad input: arguments, files, a topology, or a request a peer sent that can never be served."""

    exit_code = 2


class ModelError(InputError):
    """A model cannot be found, fetched, converted or loaded, or its architecture is unsupported."""


class ConfigError(InputError):
    """A configuration value (cuts, sampling, topology, a request's fields, ...) is invalid."""


class PeerError(EdgellmError):
    """A peer or the network failed (unreachable, timed out, answered wrongly): retry, or fail over."""

    exit_code = 3


class SessionError(PeerError):
    """A request names a session the stage does not hold (expired, closed, or the node restarted)."""


class BusyError(EdgellmError):
    """A node is at one of its limits (sessions, a shared adapter's turn): back off and retry."""

    exit_code = 4


class ProcessFailed(PeerError):
    """A process edgellm started (a node, a training client) exited, or never became ready.

    A child process is a peer of the one that started it, so this is a `PeerError` (rerun, or resume). But a
    child is an `edgellm` command itself, and where its exit code names another kind (1 a bug, 2 bad input,
    4 busy), `exit_code` is the child's: a node that rejected its topology still tells the user to fix it.
    """

    def __init__(self, message: str, child_exit_code: int | None = None) -> None:
        super().__init__(message)
        self.child_exit_code = child_exit_code
        if child_exit_code is not None and child_exit_code in (1, InputError.exit_code, BusyError.exit_code):
            self.exit_code = child_exit_code
