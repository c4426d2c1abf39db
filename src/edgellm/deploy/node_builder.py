"""Start one node of a deployment: load only its stages, connect to its next hops, serve over gRPC."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch

from edgellm.deploy.topology import Topology
from edgellm.errors import ConfigError
from edgellm.model.arch import arch_for
from edgellm.model.stage import Stage
from edgellm.net.direct_hop import LocalHop
from edgellm.net.link import EmulatedLink
from edgellm.net.rpc import ChannelConfig, NodeHandler, RemoteHop, TlsFiles, serve
from edgellm.quant.scheme import parse_quant
from edgellm.serve.device import DeviceEngine, DeviceServer
from edgellm.serve.local_engine import DTYPES
from edgellm.serve.report import weight_bytes
from edgellm.split.host import SessionLimits, StageHost
from edgellm.split.one_process import load_stages, stage_label
from edgellm.split.pipeline import Hop
from edgellm.split.server import StageServer
from edgellm.splitlearn.server_host import TrainHost
from edgellm.store import resolve_model
from edgellm.store.paths import checkpoint_root
from edgellm.store.weights import load_config, load_tokenizer

log = logging.getLogger(__name__)


def channel_config(topology: Topology) -> ChannelConfig:
    """Token, deadline and TLS of a deployment, as its clients and servers use them."""
    tls = topology.security.tls
    files = None
    if tls is not None:
        files = TlsFiles(cert=tls.cert, key=tls.key, ca=tls.ca, client_auth=tls.client_auth)
    return ChannelConfig(token=topology.resolve_token(), deadline_s=topology.limits.deadline_s, tls=files)


def remote_hop(
    topology: Topology, sender: str, receiver: str, route: tuple[str, ...] | None, seed: int = 0
) -> RemoteHop:
    """A hop from `sender` to the server `receiver`, through their link's emulation and codec."""
    node = topology.node(receiver)
    if node.address is None:
        raise ConfigError(f"{topology.source}: node {receiver!r} has no address")
    link = topology.link_between(sender, receiver)
    emulated = EmulatedLink(link.profile, seed=seed)
    return RemoteHop(receiver, node.address, channel_config(topology), emulated, link.codec, sender, route)


@dataclass
class BuiltNode:
    """A node ready to serve: its handler and what it holds."""

    name: str
    address: str
    handler: NodeHandler
    stages: list[Stage]


def build_node(topology: Topology, name: str) -> BuiltNode:
    """Load the stages of node `name` and wire its handler (device engine or stage server).

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
    specs = [spec for owner, spec in layout if owner == name]
    quant = node.quant if node.quant is not None else topology.model.quant
    stages = load_stages(model_dir, specs, DTYPES[topology.model.dtype], parse_quant(quant))
    _check_memory(topology, name, stages)
    limits = SessionLimits(topology.limits.max_sessions, topology.limits.idle_timeout_s)
    info = {"model": topology.model.name, "mode": topology.mode, "dtype": topology.model.dtype, "quant": quant}
    if node.role == "device":
        hops = device_hops(topology, name, stages, limits)
        tokenizer = load_tokenizer(model_dir)
        engine = DeviceEngine(
            name,
            tokenizer,
            config,
            hops,
            layout,
            {**info, "cuts": list(topology.model.cuts), "head": topology.model.head},
        )
        return BuiltNode(name, node.address, DeviceServer(engine), stages)
    if len(stages) != 1:
        raise ConfigError(f"{topology.source}: server {name!r} holds {len(stages)} stages; expected one")
    downstream: dict[str, Hop] = {}
    nxt = topology.next_hop(name) if topology.mode == "chain" else None
    if nxt is not None:
        downstream[nxt.name] = remote_hop(topology, name, nxt.name, route=None)
    host = StageHost(stages[0], limits)
    trainer = TrainHost(host, arch_for(config).layers, name, checkpoint_root())
    server = StageServer(name, host, downstream, {**info, "role": node.role}, trainer=trainer)
    return BuiltNode(name, node.address, server, stages)


def device_hops(topology: Topology, name: str, stages: list[Stage], limits: SessionLimits) -> list[Hop]:
    """The device's pipeline: its first stage, the servers (one chained hop, or each in turn), its head stage."""
    local = {s.spec: LocalHop(f"{name}/{stage_label(s.spec)}", StageHost(s, limits)) for s in stages}
    first = [hop for spec, hop in local.items() if spec.embed]  # none when the servers run the whole model
    head = [hop for spec, hop in local.items() if spec.head and not spec.embed]
    servers = [n.name for n in topology.servers]
    if not servers:  # a device-only deployment
        remote: list[Hop] = []
    elif topology.mode == "chain":
        remote = [remote_hop(topology, name, servers[0], route=tuple(servers[1:]))]
    else:
        remote = [remote_hop(topology, name, s, route=(), seed=i) for i, s in enumerate(servers)]
    return [*first, *remote, *head]


def _check_memory(topology: Topology, name: str, stages: list[Stage]) -> None:
    budget = topology.node(name).memory_mb
    if budget is None:
        return
    need = sum(weight_bytes(s) for s in stages)
    if need > budget * 1_000_000:
        raise ConfigError(
            f"{topology.source}: node {name!r} needs {need / 1e6:.0f} MB for its weights, over its memory_mb of {budget}"
        )


def run_node(topology: Topology, name: str, on_ready: Any = None) -> int:
    """Serve node `name` until SIGINT/SIGTERM; returns an exit code."""
    built = build_node(topology, name)
    server, port = serve(built.handler, built.address, channel_config(topology))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    spec = ", ".join(f"[{s.spec.start}, {s.spec.end})" for s in built.stages)
    log.info("node %s serving layers %s on %s", name, spec, built.address)
    if on_ready is not None:
        on_ready({"event": "ready", "name": name, "address": built.address, "port": port})
    stop.wait()
    server.stop(grace=1.0).wait()
    return 0
