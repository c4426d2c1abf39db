"""The I/O half of `edgellm check`: ask every node of a running deployment who it is and what it serves, ask each
node to reach its next hop, and predict each node's memory from the model's config; `edgellm.deploy.preflight`
judges the answers.

Nothing is loaded but the model's `config.json` (when it is on this machine: a model directory, or a registered
model already pulled; never downloaded here): the weights are sized on the meta device
(`edgellm.deploy.memory_budget.predict_need`). Without the config the layer count comes from what the nodes report,
and memory is not predicted.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from edgellm.deploy.memory_budget import effective_max_context, predict_need
from edgellm.deploy.node_builder import channel_config
from edgellm.deploy.preflight import MB, Answer, Expected, Failure, MemoryPlan, Part, Verdict, info_parts, judge
from edgellm.deploy.topology import Topology
from edgellm.errors import EdgellmError, InputError
from edgellm.net.rpc import RemoteHop
from edgellm.net.rpc_status import AuthError, NodeUnreachable
from edgellm.quant.scheme import parse_quant
from edgellm.serve.local_engine import DTYPES
from edgellm.store.fetch import is_pulled
from edgellm.store.paths import models_dir
from edgellm.store.registry import REGISTRY
from edgellm.store.weights import load_config

# A node process's RSS before it loads a weight (Python, torch, transformers, gRPC): about 320-330 MB measured for
# `edgellm node` (docs/TOPOLOGY.md). Each node measures its own; the check can only assume it, and says so.
RUNTIME_MB_ASSUMED = 330

K = TypeVar("K")
T = TypeVar("T")


def survey(topology: Topology, timeout_s: float) -> Verdict:
    """Call every node's `Info` at its address in `topology`, then each answering node's `ping_peer` of its peers,
    each call within `timeout_s`; judge the answers against the topology.

    Raises:
        ConfigError: the topology's token cannot be read; the cuts do not fit the model.
        ModelError: the model's config is here but unreadable.
    """
    channel = dataclasses.replace(channel_config(topology), deadline_s=timeout_s)
    hops = {n.name: RemoteHop(n.name, n.address, channel, sender="check") for n in topology.nodes if n.address}
    try:
        answers = _parallel({name: partial(answer, hop.info) for name, hop in hops.items()})
        expected = expectations(topology, local_model_config(topology.model.name), answers)
        serving = [n for n in expected if n.name in answers and (answers[n.name].info or {}).get("name") == n.name]
        pings = _parallel({(n.name, peer): partial(ping, hops[n.name], peer, timeout_s)
                           for n in serving for peer in n.peers})  # fmt: skip
    finally:
        for hop in hops.values():
            hop.shutdown()
    return judge(expected, answers, pings)


def _parallel(calls: Mapping[K, Callable[[], T]]) -> dict[K, T]:
    """Run `calls` at once (each a network call that may wait its whole timeout), keeping their order."""
    if not calls:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(calls), 16)) as pool:
        futures = {key: pool.submit(call) for key, call in calls.items()}
        return {key: future.result() for key, future in futures.items()}


def answer(call: Callable[[], dict[str, Any]]) -> Answer:
    """The outcome of one call to a node: its answer, or the kind of its failure (`preflight.Failure`)."""
    try:
        return Answer(info=call())
    except EdgellmError as exc:
        return Answer(failure=failure(exc))


def failure(exc: EdgellmError) -> Failure:
    """`exc` as a `Failure`: relayed ones carry the message of the node where they began."""
    if isinstance(exc, AuthError):
        kind = "token"
    elif isinstance(exc, NodeUnreachable):
        kind = "down"
    elif isinstance(exc, InputError):
        kind = "refused"
    else:
        kind = "error"
    relayed = bool(exc.relays)
    return Failure(kind, exc.origin if relayed and exc.origin else str(exc), relayed)


def ping(hop: RemoteHop, peer: str, timeout_s: float) -> Answer:
    """Ask the node behind `hop` to call `Info` of its hop to `peer` (the `ping_peer` control op)."""
    start = time.perf_counter()
    result = answer(lambda: hop.control({"op": "ping_peer", "to": peer, "timeout_s": timeout_s}, timeout_s + 2.0))
    if result.info is None:
        return result
    info = result.info.get("info")
    ms = result.info.get("ms")
    return Answer(info=info if isinstance(info, dict) else {},
                  ms=float(ms) if isinstance(ms, int | float) else (time.perf_counter() - start) * 1e3)  # fmt: skip


def local_model_config(name: str) -> Any | None:
    """The model's config when it is on this machine (a directory, or a registered model already pulled), else
    None: the check never downloads a model.

    Raises:
        ModelError: a config.json that cannot be read.
    """
    if name in REGISTRY:
        return load_config(models_dir() / name) if is_pulled(name) else None
    path = Path(name).expanduser()
    return load_config(path) if (path / "config.json").is_file() else None


def layer_count(model_config: Any | None, answers: Mapping[str, Answer]) -> int | None:
    """The model's decoder layers: from its config, else the furthest layer any node reports serving."""
    if model_config is not None:
        return int(model_config.num_hidden_layers)
    ends = [p.end for name, a in answers.items() if a.info is not None for p in info_parts(a.info, name) or ()]
    return max(ends) if ends else None


def peers_of(topology: Topology, name: str) -> tuple[str, ...]:
    """The nodes `name` dials: its next hop in a chain; every server from a star's device."""
    if topology.mode == "star":
        return tuple(s.name for s in topology.servers) if name == topology.device.name else ()
    nxt = topology.next_hop(name)
    return () if nxt is None else (nxt.name,)


def expectations(topology: Topology, model_config: Any | None, answers: Mapping[str, Answer]) -> list[Expected]:
    """What the topology says of each node, in route order: its stages and their predicted memory."""
    num_layers = layer_count(model_config, answers)
    assignment = topology.stage_assignment(num_layers) if num_layers is not None else None
    max_context = topology.limits.max_context
    if model_config is not None:
        max_context = effective_max_context(max_context, model_config)
    out = []
    for name in topology.route:
        node = topology.node(name)
        quant = node.quant if node.quant is not None else topology.model.quant
        specs = None if assignment is None else [spec for owner, spec in assignment if owner == name]
        memory, problem = None, None
        if model_config is not None and specs is not None:
            try:
                need = predict_need(model_config, specs, parse_quant(quant), DTYPES[topology.model.dtype],
                                    max_context, RUNTIME_MB_ASSUMED * MB)  # fmt: skip
                memory = MemoryPlan(need.runtime_bytes, need.weight_bytes, need.kv_bytes, need.activation_bytes,
                                    need.max_context)  # fmt: skip
            except InputError as exc:
                problem = str(exc)
        fields = {"model": topology.model.name, "mode": topology.mode, "dtype": topology.model.dtype, "quant": quant}
        out.append(Expected(
            name, node.role, node.address,
            None if specs is None else tuple(Part(s.start, s.end, s.embed, s.head) for s in specs),
            fields, memory, node.memory_mb, peers_of(topology, name), problem,
        ))  # fmt: skip
    return out
