"""The validated deployment: which nodes run a split model, in what order, over which links, with which replicas.

Invariants of a `Topology` (checked on construction):
- node names are unique; every node is on `route` once, or is a replica (`replica_of`) of a server on it;
  `route[0]` is the only device;
- servers (edge/cloud) have an address; all addresses are distinct `host:port`s;
- `len(model.cuts) == len(route) - 1`: `route[i]` runs layers `[cuts[i-1], cuts[i])` (none if that is empty); a
  replica runs its primary's layers;
- every hop the mode uses has a link: chain needs `route[i] <-> route[i+1]` for every i, star needs
  `route[0] <-> s` for every server s. Other links between nodes of the route may be declared too (a planner may
  choose another order of the nodes); "up" on any link is away from the device in route order. A replica uses
  its primary's links unless a link names it;
- without a shared secret, every node must listen on a loopback address.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from edgellm.deploy.specs import ControlSpec, Limits, LinkSpec, ModelSpec, NodeSpec, Security, is_loopback
from edgellm.errors import ConfigError
from edgellm.model.stage import StageSpec, chain_stages

MODES = {
    "chain": "in-network: the device calls route[1], each server forwards to the next; replies retrace it",
    "star": "the device calls each server in route order and carries the hidden states between them",
}


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
        if self.control.replan and any(n.replica_of for n in self.nodes):
            self._fail("control.replan", "live re-planning does not move stage replicas yet; turn one of them off")
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
            if node.replica_of is not None:
                self._check_replica(i, node, names)
            elif node.name not in self.route:
                self._fail(f"nodes[{i}].name", f"node {node.name!r} is not on deployment.route (nor a replica_of one)")
        if self.mode not in MODES:
            self._fail("deployment.mode", f"unknown mode {self.mode!r}; choose from {sorted(MODES)}")

    def _check_replica(self, i: int, node: NodeSpec, names: dict[str, NodeSpec]) -> None:
        primary = names.get(node.replica_of or "")
        servers = self.route[1:]
        if node.name in self.route:
            self._fail(f"nodes[{i}].replica_of", f"{node.name!r} is on deployment.route; a replica is not")
        if primary is None or primary.name not in servers:
            self._fail(f"nodes[{i}].replica_of", f"{node.replica_of!r} is not a server on deployment.route; "
                       f"choose from {list(servers)}")  # fmt: skip
        if not node.is_server:
            self._fail(f"nodes[{i}].role", f"a replica serves a stage, so it is an edge or cloud node, not {node.role}")

    def _check_links(self) -> None:
        device, servers = self.route[0], self.route[1:]
        hops = zip(self.route, self.route[1:]) if self.mode == "chain" else ((device, s) for s in servers)
        needed = [frozenset(hop) for hop in hops]
        found: dict[frozenset[str], int] = {}
        known = [node.name for node in self.nodes]
        for i, link in enumerate(self.links):
            pair = frozenset((link.a, link.b))
            for end in (link.a, link.b):
                if end not in known:
                    self._fail(f"links[{i}].between", f"unknown node {end!r}; choose from {sorted(known)}")
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

    def primary(self, name: str) -> str:
        """The node on the route whose stage `name` runs: itself, or what it is a replica of."""
        return self.node(name).replica_of or name

    def replicas(self, name: str) -> tuple[NodeSpec, ...]:
        """Every node that runs route node `name`'s stage: `name` first, then its replicas in file order."""
        return (self.node(name), *(n for n in self.nodes if n.replica_of == name))

    @property
    def has_replicas(self) -> bool:
        return any(n.replica_of is not None for n in self.nodes)

    def node(self, name: str) -> NodeSpec:
        """The node called `name`. Raises ConfigError naming the valid names."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise ConfigError(f"{self.source}: no node {name!r}; choose from {sorted(n.name for n in self.nodes)}")

    def link_between(self, a: str, b: str) -> LinkSpec:
        """The link joining `a` and `b`, in either order: one naming them, else (for a replica) its primary's.

        Raises ConfigError when there is none.
        """
        for pair in ((a, b), (self.primary(a), b), (a, self.primary(b)), (self.primary(a), self.primary(b))):
            for link in self.links:
                if link.joins(*pair):
                    return link
        raise ConfigError(f"{self.source}: no link between {a!r} and {b!r}")

    def direction(self, sender: str, receiver: str) -> str:
        """`"up"` when `sender -> receiver` goes away from the device along the route, else `"down"`: the
        direction to pass to `EmulatedLink.send`, and which of `profile.up_mbps`/`down_mbps` applies.

        Raises:
            ConfigError: there is no link between them.
        """
        self.link_between(sender, receiver)
        return "up" if self.route.index(self.primary(sender)) < self.route.index(self.primary(receiver)) else "down"

    def next_hop(self, name: str) -> NodeSpec | None:
        """Where `name` sends its stage output.

        Chain mode: the next node on the route (None for the last, whose reply retraces the chain). Star mode:
        `route[1]` for the device (it then calls the other servers itself), None for every server (each
        replies to the device only).
        """
        i = self.route.index(self.primary(name))
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
        """The stages node `name` runs, in execution order (the device may run two: first and head; a replica
        runs its primary's)."""
        primary = self.primary(name)
        return [spec for owner, spec in self.stage_assignment(num_layers) if owner == primary]

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
