"""`edgellm cache apply`: a placement realised on real cache nodes, requests routed to them, popularity shifts.

1. Every variant is published into the origin's block store (the cloud node's): base models as layer blocks,
   LoRA variants as adapter blocks over their base (`edgellm.blocks.chunk`).
2. The cloud starts with the origin store; each edge server starts empty with its storage budget
   (`edgellm.control.cache_nodes`). Each variant answers the prompts once on the cloud: its tokens are the
   reference every routed answer is checked against, and its measured prefill/decode times per token are the
   latency model's inference costs (`edgellm.placement.latency`).
3. Per phase: the placement of the phase's popularity (`edgellm.placement.solve`); the nodes sync to it at once
   (each fetches missing blocks from peer edges, then the cloud, over its emulated backhaul, and evicts the
   rest); a generation started before the sync on a variant the sync drops runs to its end; then the phase's
   requests, each routed to the lowest-latency server in the user's reach holding the variant within the user's
   requirement (`edgellm.placement.route`), else to the cloud, and its tokens compared with the reference.

What is emulated is said in the report: the backhaul links (applied to block fetches), the users' links and the
servers' speeds (used by the latency model only: requests travel over loopback and every node shares this
machine's CPU).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.blocks import BlockStore, Manifest
from edgellm.blocks.chunk import publish_adapter, publish_model
from edgellm.blocks.manifest import required_digests
from edgellm.control.cache_apply_config import ApplyConfig, PhaseSpec, phase_demand, summary
from edgellm.control.cache_nodes import CacheNodes, CacheNodeSpec
from edgellm.net.link import LinkProfile
from edgellm.placement.algorithms import solve
from edgellm.placement.edge_instance import Model, PlacementInstance, Reach, Server, User, Workload
from edgellm.placement.holdings import Placement, migration, route
from edgellm.progress import Phase

log = logging.getLogger(__name__)

CLOUD = "cloud"
CARRY_TOKENS_FACTOR = 4  # the generation kept running across a sync decodes this many times max_new_tokens


@dataclass
class References:
    """Each (variant, prompt)'s tokens on the cloud, and each variant's measured costs per token."""

    tokens: dict[tuple[str, str, int], list[int]] = field(default_factory=dict)
    costs: dict[str, tuple[float, float]] = field(default_factory=dict)  # variant -> (prefill, decode) ms/token
    prompt_tokens: int = 0


def publish(config: ApplyConfig, work_dir: Path) -> dict[str, Manifest]:
    """Every variant of `config` into the origin store under `work_dir/origin`; -> manifests by name."""
    from edgellm.lora.synthetic import synthetic_adapter
    from edgellm.store import resolve_model

    origin = BlockStore(work_dir / "origin")
    manifests: dict[str, Manifest] = {}
    model_dirs: dict[str, Path] = {}
    for v in config.variants:
        if v.model is not None:
            model_dirs[v.name] = resolve_model(v.model)
            manifests[v.name] = publish_model(origin, model_dirs[v.name], v.name)
    for v in config.variants:
        if v.base is None:
            continue
        adapter = v.adapter
        if adapter is None:
            adapter = work_dir / "adapters" / v.name
            synthetic_adapter(model_dirs[v.base], adapter, seed=int(v.synthetic_seed or 0), rank=v.synthetic_rank)
        manifests[v.name] = publish_adapter(origin, adapter, v.name, v.base)
    return manifests


def instance_for(config: ApplyConfig, manifests: dict[str, Manifest], refs: References,
                 demand: tuple[tuple[float, ...], ...]) -> PlacementInstance:  # fmt: skip
    """The placement instance of the real variants: blocks by digest, measured costs, the config's network."""
    block_bytes: dict[str, int] = {}
    models = []
    for v in config.variants:
        blocks = required_digests(manifests, {v.name})
        block_bytes.update(blocks)
        prefill, decode = refs.costs[v.name]
        models.append(Model(v.name, tuple(sorted(blocks)), prefill, decode))
    servers = tuple(Server(s.name, s.storage_bytes, s.speed, backhaul=s.backhaul) for s in config.servers)
    users = tuple(User(u.name, u.latency_req_ms) for u in config.users)
    reach = tuple(Reach(u.name, s, link) for u in config.users for s, link in u.reach)
    workload = Workload(prompt_tokens=max(1, refs.prompt_tokens), output_tokens=config.max_new_tokens)
    return PlacementInstance(servers, users, tuple(models), block_bytes, demand, reach, workload)


