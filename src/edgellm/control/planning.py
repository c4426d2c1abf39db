"""Plan a deployment: its profile (cached, or measured now), the optimizer, and the plan as a report or topology."""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.control.documents import planned_document, read_document
from edgellm.control.profile_file import (
    default_path,
    instance_from_profile,
    load_profile,
    profile_key,
    save_profile,
)
from edgellm.deploy.topology import Topology, write_topology
from edgellm.errors import ConfigError
from edgellm.plan import Instance, Plan, Solution, evaluate, solve
from edgellm.split.layout import Layout
from edgellm.store import resolve_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanRequest:
    """What to optimize and under which limits (the options of `edgellm plan`)."""

    objective: str = "latency"
    max_ppl_increase_pct: float = math.inf
    prompt_tokens: int | None = None  # None: the profile's prompt length
    sessions: int = 1
    device_first: bool = True


def current_key(topology: Topology) -> dict[str, str]:
    model_dir = resolve_model(topology.model.name)
    config_sha = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:16]
    return profile_key(topology, config_sha)


def obtain_profile(
    topology: Topology,
    path: Path | None = None,
    force: bool = False,
    on_progress: Callable[[str], None] = lambda _: None,
    **measure: Any,
) -> tuple[dict[str, Any], Path, bool]:
    """The topology's profile: from `path` (or the cache) while its key matches, else measured now and saved.

    Returns (profile, where it is, whether it was measured now). A `path` given explicitly with a stale profile is
    remeasured only with `force`; otherwise its staleness is an error (a user-named file is never overwritten
    silently).
    """
    from edgellm.control.profiler import profile_deployment  # torch, grpc: only when measuring

    key = current_key(topology)
    target = path or default_path(key)
    if not force and target.is_file():
        if path is not None:
            return load_profile(target, key), target, False
        try:
            return load_profile(target, key), target, False
        except Exception:  # noqa: BLE001 - a broken cache entry is remeasured
            log.warning("cached profile %s is unusable; measuring again", target)
    profile = profile_deployment(topology, on_progress=on_progress, **measure)
    return profile, save_profile(profile, target), True


def plan_from_profile(profile: dict[str, Any], request: PlanRequest, mode: str = "chain") -> Solution:
    instance = instance_from_profile(profile, mode, request.prompt_tokens, request.sessions)
    return solve(instance, request.objective, request.max_ppl_increase_pct, device_first=request.device_first)


def cache_share(instance: Instance, plan: Plan, cache_bytes: int | None) -> float:
    """How cold the plan runs, 0 (every weight stays in the last-level cache) to 1 (none does): the weights of
    every node of the plan share one cache on this machine. 0 while they take at most half of it, 1 from all of
    it on, linear between (a documented rule of thumb; docs/PLANNER.md)."""
    if not cache_bytes:
        return 1.0
    weights = 0
    for stage in plan.stages:
        node = instance.node(stage.node)
        scheme = node.scheme(stage.scheme) if node is not None else None
        if scheme is not None:
            weights += stage.num_layers * scheme.layer_bytes
    first = instance.node(plan.stages[0].node)
    scheme = first.scheme(plan.stages[0].scheme) if first is not None else None
    if scheme is not None:
        weights += scheme.embed_bytes + (0 if instance.model.tied_embeddings else scheme.head_bytes)
    return min(max((weights - cache_bytes / 2) / (cache_bytes / 2), 0.0), 1.0)


