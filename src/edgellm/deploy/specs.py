"""The parts of a deployment topology: model split, nodes, links, security and limits, each a frozen spec.

Each spec validates itself on construction and raises `ConfigError("<field>: <problem>")`; the topology parser
prefixes the file name and the table's path, giving "deploy.toml: nodes[1].role: unknown role 'edgee'; ...".
Cross-references between specs (route, links, cuts vs route) are checked by
`edgellm.deploy.topology.Topology`.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgellm.deploy.document import Table
from edgellm.deploy.presets import get_preset
from edgellm.engine.select import ENGINES
from edgellm.errors import ConfigError
from edgellm.model.stage import HEAD_PLACEMENTS
from edgellm.net.codec import CodecSpec
from edgellm.net.link import LinkProfile
from edgellm.privacy.config import DEFAULT_DELTA, DP_KEYS, DPConfig
from edgellm.quant.scheme import parse_quant
from edgellm.split.budget import NodeEmulation

ROLES = ("cloud", "device", "edge")
SERVER_ROLES = ("cloud", "edge")  # they listen and run server stages; the device dials them
DTYPE_NAMES = (
    "bf16",
    "fp16",
    "fp32",
)  # the keys of edgellm.serve.local_engine.DTYPES, without importing the engine
TOKEN_KEYS = {"token_env": "env", "token_file": "file", "token": "inline"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]\s]+)):(?P<port>\d+)")


def parse_address(text: str) -> tuple[str, int]:
    """`"127.0.0.1:50061"` -> `("127.0.0.1", 50061)`; IPv6 is bracketed: `"[::1]:50061"` -> `("::1", 50061)`.

    Raises:
        ConfigError: not `host:port`, or the port is outside 1..65535.
    """
    match = _HOST_PORT.fullmatch(text)
    if match is None:
        raise ConfigError(f"expected host:port (IPv6 as [::1]:port), got {text!r}")
    host = match["v6"] or match["host"]
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{host!r} in {text!r} is not an IPv6 address") from None
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range 1..65535")
    return host, port


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IPs (127.0.0.0/8, ::1); False for every other name or address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ModelSpec:
    """The model and how it is split: `cuts[i]` is the first layer of `route[i + 1]`.

    A first cut of 0 gives the device no layers: `route[1]` starts at layer 0 and holds the embedding, so
    token ids cross the first link (a thin client, e.g. a cloud-only baseline), unless `embed = "device"`: then
    the device keeps the embedding alone and only hidden states leave it. `embed = "auto"` (the default) is
    "device" unless the first cut is 0.
    """

    name: str
    cuts: tuple[int, ...]
    dtype: str = "fp32"
    head: str = "device"
    quant: str = "none"  # every node's stages, unless the node says otherwise (edgellm.quant.scheme.parse_quant)
    embed: str = "auto"  # where the token embedding runs: auto | device (see above)
    engine: str = "fast"  # what runs the decoder blocks: fast | generic (edgellm.engine.select)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("name: must not be empty")
        _check_quant(self.quant)
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype: unknown dtype {self.dtype!r}; choose from {list(DTYPE_NAMES)}")
        if self.head not in HEAD_PLACEMENTS:
            raise ConfigError(f"head: unknown head placement {self.head!r}; choose from {sorted(HEAD_PLACEMENTS)}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: unknown engine {self.engine!r}; choose from {list(ENGINES)}")
        if self.embed not in ("auto", "device"):
            raise ConfigError(f"embed: must be 'auto' or 'device', got {self.embed!r}")
        if self.embed == "device" and self.cuts and self.cuts[0] != 0:
            raise ConfigError("embed: 'device' is for a first cut of 0 (the device keeps the embedding alone)")
        if any(c < 0 for c in self.cuts):
            raise ConfigError(f"cuts: layer indices must be >= 0, got {list(self.cuts)}")
        if any(b <= a for a, b in zip(self.cuts, self.cuts[1:])):
            raise ConfigError(f"cuts: must be strictly increasing, got {list(self.cuts)}")


def _check_quant(text: str) -> None:
    try:
        parse_quant(text)
    except ConfigError as exc:
        raise ConfigError(f"quant: {exc}") from None


@dataclass(frozen=True)
class NodeSpec:
    """One process of the deployment (`edgellm node --name NAME`), listening on `address`.

    Attributes:
        name: unique; letters, digits, `_.-`. The `--name` of `edgellm node`.
        role: one of `ROLES`.
        address: `host:port` the node listens on. Servers (edge/cloud) need one: the device and upstream
            servers dial it. Optional for the device, where it is what clients (`edgellm run`) dial.
        threads: torch intra-op threads for this node's stages.
        memory_mb: the node process's whole memory budget in MB (10^6 bytes): runtime, stage weights, KV cache
            of its sessions at `max_context`, activations (`edgellm.deploy.memory_budget`). The node refuses to
            start when they would not fit, and refuses a session that would pass it. None for no limit.
        quant: weight quantization of this node's stages (`int8`, `int4-g64,head=int8`, `none`, ...); None
            means the model's `quant`.
        compute_scale: the node's stage computations take this many times what they measure on this machine
            (>= 1.0), to emulate a slower device.
        preset: the named preset (`edgellm.deploy.presets.PRESETS`) the node's capabilities started from; the
            parser has already applied it (explicit keys override it), so it is kept for reports only.
        replica_of: a server on the route whose stage this node also runs (a replica: the device routes sessions
            to either, and fails over between them); None for a node on the route.
    """

    name: str
    role: str
    address: str | None = None
    threads: int = 1
    memory_mb: int | None = None
    quant: str | None = None
    compute_scale: float = 1.0
    preset: str | None = None
    replica_of: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"name: {self.name!r} must be letters, digits, '_', '.' or '-', starting alnum")
        if self.role not in ROLES:
            raise ConfigError(f"role: unknown role {self.role!r}; choose from {sorted(ROLES)}")
        if self.address is None and self.is_server:
            raise ConfigError(f"address: a {self.role} node needs a host:port to listen on")
        if self.address is not None:
            try:
                parse_address(self.address)
            except ConfigError as exc:
                raise ConfigError(f"address: {exc}") from None
        if self.threads < 1:
            raise ConfigError(f"threads: must be >= 1, got {self.threads}")
        if self.memory_mb is not None and self.memory_mb < 1:
            raise ConfigError(f"memory_mb: must be >= 1, got {self.memory_mb}")
        if not (math.isfinite(self.compute_scale) and self.compute_scale >= 1.0):
            raise ConfigError(f"compute_scale: must be a number >= 1.0, got {self.compute_scale}")
        if self.preset is not None:
            try:
                get_preset(self.preset)
            except ConfigError as exc:
                raise ConfigError(f"preset: {exc}") from None
        if self.quant is not None:
            _check_quant(self.quant)

    @property
    def is_server(self) -> bool:
        return self.role in SERVER_ROLES

    @property
    def emulation(self) -> NodeEmulation:
        """The slower device this node stands for (what its stage hosts and reports use)."""
        return NodeEmulation(self.compute_scale, self.memory_mb, self.preset)

    @property
    def host_port(self) -> tuple[str, int] | None:
        """`(host, port)` of `address` (IPv6 unbracketed), or None when there is none."""
        return None if self.address is None else parse_address(self.address)


@dataclass(frozen=True)
class LinkSpec:
    """An undirected link between nodes `a` and `b`, emulated by the transport.

    "Up" is the direction away from the device along the route (`Topology.direction`); `profile.up_mbps`
    applies to it and `profile.down_mbps` to the way back. `profile_name` is the named profile the numbers
    started from (fields given explicitly in the file override it). `dp`: differential privacy on the smashed data
    the device sends over this link (only on the link from the device to the first server; `link_dp`).
    """

    a: str
    b: str
    profile: LinkProfile
    profile_name: str = "none"
    codec: CodecSpec = CodecSpec()
    dp: DPConfig | None = None

    def __post_init__(self) -> None:
        if self.a == self.b:
            raise ConfigError(f"between: a link joins two different nodes, got {self.a!r} twice")

    def joins(self, x: str, y: str) -> bool:
        """True when this link is between `x` and `y`, in either order."""
        return {self.a, self.b} == {x, y}

    def other(self, name: str) -> str:
        """The far end of the link seen from `name`."""
        if name not in (self.a, self.b):
            raise ConfigError(f"node {name!r} is not an end of link {self.a}<->{self.b}")
        return self.b if name == self.a else self.a


@dataclass(frozen=True)
class TokenSource:
    """Where the shared secret comes from: an env var name, a file path, or (tests only) the secret itself."""

    kind: Literal["env", "file", "inline"]
    value: str = field(repr=False)  # repr=False: an inline secret must not reach logs

    def __post_init__(self) -> None:
        if self.kind not in TOKEN_KEYS.values():
            raise ConfigError(f"unknown token source {self.kind!r}; choose from {sorted(TOKEN_KEYS.values())}")
        if not self.value:
            raise ConfigError(f"{self.key}: must not be empty")

    @property
    def key(self) -> str:
        """The TOML key this source is written as."""
        return next(k for k, v in TOKEN_KEYS.items() if v == self.kind)

    def read(self) -> str:
        """The secret, read now from the env var or file (surrounding whitespace stripped).

        Raises:
            ConfigError: "<key>: <problem>": the env var is unset or empty, the file unreadable or empty.
        """
        if self.kind == "inline":
            return self.value
        if self.kind == "env":
            secret = os.environ.get(self.value, "").strip()
            if not secret:
                raise ConfigError(f"{self.key}: environment variable {self.value} is not set or empty")
            return secret
        try:
            secret = Path(self.value).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{self.key}: cannot read {self.value}: {exc.strerror or exc}") from None
        if not secret:
            raise ConfigError(f"{self.key}: {self.value} is empty")
        return secret


@dataclass(frozen=True)
class TLSSpec:
    """Certificates (absolute, or relative to the working directory) every server presents and clients check.

    Attributes:
        cert, key: PEM certificate chain and private key every server presents (and, with client_auth, the
            client certificate the nodes present when they dial).
        ca: PEM CA bundle to verify peers with; None means the system trust store.
        client_auth: servers also require and verify a client certificate (needs `ca`).
    """

    cert: Path
    key: Path
    ca: Path | None = None
    client_auth: bool = False

    def __post_init__(self) -> None:
        if self.client_auth and self.ca is None:
            raise ConfigError("ca: client_auth = true needs a CA bundle to verify clients with")

    def check_files(self) -> None:
        """Raises ConfigError ("<cert|key|ca>: file ... not found") for the first file that does not exist."""
        for key, path in (("cert", self.cert), ("key", self.key), ("ca", self.ca)):
            if path is not None and not path.is_file():
                raise ConfigError(f"{key}: file {str(path)!r} not found")


@dataclass(frozen=True)
class Security:
    """Authentication (a shared secret) and transport encryption (TLS); both optional."""

    token: TokenSource | None = None
    tls: TLSSpec | None = None


@dataclass(frozen=True)
class Limits:
    """Per-node serving limits: request deadline, concurrent sessions, idle session expiry, and the longest
    context (prompt + generated tokens) a session may reach, which every node reserves KV cache for."""

    deadline_s: float = 30.0
    max_sessions: int = 64
    idle_timeout_s: float = 600.0
    max_context: int = 2048

    def __post_init__(self) -> None:
        if not self.deadline_s > 0:
            raise ConfigError(f"deadline_s: must be > 0, got {self.deadline_s}")
        if self.max_sessions < 1:
            raise ConfigError(f"max_sessions: must be >= 1, got {self.max_sessions}")
        if not self.idle_timeout_s > 0:
            raise ConfigError(f"idle_timeout_s: must be > 0, got {self.idle_timeout_s}")
        if self.max_context < 1:
            raise ConfigError(f"max_context: must be >= 1, got {self.max_context}")


CONTROL_OBJECTIVES = ("latency", "ttft", "throughput")  # edgellm.plan.placement.OBJECTIVES


@dataclass(frozen=True)
class ControlSpec:
    """The `[control]` table: whether the device re-plans while it runs, and on what.

    Attributes:
        replan: the device watches its links (from its own traffic), re-plans when one departs from the profile
            by more than `hysteresis` (relative) for `min_samples` steps in a row, and migrates live when the
            new plan is better by `margin` (relative).
        profile: the profile the deployment was planned with (`edgellm profile`); needed by `replan`.
        objective, max_ppl_increase: as `edgellm plan`'s options (None: no cap).
    """

    replan: bool = False
    profile: Path | None = None
    objective: str = "latency"
    max_ppl_increase: float | None = None
    hysteresis: float = 0.5
    margin: float = 0.1
    min_samples: int = 3

    def __post_init__(self) -> None:
        if self.replan and self.profile is None:
            raise ConfigError("profile: replan = true needs the profile the deployment was planned with")
        if self.objective not in CONTROL_OBJECTIVES:
            raise ConfigError(f"objective: unknown {self.objective!r}; choose from {list(CONTROL_OBJECTIVES)}")
        if self.max_ppl_increase is not None and not self.max_ppl_increase >= 0:
            raise ConfigError(f"max_ppl_increase: must be >= 0, got {self.max_ppl_increase}")
        if not self.hysteresis > 0:
            raise ConfigError(f"hysteresis: must be > 0, got {self.hysteresis}")
        if not self.margin >= 0:
            raise ConfigError(f"margin: must be >= 0, got {self.margin}")
        if self.min_samples < 1:
            raise ConfigError(f"min_samples: must be >= 1, got {self.min_samples}")


def link_dp(link: Table) -> DPConfig | None:
    """A link's optional `dp = {clip = 4.0, noise = 0.5, delta = 1e-5, max_epsilon = 8.0, seed = 1}` table."""
    if "dp" not in link:
        return None
    t = link.table("dp", set(DP_KEYS))
    values = (t.number("clip"), t.number("noise"), t.number("delta", DEFAULT_DELTA), t.number("max_epsilon", None),
              t.number("grad_clip", None), t.integer("seed", None))  # fmt: skip
    with link.at("dp"):
        return DPConfig(*values)
