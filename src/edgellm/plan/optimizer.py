"""The exact optimizer: the best plan of an instance for an objective, under memory budgets and a ppl cap.

    solution = solve(instance, "latency", max_ppl_increase_pct=1.0)
    solution.plan.cuts, solution.cost.decode_ms, solution.binding

Objectives: "latency" minimizes decode_ms (ties: lower ttft_ms); "ttft" minimizes ttft_ms (ties: lower
decode_ms); "throughput" maximizes throughput_tok_s (ties: lower decode_ms). The search space: any path of
servers from the device along existing links (chain) or any order of servers linked to the device (star), every
cut, one scheme per node, one codec per hop, each allowed head side, and with device_first=False thin clients too.

Exact: latency and ttft are additive, so `edgellm.plan.search` finds the optimum directly. Throughput is
1000 / max(decode_ms / N, bottleneck_ms): for a threshold T on every resource's busy time, D(T) = the least
decode_ms of the plans within T is non-increasing in T, so a binary search over the candidate thresholds (every
option's busy time) finds the least T with D(T) / N <= T; the optimum is the better of the plans at that T and
at the threshold just below it. A ppl cap makes each label a Pareto set of (cost, ppl); `edgellm.plan.bounds`
keeps those sets small with Lagrangian bounds, without losing exactness.

`solve` first finds the optimum with no memory budget and no cap; if it meets both, it is the answer (binding
None); else the constrained optimum is searched, and `binding` names what the unconstrained one broke.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from dataclasses import dataclass

from edgellm.errors import ConfigError
from edgellm.plan.bounds import capped_best
from edgellm.plan.cost import PlanCost, StageRun, evaluate, objective_key, stage_memory_bytes, violations
from edgellm.plan.instance import MODES, Instance, NodeCaps
from edgellm.plan.options import Criteria, StageKind
from edgellm.plan.placement import HEADS, OBJECTIVES, Plan
from edgellm.plan.search import Search, Space
from edgellm.plan.synthetic import benchmark_instance

__all__ = ["InfeasiblePlan", "Solution", "benchmark_instance", "make_space", "solve"]

_REL_TOL = 1e-9


class InfeasiblePlan(ConfigError):
    """No plan in the search space meets the constraints; the one-line message names the binding one."""


@dataclass(frozen=True)
class Solution:
    """The optimal plan, its cost, the constraint that binds (None: the unconstrained optimum meets every
    constraint), and the time the solve took."""

    plan: Plan
    cost: PlanCost
    binding: str | None
    solve_ms: float


def make_space(
    instance: Instance,
    objective: str,
    max_ppl_increase_pct: float,
    device_first: bool,
    heads: tuple[str, ...],
    modes: tuple[str, ...] | None,
) -> Space:
    """Check the arguments of `solve` and return the search space (modes None: the instance's mode).

    Raises:
        ConfigError: naming the bad argument.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; choose from {list(OBJECTIVES)}")
    if (
        isinstance(max_ppl_increase_pct, bool)
        or not isinstance(max_ppl_increase_pct, int | float)
        or math.isnan(max_ppl_increase_pct)
    ):
        raise ConfigError(f"max ppl increase must be a number, got {max_ppl_increase_pct!r}")
    heads, modes = tuple(heads), (instance.mode,) if modes is None else tuple(modes)
    if not heads or any(h not in HEADS for h in heads):
        raise ConfigError(f"heads must be a non-empty subset of {list(HEADS)}, got {list(heads)}")
    if not modes or any(m not in MODES for m in modes):
        raise ConfigError(f"modes must be a non-empty subset of {list(MODES)}, got {list(modes)}")
    return Space(tuple(dict.fromkeys(modes)), tuple(dict.fromkeys(heads)), bool(device_first))


def solve(
    instance: Instance,
    objective: str = "latency",
    max_ppl_increase_pct: float = math.inf,
    device_first: bool = True,
    heads: tuple[str, ...] = HEADS,
    modes: tuple[str, ...] | None = None,
) -> Solution:
    """The optimal plan (see the module docstring).

    Raises:
        ConfigError: a bad argument.
        InfeasiblePlan: no plan meets the memory budgets and the ppl cap (or the space is empty).
    """
    began = time.perf_counter()
    space = make_space(instance, objective, max_ppl_increase_pct, device_first, heads, modes)
    free = optimum(instance, space, objective, memory=False, cap=math.inf)
    if free is None:
        raise InfeasiblePlan(_structural_message(instance, space))
    free_cost = evaluate(instance, free)
    broken = violations(instance, free_cost, max_ppl_increase_pct)
    if not broken:
        return Solution(free, free_cost, None, (time.perf_counter() - began) * 1000)
    plan = optimum(instance, space, objective, memory=True, cap=max_ppl_increase_pct)
    if plan is None:
        raise InfeasiblePlan(diagnose(instance, space, max_ppl_increase_pct))
    cost = evaluate(instance, plan)
    reached, ideal = objective_key(cost, objective)[0], objective_key(free_cost, objective)[0]
    binding = None if reached <= ideal + _REL_TOL * abs(ideal) else ", ".join(b.split(":")[0] for b in broken)
    return Solution(plan, cost, binding, (time.perf_counter() - began) * 1000)


def optimum(instance: Instance, space: Space, objective: str, memory: bool, cap: float) -> Plan | None:
    """The optimal plan of the space for the objective (memory: respect budgets; cap: the ppl cap), or None."""
    if objective == "throughput":
        return _throughput_optimum(instance, space, memory, cap)
    primary, secondary = ("decode", "ttft") if objective == "latency" else ("ttft", "decode")
    result = cheapest(instance, space, Criteria(primary, secondary, cap, memory))
    return None if result is None else result[1]


def cheapest(instance: Instance, space: Space, criteria: Criteria) -> tuple[float, Plan] | None:
    """The cheapest plan under `criteria`: (its cost as the search summed it, the plan), or None."""
    if not criteria.scalar:
        return capped_best(instance, space, criteria)
    search = Search(instance, criteria)
    found = search.best(space)
    return None if found is None else (found.label[0], search.plan(found))


def _throughput_optimum(instance: Instance, space: Space, memory: bool, cap: float) -> Plan | None:
    unlimited = Search(instance, Criteria("decode", "ttft", math.inf, memory))
    if unlimited.best(space) is None:
        return None
    fastest = cheapest(instance, space, Criteria("decode", "ttft", cap, memory))
    if fastest is None:
        return None
    least_decode, fastest_plan = fastest
    # The optimum's cycle lies in [D(inf) / N, the fastest plan's cycle]: so does the binary search.
    ceiling = 1000.0 / evaluate(instance, fastest_plan).throughput_tok_s
    thresholds = sorted(t for t in unlimited.options.busy_ms if t <= ceiling)
    results: dict[int, tuple[float, Plan] | None] = {}

    def at(i: int) -> tuple[float, Plan] | None:  # (least decode_ms, its plan) within thresholds[i]
        if i not in results:
            results[i] = cheapest(instance, space, Criteria("decode", "ttft", cap, memory, thresholds[i]))
        return results[i]

    lo = bisect_left(thresholds, least_decode / instance.sessions)  # below it D(T) / N > T
    hi = len(thresholds)  # find the least i with D(T_i) / N <= T_i (monotone), or len(thresholds)
    while lo < hi:
        mid = (lo + hi) // 2
        result = at(mid)
        if result is not None and result[0] / instance.sessions <= thresholds[mid]:
            hi = mid
        else:
            lo = mid + 1
    found = [at(i) for i in (lo - 1, lo) if 0 <= i < len(thresholds)]
    plans = [fastest_plan] + [r[1] for r in found if r is not None]
    return min(plans, key=lambda p: objective_key(evaluate(instance, p), "throughput"))


def _structural_message(instance: Instance, space: Space) -> str:
    device = instance.device.name
    linked = [n.name for n in instance.nodes[1:] if instance.link(device, n.name) is not None]
    if not linked and "device" not in space.heads:
        return f"no plan: head='server' needs a server linked to the device {device!r}, and none is"
    return f"no plan in the search space (modes {list(space.modes)}, heads {list(space.heads)})"


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e7 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n:.0f} bytes"


