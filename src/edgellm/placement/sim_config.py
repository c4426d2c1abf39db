"""The configuration of `edgellm cache simulate`, as a checked dataclass from the TOML file's table.

    [scenario.area]      servers, users, side_m, bands, storage_gb, speed_range, backhaul
    [scenario.catalog]   models, bases, model_gb, shared_fraction, blocks_per_base, decode_ms_per_gb, prefill_ms_per_gb
    [scenario.requests]  zipf, latency_ms; [scenario.requests.workload] prompt_tokens, output_tokens, request_bytes,
                         response_bytes
    instance = "I.json"  instead of [scenario...]: one given instance (read by the CLI, relative to the config), or
    [instance]           the instance's fields inline
    [sweep]              algorithms, seeds (a count or a list), milp_time_limit_s
    [sweep.families]     storage (GB), users, latency (ms), servers, shared (fraction): lists of x values

Every field is optional except that [scenario] and [instance] exclude each other; defaults are those of
`random_instances`. docs/CACHING.md documents the format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgellm.errors import ConfigError
from edgellm.placement.algorithms import algorithm
from edgellm.placement.edge_instance import PlacementInstance, Workload
from edgellm.placement.milp import DEFAULT_TIME_LIMIT_S
from edgellm.placement.random_instances import FAMILIES, Area, Catalog, Requests, Scenario
from edgellm.placement.sweep import BASE, Family
from edgellm.plan.fields import fields_of, list_of, require_int, require_number

DEFAULT_ALGORITHMS = ("independent", "trimcaching")
_EXPLICIT_FAMILIES = ("storage", "latency")
_AREA = ("servers", "users", "side_m", "bands", "storage_gb", "speed_range", "backhaul")
_CATALOG = ("models", "bases", "model_gb", "shared_fraction", "blocks_per_base", "decode_ms_per_gb",
            "prefill_ms_per_gb")  # fmt: skip


@dataclass(frozen=True)
class SimulateConfig:
    """What `edgellm cache simulate` runs.

    Attributes:
        scenario: random instances to draw (one per seed), or None with `instance`.
        instance: one given instance, or None with `scenario`.
        families: the sweeps, in order; empty runs the base scenario (or instance) once.
        algorithms: names of `placement.ALGORITHMS`.
        seeds: one instance per seed and x (a given instance is the same for every seed).
        milp_time_limit_s: HiGHS's limit per instance.
    """

    scenario: Scenario | None
    instance: PlacementInstance | None
    families: tuple[Family, ...] = ()
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    seeds: tuple[int, ...] = (0,)
    milp_time_limit_s: float = DEFAULT_TIME_LIMIT_S

    def __post_init__(self) -> None:
        if (self.scenario is None) == (self.instance is None):
            raise ConfigError("give either [scenario] (random instances) or instance (one given instance), not both")
        if self.instance is not None:
            for family in self.families:
                if family.name not in _EXPLICIT_FAMILIES:
                    raise ConfigError(f"sweep family {family.name!r} needs a generated [scenario]; a given instance "
                                      f"sweeps only {list(_EXPLICIT_FAMILIES)}")  # fmt: skip
        if not self.algorithms:
            raise ConfigError("sweep algorithms must name at least one algorithm")
        for name in self.algorithms:
            algorithm(name)
        if not self.seeds:
            raise ConfigError("sweep seeds must not be empty")
        require_number("sweep", "milp_time_limit_s", self.milp_time_limit_s, minimum=1e-3)

    @property
    def sweeps(self) -> tuple[Family, ...]:
        """The families to run: the configured ones, or the base instance alone."""
        return self.families or (Family(BASE, (0.0,)),)


def scenario_from_json(data: object) -> Scenario:
    """A `Scenario` from its tables (area, catalog, requests); missing fields take their defaults.

    Raises:
        ConfigError: an unknown or ill-typed field, named with its table.
    """
    tables = fields_of("scenario", data, (), ("area", "catalog", "requests"))
    area = Area(**_table("scenario.area", tables.get("area", {}), _AREA))
    catalog = Catalog(**_table("scenario.catalog", tables.get("catalog", {}), _CATALOG))
    values = _table("scenario.requests", tables.get("requests", {}), ("zipf", "latency_ms", "workload"))
    values["workload"] = Workload.from_json(values.get("workload", {}))
    return Scenario(area, catalog, Requests(**values))


def _table(owner: str, data: object, names: tuple[str, ...]) -> dict[str, Any]:
    values = fields_of(owner, data, (), names)
    for name in ("bands", "speed_range", "latency_ms"):
        if name in values:
            values[name] = tuple(list_of(owner, name, values[name]))
    return values


def parse_config(data: Mapping[str, Any]) -> SimulateConfig:
    """The configuration of a TOML (or JSON) table; a string `instance` must already be replaced by its object.

    Raises:
        ConfigError: an unknown, missing or ill-typed field, named with its table.
    """
    top = fields_of("config", data, (), ("scenario", "instance", "sweep"))
    if isinstance(top.get("instance"), str):
        raise ConfigError("config instance names a file: read it first (the CLI does)")
    scenario = scenario_from_json(top["scenario"]) if "scenario" in top else None
    instance = PlacementInstance.from_json(top["instance"]) if "instance" in top else None
    if scenario is None and instance is None:
        scenario = Scenario()
    sweep = fields_of("sweep", top.get("sweep", {}), (), ("algorithms", "seeds", "milp_time_limit_s", "families"))
    families = []
    for name, values in fields_of("sweep.families", sweep.get("families", {}), (), tuple(FAMILIES)).items():
        xs = list_of("sweep.families", name, values)
        for x in xs:
            require_number(f"sweep.families {name}", "value", x)
        families.append(Family(name, tuple(float(x) for x in xs)))
    algorithms = tuple(list_of("sweep", "algorithms", sweep.get("algorithms", list(DEFAULT_ALGORITHMS))))
    return SimulateConfig(scenario, instance, tuple(families), algorithms, parse_seeds(sweep.get("seeds", 1)),
                          sweep.get("milp_time_limit_s", DEFAULT_TIME_LIMIT_S))  # fmt: skip


def parse_seeds(value: object) -> tuple[int, ...]:
    """Seeds from a count n (0..n-1) or a list of integers.

    Raises:
        ConfigError: neither, or a negative or repeated seed.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        require_int("sweep", "seeds", value, minimum=1)
        return tuple(range(value))
    seeds = list_of("sweep", "seeds", value)
    for seed in seeds:
        require_int("sweep", "seed", seed)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"sweep seeds must not repeat, got {seeds}")
    return tuple(seeds)
