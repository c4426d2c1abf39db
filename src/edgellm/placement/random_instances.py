"""Random caching instances, seeded and deterministic: servers and users in a square, links by distance, models
as variants of a few bases (shared base blocks plus a block of their own), Zipf popularity.

Every default below is a modelling assumption, named here and echoed in every report (docs/CACHING.md):

* compute: a model's decode costs `decode_ms_per_gb` per GB of weights per token on the reference node (speed
  1.0) — decode is memory-bound, ~10 ms per GB is an edge GPU streaming ~100 GB/s; prefill `prefill_ms_per_gb`
  per GB per prompt token. Servers' speeds are drawn in `speed_range`.
* links: a user reaches a server within the last band's distance, over the first band's link profile (nearer
  servers over faster radio): emulated profiles of `edgellm.net.link.PROFILES`.
* models: `models` variants spread round-robin over `bases` base models of about `model_gb` each (each base's size
  drawn in [0.5, 1.5] x `model_gb`); a variant shares `shared_fraction` of its base's bytes (split into
  `blocks_per_base` blocks: frozen layers, or the whole base under LoRA adapters) and owns the rest. 0 gives
  unrelated models (nothing shared); 0.99 is LoRA-like.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgellm.errors import ConfigError
from edgellm.placement.edge_instance import (
    Model,
    PlacementInstance,
    Server,
    User,
    Workload,
    link_from,
    reach_by_distance,
    zipf_demand,
)
from edgellm.plan.fields import require_int, require_number

GB = 1_000_000_000
FAMILIES = {  # family -> (section, field, what x is)
    "storage": ("area", "storage_gb", "storage per server (GB)"),
    "users": ("area", "users", "number of users"),
    "servers": ("area", "servers", "number of servers"),
    "latency": ("requests", "latency_ms", "latency requirement (ms)"),
    "shared": ("catalog", "shared_fraction", "fraction of each model's bytes shared with its base"),
}


def _pair(owner: str, name: str, value: object) -> tuple[float, float]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ConfigError(f"{owner} {name} must be [low, high], got {value!r}")
    for v in value:
        require_number(owner, name, v)
    if value[0] > value[1]:
        raise ConfigError(f"{owner} {name} must be [low, high] with low <= high, got {list(value)}")
    return float(value[0]), float(value[1])


@dataclass(frozen=True)
class Area:
    """Where servers and users are: counts, the square's side, link bands, storage, speeds, backhaul."""

    servers: int = 10
    users: int = 100
    side_m: float = 1000.0
    bands: tuple[tuple[float, str], ...] = ((100.0, "6g"), (200.0, "5g"), (300.0, "lte"))
    storage_gb: float = 8.0
    speed_range: tuple[float, float] = (0.5, 2.0)
    backhaul: str = "wan"

    def __post_init__(self) -> None:
        require_int("area", "servers", self.servers, minimum=1)
        require_int("area", "users", self.users, minimum=1)
        require_number("area", "side_m", self.side_m)
        require_number("area", "storage_gb", self.storage_gb)
        object.__setattr__(self, "speed_range", _pair("area", "speed_range", self.speed_range))
        if self.speed_range[0] <= 0:
            raise ConfigError(f"area speed_range must be positive, got {list(self.speed_range)}")
        bands = []
        for band in self.bands:
            if not isinstance(band, list | tuple) or len(band) != 2 or not isinstance(band[1], str):
                raise ConfigError(f"area bands entries must be [metres, profile name], got {band!r}")
            require_number("area band", "metres", band[0])
            link_from(band[1], "area band")
            bands.append((float(band[0]), band[1]))
        if not bands or [b[0] for b in bands] != sorted(b[0] for b in bands):
            raise ConfigError(f"area bands must be non-empty and in increasing metres, got {self.bands!r}")
        object.__setattr__(self, "bands", tuple(bands))
        link_from(self.backhaul, "area backhaul")


@dataclass(frozen=True)
class Catalog:
    """The models: how many, over how many bases, their size, how much they share, and their compute."""

    models: int = 30
    bases: int = 3
    model_gb: float = 2.0
    shared_fraction: float = 0.9
    blocks_per_base: int = 1
    decode_ms_per_gb: float = 10.0
    prefill_ms_per_gb: float = 0.5

    def __post_init__(self) -> None:
        require_int("catalog", "models", self.models, minimum=1)
        require_int("catalog", "bases", self.bases, minimum=1)
        require_int("catalog", "blocks_per_base", self.blocks_per_base, minimum=1)
        for name in ("model_gb", "decode_ms_per_gb", "prefill_ms_per_gb", "shared_fraction"):
            require_number("catalog", name, getattr(self, name))
        if self.model_gb <= 0:
            raise ConfigError(f"catalog model_gb must be > 0, got {self.model_gb}")
        if not 0 <= self.shared_fraction < 1:
            raise ConfigError(f"catalog shared_fraction must be in [0, 1), got {self.shared_fraction}")


