"""Start one node of a deployment: load only its stages, connect to its next hops, serve over gRPC."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgellm.adapters import AdapterStore
from edgellm.deploy.hops import channel_config, remote_hop
from edgellm.deploy.memory_budget import (
    NodeMemory,
    NodeStatus,
    check_need,
    effective_max_context,
    ledger_after_load,
    predict_need,
)
from edgellm.deploy.profile_op import register_profile_ops
from edgellm.deploy.reconfigure import DeviceReconfigurer, NodeFactory, StageReloader
from edgellm.deploy.replica_hops import device_replica_hops, downstream_hops
from edgellm.deploy.topology import Topology
from edgellm.errors import ConfigError
from edgellm.model.arch import arch_for
from edgellm.model.stage import Stage
from edgellm.net.direct_hop import LocalHop
from edgellm.net.messages import CloseSession, ForwardRequest
from edgellm.net.rpc import NodeHandler, RemoteHop, serve
from edgellm.privacy.config import DPConfig
from edgellm.privacy.mods import RowGuard
from edgellm.progress import Phase, note
from edgellm.quant.scheme import parse_quant
from edgellm.serve.device import DeviceEngine, DeviceServer
from edgellm.serve.drafts import DraftShelf
from edgellm.serve.local_engine import DTYPES
from edgellm.serve.migration import Controller, LiveMigration
from edgellm.serve.report import weight_bytes
from edgellm.split import compute_thread
from edgellm.split.adapter_ops import register_adapter_ops
from edgellm.split.budget import MemoryLedger, release_freed_memory, rss_bytes
from edgellm.split.coalesce import CoalescingHop
from edgellm.split.control import ControlOps
from edgellm.split.host import SessionLimits, StageHost
from edgellm.split.one_process import load_stages, stage_label
from edgellm.split.pipeline import Hop
from edgellm.split.server import StageServer
from edgellm.splitlearn.server_host import TrainHost
from edgellm.store import resolve_model
from edgellm.store.paths import checkpoint_root
from edgellm.store.weights import load_config, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class BuiltNode:
    """A node ready to serve: its handler and what it holds."""

    name: str
    address: str
    handler: NodeHandler
    stages: list[Stage]


ControllerFactory = Callable[[int, Callable[[str], RemoteHop]], Controller]  # (num_layers, reach) -> controller


def build_node(
    topology: Topology, name: str, controller: ControllerFactory | None = None, checkpoint_dir: Path | None = None
) -> BuiltNode:
    """Load the stages of node `name` and wire its handler (device engine or stage server).

    The node's `memory_mb` is checked twice: predicted before loading (runtime + weights + KV + activations,
    `edgellm.deploy.memory_budget`) and measured after; its stage hosts then reserve each session's KV cache.
    A server keeps its clients' training checkpoints under `checkpoint_dir` (default: `paths.checkpoint_root()`).

    Raises:
        ConfigError/ModelError: unknown node, no address, cuts that do not fit the model, memory over budget.
    """
    node = topology.node(name)
    if node.address is None:
        raise ConfigError(f"{topology.source}: node {name!r} needs an address to serve on")
    torch.set_num_threads(node.threads)
    model_dir = resolve_model(topology.model.name)
    config = load_config(model_dir)
    arch_for(config)
    layout = topology.stage_assignment(int(config.num_hidden_layers))
    specs = topology.stages_for(name, int(config.num_hidden_layers))  # a replica: its primary's
    quant = node.quant if node.quant is not None else topology.model.quant
    dtype, max_context = DTYPES[topology.model.dtype], effective_max_context(topology.limits.max_context, config)
    runtime = rss_bytes()  # the process before it loads any weight
    predicted = predict_need(config, specs, parse_quant(quant), dtype, max_context, runtime)
    check_need(name, predicted, node.memory_mb, topology.source)
    stages = load_stages(model_dir, specs, dtype, parse_quant(quant), topology.model.engine)
    release_freed_memory()  # loading's staging buffers: RSS below is what the stages really hold
    tokenizer = load_tokenizer(model_dir) if node.role == "device" else None  # before measuring: it is resident
    ledger = ledger_after_load(name, predicted, node.memory_mb, topology.source)
    memory = NodeMemory(ledger, config, dtype, max_context, runtime, topology.source)
    limits = SessionLimits(topology.limits.max_sessions, topology.limits.idle_timeout_s, max_context)
    info = {"model": topology.model.name, "mode": topology.mode, "dtype": topology.model.dtype, "quant": quant,
            "engine": stages[0].engine if stages else topology.model.engine,
            "max_context": max_context, "emulated": node.emulation.to_json()}  # fmt: skip
    factory = node_factory(topology, name, model_dir, int(config.num_hidden_layers), limits, memory)
    if node.role == "device":
        hops = device_hops(topology, name, stages, limits, factory.host)
        engine = DeviceEngine(
            name,
            tokenizer,
            config,
            hops,
            layout,
            {**info, "cuts": list(topology.model.cuts), "head": topology.model.head, "route": list(topology.route)},
            LiveMigration(
                DeviceReconfigurer(factory, stages),
                None if controller is None else controller(int(config.num_hidden_layers), factory.reach),
            ),
            node_status(topology, name, ledger),
        )
        dp = device_dp(topology)
        engine.dp_guard = None if dp is None else RowGuard.for_rows(dp)
        engine.drafts = DraftShelf(model_dir, dtype, topology.model.engine, node.emulation.compute_scale,
                                   lambda label, nbytes: ledger.reserve((0, f"drafter {label}"), nbytes, 0))  # fmt: skip
        _profile_ops(engine.control_ops, topology, name, model_dir, config, stages, max_context,
                     engine._linked_hops)  # fmt: skip
        return BuiltNode(name, node.address, DeviceServer(engine), stages)
    if len(stages) != 1:
        raise ConfigError(f"{topology.source}: server {name!r} holds {len(stages)} stages; expected one")
    downstream = downstream_hops(topology, name)  # chain mode: every replica of the next stage
    host = factory.host(stages[0])
    checkpoints = checkpoint_dir if checkpoint_dir is not None else checkpoint_root()
    stage_node = topology.primary(name)  # a replica's checkpoints are its primary's: a run fails over to it
    trainer = TrainHost(host, arch_for(config).layers, name, checkpoints, checkpoint_node=stage_node)
    server = StageServer(name, host, downstream, {**info, "role": node.role}, trainer=trainer)
    layers_path = arch_for(config).layers
    StageReloader(
        factory, server, lambda h: TrainHost(h, layers_path, name, checkpoints, checkpoint_node=stage_node)
    ).register(server.control_ops)
    register_adapter_ops(server.control_ops, lambda: server.host)
    _profile_ops(server.control_ops, topology, name, model_dir, config, stages, max_context, lambda: server.downstream)
    return BuiltNode(name, node.address, server, stages)


def _owner(topology: Topology, address: str) -> str:
    """Who already serves `address`, as a clause for the error ("" when nothing answers there)."""
    hop = RemoteHop("?", address, channel_config(topology), sender="starting node")
    try:
        info = hop.info(timeout_s=2.0)
    except Exception:  # noqa: BLE001 - nothing (or something foreign) answers: say nothing more
        return ""
    finally:
        hop.shutdown()
    return f"; node {info.get('name', '?')!r} of this deployment already serves it (is it started twice?)"


def _profile_ops(ops: ControlOps, topology: Topology, name: str, model_dir: Path, config: Any,
                 stages: list[Stage], max_context: int, hops: Callable[[], dict[str, Any]]) -> None:  # fmt: skip
    """What `edgellm profile` asks a node (edgellm.deploy.profile_op)."""
    register_profile_ops(ops, topology, name, model_dir, config, lambda: sum(weight_bytes(s) for s in stages),
                         max_context, lambda to: remote_hop(topology, name, to, route=()), hops)  # fmt: skip


def device_dp(topology: Topology) -> DPConfig | None:
    """The differential privacy the topology sets on the device's smashed data: the `dp` of the link from the
    device to the first server (route[1]), the one its hidden states leave by (docs/TOPOLOGY.md).

    Raises:
        ConfigError: `dp` on any other link (server->server traffic never passes the device, and in star mode the
            device's later hops carry what a server computed from already noised rows), or on a deployment whose
            device sends token ids (a first cut of 0 without `embed = "device"`).
    """
    found = None
    first = topology.route[:2]
    for i, link in enumerate(topology.links):
        if link.dp is None:
            continue
        if len(first) < 2 or not link.joins(*first):
            raise ConfigError(f"{topology.source}: links[{i}].dp: differential privacy goes on the link from the "
                              f"device to the first server ({' <-> '.join(first)}), not {link.a} <-> {link.b}")  # fmt: skip
        found = link.dp
    model = topology.model
    if found is not None and model.cuts and model.cuts[0] == 0 and model.embed != "device":
        raise ConfigError(f"{topology.source}: a link's dp guards hidden states, but this device sends token ids "
                          '(first cut 0): keep layers on the device, or the embedding with embed = "device"')  # fmt: skip
    return found


def node_factory(
    topology: Topology,
    name: str,
    model_dir: Path,
    num_layers: int,
    limits: SessionLimits,
    memory: NodeMemory | None = None,
) -> NodeFactory:
    """How node `name` makes its parts, so that a live reconfiguration (`edgellm.deploy.reconfigure`) makes new
    ones the same way: stages from the local store, the memory check, stage hosts (with the node's emulated
    compute and, given `memory`, its session ledger), hops to servers."""
    dtype = DTYPES[topology.model.dtype]
    emulation = topology.node(name).emulation

    def host(stage: Stage) -> StageHost:
        return StageHost(stage, limits, emulation=emulation, memory=None if memory is None else memory.for_stage(stage),
                         adapters=AdapterStore(stage))  # fmt: skip

    return NodeFactory(
        topology,
        name,
        num_layers,
        load=lambda specs, quants: load_stages(
            model_dir, specs, dtype, [parse_quant(q) for q in quants], topology.model.engine
        ),
        check_memory=lambda stages: None if memory is None else memory.check_stages(stages),
        host=host,
        connect=lambda receiver, route: CoalescingHop(remote_hop(topology, name, receiver, route)),
        reach=lambda receiver: control_hop(topology, name, receiver),
    )


def control_hop(topology: Topology, sender: str, receiver: str) -> RemoteHop:
    """A hop from `sender` to any node of the deployment for control calls: no link emulation, no route."""
    node = topology.node(receiver)
    if node.address is None:
        raise ConfigError(f"{topology.source}: node {receiver!r} has no address")
    return RemoteHop(receiver, node.address, channel_config(topology), sender=sender)


def node_status(topology: Topology, name: str, ledger: MemoryLedger) -> NodeStatus:
    """The device's view of every node's emulation and memory: its own ledger, each server's `Info`."""
    emulations = {node.name: node.emulation for node in topology.nodes}
    servers = {server.name: control_hop(topology, name, server.name).info for server in topology.servers}
    return NodeStatus(emulations, (name, ledger), servers)


def device_hops(
    topology: Topology,
    name: str,
    stages: list[Stage],
    limits: SessionLimits,
    host: Callable[[Stage], StageHost] | None = None,
) -> list[Hop]:
    """The device's pipeline: its first stage, the servers (one chained hop, or each in turn), its head stage.

    `host` makes the stage hosts of the local stages (the node's emulation and ledger); None: plain hosts.
    """
    make = host if host is not None else (lambda stage: StageHost(stage, limits))
    local = {s.spec: LocalHop(f"{name}/{stage_label(s.spec)}", make(s)) for s in stages}
    first = [hop for spec, hop in local.items() if spec.embed]  # none when the servers run the whole model
    head = [hop for spec, hop in local.items() if spec.head and not spec.embed]
    servers = [n.name for n in topology.servers]
    if not servers:  # a device-only deployment
        remote: list[Hop] = []
    elif topology.has_replicas:
        remote = device_replica_hops(topology, name)
    elif topology.mode == "chain":
        remote = [CoalescingHop(remote_hop(topology, name, servers[0], route=tuple(servers[1:])))]
    else:
        remote = [CoalescingHop(remote_hop(topology, name, s, route=(), seed=i)) for i, s in enumerate(servers)]
    return [*first, *remote, *head]


def run_node(
    topology: Topology,
    name: str,
    on_ready: Any = None,
    controller: ControllerFactory | None = None,
    checkpoint_dir: Path | None = None,
) -> int:
    """Serve node `name` until SIGINT/SIGTERM; returns an exit code. `controller` makes the device's re-planner;
    `checkpoint_dir`: where a server keeps training checkpoints (default: `paths.checkpoint_root()`).

    Start-up logs its phases (`edgellm.progress`): loading (and quantizing) the weights, then listening.
    """
    started = time.perf_counter()
    announce = f"node {name}: loading {topology.model.name} ({topology.model.dtype}, quant {_quant(topology, name)})"
    with Phase(f"load node {name}", log=log, announce=announce) as phase:
        built = build_node(topology, name, controller, checkpoint_dir)
        layers = ", ".join(f"[{s.spec.start}, {s.spec.end})" for s in built.stages)
        phase.summary = f"layers {layers}, {sum(weight_bytes(s) for s in built.stages) / 1e6:.0f} MB of weights"
    warm_up(built)
    try:
        server, port = serve(built.handler, built.address, channel_config(topology))
    except ConfigError as exc:
        raise ConfigError(f"node {name}: {exc}{_owner(topology, built.address)}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    note(log, "node %s listening on %s (layers %s), ready %.1f s after start", name, built.address, layers,
         time.perf_counter() - started)  # fmt: skip
    if on_ready is not None:
        on_ready({"event": "ready", "name": name, "address": built.address, "port": port})
    compute_thread.install().serve(stop)  # this thread loaded the weights: it runs every stage pass (fastest)
    server.stop(grace=1.0).wait()
    return 0


WARM_UP_TOKENS = 8


def warm_up(built: BuiltNode) -> None:
    """One throwaway pass through a server's stage before it listens: a fresh process's first pass pays its lazy
    allocations and thread start-up, and the first real request (a failover's replay, say) should not."""
    host = getattr(built.handler, "host", None)
    if host is None:  # the device: its stages run when a generation asks
        return
    stage = host.stage
    shape = (1, WARM_UP_TOKENS) if stage.spec.embed else (1, WARM_UP_TOKENS, stage.dims.hidden_size)
    data = torch.zeros(shape, dtype=torch.long) if stage.spec.embed else torch.zeros(shape)
    positions = torch.arange(WARM_UP_TOKENS).view(1, -1)
    session = "warm-up"
    host.forward(ForwardRequest(session, data, positions, None, True))
    host.close(CloseSession(session))


def _quant(topology: Topology, name: str) -> str:
    node = topology.node(name)
    return (node.quant if node.quant is not None else topology.model.quant) or "none"
