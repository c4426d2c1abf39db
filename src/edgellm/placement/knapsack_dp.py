"""The special case of few shared blocks, by dynamic programming (TrimCaching's second algorithm).

A block is *shared* when two or more models use it (a common base); every other block is *specific* to its one
model. With few shared blocks, one server's best content is found exactly: for each subset T of the shared blocks
that fits, the models whose shared blocks lie within T are a 0/1 knapsack on their specific bytes in the storage
T leaves, each worth the hits it adds; the best T wins. Within one server the hits of different models add up
(a request is for one model), so this is exact for the server. Servers are filled in turn, each given the hits
the servers before it already serve.

Sizes are counted in units: the greatest common divisor of the block sizes and the capacities when that keeps
the table within `MAX_UNITS` cells (then exact), else capacity / `MAX_UNITS` with each model's size rounded up (so
the result always fits, and may leave a little storage unused).
"""

from __future__ import annotations

import math
from functools import reduce

import numpy as np

from edgellm.placement.eligibility import Chosen, Eligibility, Unsuitable

MAX_SHARED_BLOCKS = 12  # 4096 subsets per server
MAX_UNITS = 4096  # knapsack capacity cells per subset


def shared_blocks(arrays: Eligibility) -> np.ndarray:
    """[B] bool: blocks two or more models use."""
    return np.asarray(arrays.uses.sum(axis=0) >= 2)


def knapsack(values: np.ndarray, weights: np.ndarray, capacity: int) -> tuple[float, np.ndarray]:
    """0/1 knapsack over integer weights: (best value, [N] bool chosen)."""
    best = np.zeros(capacity + 1)
    take = np.zeros((len(values), capacity + 1), dtype=bool)
    for i, (value, weight) in enumerate(zip(values, weights)):
        if weight > capacity or value <= 0:
            continue
        with_item = best[: capacity + 1 - weight] + value
        better = with_item > best[weight:]
        take[i, weight:] = better
        best[weight:] = np.where(better, with_item, best[weight:])
    chosen = np.zeros(len(values), dtype=bool)
    c = capacity
    for i in range(len(values) - 1, -1, -1):
        if take[i, c]:
            chosen[i] = True
            c -= int(weights[i])
    return float(best[capacity]), chosen


def _unit(specific: np.ndarray, shared_bytes: np.ndarray, capacities: np.ndarray) -> int:
    sizes = [int(v) for v in (*specific, *shared_bytes, *capacities) if v > 0]
    gcd = reduce(math.gcd, sizes, 0) or 1
    if max(capacities, default=0) // gcd <= MAX_UNITS:
        return gcd
    return max(1, math.ceil(int(max(capacities)) / MAX_UNITS))


def _fill_server(
    arrays: Eligibility, s: int, values: np.ndarray, shared_sets: np.ndarray, specific: np.ndarray, unit: int
) -> np.ndarray:
    """[M] bool: the best content of server s (exact up to the size units)."""
    shared_bytes = arrays.block_bytes[shared_blocks(arrays)]
    weights = -(-specific // unit)  # ceil: rounded up, so the choice always fits
    best_value, best_models = -1.0, np.zeros(len(values), dtype=bool)
    for mask in range(1 << len(shared_bytes)):
        in_t = np.array([(mask >> k) & 1 for k in range(len(shared_bytes))], dtype=bool)
        left = int(arrays.storage_bytes[s]) - int(shared_bytes[in_t].sum())
        if left < 0:
            continue
        allowed = ~(shared_sets & ~in_t[None, :]).any(axis=1) & (values > 0)  # shared blocks within T
        value, chosen = knapsack(np.where(allowed, values, 0.0), weights, left // unit)
        if value > best_value:
            best_value, best_models = value, chosen & allowed
    return best_models


def dp(arrays: Eligibility, time_limit_s: float | None = None) -> Chosen:
    """Servers filled in turn, each with its exact best content given the servers before it.

    Raises:
        Unsuitable: the instance has more than `MAX_SHARED_BLOCKS` shared blocks (use `trimcaching` or `milp`).
    """
    shared = shared_blocks(arrays)
    if int(shared.sum()) > MAX_SHARED_BLOCKS:
        raise Unsuitable(
            f"dp handles instances with at most {MAX_SHARED_BLOCKS} shared blocks (blocks two or more models use); "
            f"this one has {int(shared.sum())}: use trimcaching or milp"
        )
    _, servers, models, _ = arrays.shape
    shared_sets = arrays.uses[:, shared]  # [M, K]
    specific = (arrays.uses[:, ~shared].astype(np.int64) @ arrays.block_bytes[~shared]).astype(np.int64)  # [M]
    unit = _unit(specific, arrays.block_bytes[shared], arrays.storage_bytes)
    eligible = arrays.eligible.astype(np.float64)  # [M, U, S]
    residual = arrays.demand.copy()  # [U, M]
    held = np.zeros((servers, models), dtype=bool)
    for s in range(servers):
        values = np.einsum("um,mu->m", residual, eligible[:, :, s])  # [M]: hits each model would add here
        held[s] = _fill_server(arrays, s, values, shared_sets, specific, unit)
        for m in np.flatnonzero(held[s]):
            residual[:, m] *= 1.0 - eligible[m][:, s]
    return Chosen(held)
