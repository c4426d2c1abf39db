"""Label algebra of the optimizer's dynamic programs: Pareto sets of (cost, tie-break, ppl) and their sums.

A label is (primary, secondary, ppl, back): two additive costs compared lexicographically, the additive ppl the
cap constrains, and `back`, how the label was made (a leaf's description, or ("+", left, right)). A label set is
a list of labels none of which another dominates (lower or equal cost and ppl), sorted by cost: it is the exact
way to carry an additive side constraint through a min-cost program. With no cap every ppl is 0 and each set has
at most one label; `convolve` then takes a fast path that does its arithmetic in C (`map`, `min`).

A table is a list, indexed by a number of layers, of label sets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import compress, repeat
from operator import add, eq, itemgetter
from typing import Any

Label = tuple[float, float, float, Any]
Table = list[list[Label]]

ZERO: Label = (0.0, 0.0, 0.0, None)
_COST = itemgetter(0, 1, 2)


def plus(a: Label, b: Label) -> Label:
    """The label of doing a and b."""
    return a[0] + b[0], a[1] + b[1], a[2] + b[2], ("+", a, b)


def pareto(candidates: list[Label]) -> list[Label]:
    """The non-dominated labels of `candidates` (reordered), by increasing cost and strictly decreasing ppl."""
    candidates.sort(key=_COST)
    out = []
    best_ppl = math.inf
    for label in candidates:
        if label[2] < best_ppl:
            out.append(label)
            best_ppl = label[2]
    return out


def sums(xs: list[Label], ys: list[Label], cap: float) -> list[Label]:
    """The label set of x + y for x in xs, y in ys, keeping ppl <= cap."""
    if len(xs) == 1 and len(ys) == 1:
        label = plus(xs[0], ys[0])
        return [label] if label[2] <= cap else []
    return pareto([plus(x, y) for x in xs for y in ys if x[2] + y[2] <= cap])


def best(labels: Iterable[Label], cap: float) -> Label | None:
    """The cheapest label with ppl <= cap (lexicographic on cost), or None."""
    feasible = [label for label in labels if label[2] <= cap]
    return min(feasible, key=_COST) if feasible else None


def leaves(label: Label) -> list[Any]:
    """The `back` of every leaf under `label`, left to right (the order the program added them)."""
    out = []
    stack = [label[3]]
    while stack:
        back = stack.pop()
        if back is None:
            continue
        if back[0] == "+":
            stack.append(back[2][3])
            stack.append(back[1][3])
        else:
            out.append(back)
    return out


def convolve(
    ta: Table, tb: Table, outs: Iterable[int], cap: float, scalar: bool, bound: tuple[float, list[float]] | None = None
) -> dict[int, list[Label]]:
    """Min-plus convolution: out[m] = label set of a + b over a in ta[i], b in tb[m - i], for m in `outs`.

    `scalar` promises every set of ta and tb has at most one label (no cap): the fast path. `bound` = (weight,
    room) keeps only the sums with cost + weight * ppl <= room[m] (see `edgellm.plan.bounds`).
    """
    if scalar:
        return _convolve_scalar(ta, tb, outs)
    weight, room = bound if bound is not None else (0.0, None)
    least_a = [min(x[0] + weight * x[2] for x in xs) if xs else math.inf for xs in ta]
    least_b = [min(y[0] + weight * y[2] for y in ys) if ys else math.inf for ys in tb]
    out = {}
    na, nb = len(ta), len(tb)
    for m in outs:
        candidates: list[Label] = []
        limit = math.inf if room is None else room[m]
        for i in range(max(0, m - nb + 1), min(m, na - 1) + 1):
            if least_a[i] + least_b[m - i] > limit:
                continue
            for x in ta[i]:
                for y in tb[m - i]:
                    ppl = x[2] + y[2]
                    if ppl <= cap and x[0] + y[0] + weight * ppl <= limit:
                        candidates.append(plus(x, y))
        out[m] = pareto(candidates)
    return out


def _convolve_scalar(ta: Table, tb: Table, outs: Iterable[int]) -> dict[int, list[Label]]:
    inf = math.inf
    pa = [s[0][0] if s else inf for s in ta]
    rb = [s[0][0] if s else inf for s in reversed(tb)]  # rb[k] = cost of tb[nb - 1 - k]
    na, nb = len(ta), len(tb)
    out: dict[int, list[Label]] = {}
    second_a: list[float] | None = None
    second_b: list[float] | None = None
    for m in outs:
        lo, hi = max(0, m - nb + 1), min(m, na - 1)
        if lo > hi:
            out[m] = []
            continue
        shift = nb - 1 - m
        costs = list(map(add, pa[lo : hi + 1], rb[shift + lo : shift + hi + 1]))
        cheapest = min(costs)
        if cheapest == inf:
            out[m] = []
            continue
        k = costs.index(cheapest)
        if costs.count(cheapest) > 1:  # an exact tie: the secondary cost decides
            if second_a is None or second_b is None:
                second_a = [s[0][1] if s else inf for s in ta]
                second_b = [s[0][1] if s else inf for s in reversed(tb)]
            seconds = list(map(add, second_a[lo : hi + 1], second_b[shift + lo : shift + hi + 1]))
            k = min(compress(range(len(costs)), map(eq, costs, repeat(cheapest))), key=seconds.__getitem__)
        out[m] = [plus(ta[lo + k][0], tb[m - lo - k][0])]
    return out
