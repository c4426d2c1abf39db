"""Brute force over the optimizer's search space: every plan, costed by `edgellm.plan.cost`. For tests (it is
exponential); it shares nothing with the optimizer's programs but the space's definition."""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import permutations, product

from edgellm.plan.cost import PlanCost, evaluate, objective_key, violations
from edgellm.plan.instance import Instance
from edgellm.plan.optimizer import InfeasiblePlan, Solution, make_space
from edgellm.plan.placement import HEADS, Plan, StageAssign
from edgellm.plan.search import Space


def _chain_paths(instance: Instance, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """Every simple path of servers that extends `path` (a path from the device) along links, itself included."""
    yield path[1:]
    for node in instance.nodes[1:]:
        if node.name not in path and instance.link(path[-1], node.name) is not None:
            yield from _chain_paths(instance, (*path, node.name))


def server_orders(instance: Instance, mode: str) -> Iterator[tuple[str, ...]]:
    """Every order of servers a plan can visit (the empty one included)."""
    device = instance.device.name
    if mode == "chain":
        yield from _chain_paths(instance, (device,))
        return
    linked = [n.name for n in instance.nodes[1:] if instance.link(device, n.name) is not None]
    for k in range(len(linked) + 1):
        yield from permutations(linked, k)


def _compositions(total: int, parts: int, first_min: int) -> Iterator[tuple[int, ...]]:
    """Every tuple of `parts` layer counts summing to `total`, the first >= first_min, the others >= 1."""
    if parts == 1:
        if total >= first_min:
            yield (total,)
        return
    for first in range(first_min, total - (parts - 1) + 1):
        for rest in _compositions(total - first, parts - 1, 1):
            yield (first, *rest)


def _shapes(instance: Instance, space: Space) -> Iterator[tuple[str, str, bool, tuple[str, ...]]]:
    """(mode, head, thin client, node order) of every plan shape in the space."""
    device = instance.device.name
    for mode in space.modes:
        orders = list(server_orders(instance, mode))
        for head in space.heads:
            for thin in (False,) if space.device_first else (False, True):
                for servers in orders:
                    if (thin and head == "device") or (head == "server" and not servers):
                        continue
                    yield mode, head, thin, servers if thin else (device, *servers)


def plans(instance: Instance, space: Space) -> Iterator[Plan]:
    """Every plan of the space (one per cut, scheme per node and codec per hop)."""
    codec_names = [c.name for c in instance.codecs]
    for mode, head, thin, order in _shapes(instance, space):
        hops = len(order) - (0 if thin else 1)
        schemes = [
            [s.name for s in instance.nodes[[n.name for n in instance.nodes].index(name)].schemes] for name in order
        ]
        for counts in _compositions(instance.model.num_layers, len(order), 1 if thin else 0):
            bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
            for chosen in product(*schemes):
                stages = tuple(
                    StageAssign(n, bounds[i], bounds[i + 1], s) for i, (n, s) in enumerate(zip(order, chosen))
                )
                for codecs in product(codec_names, repeat=hops):
                    yield Plan(stages, codecs, head, mode)


def count_plans(instance: Instance, space: Space) -> int:
    """How many plans `plans` yields (without building them)."""
    total = 0
    for _, _, thin, order in _shapes(instance, space):
        ways = sum(1 for _ in _compositions(instance.model.num_layers, len(order), 1 if thin else 0))
        for name in order:
            node = instance.node(name)
            assert node is not None
            ways *= len(node.schemes)
        total += ways * len(instance.codecs) ** (len(order) - (0 if thin else 1))
    return total


def costed_plans(instance: Instance, space: Space) -> list[tuple[Plan, PlanCost]]:
    """Every plan of the space with its cost (constraints not applied)."""
    return [(plan, evaluate(instance, plan)) for plan in plans(instance, space)]


def pick(
    instance: Instance, costed: list[tuple[Plan, PlanCost]], objective: str, max_ppl_increase_pct: float
) -> tuple[Plan, PlanCost, str | None] | None:
    """The best of `costed` meeting the memory budgets and the ppl cap, and the binding constraints (those the
    best of all, constraints ignored, breaks); None when none meets them."""
    if not costed:
        return None
    free = min(costed, key=lambda pc: objective_key(pc[1], objective))
    feasible = [pc for pc in costed if not violations(instance, pc[1], max_ppl_increase_pct)]
    if not feasible:
        return None
    plan, cost = min(feasible, key=lambda pc: objective_key(pc[1], objective))
    reached, ideal = objective_key(cost, objective)[0], objective_key(free[1], objective)[0]
    if reached <= ideal + 1e-9 * abs(ideal):  # the tolerance `solve` uses for "the constraints cost nothing"
        return plan, cost, None
    broken = violations(instance, free[1], max_ppl_increase_pct)
    return plan, cost, ", ".join(b.split(":")[0] for b in broken)


def exhaustive_solve(
    instance: Instance,
    objective: str = "latency",
    max_ppl_increase_pct: float = math.inf,
    device_first: bool = True,
    heads: tuple[str, ...] = HEADS,
    modes: tuple[str, ...] | None = None,
) -> Solution:
    """`edgellm.plan.optimizer.solve` by brute force (same arguments, same space; solve_ms is 0).

    Raises:
        InfeasiblePlan: no plan of the space meets the constraints.
    """
    space = make_space(instance, objective, max_ppl_increase_pct, device_first, heads, modes)
    found = pick(instance, costed_plans(instance, space), objective, max_ppl_increase_pct)
    if found is None:
        raise InfeasiblePlan("no plan in the search space meets the memory budgets and the max ppl increase")
    return Solution(found[0], found[1], found[2], 0.0)
