"""The exact placement of a small instance: a mixed-integer program solved by HiGHS (`scipy.optimize.milp`).

    maximise   sum_{u,m} demand[u,m] * z[u,m] / sum(demand)
    subject to z[u,m] <= sum_{s eligible for (u,m)} x[s,m]      a hit needs a server in reach, in time, holding m
               x[s,m] <= y[s,b]          for every block b of m  a model is held only with all its blocks
               sum_b bytes[b] * y[s,b] <= storage[s]              the union of the blocks fits
               x, y binary; 0 <= z <= 1

Only useful variables are built: x[s,m] where s could serve some request for m in time, y[s,b] for the blocks of
those models, z[u,m] where u asks for m and some server could serve it. Storage rows are scaled by the storage,
and the solution is checked against the exact byte counts after rounding. scipy is imported here only.
"""

from __future__ import annotations

import logging

import numpy as np

from edgellm.errors import ConfigError
from edgellm.placement.eligibility import Chosen, Eligibility, Unsuitable, union_bytes

MAX_VARIABLES = 20_000  # beyond this HiGHS may run for hours: use trimcaching
DEFAULT_TIME_LIMIT_S = 60.0

_log = logging.getLogger(__name__)


def _variables(arrays: Eligibility) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays of the useful x (pairs s, m), y (pairs s, b) and z (pairs u, m)."""
    useful = (arrays.demand.T[:, :, None] > 0) & arrays.eligible  # [M, U, S]
    x = np.argwhere(useful.any(axis=1).T)  # [(s, m)]
    blocks_of = (x[:, :1], arrays.uses[x[:, 1]])
    y_mask = np.zeros((arrays.shape[1], arrays.shape[3]), dtype=bool)  # [S, B]
    for s, needs in zip(blocks_of[0][:, 0], blocks_of[1]):
        y_mask[s] |= needs
    y = np.argwhere(y_mask)  # [(s, b)]
    z = np.argwhere(useful.any(axis=2).T)  # [(u, m)]
    return x, y, z


def _constraints(arrays: Eligibility, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[object, np.ndarray]:
    """The sparse constraint matrix (rows <= upper bound) over [x | y | z] and its upper bounds."""
    from scipy.sparse import coo_matrix

    nx, ny = len(x), len(y)
    x_of = {(int(s), int(m)): i for i, (s, m) in enumerate(x)}
    y_of = {(int(s), int(b)): nx + i for i, (s, b) in enumerate(y)}
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    upper: list[float] = []

    def add(entries: list[tuple[int, float]], bound: float) -> None:
        for col, val in entries:
            rows.append(len(upper))
            cols.append(col)
            vals.append(val)
        upper.append(bound)

    for k, (u, m) in enumerate(z):  # z[u,m] - sum_s x[s,m] <= 0
        servers = np.flatnonzero(arrays.eligible[m, u])
        add([(nx + ny + k, 1.0), *((x_of[(int(s), int(m))], -1.0) for s in servers)], 0.0)
    for i, (s, m) in enumerate(x):  # x[s,m] - y[s,b] <= 0
        for b in np.flatnonzero(arrays.uses[m]):
            add([(i, 1.0), (y_of[(int(s), int(b))], -1.0)], 0.0)
    for s in range(arrays.shape[1]):  # sum_b bytes[b] / storage[s] * y[s,b] <= 1
        storage = float(arrays.storage_bytes[s]) or 1.0  # an empty server: sum_b bytes[b] * y[s,b] <= 0
        entries = [(col, float(arrays.block_bytes[b]) / storage) for (t, b), col in y_of.items() if t == s]
        if entries:
            add(entries, 1.0 if arrays.storage_bytes[s] > 0 else 0.0)
    matrix = coo_matrix((vals, (rows, cols)), shape=(len(upper), nx + ny + len(z))).tocsr()
    return matrix, np.array(upper)


def milp(arrays: Eligibility, time_limit_s: float | None = DEFAULT_TIME_LIMIT_S) -> Chosen:
    """The optimal placement (or the best HiGHS found within `time_limit_s`, then `optimal` is False).

    Raises:
        Unsuitable: the program would have more than `MAX_VARIABLES` variables.
        ConfigError: HiGHS found no placement in time.
    """
    from scipy.optimize import Bounds, LinearConstraint
    from scipy.optimize import milp as highs

    x, y, z = _variables(arrays)
    size = len(x) + len(y) + len(z)
    if size > MAX_VARIABLES:
        raise Unsuitable(f"milp: {size} variables > {MAX_VARIABLES}; solve an instance this large with trimcaching")
    held = np.zeros((arrays.shape[1], arrays.shape[2]), dtype=bool)
    if len(z) == 0:
        return Chosen(held, optimal=True)
    total = arrays.total_demand
    cost = np.concatenate([np.zeros(len(x) + len(y)), -arrays.demand[z[:, 0], z[:, 1]] / total])
    matrix, upper = _constraints(arrays, x, y, z)
    integrality = np.concatenate([np.ones(len(x) + len(y)), np.zeros(len(z))])
    options = {"time_limit": time_limit_s} if time_limit_s is not None else {}
    result = highs(cost, constraints=LinearConstraint(matrix, -np.inf, upper), integrality=integrality,
                   bounds=Bounds(0.0, 1.0), options=options)  # fmt: skip
    if result.x is None:
        raise ConfigError(f"milp: HiGHS found no placement ({result.message})")
    chosen = result.x[: len(x)] > 0.5
    held[x[chosen, 0], x[chosen, 1]] = True
    optimal = result.status == 0
    if not optimal:
        _log.warning("milp: stopped before proving optimality (%s)", result.message)
    fits = bool(np.all(union_bytes(arrays, held) <= arrays.storage_bytes))
    return Chosen(held if fits else _repair(arrays, held), optimal=optimal and fits)


def _repair(arrays: Eligibility, held: np.ndarray) -> np.ndarray:
    """Drop models from a server whose exact union of blocks exceeds its storage (a solver tolerance), least
    demanded first, until it fits."""
    held = held.copy()
    for s in np.flatnonzero(union_bytes(arrays, held) > arrays.storage_bytes):
        for m in np.argsort(arrays.demand.sum(axis=0)):
            if union_bytes(arrays, held)[s] <= arrays.storage_bytes[s]:
                break
            held[s, m] = False
    return held