@dataclass(frozen=True)
class Requests:
    """What users ask: Zipf exponent of model popularity, latency requirement range, the request's shape."""

    zipf: float = 0.8
    latency_ms: tuple[float, float] = (400.0, 1200.0)
    workload: Workload = field(default_factory=Workload)

    def __post_init__(self) -> None:
        require_number("requests", "zipf", self.zipf)
        object.__setattr__(self, "latency_ms", _pair("requests", "latency_ms", self.latency_ms))


@dataclass(frozen=True)
class Scenario:
    """A family of random instances: one per seed."""

    area: Area = field(default_factory=Area)
    catalog: Catalog = field(default_factory=Catalog)
    requests: Requests = field(default_factory=Requests)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["area"]["bands"] = [list(b) for b in self.area.bands]
        return data


def with_value(scenario: Scenario, family: str, x: float) -> Scenario:
    """The scenario with the quantity `family` swept to `x` (latency: every user's requirement is x).

    Raises:
        ConfigError: an unknown family (naming the valid ones) or a value the field refuses.
    """
    if family not in FAMILIES:
        raise ConfigError(f"unknown sweep family {family!r}; choose from {sorted(FAMILIES)}")
    section, name, _ = FAMILIES[family]
    value: Any = (x, x) if name == "latency_ms" else int(x) if name in ("users", "servers") else x
    if name in ("users", "servers") and value != x:
        raise ConfigError(f"sweep family {family!r} takes whole numbers, got {x!r}")
    part = dataclasses.replace(getattr(scenario, section), **{name: value})
    return dataclasses.replace(scenario, **{section: part})


def _catalog(catalog: Catalog, rng: np.random.Generator) -> tuple[list[Model], dict[str, int]]:
    base_bytes = catalog.model_gb * GB * rng.uniform(0.5, 1.5, size=catalog.bases)
    block_bytes: dict[str, int] = {}
    models = []
    for j in range(catalog.models):
        i = j % catalog.bases
        shared = int(catalog.shared_fraction * base_bytes[i]) // catalog.blocks_per_base
        blocks = [f"base{i}.{k}" for k in range(catalog.blocks_per_base)] if shared > 0 else []
        block_bytes.update(dict.fromkeys(blocks, shared))
        own = int(base_bytes[i]) - shared * len(blocks)
        blocks.append(f"model{j}")
        block_bytes[f"model{j}"] = own
        size_gb = (shared * (len(blocks) - 1) + own) / GB
        models.append(Model(f"model{j}", tuple(blocks), catalog.prefill_ms_per_gb * size_gb,
                            catalog.decode_ms_per_gb * size_gb))  # fmt: skip
    return models, block_bytes


def generate(scenario: Scenario, seed: int) -> PlacementInstance:
    """The random instance of `scenario` drawn with `seed` (the same seed gives the same instance)."""
    rng = np.random.default_rng(seed)
    area, requests = scenario.area, scenario.requests
    servers = tuple(
        Server(f"s{i}", int(area.storage_gb * GB), float(rng.uniform(*area.speed_range)),
               float(rng.uniform(0, area.side_m)), float(rng.uniform(0, area.side_m)), link_from(area.backhaul))
        for i in range(area.servers)
    )  # fmt: skip
    users = tuple(
        User(f"u{i}", float(rng.uniform(*requests.latency_ms)), float(rng.uniform(0, area.side_m)),
             float(rng.uniform(0, area.side_m)))
        for i in range(area.users)
    )  # fmt: skip
    models, block_bytes = _catalog(scenario.catalog, rng)
    demand = zipf_demand(len(users), len(models), requests.zipf, seed=int(rng.integers(2**31)))
    reach = reach_by_distance(servers, users, [(m, link_from(name)) for m, name in area.bands])
    return PlacementInstance(servers, users, tuple(models), block_bytes, demand, reach, requests.workload)


def small_instance(seed: int) -> PlacementInstance:
    """A small random instance, exactly solvable by the MILP in well under a second: 2-4 servers, 5-12 users, 4-8
    models over 1-3 bases sharing 0-99% of their bytes, storage 2-8 GB (the tests' and the benchmark's
    greedy-against-optimum distribution)."""
    r = np.random.default_rng(seed)
    area = Area(servers=int(r.integers(2, 5)), users=int(r.integers(5, 13)), side_m=400.0,
                bands=((150.0, "6g"), (300.0, "lte")), storage_gb=float(r.uniform(2, 8)))  # fmt: skip
    catalog = Catalog(models=int(r.integers(4, 9)), bases=int(r.integers(1, 4)),
                      shared_fraction=float(r.choice([0.0, 0.5, 0.9, 0.99])))  # fmt: skip
    return generate(Scenario(area, catalog, Requests(latency_ms=(300.0, 1000.0))), seed)