def _max_layers(instance: Instance, node: NodeCaps, kind: StageKind) -> tuple[int, int, str]:
    """(most layers the node holds in role `kind` at any scheme (-1: not even the embedding or head),
    the least bytes the role needs with 0 layers, and the scheme of that least)."""
    model, num_layers = instance.model, instance.model.num_layers
    most, least, least_scheme = -1, -1, ""
    for scheme in node.schemes:
        base = stage_memory_bytes(
            model, StageRun(node, scheme, 0, kind.embeds, kind.holds_head, kind.separate_head), instance.sessions
        )
        if least < 0 or base < least:
            least, least_scheme = base, scheme.name
        per_layer = scheme.layer_bytes + node.kv_bytes_per_token_per_layer * model.max_context * instance.sessions
        if node.memory_bytes is None:
            most = num_layers
        elif base <= node.memory_bytes:
            fits = num_layers if per_layer == 0 else (node.memory_bytes - base) // per_layer
            most = max(most, min(num_layers, fits))
    return most, least, least_scheme


def _reachable(instance: Instance, space: Space) -> set[str]:
    """The servers some plan of the space can use: linked to the device (star), or joined to it by links (chain)."""
    device = instance.device.name
    seen = {n.name for n in instance.nodes[1:] if instance.link(device, n.name) is not None}
    if "chain" in space.modes:
        frontier = list(seen)
        while frontier:
            here = frontier.pop()
            for node in instance.nodes[1:]:
                if node.name not in seen and instance.link(here, node.name) is not None:
                    seen.add(node.name)
                    frontier.append(node.name)
    return seen


