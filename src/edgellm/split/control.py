"""The control channel's ops: a registry of named ops with typed fields, and the ops every node answers.

A `Control` call (`edgellm.net.rpc`) carries one JSON object `{"op": NAME, field: value, ...}` and is answered
with one. Each node holds a `ControlOps` registry; `dispatch` refuses an unknown op or field with a
`ConfigError` that names the valid ones, fills in defaults, and runs the op. Every node answers:

- `echo` (`payload`: base64, `reply_bytes`: int): `{"payload": base64 of reply_bytes bytes}` (`edgellm.net.probe`);
- `info`: what `Info` answers;
- `probe_link` (`to`, `sizes`, `repeats`): times echoes through this node's link to `to`, the link's emulation
  included: each size up with the smallest size down, and the smallest up with each size down, `repeats` times
  each; answers `{"from", "to", "profile", "samples": [[up_bytes, down_bytes, seconds], ...]}`;
- `set_link` (`to`, `profile_name` and/or `profile`, `seed`): replaces the emulation of this node's link to `to`
  from its next message on, and answers `{"to", "profile"}`.
- `ping_peer` (`to`, `timeout_s`): calls `Info` of this node's hop to `to` as its own traffic would (the address,
  token and TLS this node dials it with, no link emulation) and answers `{"from", "to", "ms", "info"}`; a peer that
  refuses this node's token or does not answer fails the op with that error, relayed naming the peer
  (`edgellm check` asks each node so, to find a token mismatch between nodes before the first prompt).

Stage servers add `load_stage` (`edgellm.deploy.reconfigure`), the device adds `migrate`
(`edgellm.serve.migration`); other ops register by name with `ControlOps.register`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from edgellm.errors import ConfigError
from edgellm.net.link import EmulatedLink, LinkProfile, profile
from edgellm.net.probe import echo

OpHandler = Callable[[dict[str, Any]], dict[str, Any]]
LINK_FIELDS = tuple(f.name for f in dataclasses.fields(LinkProfile))
MAX_PROBE_SIZES = 16
MAX_PROBE_REPEATS = 50


@dataclass(frozen=True)
class Field:
    """One field of an op: its JSON type (`float` also takes ints), whether it must be given, its default.
    A JSON null counts as absent."""

    kind: type | tuple[type, ...]
    required: bool = False
    default: Any = None


@dataclass(frozen=True)
class ControlOp:
    handler: OpHandler
    fields: Mapping[str, Field]


class ControlOps:
    """A node's control ops by name."""

    def __init__(self) -> None:
        self._ops: dict[str, ControlOp] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self._ops)

    def register(self, name: str, handler: OpHandler, fields: Mapping[str, Field] | None = None) -> None:
        """Add (or replace) op `name`; `handler` gets the request's fields, defaults filled in, without "op"."""
        self._ops[name] = ControlOp(handler, dict(fields or {}))

    def dispatch(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Check `request` against its op's fields and run the op.

        Raises:
            ConfigError: no or an unknown op, an unknown or missing field, a field of the wrong type; or
                whatever the op raises.
        """
        name = request.get("op")
        op = self._ops.get(name) if isinstance(name, str) else None
        if op is None or not isinstance(name, str):
            raise ConfigError(f"unknown control op {name!r}; choose from {self.names}")
        unknown = set(request) - set(op.fields) - {"op"}
        if unknown:
            raise ConfigError(f"unknown fields {sorted(unknown)} for control op {name!r}; valid: {sorted(op.fields)}")
        values = {key: _checked(name, key, request.get(key), field) for key, field in op.fields.items()}
        return op.handler(values)


def _checked(op: str, key: str, value: Any, field: Field) -> Any:
    if value is None:
        if field.required:
            raise ConfigError(f"control op {op!r} needs field {key!r}")
        return field.default
    kinds = field.kind if isinstance(field.kind, tuple) else (field.kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"control op {op!r}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


class LinkedHop(Protocol):
    """A hop that goes through an emulated link and can time an echo through it (`edgellm.net.rpc.RemoteHop`)."""

    name: str
    link: EmulatedLink | None

    def probe(self, up_bytes: int, down_bytes: int, timeout_s: float | None = None) -> float: ...


def node_ops(name: str, info: Callable[[], dict[str, Any]], hops: Callable[[], Mapping[str, Any]]) -> ControlOps:
    """The ops every node answers: `echo`, `info`, and `probe_link`/`set_link` on the links of `hops()` (this
    node's current hops by receiver name; those without a link emulation cannot be probed or set)."""
    ops = ControlOps()
    ops.register("echo", lambda r: echo(r["payload"], r["reply_bytes"]),
                 {"payload": Field(str, default=""), "reply_bytes": Field(int, default=0)})  # fmt: skip
    ops.register("info", lambda r: info())
    ops.register(
        "probe_link",
        lambda r: probe_link(name, linked_hop(name, hops(), r["to"]), r["sizes"], r["repeats"]),
        {"to": Field(str, required=True), "sizes": Field(list, default=[64, 65536]), "repeats": Field(int, default=3)},
    )
    ops.register(
        "set_link",
        lambda r: set_link(linked_hop(name, hops(), r["to"]), r["profile_name"], r["profile"], r["seed"]),
        {"to": Field(str, required=True), "profile_name": Field(str), "profile": Field(dict), "seed": Field(int, default=0)},
    )  # fmt: skip
    ops.register("ping_peer", lambda r: ping_peer(name, hops(), r["to"], r["timeout_s"]),
                 {"to": Field(str, required=True), "timeout_s": Field(float, default=5.0)})  # fmt: skip
    return ops


def ping_peer(node: str, hops: Mapping[str, Any], to: str, timeout_s: float) -> dict[str, Any]:
    """`Info` of `node`'s hop to `to`, asked as `node`'s own traffic goes (its address for `to`, its token).

    Raises:
        ConfigError: no hop to `to`, an in-process hop, a timeout outside (0, 60] s.
        AuthError, PeerError: `to` refused `node`'s token, or did not answer (relayed to the caller, naming `to`).
    """
    if not 0 < timeout_s <= 60:
        raise ConfigError(f"ping_peer timeout_s must be in (0, 60], got {timeout_s}")
    hop = hops.get(to)
    if hop is None:
        raise ConfigError(f"node {node} has no link to {to!r}; it has links to {sorted(hops)}")
    if not hasattr(hop, "info"):
        raise ConfigError(f"node {node}'s hop to {to!r} runs in-process: there is no peer to ping")
    start = time.perf_counter()
    info = hop.info(timeout_s=timeout_s)
    return {"from": node, "to": to, "ms": round((time.perf_counter() - start) * 1e3, 3), "info": info}


def linked_hop(node: str, hops: Mapping[str, Any], to: str) -> LinkedHop:
    """The hop of `node` to `to`. Raises ConfigError naming the links `node` has."""
    hop = hops.get(to)
    if hop is None:
        raise ConfigError(f"node {node} has no link to {to!r}; it has links to {sorted(hops)}")
    if not hasattr(hop, "probe"):
        raise ConfigError(f"node {node}'s hop to {to!r} runs in-process: it has no link to probe or emulate")
    return hop  # type: ignore[no-any-return]


def probe_link(sender: str, hop: LinkedHop, sizes: list[Any], repeats: int) -> dict[str, Any]:
    """Time echoes through `hop`: each size up with the smallest down, the smallest up with each size down.

    A line through the first kind gives the "up" direction's cost per byte, through the second the "down"
    direction's; their intercepts are the round trip. Samples are `[up_bytes, down_bytes, seconds]`, `repeats`
    per pair, the pairs interleaved so a drift in the machine's load spreads over all of them.

    Raises:
        ConfigError: sizes that are not 1..MAX_PROBE_SIZES byte counts, repeats out of 1..MAX_PROBE_REPEATS.
    """
    if not 1 <= repeats <= MAX_PROBE_REPEATS:
        raise ConfigError(f"probe_link repeats must be in 1..{MAX_PROBE_REPEATS}, got {repeats}")
    if not 1 <= len(sizes) <= MAX_PROBE_SIZES or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise ConfigError(f"probe_link takes 1..{MAX_PROBE_SIZES} sizes in bytes, got {sizes!r}")
    small = min(sizes)
    pairs = list(dict.fromkeys([*((s, small) for s in sizes), *((small, s) for s in sizes)]))
    samples = [[up, down, hop.probe(up, down)] for _ in range(repeats) for up, down in pairs]
    return {"from": sender, "to": hop.name, "profile": profile_json(hop.link), "samples": samples}


def set_link(hop: LinkedHop, profile_name: str | None, fields: Mapping[str, Any] | None, seed: int) -> dict[str, Any]:
    """Replace `hop`'s link emulation: the named profile (else the current one) with `fields` over it.

    Takes effect from the hop's next message (a message in flight finishes on the old link). In `fields`,
    `null` bandwidth means unlimited.

    Raises:
        ConfigError: neither a profile name nor fields, an unknown profile or field, an invalid value.
    """
    if profile_name is None and fields is None:
        raise ConfigError("set_link needs profile_name, profile (fields over the current profile), or both")
    base = profile(profile_name) if profile_name is not None else current_profile(hop.link)
    overrides = dict(fields or {})
    unknown = set(overrides) - set(LINK_FIELDS)
    if unknown:
        raise ConfigError(f"unknown link profile fields {sorted(unknown)}; valid: {list(LINK_FIELDS)}")
    for key, value in overrides.items():
        if value is None and key.endswith("_mbps"):
            overrides[key] = math.inf
        elif not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"link profile field {key!r} must be a number, got {value!r}")
    new = dataclasses.replace(base, **overrides)  # LinkProfile checks the values
    hop.link = EmulatedLink(new, seed=seed)
    return {"to": hop.name, "profile": profile_json(hop.link)}


def current_profile(link: EmulatedLink | None) -> LinkProfile:
    """The profile a link emulates; no emulation is the `none` profile."""
    return profile("none") if link is None else link.profile


def profile_json(link: EmulatedLink | None) -> dict[str, Any]:
    """A link's profile as JSON: unlimited bandwidth is `null` (JSON has no infinity)."""
    values = dataclasses.asdict(current_profile(link))
    return {key: None if value == math.inf else value for key, value in values.items()}


def link_profiles(hops: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The emulated profile of each linked hop, for `Info` and reports: `[{"to", "profile"}]`."""
    return [{"to": name, "profile": profile_json(hop.link)} for name, hop in hops.items() if hasattr(hop, "probe")]
