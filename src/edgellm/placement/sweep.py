"""Sweeps: the hit ratio of each algorithm as one quantity varies (TrimCaching's families of figures).

For each family (storage per server, users, latency requirement, servers, shared fraction), each value x of it
and each seed, one instance is built and every algorithm places it; a point is the mean hit ratio and mean solve
time over the seeds. Pure: instances come from a `make(family, x, seed)` function and progress goes to a
`(done, total)` callback.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgellm.errors import ConfigError
from edgellm.placement.algorithms import algorithm, solve
from edgellm.placement.edge_instance import PlacementInstance
from edgellm.placement.eligibility import Unsuitable, eligibility
from edgellm.placement.random_instances import FAMILIES, GB, Scenario, generate, with_value

BASE = "base"  # the pseudo-family of a run without sweeps: the base instance, x = 0
MakeInstance = Callable[[str, float, int], PlacementInstance]


@dataclass(frozen=True)
class Family:
    """One swept quantity and its values."""

    name: str
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.name not in FAMILIES and self.name != BASE:
            raise ConfigError(f"unknown sweep family {self.name!r}; choose from {sorted(FAMILIES)}")
        if not self.values:
            raise ConfigError(f"sweep family {self.name!r} needs at least one value")

    @property
    def label(self) -> str:
        return FAMILIES[self.name][2] if self.name in FAMILIES else "the base instance"


@dataclass
class FamilyResult:
    """Per algorithm, per value of the family: mean hit ratio and mean solve seconds over the seeds (None where
    the algorithm could not take an instance of that value; `skipped` says why, once per algorithm), and how many
    instances an exact algorithm stopped on at its time limit (its best placement then counts)."""

    family: str
    label: str
    values: list[float]
    hit_ratio: dict[str, list[float | None]] = field(default_factory=dict)
    solve_s: dict[str, list[float | None]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    stopped_early: dict[str, int] = field(default_factory=dict)  # milp: instances not proven optimal in time

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def generated(scenario: Scenario) -> MakeInstance:
    """Instances drawn from `scenario`, with the family's quantity set to x."""
    return lambda family, x, seed: generate(scenario if family == BASE else with_value(scenario, family, x), seed)


def explicit(instance: PlacementInstance) -> MakeInstance:
    """The one given instance, with every server's storage (family storage, x in GB) or every user's latency
    requirement (family latency, x in ms) set to x; the seed is ignored.

    Raises:
        ConfigError (when called): another family, which needs generated instances.
    """

    def make(family: str, x: float, seed: int) -> PlacementInstance:
        if family == "storage":
            servers = tuple(dataclasses.replace(s, storage_bytes=int(x * GB)) for s in instance.servers)
            return dataclasses.replace(instance, servers=servers)
        if family == "latency":
            users = tuple(dataclasses.replace(u, latency_req_ms=float(x)) for u in instance.users)
            return dataclasses.replace(instance, users=users)
        if family == BASE:
            return instance
        raise ConfigError(f"sweep family {family!r} needs a generated scenario; a given instance sweeps only "
                          "storage and latency")  # fmt: skip

    return make


def sweep(
    make: MakeInstance,
    families: Sequence[Family],
    algorithms: Sequence[str],
    seeds: Sequence[int],
    time_limit_s: float | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[FamilyResult]:
    """Run every algorithm on every (family, x, seed) instance; `on_step(done, total)` after each instance.

    Raises:
        ConfigError: an unknown algorithm, or a family `make` cannot build.
    """
    for name in algorithms:
        algorithm(name)  # unknown names fail before any work
    total, done = sum(len(f.values) for f in families) * len(seeds), 0
    results = []
    for family in families:
        result = FamilyResult(family.name, family.label, [float(x) for x in family.values])
        for name in algorithms:
            result.hit_ratio[name], result.solve_s[name] = [], []
        for x in family.values:
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in algorithms}
            for seed in seeds:
                instance = make(family.name, x, seed)
                arrays = eligibility(instance)
                for name in algorithms:
                    try:
                        solution = solve(instance, name, arrays, time_limit_s)
                    except Unsuitable as exc:
                        result.skipped[name] = str(exc)
                        continue
                    runs[name].append((solution.hit_ratio, solution.solve_s))
                    if solution.optimal is False:
                        result.stopped_early[name] = result.stopped_early.get(name, 0) + 1
                done += 1
                if on_step is not None:
                    on_step(done, total)
            for name in algorithms:
                complete = len(runs[name]) == len(seeds)
                result.hit_ratio[name].append(statistics.fmean(h for h, _ in runs[name]) if complete else None)
                result.solve_s[name].append(statistics.fmean(t for _, t in runs[name]) if complete else None)
        results.append(result)
    return results
