"""The deployment topology: which nodes run a split model, in what order, over which emulated links.

One TOML file (schema in docs/TOPOLOGY.md) describes a whole deployment; every node process loads the same
file and picks out its own part by name. `parse_topology` is the pure core (a dict in, a validated `Topology`
out); `load_topology` adds the file reading and `write_topology` the writing. Every problem is a `ConfigError`
naming the file, the field path (`nodes[1].address`, `links[0].profile`) and what is wrong; unknown keys are
errors, so a typo is never silently ignored.

Invariants of a `Topology` (checked on construction):
- node names are unique; every node is on `route`, once; `route[0]` is the only device;
- servers (edge/cloud) have an address; all addresses are distinct `host:port`s;
- `len(model.cuts) == len(route) - 1`: `route[i]` runs layers `[cuts[i-1], cuts[i])` (none if that is empty);
- every hop the mode uses has a link: chain needs `route[i] <-> route[i+1]` for every i, star needs
  `route[0] <-> s` for every server s. Other links between nodes of the route may be declared too (a planner may
  choose another order of the nodes); "up" on any link is away from the device in route order;
- without a shared secret, every node must listen on a loopback address.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from edgellm.deploy.document import Table, render_toml
from edgellm.deploy.presets import get_preset
from edgellm.deploy.specs import (
    TOKEN_KEYS,
    ControlSpec,
    Limits,
    LinkSpec,
    ModelSpec,
    NodeSpec,
    Security,
    TLSSpec,
    TokenSource,
    is_loopback,
    link_dp,
)
from edgellm.errors import ConfigError
from edgellm.model.stage import StageSpec, chain_stages
from edgellm.net.codec import parse_codec
from edgellm.net.link import profile

MODES = {
    "chain": "in-network: the device calls route[1], each server forwards to the next; replies retrace it",
    "star": "the device calls each server in route order and carries the hidden states between them",
}

# The schema: the keys each table may hold (anything else is an error).
TOP_KEYS = {"model", "deployment", "nodes", "links", "control"}
CONTROL_KEYS = {"replan", "profile", "objective", "max_ppl_increase", "hysteresis", "margin", "min_samples"}
MODEL_KEYS = {"name", "dtype", "cuts", "head", "quant", "embed", "engine"}
DEPLOYMENT_KEYS = {"route", "mode", "deadline_s", "max_sessions", "idle_timeout_s", "max_context", "tls", *TOKEN_KEYS}
TLS_KEYS = {"cert", "key", "ca", "client_auth"}
NODE_KEYS = {"name", "role", "address", "threads", "memory_mb", "quant", "compute_scale", "preset"}
LINK_NUMBERS = ("up_mbps", "down_mbps", "rtt_ms", "jitter_ms", "loss_pct")  # override the profile's fields
LINK_KEYS = {"between", "profile", "codec", "dp", *LINK_NUMBERS}  # dp: edgellm.deploy.specs.link_dp


@dataclass(frozen=True)
class Topology:
    """A validated deployment (invariants in the module docstring). Build it with `parse_topology`.

    Attributes:
        model: the model and its cuts. nodes, links: every node and link, in file order.
        route: node names, the device first, then the servers in the order the hidden states visit them.
        mode: one of `MODES`. security: secret source and TLS files. limits: deadline and session limits.
        source: the file name; it prefixes every error this topology raises.
        control: the `[control]` table: live re-planning on the device (off by default).
    """

    model: ModelSpec
    nodes: tuple[NodeSpec, ...]
    links: tuple[LinkSpec, ...]
    route: tuple[str, ...]
    mode: str = "chain"
    security: Security = Security()
    limits: Limits = Limits()
    source: str = "<topology>"
    control: ControlSpec = ControlSpec()

    def __post_init__(self) -> None:
        self._check_nodes()
        self._check_route()
        self._check_links()
        if len(self.model.cuts) != len(self.route) - 1:
            self._fail(
                "model.cuts",
                f"{len(self.model.cuts)} cut(s) for a route of {len(self.route)} nodes; "
                f"need {len(self.route) - 1} (one per hop; a first cut of 0 gives the device no layers)",
            )
        if self.security.token is None:
            for i, node in enumerate(self.nodes):
                host_port = node.host_port
                if host_port is not None and not is_loopback(host_port[0]):
                    self._fail(
                        f"nodes[{i}].address",
                        f"{node.address} is not a loopback address, so the deployment needs a shared secret: "
                        "set deployment.token_env or deployment.token_file",
                    )

    def _fail(self, path: str, problem: str) -> NoReturn:
        raise ConfigError(f"{self.source}: {path}: {problem}")

    def _check_nodes(self) -> None:
        seen: dict[str, int] = {}
        listening: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            if node.name in seen:
                self._fail(f"nodes[{i}].name", f"duplicate node {node.name!r} (also nodes[{seen[node.name]}])")
            seen[node.name] = i
            if node.address is not None:
                if node.address in listening:
                    self._fail(f"nodes[{i}].address", f"{node.address} is also nodes[{listening[node.address]}]'s")
                listening[node.address] = i

    def _check_route(self) -> None:
        names = {node.name: node for node in self.nodes}
        if not self.route:
            self._fail("deployment.route", "needs at least the device")
        for i, name in enumerate(self.route):
            if name not in names:
                self._fail(f"deployment.route[{i}]", f"unknown node {name!r}; choose from {sorted(names)}")
            if name in self.route[:i]:
                self._fail(f"deployment.route[{i}]", f"{name!r} appears more than once")
            role = names[name].role
            if i == 0 and role != "device":
                self._fail("deployment.route[0]", f"{name!r} is a {role} node; the route starts at the device")
            if i > 0 and role == "device":
                self._fail(f"deployment.route[{i}]", f"{name!r} is a device; only route[0] may be one")
        for i, node in enumerate(self.nodes):
            if node.name not in self.route:
                self._fail(f"nodes[{i}].name", f"node {node.name!r} is not on deployment.route")
        if self.mode not in MODES:
            self._fail("deployment.mode", f"unknown mode {self.mode!r}; choose from {sorted(MODES)}")

    def _check_links(self) -> None:
        device, servers = self.route[0], self.route[1:]
        hops = zip(self.route, self.route[1:]) if self.mode == "chain" else ((device, s) for s in servers)
        needed = [frozenset(hop) for hop in hops]
        found: dict[frozenset[str], int] = {}
        for i, link in enumerate(self.links):
            pair = frozenset((link.a, link.b))
            for end in (link.a, link.b):
                if end not in self.route:
                    self._fail(f"links[{i}].between", f"unknown node {end!r}; choose from {sorted(self.route)}")
            if pair in found:
                self._fail(f"links[{i}].between", f"{link.a}<->{link.b} is also links[{found[pair]}]")
            found[pair] = i  # a link no hop of this mode uses is allowed: another order of the nodes may use it
        for pair in needed:
            if pair not in found:
                a, b = sorted(pair, key=self.route.index)
                self._fail("links", f"no link between {a!r} and {b!r}; mode {self.mode!r} needs one per hop")

    @property
    def device(self) -> NodeSpec:
        """The device node, `route[0]`."""
        return self.node(self.route[0])

    @property
    def servers(self) -> tuple[NodeSpec, ...]:
        """The server nodes in route order, `route[1:]`."""
        return tuple(self.node(name) for name in self.route[1:])

    def node(self, name: str) -> NodeSpec:
        """The node called `name`. Raises ConfigError naming the valid names."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise ConfigError(f"{self.source}: no node {name!r}; choose from {sorted(n.name for n in self.nodes)}")

    def link_between(self, a: str, b: str) -> LinkSpec:
        """The link joining `a` and `b`, in either order. Raises ConfigError when there is none."""
        for link in self.links:
            if link.joins(a, b):
                return link
        raise ConfigError(f"{self.source}: no link between {a!r} and {b!r}")

    def direction(self, sender: str, receiver: str) -> str:
        """`"up"` when `sender -> receiver` goes away from the device along the route, else `"down"`: the
        direction to pass to `EmulatedLink.send`, and which of `profile.up_mbps`/`down_mbps` applies.

        Raises:
            ConfigError: there is no link between them.
        """
        self.link_between(sender, receiver)
        return "up" if self.route.index(sender) < self.route.index(receiver) else "down"

    def next_hop(self, name: str) -> NodeSpec | None:
        """Where `name` sends its stage output.

        Chain mode: the next node on the route (None for the last, whose reply retraces the chain). Star mode:
        `route[1]` for the device (it then calls the other servers itself), None for every server (each
        replies to the device only).
        """
        i = self.route.index(self.node(name).name)
        if i + 1 == len(self.route) or (self.mode == "star" and i > 0):
            return None
        return self.node(self.route[i + 1])

    def stage_assignment(self, num_layers: int) -> list[tuple[str, StageSpec]]:
        """The stages in execution order, each with the node that runs it (`edgellm.model.stage.chain_stages`:
        `route[i]` runs `[cuts[i-1], cuts[i])`; a first cut of 0 makes a thin device, or with `model.embed =
        "device"` an embedding-only one; `model.head` places the head).

        Raises:
            ConfigError: at `model.cuts`, when the cuts do not fit `num_layers`.
        """
        try:
            return chain_stages(num_layers, self.model.cuts, self.route[0], self.route[1:], self.model.head,  # type: ignore[arg-type]
                                self.model.embed == "device")  # fmt: skip
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: model.cuts: {exc}") from None

    def stages_for(self, name: str, num_layers: int) -> list[StageSpec]:
        """The stages node `name` runs, in execution order (the device may run two: first and head)."""
        self.node(name)
        return [spec for owner, spec in self.stage_assignment(num_layers) if owner == name]

    def resolve_token(self) -> str | None:
        """The shared secret, read now from its env var or file; None when none is configured.

        Raises:
            ConfigError: the env var is unset or empty, or the file is missing, unreadable or empty.
        """
        token = self.security.token
        try:
            return None if token is None else token.read()
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: deployment.{exc}") from None

    def check_files(self) -> None:
        """Check that the TLS files exist; the one check that needs the filesystem (`load_topology` runs it).

        Raises:
            ConfigError: at `deployment.tls.<cert|key|ca>`, naming the missing file.
        """
        try:
            if self.security.tls is not None:
                self.security.tls.check_files()
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: deployment.tls.{exc}") from None