def _memory_message(instance: Instance, space: Space) -> str:
    device, num_layers = instance.device, instance.model.num_layers
    total = 0
    if space.device_first:
        kinds = [(StageKind(True, h == "device", h == "device"), h) for h in space.heads]
        fits = [(_max_layers(instance, device, kind), h) for kind, h in kinds]
        (most, least, scheme), head = max(fits, key=lambda f: (f[0][0], -f[0][1], f[1] == "server"))
        if most < 0:
            what = "the embedding and head" if head == "device" else "the embedding"
            budget = _fmt_bytes(device.memory_bytes or 0)
            return f"no plan fits: node {device.name!r} cannot hold {what} at any scheme (needs >= {_fmt_bytes(least)} at {scheme}, budget {budget})"
        total += most
    servers = [n for n in instance.nodes[1:] if n.name in _reachable(instance, space)]
    total += sum(max(0, _max_layers(instance, n, StageKind(False, False))[0]) for n in servers)
    if total < num_layers:
        return (
            f"no plan fits: the reachable nodes' memory holds at most {total} of the {num_layers} layers at any scheme"
        )
    return f"no plan fits in the nodes' memory budgets: no placement of the {num_layers} layers, embedding and head fits every node"


def diagnose(instance: Instance, space: Space, cap: float) -> str:
    """One line naming the constraint that makes the space infeasible: memory (which node, or the layers'
    total), else the ppl cap (with the least ppl increase any memory-feasible plan reaches)."""
    if Search(instance, Criteria("decode", "ttft", math.inf, True)).best(space) is None:
        return _memory_message(instance, space)
    found = Search(instance, Criteria("ppl", "decode", math.inf, True)).best(space)
    assert found is not None
    return f"no plan meets max ppl increase {cap:.4g}%: the best reachable is +{found.label[0]:.4g}%"