def measure_references(nodes: CacheNodes, config: ApplyConfig) -> References:
    """Each variant answers each prompt on the cloud (after one warm-up answer): the reference tokens and the
    measured prefill and decode ms per token (the median over prompts)."""
    refs = References()
    with Phase("reference answers on the cloud", total=len(config.variants) * len(config.prompts), log=log) as phase:
        nodes.generate(CLOUD, config.variants[0].name, request(config, config.prompts[0]))  # warm-up
        for v in config.variants:
            prefill, decode = [], []
            for prompt in config.prompts:
                tokens, report = nodes.generate(CLOUD, v.name, request(config, prompt))
                refs.tokens[(v.name, prompt, config.max_new_tokens)] = tokens
                prompt_tokens = max(1, len(report.get("prompt_tokens") or ()))
                refs.prompt_tokens = max(refs.prompt_tokens, prompt_tokens)
                prefill.append(float(report["ttft_ms"]) / prompt_tokens)
                decode.append(float(report.get("decode_ms_per_token") or report["ttft_ms"]))
                phase.advance()
            refs.costs[v.name] = (float(np.median(prefill)), float(np.median(decode)))
    return refs


def request(config: ApplyConfig, prompt: str, max_new_tokens: int | None = None) -> dict[str, Any]:
    return {"prompt": prompt, "max_new_tokens": max_new_tokens or config.max_new_tokens}