def predicted(instance: Instance, plan: Plan, profile: dict[str, Any]) -> dict[str, float]:
    """The plan's predicted TTFT and decode ms/token: the cost model's, between its warm-cache and cold-cache
    times by how much of the plan's weights the machine's cache holds (`cache_share`), with the profile's
    calibration (edgellm.control.profiler.calibrate: a compute factor, and a per-token constant for the device's
    loop and the token stream, the same for every plan)."""
    cal = profile.get("calibration", {})
    factor = cal.get("compute_factor", 1.0)
    cold = evaluate(scaled_compute(instance, factor), plan)
    warm_instance = warm(instance, profile)
    hot = evaluate(scaled_compute(warm_instance, factor), plan) if warm_instance is not None else cold
    share = cache_share(instance, plan, profile.get("machine", {}).get("llc_bytes"))
    decode = hot.decode_ms + share * (cold.decode_ms - hot.decode_ms)
    ttft = hot.ttft_ms + share * (cold.ttft_ms - hot.ttft_ms)
    return {
        "ttft_ms": ttft + cal.get("ttft_overhead_ms", 0.0),
        "decode_ms": decode + cal.get("step_overhead_ms", 0.0),
        "model_ttft_ms": ttft,
        "model_decode_ms": decode,
        "cold_decode_ms": cold.decode_ms,
        "warm_decode_ms": hot.decode_ms,
        "cache_share": share,
        "ppl_increase_pct": cold.ppl_increase_pct,
    }


def scaled_compute(instance: Instance, factor: float) -> Instance:
    """The instance with every node's compute times multiplied by `factor` (links untouched)."""
    import dataclasses

    if factor == 1.0:
        return instance
    nodes = []
    for node in instance.nodes:
        schemes = tuple(dataclasses.replace(s, layer_decode_ms=s.layer_decode_ms * factor,
                                            layer_prefill_ms_per_token=s.layer_prefill_ms_per_token * factor,
                                            head_decode_ms=s.head_decode_ms * factor,
                                            embed_decode_ms=s.embed_decode_ms * factor) for s in node.schemes)  # fmt: skip
        nodes.append(dataclasses.replace(node, schemes=schemes, stage_overhead_ms=node.stage_overhead_ms * factor))
    return dataclasses.replace(instance, nodes=tuple(nodes))


def warm(instance: Instance, profile: dict[str, Any]) -> Instance | None:
    """The instance with every node's warm-cache times (None when the profile has none)."""
    import dataclasses

    nodes = []
    for node in instance.nodes:
        rows = {r["name"]: r.get("warm") for r in profile["nodes"][node.name]["schemes"]}
        if not all(rows.values()):
            return None
        schemes = tuple(dataclasses.replace(s, layer_decode_ms=rows[s.name]["layer_decode_ms"],
                                            embed_decode_ms=rows[s.name]["embed_decode_ms"],
                                            head_decode_ms=rows[s.name]["head_decode_ms"]) for s in node.schemes)  # fmt: skip
        overhead = statistics.median(rows[s.name]["stage_overhead_ms"] for s in node.schemes)
        nodes.append(dataclasses.replace(node, schemes=schemes, stage_overhead_ms=overhead))
    return dataclasses.replace(instance, nodes=tuple(nodes))


