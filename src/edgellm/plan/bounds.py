"""The capped search made fast, still exact: Lagrangian bounds prune the Pareto labels of the ppl cap.

For lambda >= 0, a plan of cost c and ppl p meets the cap and costs at most UB only if
c + lambda * p <= UB + lambda * cap. A label (c', p') of a partial plan (the servers in T holding m layers, or
the root's and last server's stages holding j layers) completes into such a plan only if
c' + lambda * p' + ctg <= UB + lambda * cap, where ctg is the least lambda-weighted cost of any completion: a
scalar program computes it (cost-to-go). Labels that fail are dropped; the optimum never fails.

UB is the cost of the best plan found that meets the cap; lambda is the optimal Lagrange multiplier, found by
walking the lower convex hull of (cost, ppl) from the cheapest plan and the least-ppl plan (each step one scalar
search), which makes the bound as tight as a Lagrangian bound gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from operator import add

from edgellm.plan.cost import evaluate
from edgellm.plan.instance import Instance
from edgellm.plan.labels import Table
from edgellm.plan.options import Criteria
from edgellm.plan.placement import Plan
from edgellm.plan.search import Problem, Search, Space

_REL_SLACK = 1e-9


@dataclass(frozen=True)
class _Point:
    """A plan of a scalar search: its DP cost, its cost and ppl as the cost model gives them."""

    value: float
    cost: float
    ppl: float
    plan: Plan


def _point(instance: Instance, search: Search, space: Space, metric: str) -> _Point | None:
    found = search.best(space)
    if found is None:
        return None
    plan = search.plan(found)
    cost = evaluate(instance, plan)
    return _Point(found.label[0], cost.decode_ms if metric == "decode" else cost.ttft_ms, cost.ppl_increase_pct, plan)


class Bounds:
    """A `Pruner`: room[m] = limit - cost-to-go[m] for each alloc(T) and joined table."""

    def __init__(
        self,
        weight: float,
        limit: float,
        ctg_alloc: dict[int, list[float]],
        ctg_joined: dict[tuple[Problem, int], list[float]],
    ) -> None:
        self.weight = weight
        self._alloc = {mask: [limit - c for c in ctg] for mask, ctg in ctg_alloc.items()}
        self._joined = {key: [limit - c for c in ctg] for key, ctg in ctg_joined.items()}

    def alloc_room(self, mask: int) -> list[float] | None:
        return self._alloc.get(mask)

    def joined_room(self, problem: Problem, u: int) -> list[float] | None:
        return self._joined.get((problem, u))


def _costs(table: Table) -> list[float]:
    return [labels[0][0] if labels else math.inf for labels in table]


def cost_to_go(search: Search, space: Space) -> tuple[dict[int, list[float]], dict[tuple[Problem, int], list[float]]]:
    """The least cost of completing each alloc(T)[m] and each joined[u][j] of a finished scalar search."""
    num_layers, inf = search.instance.model.num_layers, math.inf
    direct: dict[int, list[float]] = {}
    joined: dict[tuple[Problem, int], list[float]] = {}
    for problem in search.problems(space):
        parts = search.parts(problem)
        if parts is None or not parts.hop_more:
            continue
        for (mask, u), path in parts.paths.items():
            head = path[0][0] + parts.hop_more[0][0]
            rest = mask & ~(1 << u)
            # joined[u][j] completes with alloc(rest)[L - j]; alloc(rest)[m] with joined[u][L - m].
            via_alloc = [head + c for c in reversed(_costs(search.alloc(rest)))]
            via_joined = [head + c for c in reversed(_costs(parts.joined[u]))]
            joined[problem, u] = list(map(min, joined.get((problem, u), via_alloc), via_alloc))
            direct[rest] = list(map(min, direct.get(rest, via_joined), via_joined))
    mid = [_costs(table) for table in search.mid]
    ctg: dict[int, list[float]] = {}
    for mask in sorted(search.allocated(), reverse=True):  # alloc(T | v), v below T's bits, is built from alloc(T)
        if mask == 0:
            continue
        best = direct.get(mask, [inf] * (num_layers + 1))
        low = (mask & -mask).bit_length() - 1
        for v in range(low):
            above = ctg.get(mask | 1 << v)
            if above is not None:
                grown = [
                    min(map(add, mid[v][1 : num_layers - m + 1], above[m + 1 :]), default=inf)
                    for m in range(num_layers + 1)
                ]
                best = list(map(min, best, grown))
        ctg[mask] = best
    return ctg, joined


def capped_best(instance: Instance, space: Space, criteria: Criteria) -> tuple[float, Plan] | None:
    """The cheapest plan meeting criteria.cap (and the rest of `criteria`): (its DP cost, the plan), or None."""
    free = replace(criteria, cap=math.inf, ppl_weight=0.0)
    search = Search(instance, free)
    lo = _point(instance, search, space, criteria.primary)
    if lo is None:
        return None
    if lo.ppl <= criteria.cap:  # the cheapest plan meets the cap
        return lo.value, lo.plan
    hi = _point(
        instance, Search(instance, replace(free, primary="ppl", secondary=criteria.primary)), space, criteria.primary
    )
    if hi is None or hi.ppl > criteria.cap:
        return None
    upper, weight, lower = hi.cost, 0.0, lo.value  # lower: no plan meeting the cap costs less
    for _ in range(64):  # walk the hull: each step finds a new vertex or proves the multiplier optimal
        weight = (hi.cost - lo.cost) / (lo.ppl - hi.ppl)
        search = Search(instance, replace(free, ppl_weight=weight))
        point = _point(instance, search, space, criteria.primary)
        assert point is not None
        lower = max(lower, point.value - weight * criteria.cap)  # the Lagrangian bound
        line = lo.cost + weight * lo.ppl
        if point.cost + weight * point.ppl >= line - _REL_SLACK * abs(line):
            break
        if point.ppl <= criteria.cap:
            hi, upper = point, min(upper, point.cost)
        else:
            lo = point
    return _deepen(instance, space, criteria, weight, cost_to_go(search, space), lower, upper) or (hi.cost, hi.plan)


def _deepen(
    instance: Instance,
    space: Space,
    criteria: Criteria,
    weight: float,
    ctg: tuple[dict[int, list[float]], dict[tuple[Problem, int], list[float]]],
    lower: float,
    upper: float,
) -> tuple[float, Plan] | None:
    """Searches with the bound at growing targets between the Lagrangian bound and the best plan found: a
    search whose best plan costs <= its target has found the optimum (every plan within the target survives);
    one that finds none proves the optimum costs more. The last target is `upper`, which its plan survives."""
    gap = max(0.0, upper - lower)
    for fraction in _FRACTIONS:
        target = min(upper, lower + fraction * gap)
        limit = target + weight * criteria.cap
        search = Search(instance, criteria, Bounds(weight, limit + _REL_SLACK * (abs(limit) + 1.0), *ctg))
        found = search.best(space)
        if found is not None:
            if found.label[0] <= target + _REL_SLACK * (abs(target) + 1.0) or target >= upper:
                return found.label[0], search.plan(found)
            upper = min(upper, found.label[0])
    return None  # only floating-point noise can prune every label: the caller's best plan stands


_FRACTIONS = (0.125, 0.5, 1.0)