def run_phases(nodes: CacheNodes, config: ApplyConfig, manifests: dict[str, Manifest], refs: References,
               on_phase: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Every phase in turn (see the module's docstring); -> one report per phase."""
    previous = Placement({s.name: frozenset() for s in config.servers})
    reports = []
    for phase in config.phases:
        instance = instance_for(config, manifests, refs, phase_demand(config, phase))
        solution = solve(instance, config.algorithm)
        predicted = migration(instance, previous, solution.placement)
        carry = _start_carry(nodes, config, manifests, previous, solution.placement)
        holdings = {s.name: set(solution.placement.on(s.name)) for s in config.servers}
        order = {s.name: [*sorted(set(holdings) - {s.name}), CLOUD] for s in config.servers}
        links = {(s.name, src): LinkProfile(s.backhaul.up_mbps, s.backhaul.down_mbps, s.backhaul.rtt_ms)
                 for s in config.servers for src in order[s.name]}  # fmt: skip
        started = time.perf_counter()
        synced = nodes.sync(holdings, manifests, order, links)
        sync_s = time.perf_counter() - started
        carried = _finish_carry(nodes, config, carry)
        served = _serve_requests(nodes, config, instance, solution.placement, phase, refs)
        report = {"phase": phase.name, "popularity": list(phase.popularity), "zipf": phase.zipf,
                  "placement": solution.placement.to_json(), "predicted_hit_ratio": round(solution.hit_ratio, 4),
                  "solve_s": round(solution.solve_s, 4), "stored_bytes": solution.stored_bytes,
                  "migration_predicted": {k: m.to_json() for k, m in predicted.items()},
                  "sync": synced, "sync_s": round(sync_s, 3), "carried_session": carried, **served}  # fmt: skip
        reports.append(report)
        if on_phase is not None:
            on_phase(report)
        previous = solution.placement
    return reports


def _start_carry(nodes: CacheNodes, config: ApplyConfig, manifests: dict[str, Manifest], old: Placement,
                 new: Placement) -> dict[str, Any] | None:  # fmt: skip
    """A long generation, started now, on a variant `old` holds on a server and `new` evicts there."""
    for server in sorted(old.models):
        kept = required_digests(manifests, set(new.on(server)))
        dropped = sorted(v for v in old.on(server) - new.on(server) if not manifests[v].digests <= kept.keys())
        if dropped:
            prompt, tokens = config.prompts[0], config.max_new_tokens * CARRY_TOKENS_FACTOR
            events = nodes.stream(server, dropped[0], request(config, prompt, tokens))
            first = next(events)  # the generation runs (and pins its blocks) from here
            out: list[dict[str, Any]] = [first]
            thread = threading.Thread(target=out.extend, args=(events,), daemon=True)
            thread.start()
            return {"node": server, "variant": dropped[0], "prompt": prompt, "tokens": tokens, "thread": thread,
                    "events": out}  # fmt: skip
    return None


def _finish_carry(nodes: CacheNodes, config: ApplyConfig, carry: dict[str, Any] | None) -> dict[str, Any] | None:
    if carry is None:
        return None
    carry["thread"].join(600)
    got = [int(e["token"]) for e in carry["events"] if "token" in e]
    want, _ = nodes.generate(CLOUD, carry["variant"], request(config, carry["prompt"], carry["tokens"]))
    return {"node": carry["node"], "variant": carry["variant"], "tokens": len(got), "completed": len(got) > 0
            and any("report" in e for e in carry["events"]), "tokens_equal_origin": got == want}  # fmt: skip


def _serve_requests(nodes: CacheNodes, config: ApplyConfig, instance: PlacementInstance, placement: Placement,
                    phase: PhaseSpec, refs: References) -> dict[str, Any]:  # fmt: skip
    rng = np.random.default_rng(phase.seed)
    demand = np.asarray(instance.demand)
    rows: list[dict[str, Any]] = []
    with Phase(f"phase {phase.name}: requests", total=phase.requests, log=log) as bar:
        for i in range(phase.requests):
            u = int(rng.integers(len(instance.users)))
            m = int(rng.choice(len(instance.models), p=demand[u] / demand[u].sum()))
            user, variant = instance.users[u].name, instance.models[m].name
            prompt = config.prompts[i % len(config.prompts)]
            server = route(instance, placement, user, variant)
            node = server or CLOUD
            start = time.perf_counter()
            tokens, _ = nodes.generate(node, variant, request(config, prompt))
            wall_ms = (time.perf_counter() - start) * 1e3
            want = refs.tokens[(variant, prompt, config.max_new_tokens)]
            rows.append({"user": user, "variant": variant, "node": node, "edge_hit": server is not None,
                         "tokens_equal_origin": tokens == want, "wall_ms": round(wall_ms, 1)})  # fmt: skip
            bar.advance()
    hits = sum(r["edge_hit"] for r in rows)
    return {"requests": rows, "served_at_edge": hits, "served_by_cloud": len(rows) - hits,
            "measured_hit_ratio": round(hits / len(rows), 4),
            "tokens_equal_origin": sum(r["tokens_equal_origin"] for r in rows)}  # fmt: skip


def apply(config: ApplyConfig, work_dir: Path, on_phase: Callable[[dict[str, Any]], None] | None = None,
          dtype: str = "fp32") -> dict[str, Any]:  # fmt: skip
    """Publish, start the nodes, measure the references, run every phase, stop the nodes; -> the report."""
    manifests = publish(config, work_dir)
    specs = [CacheNodeSpec(CLOUD, work_dir / "origin")]
    specs += [CacheNodeSpec(s.name, work_dir / "stores" / s.name, s.storage_bytes) for s in config.servers]
    with CacheNodes(specs, work_dir / "logs", dtype=dtype) as nodes:
        nodes.sync({s.name: set() for s in config.servers}, manifests, {})  # a rerun starts from empty stores
        refs = measure_references(nodes, config)
        phases = run_phases(nodes, config, manifests, refs, on_phase)
        final = nodes.reports()
        infos = {name: hop.info() for name, hop in nodes.hops.items()}
    disk = {name: {"used_bytes": r["used_bytes"], "independent_bytes": r["independent_bytes"],
                   "budget_bytes": r["budget_bytes"], "held": infos[name]["held"],
                   "rss_bytes": infos[name]["memory"]["rss_bytes"], "engines": infos[name]["engines"]}
            for name, r in final.items()}  # fmt: skip
    return {
        "config": summary(config),
        "variants": {n: {"kind": m.kind, "base": m.base, "bytes": m.size_bytes, "blocks": len(m.blocks)}
                     for n, m in manifests.items()},
        "measured_costs_ms_per_token": {v: {"prefill": round(p, 3), "decode": round(d, 3)}
                                        for v, (p, d) in refs.costs.items()},
        "phases": phases,
        "stores": disk,
        "emulation": {
            "backhaul": "each server's backhaul link is emulated on its block fetches (sleeps to the profile)",
            "user_links": "the users' links and the cloud link enter the latency model only; requests travel "
                          "over loopback",
            "speed": "server speeds enter the latency model only; every node shares this machine's CPU",
        },
        "logs": str(work_dir / "logs"),
    }  # fmt: skip