def _parse_model(t: Table) -> ModelSpec:
    name, cuts = t.string("name"), tuple(t.integers("cuts"))
    dtype, head, quant = t.string("dtype", "fp32"), t.string("head", "device"), t.string("quant", "none")
    embed, engine = t.string("embed", "auto"), t.string("engine", "fast")
    with t.building():
        return ModelSpec(name, cuts, dtype, head, quant, embed, engine)


def _parse_node(t: Table) -> NodeSpec:
    """A node; a `preset` gives the defaults of `threads`, `memory_mb` and `compute_scale`, its own keys win."""
    name, role, address = t.string("name"), t.string("role"), t.string("address", None)
    preset_name = t.string("preset", None)
    preset = None
    if preset_name is not None:
        with t.at("preset"):
            preset = get_preset(preset_name)
    threads = t.integer("threads", preset.threads if preset else 1)
    memory_mb = t.integer("memory_mb", preset.memory_mb if preset else None)
    compute_scale = t.number("compute_scale", preset.compute_scale if preset else 1.0)
    quant = t.string("quant", None)
    with t.building():
        return NodeSpec(name, role, address, threads, memory_mb, quant, compute_scale, preset_name)


def _parse_link(t: Table) -> LinkSpec:
    between = t.strings("between")
    if len(between) != 2:
        raise t.error("between", f"must name exactly two nodes, got {between}")
    name, codec_text, dp = t.string("profile", "none"), t.string("codec", "none"), link_dp(t)
    with t.at("profile"):
        base = profile(name)
    overrides = {key: t.number(key) for key in LINK_NUMBERS if key in t}
    for key, value in overrides.items():
        if value < 0 or (value == 0 and key.endswith("_mbps")):
            raise t.error(key, f"must be {'> 0' if key.endswith('_mbps') else '>= 0'}, got {value}")
    if overrides.get("loss_pct", 0.0) >= 100:
        raise t.error("loss_pct", f"must be below 100, got {overrides['loss_pct']}")
    with t.at("profile"):
        link_profile = dataclasses.replace(base, **overrides)
    with t.at("codec"):
        codec = parse_codec(codec_text)
    with t.building():
        return LinkSpec(between[0], between[1], link_profile, name.lower(), codec, dp)


