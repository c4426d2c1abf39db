"""Greedy placements: the independent-caching baseline and the TrimCaching greedy.

Both add one (server, model) pair at a time, the one with the most marginal hits per marginal byte that still
fits, until none adds a hit. They differ in what a model costs:

* independent caching stores each model whole: its cost is the sum of its blocks, whatever the server holds;
* TrimCaching (Qu, Lin et al., 2024) stores each block once per server: a model's marginal cost is the bytes of
  its blocks the server does not hold yet (zero when another model brought them all), and the storage constraint
  is on the union of the blocks.

The hit objective is monotone submodular; under a knapsack-type constraint the cost-benefit greedy alone can be
arbitrarily bad (one cheap model crowding out a valuable large one), so `trimcaching` runs the cost-benefit greedy
and the plain greedy (most marginal hits, cost ignored but feasibility kept) and returns the better, as is
standard for knapsack-constrained submodular maximisation. Both also run once from each of the `SEED_PAIRS`
(server, model) pairs of most initial hits placed first (partial enumeration of order one): a greedy's first
choices can commit neighbouring servers to the wrong base, and a restart from another first pair undoes that
(on 200 random small instances the worst greedy/optimum ratio rose from 0.88 to 0.96, docs/CACHING.md).
Last, the best is compared with the independent placement, which is feasible under the union constraint too (a
union is never larger than a sum): so the sharing-aware placement is never worse than independent caching, on
every instance, by construction.

Speed: marginal hits are kept per (server, model) and updated incrementally: placing m on s only changes the
gains of model m (the users it now covers) and the marginal bytes of server s.
"""

from __future__ import annotations

import numpy as np

from edgellm.placement.eligibility import Chosen, Eligibility, hits

SEED_PAIRS = 16  # partial enumeration: greedy runs started from each of this many (server, model) pairs


class _Fill:
    """The state of a greedy fill: what is held, what is left of each server's storage, the marginal hits and
    marginal bytes of every (server, model) pair."""

    def __init__(self, arrays: Eligibility, shared: bool) -> None:
        servers, models = arrays.shape[1], arrays.shape[2]
        self.arrays, self.shared = arrays, shared
        self.eligible = arrays.eligible_weights  # [M, U, S]
        self.residual = arrays.demand.copy()  # [U, M]: the demand of requests not yet hits
        self.gain = np.einsum("um,mus->sm", self.residual, self.eligible)  # [S, M]
        self.sized = (arrays.uses * arrays.block_bytes[None, :]).T.astype(np.float64)  # [B, M]
        self.missing = np.ones((servers, arrays.uses.shape[1]))  # [S, B]: 1 where the server lacks the block
        self.marginal = np.tile(arrays.model_bytes.astype(np.float64), (servers, 1))  # [S, M]
        self.free = arrays.storage_bytes.astype(np.float64)  # [S]
        self.held = np.zeros((servers, models), dtype=bool)

    def fits(self, s: int, m: int) -> bool:
        return bool(self.marginal[s, m] <= self.free[s])

    def place(self, s: int, m: int) -> None:
        """Hold m on s: its storage, its blocks, and the gains of model m change."""
        self.held[s, m] = True
        self.free[s] -= self.marginal[s, m]
        if self.shared:
            self.missing[s, self.arrays.uses[m]] = 0.0
            self.marginal[s] = self.missing[s] @ self.sized
        self.residual[:, m] *= 1.0 - self.eligible[m][:, s]
        self.gain[:, m] = self.residual[:, m] @ self.eligible[m]

    def run(self, by_ratio: bool) -> np.ndarray:
        """Add pairs until none that fits adds a hit; returns `held` [S, M]."""
        while True:
            open_ = ~self.held & (self.gain > 0) & (self.marginal <= self.free[:, None])
            if not open_.any():
                return self.held
            if by_ratio:
                score = np.where(self.marginal > 0, self.gain / np.maximum(self.marginal, 1.0), np.inf)
            else:
                score = self.gain.copy()
            score[~open_] = -1.0
            s, m = np.unravel_index(int(np.argmax(score)), score.shape)
            self.place(int(s), int(m))


def greedy(arrays: Eligibility, shared: bool, by_ratio: bool, start: tuple[int, int] | None = None) -> np.ndarray:
    """[S, M] bool: models added one at a time by marginal hits per marginal byte (`by_ratio`) or by marginal hits.

    `shared`: a block already on a server costs nothing again (TrimCaching); otherwise each model costs its whole
    size (independent caching) and the storage constraint is on the sum of the models' sizes. `start`: a
    (server, model) pair placed first, if it fits.
    """
    fill = _Fill(arrays, shared)
    if start is not None and fill.fits(*start):
        fill.place(*start)
    return fill.run(by_ratio)


def independent(arrays: Eligibility, time_limit_s: float | None = None) -> Chosen:
    """Independent caching: each model stored whole, models added by marginal hits per byte of the model."""
    return Chosen(greedy(arrays, shared=False, by_ratio=True))


def trimcaching(arrays: Eligibility, time_limit_s: float | None = None) -> Chosen:
    """The TrimCaching greedy: the best of the cost-benefit and the plain greedy under the union-of-blocks
    constraint, each started from nothing and from each of the `SEED_PAIRS` pairs of most initial hits, and of
    independent caching (see the module docstring)."""
    candidates = [greedy(arrays, shared=False, by_ratio=True)]
    gain = _Fill(arrays, shared=True).gain
    order = np.argsort(-gain, axis=None, kind="stable")[:SEED_PAIRS]
    starts = [None, *(divmod(int(k), gain.shape[1]) for k in order if gain.flat[k] > 0)]
    for start in starts:
        for by_ratio in (True, False):
            candidates.append(greedy(arrays, shared=True, by_ratio=by_ratio, start=start))
    return Chosen(max(candidates, key=lambda held: hits(arrays, held)))