def plan_report(topology: Topology, profile: dict[str, Any], solution: Solution, request: PlanRequest,
                profile_path: Path) -> dict[str, Any]:  # fmt: skip
    """The plan as JSON: per node its stage, scheme, memory against budget and emulation; per hop its codec and the
    link's emulated profile; the predictions; the binding constraint."""
    plan, cost = solution.plan, solution.cost
    instance = instance_from_profile(profile, plan.mode, request.prompt_tokens, request.sessions)
    pred = predicted(instance, plan, profile)
    nodes = []
    for stage in plan.stages:
        node = profile["nodes"][stage.node]
        emulated = node.get("emulated", {})
        nodes.append({
            "name": stage.node, "role": node["role"], "layers": [stage.start, stage.end], "scheme": stage.scheme,
            "embed": stage is plan.stages[0],
            "head": (plan.head == "server" and stage is plan.stages[-1])
            or (plan.head == "device" and stage.node == topology.route[0]),
            "memory_mb": round(cost.memory_bytes.get(stage.node, 0) / 1e6, 1),
            "budget_mb": emulated.get("memory_mb"), "emulated": emulated,
        })  # fmt: skip
    route = [s.node for s in plan.stages]
    device = topology.route[0]
    if route[0] != device:
        route = [device, *route]
    hops = list(zip(route, route[1:])) if plan.mode == "chain" else [(route[0], s) for s in route[1:]]
    links = []
    for (a, b), codec in zip(hops, plan.codecs):
        link = topology.link_between(a, b)
        links.append({"from": a, "to": b, "codec": codec, "profile": link.profile_name,
                      "emulated": vars(link.profile)})  # fmt: skip
    return {
        "topology": topology.source,
        "profile": str(profile_path),
        "profile_created": profile.get("created"),
        "machine": profile.get("machine"),
        "objective": request.objective,
        "max_ppl_increase_pct": None if math.isinf(request.max_ppl_increase_pct) else request.max_ppl_increase_pct,
        "device_first": request.device_first,
        "mode": plan.mode,
        "head": plan.head,
        "cuts": list(plan.cuts),
        "nodes": nodes,
        "links": links,
        "predicted": {
            "ttft_ms": round(pred["ttft_ms"], 2),
            "prompt_tokens": request.prompt_tokens or profile["settings"]["prompt_tokens"],
            "decode_ms_per_token": round(pred["decode_ms"], 3),
            "decode_tok_per_s": round(1e3 / pred["decode_ms"], 2) if pred["decode_ms"] > 0 else None,
            "calibration_ms": {
                "decode": round(pred["decode_ms"] - cost.decode_ms, 3),
                "ttft": round(pred["ttft_ms"] - cost.ttft_ms, 3),
            },
            "throughput_tok_s": round(cost.throughput_tok_s, 2),
            "sessions": request.sessions,
            "ppl_increase_pct": round(cost.ppl_increase_pct, 4),
        },
        "binding": solution.binding,
        "solve_ms": round(solution.solve_ms, 2),
        "plan": plan.to_json(),
    }


def write_plan(topology: Topology, plan: Plan, out: Path) -> Topology:
    """Write the topology with the plan applied to `out`; returns it (validated)."""
    return write_topology(out, planned_document(read_document(Path(topology.source)), plan))


def layout_for(plan: Plan, device: str) -> Layout:
    """The plan as a live-migration target (`edgellm.split.layout.Layout`; chain mode)."""
    stages = list(plan.stages)
    device_first = stages[0].node == device
    servers = stages[1:] if device_first else stages
    embed_only = device_first and stages[0].end == 0
    cuts = [s.start for s in servers]
    quant = {s.node: s.scheme for s in stages}
    if plan.head == "device" and not device_first:
        quant.setdefault(device, "none")  # the device's head stage; a thin device holds nothing else
    codecs = {s.node: codec for s, codec in zip(servers, plan.codecs)}  # the hop into each server, in order
    return Layout(tuple(cuts), tuple(s.node for s in servers), plan.head, quant, embed_only, codecs)


def apply_plan(topology: Topology, plan: Plan) -> dict[str, Any]:
    """Move a running chain deployment to `plan` through its device (the `migrate` control op): servers load their
    new stages, the device rebuilds its own. Returns the device's answer.

    Raises:
        ConfigError: the deployment is not in chain mode (write the plan with `edgellm plan --write` and restart
            the nodes instead), or the device refused the layout.
    """
    from edgellm.deploy.node_builder import channel_config
    from edgellm.net.rpc import RemoteHop

    if topology.mode != "chain" or plan.mode != "chain":
        raise ConfigError(
            f"{topology.source}: --plan auto moves a running deployment in chain mode only; for {topology.mode!r} "
            "mode write the plan with `edgellm plan --write OUT.toml` and start the nodes from it"
        )
    device = topology.device
    if device.address is None:
        raise ConfigError(f"{topology.source}: the device node {device.name!r} has no address to reach it at")
    hop = RemoteHop(device.name, device.address, channel_config(topology), sender="planner")
    try:
        return hop.control({"op": "migrate", **layout_for(plan, device.name).to_json()}, timeout_s=300.0)
    finally:
        hop.shutdown()