def _path(t: Table, key: str, base_dir: Path | None) -> Path:
    """A required, non-empty path field; a relative path is taken relative to `base_dir` (the TOML's dir)."""
    text = t.string(key)
    if not text:
        raise t.error(key, "must not be empty")
    path = Path(text)
    return path if path.is_absolute() or base_dir is None else base_dir / path


def _parse_security(t: Table, base_dir: Path | None) -> Security:
    given = [key for key in TOKEN_KEYS if key in t]
    if len(given) > 1:
        raise t.error(given[1], f"choose one token source, got {' and '.join(given)}")
    token = None
    if given:
        key = given[0]
        value = str(_path(t, key, base_dir)) if key == "token_file" else t.string(key)
        with t.building():
            token = TokenSource(TOKEN_KEYS[key], value)  # type: ignore[arg-type]
    tls = None
    if "tls" in t:
        s = t.table("tls", TLS_KEYS)
        cert, key_file = _path(s, "cert", base_dir), _path(s, "key", base_dir)
        ca = _path(s, "ca", base_dir) if "ca" in s else None
        with s.building():
            tls = TLSSpec(cert, key_file, ca, s.boolean("client_auth", False))
    return Security(token, tls)


def parse_topology(data: Mapping[str, Any], source: str = "<topology>", base_dir: Path | None = None) -> Topology:
    """Validate a parsed TOML document (a dict) into a `Topology`. Pure: reads no file, env var or clock.

    Args:
        data: the document, as `tomllib` returns it.
        source: the file name, prefixed to every error message.
        base_dir: the directory relative `token_file` and TLS paths are relative to (the TOML file's);
            None leaves them relative to the working directory.

    Raises:
        ConfigError: "<source>: <field path>: <problem>" for the first problem found.
    """
    top = Table(data, "", source, TOP_KEYS)
    model = _parse_model(top.table("model", MODEL_KEYS))
    dep = top.table("deployment", DEPLOYMENT_KEYS)
    nodes = tuple(_parse_node(t) for t in top.tables("nodes", NODE_KEYS))
    links = tuple(_parse_link(t) for t in top.tables("links", LINK_KEYS, required=False))
    route, mode = tuple(dep.strings("route")), dep.string("mode", "chain")
    security = _parse_security(dep, base_dir)
    deadline_s, max_sessions = dep.number("deadline_s", 30.0), dep.integer("max_sessions", 64)
    idle_timeout_s, max_context = dep.number("idle_timeout_s", 600.0), dep.integer("max_context", 2048)
    with dep.building():
        limits = Limits(deadline_s, max_sessions, idle_timeout_s, max_context)
    control = _parse_control(top.table("control", CONTROL_KEYS), base_dir) if "control" in top else ControlSpec()
    return Topology(model, nodes, links, route, mode, security, limits, source, control)


