"""The placement algorithms by name, and solving an instance with one.

| name | what | guarantee |
|---|---|---|
| `independent` | each model stored whole; greedy by marginal hits per byte | the baseline TrimCaching beats |
| `trimcaching` | blocks shared once per server; the best of the cost-benefit and plain greedy (and independent) | never below `independent` |
| `dp` | per server, every subset of the shared blocks and a knapsack of the rest; servers in turn | exact for one server; needs few shared blocks |
| `milp` | the mixed-integer program, HiGHS | optimal (small instances only) |
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgellm.errors import ConfigError
from edgellm.placement.edge_instance import PlacementInstance
from edgellm.placement.eligibility import Chosen, Eligibility, eligibility, hits, union_bytes
from edgellm.placement.greedy import independent, trimcaching
from edgellm.placement.holdings import Placement, placement_from
from edgellm.placement.knapsack_dp import dp
from edgellm.placement.milp import DEFAULT_TIME_LIMIT_S, milp

Algorithm = Callable[[Eligibility, float | None], Chosen]

ALGORITHMS: dict[str, Algorithm] = {"independent": independent, "trimcaching": trimcaching, "dp": dp, "milp": milp}


def algorithm(name: str) -> Algorithm:
    """The algorithm called `name`.

    Raises:
        ConfigError: an unknown name; the message lists the valid ones.
    """
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown placement algorithm {name!r}; choose from {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


@dataclass(frozen=True)
class Solution:
    """A placement and what it achieves.

    Attributes:
        algorithm: the name it was solved with.
        placement: the models each server holds.
        hit_ratio: the demand-weighted fraction of requests served at the edge in time.
        stored_bytes: each server's union of blocks.
        solve_s: the algorithm's own time (the instance's arrays are built before and not counted).
        optimal: True when proven optimal (milp), False when the solver stopped early, None when not known.
    """

    algorithm: str
    placement: Placement
    hit_ratio: float
    stored_bytes: dict[str, int]
    solve_s: float
    optimal: bool | None

    def to_json(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "hit_ratio": self.hit_ratio, "solve_s": self.solve_s,
                "optimal": self.optimal, "stored_bytes": dict(self.stored_bytes),
                "placement": self.placement.to_json()}  # fmt: skip


def solve(
    instance: PlacementInstance,
    name: str = "trimcaching",
    arrays: Eligibility | None = None,
    time_limit_s: float | None = DEFAULT_TIME_LIMIT_S,
) -> Solution:
    """Place the models of `instance` with the algorithm `name` (`arrays`: the instance's, if built already;
    `time_limit_s`: for milp).

    Raises:
        ConfigError: an unknown algorithm, or one that cannot take this instance (dp: too many shared blocks;
            milp: too large).
    """
    run = algorithm(name)
    arrays = arrays if arrays is not None else eligibility(instance)
    start = time.perf_counter()
    chosen = run(arrays, time_limit_s)
    solve_s = time.perf_counter() - start
    used = union_bytes(arrays, chosen.held)
    stored = {s.name: int(used[i]) for i, s in enumerate(instance.servers)}
    return Solution(name, placement_from(instance, chosen.held), hits(arrays, chosen.held), stored, solve_s,
                    chosen.optimal)  # fmt: skip
