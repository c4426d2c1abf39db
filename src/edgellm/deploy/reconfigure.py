"""Reconfigure a running chain deployment: a server loads another stage (`load_stage`), and the device moves the
whole deployment to a new layout (`DeviceReconfigurer`, the `Rebuilder` of `edgellm.serve.migration`).

Order of a migration, from the device: check the layout against the topology (every server on the route, a
link for every hop of the chain, cuts that fit the model, known weight schemes); send `load_stage` to every
server whose stage, scheme or next hop changes, all at once; meanwhile load the device's own changed stages;
then build the device's hops (its first stage, one `RemoteHop` to the first server with the rest of the route,
its head stage). A server loads first and swaps after, so it serves its old stage until the new one is ready;
the swap drops every session of the old stage (their KV caches belong to its layers).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from edgellm.deploy.topology import Topology
from edgellm.errors import ConfigError
from edgellm.model.stage import Stage, StageSpec, chain_stages
from edgellm.net.codec import parse_codec
from edgellm.net.direct_hop import LocalHop
from edgellm.net.rpc import RemoteHop, codec_name
from edgellm.quant.scheme import parse_quant
from edgellm.split.control import ControlOps, Field
from edgellm.split.host import StageHost
from edgellm.split.layout import Layout
from edgellm.split.one_process import stage_label
from edgellm.split.pipeline import Hop
from edgellm.split.server import StageServer, Trainer

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 600.0  # a server may quantize its new stage on first use
StageLayout = list[tuple[str, StageSpec]]


@dataclass(frozen=True)
class NodeFactory:
    """How `edgellm.deploy.node_builder` makes a node's parts; a reconfiguration makes new ones the same way.

    Attributes:
        topology, name: the deployment and this node.
        num_layers: the model's decoder layers.
        load: stages of the model for specs, each at its weight scheme (as `parse_quant` reads it).
        check_memory: raises ConfigError when stages (all of the node's) pass its memory budget.
        host: a stage host for a stage, with the node's session limits (and emulation).
        connect: a hop from this node to a server (`receiver`, chain `route`), through their link.
        reach: a hop to any node of the deployment for control calls (no link needed, none emulated).
    """

    topology: Topology
    name: str
    num_layers: int
    load: Callable[[Sequence[StageSpec], Sequence[str]], list[Stage]]
    check_memory: Callable[[list[Stage]], None]
    host: Callable[[Stage], StageHost]
    connect: Callable[[str, tuple[str, ...] | None], Any]  # a hop (`RemoteHop`, usually coalescing: split.coalesce)
    reach: Callable[[str], RemoteHop]

    def quant_of(self, node: str) -> str:
        """The weight scheme a node started with."""
        scheme = self.topology.node(node).quant
        return scheme if scheme is not None else self.topology.model.quant


def check_stage(spec: StageSpec, num_layers: int) -> None:
    """Raises ConfigError when `spec` does not fit a model of `num_layers` layers."""
    if spec.end > num_layers:
        raise ConfigError(f"stage layers [{spec.start}, {spec.end}) pass the model's {num_layers} layers")
    if spec.embed and spec.start != 0:
        raise ConfigError(f"a stage with the embedding starts at layer 0, not {spec.start}")
    if spec.head and spec.end != num_layers:
        raise ConfigError(f"a stage with the head ends at the last layer ({num_layers}), not {spec.end}")


def check_scheme(scheme: str) -> None:
    parse_quant(scheme)  # raises ConfigError naming the valid schemes


class StageReloader:
    """The `load_stage` control op of a stage server: load another stage of the model, then swap it in.

    Fields: `start`, `end` (layers), `embed`, `head` (bools), `quant` (a scheme; default: the current one),
    `next` (the node to forward to, which must have a link with this one in the topology; null: last in the
    chain). Answers `{"layers", "embed", "head", "quant", "next", "load_ms"}`.
    """

    FIELDS = {
        "start": Field(int, required=True), "end": Field(int, required=True), "embed": Field(bool, default=False),
        "head": Field(bool, default=False), "quant": Field(str), "next": Field(str), "codec": Field(str),
    }  # fmt: skip

    def __init__(
        self, factory: NodeFactory, server: StageServer, trainer: Callable[[StageHost], Trainer] | None
    ) -> None:
        self.factory = factory
        self.server = server
        self.trainer = trainer
        self.quant = factory.quant_of(factory.name)
        self._lock = threading.Lock()  # one reload at a time

    def register(self, ops: ControlOps) -> None:
        ops.register("load_stage", self.load_stage, self.FIELDS)

    def load_stage(self, request: dict[str, Any]) -> dict[str, Any]:
        """Load the stage `request` names and swap it in (see the class doc).

        Raises:
            ConfigError: a range that does not fit the model, an unknown scheme, a next node without a link, a
                stage over the memory budget; the node then keeps its old stage.
        """
        factory, name = self.factory, self.factory.name
        spec = StageSpec(request["start"], request["end"], request["embed"], request["head"])
        check_stage(spec, factory.num_layers)
        quant = request["quant"] if request["quant"] is not None else self.quant
        check_scheme(quant)
        nxt, codec = request["next"], request["codec"]
        if codec is not None:
            if nxt is None:
                raise ConfigError("codec is the codec of the hop to next; give next too")
            parse_codec(codec)
        if nxt is not None:
            if spec.head:
                raise ConfigError(f"a stage with the head is last in the chain; it cannot forward to {nxt!r}")
            check_link(factory.topology, name, nxt)
        with self._lock:
            start = time.perf_counter()
            stage = factory.load([spec], [quant])[0]
            factory.check_memory([stage])
            downstream = dict(self.server.downstream)
            if nxt is not None and nxt not in downstream:
                downstream[nxt] = factory.connect(nxt, None)
            if nxt is not None and codec is not None:
                downstream[nxt].codec = parse_codec(codec)  # type: ignore[attr-defined]
            host = factory.host(stage)
            trainer = self.trainer(host) if self.trainer is not None else None
            self.server.replace_stage(host, downstream, trainer, {"quant": quant, "next": nxt})
            self.quant = quant
            load_ms = (time.perf_counter() - start) * 1e3
        log.info("node %s now serves %s (%s), next %s, loaded in %.0f ms", name, stage_label(spec), quant, nxt, load_ms)
        return {"layers": [spec.start, spec.end], "embed": spec.embed, "head": spec.head, "quant": quant,
                "next": nxt, "load_ms": round(load_ms, 3)}  # fmt: skip


def check_link(topology: Topology, sender: str, receiver: str) -> None:
    """Raises ConfigError unless `receiver` is a server with a link to `sender` in the topology."""
    node = topology.node(receiver)
    if node.role == "device" or receiver == sender:
        raise ConfigError(f"{receiver!r} is not a server {sender!r} can forward to")
    topology.link_between(sender, receiver)


def assign_stages(layout: Layout, device: str, num_layers: int) -> StageLayout:
    """The stages of `layout` in execution order, each with its node (as `Topology.stage_assignment`)."""
    return chain_stages(num_layers, layout.cuts, device, layout.route, layout.head,  # type: ignore[arg-type]
                        layout.device_embeds)  # fmt: skip


ServerState = tuple[StageSpec, str, str | None, str | None]  # stage, weight scheme, next node, its hop's codec


class DeviceReconfigurer:
    """Moves a running chain deployment to a new layout, from the device (`edgellm.serve.migration.Rebuilder`).

    Keeps what each server runs (as the topology started it, then as the migrations left it), so only the
    servers whose stage, scheme or next node changes reload. Servers left off the new route keep their stage.

    Args:
        factory: how the device node makes its parts.
        stages: the device's stages now.
    """

    def __init__(self, factory: NodeFactory, stages: Sequence[Stage]) -> None:
        self.factory = factory
        topology, device = factory.topology, factory.name
        self._device_quant = factory.quant_of(device)
        self._local: dict[StageSpec, Stage] = {s.spec: s for s in stages}
        self._servers: dict[str, ServerState] = {}
        for owner, spec in topology.stage_assignment(factory.num_layers):
            if owner != device:
                nxt = topology.next_hop(owner) if topology.mode == "chain" else None
                codec = None if nxt is None else codec_name(topology.link_between(owner, nxt.name).codec)
                self._servers[owner] = (spec, factory.quant_of(owner), None if nxt is None else nxt.name, codec)
        self._links: dict[str, Any] = {}  # server -> the EmulatedLink of the device's last hop to it
        self._control: dict[str, RemoteHop] = {}

    def check(self, layout: Layout) -> StageLayout:
        """The stages of `layout`; raises ConfigError when it cannot be migrated to (changes nothing)."""
        topology, device = self.factory.topology, self.factory.name
        if topology.mode != "chain":
            raise ConfigError(f"live migration moves chain deployments; {topology.source} is in mode {topology.mode!r}")
        for i, server in enumerate(layout.route):
            check_link(topology, layout.route[i - 1] if i else device, server)
        for node, scheme in layout.quant.items():
            topology.node(node)
            check_scheme(scheme)
        for node, codec in layout.codecs.items():
            if node not in layout.route:
                raise ConfigError(f"layout codecs name {node!r}, which is not on the route {list(layout.route)}")
            parse_codec(codec)
        try:
            return assign_stages(layout, device, self.factory.num_layers)
        except ConfigError as exc:
            raise ConfigError(f"layout cuts {list(layout.cuts)}: {exc}") from None

    def rebuild(self, layout: Layout, hops: Sequence[Hop]) -> tuple[list[Hop], StageLayout]:
        """Reload the changed servers (in parallel) and the device's changed stages; -> new hops and stages.

        Raises:
            ConfigError: the layout is invalid (nothing changed), or a server refused its stage.
            PeerError: a server failed or did not answer. Either way the servers that did reload keep their
                new stage: the old layout's sessions are gone, so the caller's generation fails.
        """
        device = self.factory.name
        assignment = self.check(layout)
        self._links.update({h.name: h.link for h in hops if hasattr(h, "probe")})  # type: ignore[attr-defined]
        targets = self._targets(layout, assignment)
        changed = {s: t for s, t in targets.items() if self._servers.get(s) != t}
        quant = layout.quant.get(device, self._device_quant)
        specs = [spec for owner, spec in assignment if owner == device]
        first: BaseException | None = None
        with ThreadPoolExecutor(max_workers=len(changed) + 1) as pool:
            loads = {s: pool.submit(self._load_remote, s, t) for s, t in changed.items()}
            local = pool.submit(self._load_local, specs, quant)
            for server, future in loads.items():
                try:
                    future.result()
                    self._servers[server] = changed[server]
                except Exception as exc:  # noqa: BLE001 - wait for every load, then raise the first failure
                    first = first or exc
            try:
                stages = local.result()
            except Exception as exc:  # noqa: BLE001 - as above
                first = first or exc
        if first is not None:
            raise first
        return self._hops(layout, stages, quant, hops), assignment

    def _targets(self, layout: Layout, assignment: StageLayout) -> dict[str, ServerState]:
        out = {}
        for i, server in enumerate(layout.route):
            spec = next(spec for owner, spec in assignment if owner == server)
            current = self._servers.get(server)
            quant = layout.quant.get(server, current[1] if current else self.factory.quant_of(server))
            nxt = layout.route[i + 1] if i + 1 < len(layout.route) else None
            codec = (
                None
                if nxt is None
                else layout.codecs.get(nxt, codec_name(self.factory.topology.link_between(server, nxt).codec))
            )
            out[server] = (spec, quant, nxt, codec)
        return out

    def _load_remote(self, server: str, target: ServerState) -> dict[str, Any]:
        spec, quant, nxt, codec = target
        if server not in self._control:
            self._control[server] = self.factory.reach(server)
        hop = self._control[server]
        request = {"op": "load_stage", "start": spec.start, "end": spec.end, "embed": spec.embed, "head": spec.head,
                   "quant": quant, "next": nxt, "codec": codec}  # fmt: skip
        return hop.control(request, timeout_s=LOAD_TIMEOUT_S)

    def _load_local(self, specs: list[StageSpec], quant: str) -> list[Stage]:
        """The device's stages for `specs`: those it holds at the same scheme reused, the others loaded."""
        keep = quant == self._device_quant
        missing = [spec for spec in specs if not keep or spec not in self._local]
        loaded = dict(zip(missing, self.factory.load(missing, [quant] * len(missing)))) if missing else {}
        stages = [loaded[spec] if spec in loaded else self._local[spec] for spec in specs]
        self.factory.check_memory(stages)
        return stages

    def _hops(self, layout: Layout, stages: list[Stage], quant: str, old: Sequence[Hop]) -> list[Hop]:
        device = self.factory.name
        reused = {h.name: h for h in old if isinstance(h, LocalHop)}
        local: list[Hop] = []
        for stage in stages:
            name = f"{device}/{stage_label(stage.spec)}"
            same = self._local.get(stage.spec) is stage and name in reused
            local.append(reused[name] if same else LocalHop(name, self.factory.host(stage)))
        self._local, self._device_quant = {s.spec: s for s in stages}, quant
        first = [hop for hop, s in zip(local, stages) if s.spec.embed]
        head = [hop for hop, s in zip(local, stages) if s.spec.head and not s.spec.embed]
        remote: list[Hop] = []
        if layout.route:
            hop = self.factory.connect(layout.route[0], tuple(layout.route[1:]))
            if layout.route[0] in self._links:  # carry over the link's emulation, `set_link` changes included
                hop.link = self._links[layout.route[0]]
            if layout.route[0] in layout.codecs:
                hop.codec = parse_codec(layout.codecs[layout.route[0]])
            remote.append(hop)
        return [*first, *remote, *head]