def _parse_control(t: Table, base_dir: Path | None) -> ControlSpec:
    profile_path = _path(t, "profile", base_dir) if "profile" in t else None
    cap = t.number("max_ppl_increase") if "max_ppl_increase" in t else None
    with t.building():
        return ControlSpec(t.boolean("replan", False), profile_path, t.string("objective", "latency"), cap,
                           t.number("hysteresis", 0.5), t.number("margin", 0.1), t.integer("min_samples", 3))  # fmt: skip


def load_topology(path: str | Path) -> Topology:
    """Read, parse and validate a topology file, and check that the TLS files it names exist.

    Raises:
        ConfigError: the file is missing or unreadable, is not valid TOML (the message gives line and column),
            or fails validation.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: topology file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read topology file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    topology = parse_topology(data, source=str(path), base_dir=path.parent)
    topology.check_files()
    return topology


def topology_toml(document: Mapping[str, Any]) -> str:
    """Render a topology document (the dict `parse_topology` takes) as TOML text, after validating it.

    Raises:
        ConfigError: the document is not a valid topology, or holds a value TOML cannot express.
    """
    parse_topology(document, source="<rendered topology>")
    return render_toml(document)


def write_topology(path: str | Path, document: Mapping[str, Any]) -> Topology:
    """Validate `document`, write it as TOML to `path`, and return the `Topology` it describes.

    Relative `token_file` and TLS paths in `document` are relative to `path`'s directory, as when loaded.
    """
    path = Path(path)
    text = render_toml(document)
    topology = parse_topology(tomllib.loads(text), source=str(path), base_dir=path.parent)
    path.write_text(text, encoding="utf-8")
    return topology
