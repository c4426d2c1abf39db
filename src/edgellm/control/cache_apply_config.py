"""The file `edgellm cache apply` reads (TOML): real variants, edge servers, users, and popularity phases.

    algorithm = "trimcaching"          # placement algorithm (edgellm.placement.ALGORITHMS)
    max_new_tokens = 16                # each request's answer length
    prompts = ["...", "..."]           # requests cycle through these
    cloud_link = "wan"                 # users -> cloud (the latency model's; emulated setting)

    [[variants]]                       # a base model: a registered name or a model directory
    name = "smollm2"
    model = "smollm2-135m"
    [[variants]]                       # a LoRA variant of it: a peft directory, or a synthetic one
    name = "poet"
    base = "smollm2"
    adapter = "adapters/poet"          # or: synthetic_seed = 1 (and synthetic_rank = 8)

    [[servers]]
    name = "edge1"
    storage_mb = 700                   # its block store's budget
    speed = 1.0                        # compute relative to this machine (the latency model's)
    backhaul = "5g"                    # blocks are fetched over this link, emulated

    [[users]]
    name = "alice"
    latency_req_ms = 4000
    reach = { edge1 = "5g", edge2 = "lte" }   # servers in reach and the link to each (latency model)

    [[phases]]                         # one placement per phase; its requests follow its popularity
    name = "morning"
    popularity = ["poet", "smollm2"]   # most popular first: Zipf(zipf) over this order (others: never asked)
    zipf = 1.0
    requests = 8
    seed = 0

Relative paths are relative to the file. Pure: `apply_config(data, base_dir)` checks everything and names what
is wrong; nothing here reads files or models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError
from edgellm.placement.edge_instance import Link, link_from
from edgellm.plan.fields import fields_of, list_of, require_int, require_name, require_number, require_unique

TOP_FIELDS = ("algorithm", "max_new_tokens", "prompts", "cloud_link", "variants", "servers", "users", "phases")


@dataclass(frozen=True)
class VariantSpec:
    name: str
    model: str | None = None  # a base: registered name or directory
    base: str | None = None  # a LoRA variant: the base variant's name
    adapter: Path | None = None  # its peft directory, or
    synthetic_seed: int | None = None  # a synthetic adapter of this seed
    synthetic_rank: int = 8


@dataclass(frozen=True)
class ServerSpec:
    name: str
    storage_bytes: int
    speed: float
    backhaul: Link


@dataclass(frozen=True)
class UserSpec:
    name: str
    latency_req_ms: float
    reach: tuple[tuple[str, Link], ...]


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    popularity: tuple[str, ...]
    zipf: float
    requests: int
    seed: int


@dataclass(frozen=True)
class ApplyConfig:
    variants: tuple[VariantSpec, ...]
    servers: tuple[ServerSpec, ...]
    users: tuple[UserSpec, ...]
    phases: tuple[PhaseSpec, ...]
    algorithm: str = "trimcaching"
    max_new_tokens: int = 16
    prompts: tuple[str, ...] = ("Tell me about the ocean.",)
    cloud_link: Link = link_from("wan")


def apply_config(data: object, base_dir: Path) -> ApplyConfig:
    """The config of a parsed TOML document; relative paths are taken from `base_dir`.

    Raises:
        ConfigError: an unknown, missing or ill-typed field, a name used twice, a base or server that does not
            exist, a phase naming an unknown variant.
    """
    top = fields_of("cache apply config", data, ("variants", "servers", "users", "phases"), TOP_FIELDS)
    variants = tuple(_variant(v, base_dir) for v in list_of("config", "variants", top["variants"]))
    servers = tuple(_server(s) for s in list_of("config", "servers", top["servers"]))
    users = tuple(_user(u) for u in list_of("config", "users", top["users"]))
    phases = tuple(_phase(p) for p in list_of("config", "phases", top["phases"]))
    for owner, items in (("variant", variants), ("server", servers), ("user", users), ("phase", phases)):
        if not items:
            raise ConfigError(f"cache apply config needs at least one {owner}")
        require_unique(f"config {owner}", [x.name for x in items])
    names = {v.name for v in variants}
    bases = {v.name for v in variants if v.model is not None}
    for v in variants:
        if v.base is not None and v.base not in bases:
            raise ConfigError(f"variant {v.name!r}: base {v.base!r} is not a base variant; bases: {sorted(bases)}")
    server_names = {s.name for s in servers}
    if "cloud" in server_names:
        raise ConfigError("'cloud' is the origin's name: call the servers something else")
    for u in users:
        unknown = [s for s, _ in u.reach if s not in server_names]
        if unknown:
            raise ConfigError(f"user {u.name!r} reaches unknown servers {unknown}; servers: {sorted(server_names)}")
    for p in phases:
        unknown = [v for v in p.popularity if v not in names]
        if unknown:
            raise ConfigError(f"phase {p.name!r} names unknown variants {unknown}; variants: {sorted(names)}")
    prompts = tuple(list_of("config", "prompts", top.get("prompts", list(ApplyConfig.prompts))))
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("config prompts must be a non-empty list of non-empty strings")
    max_new_tokens = top.get("max_new_tokens", ApplyConfig.max_new_tokens)
    require_int("config", "max_new_tokens", max_new_tokens, 1)
    algorithm = top.get("algorithm", ApplyConfig.algorithm)
    if not isinstance(algorithm, str):
        raise ConfigError(f"config algorithm must be a name, got {algorithm!r}")
    cloud_link = link_from(top.get("cloud_link", "wan"), "config cloud_link")
    return ApplyConfig(variants, servers, users, phases, algorithm, max_new_tokens, prompts, cloud_link)


def _variant(data: object, base_dir: Path) -> VariantSpec:
    fields = fields_of("variant", data, ("name",), ("model", "base", "adapter", "synthetic_seed", "synthetic_rank"))
    name = fields["name"]
    require_name("variant", "name", name)
    owner = f"variant {name!r}"
    model, base, adapter, seed = (fields.get(k) for k in ("model", "base", "adapter", "synthetic_seed"))
    if (model is None) == (base is None):
        raise ConfigError(f"{owner} needs exactly one of 'model' (a base) and 'base' (a LoRA variant of one)")
    if model is not None:
        if not isinstance(model, str) or adapter is not None or seed is not None:
            raise ConfigError(f"{owner}: a base names a model (a string) and no adapter")
        local = base_dir / model
        return VariantSpec(name, model=str(local) if local.exists() else model)
    require_name(owner, "base", base)
    if (adapter is None) == (seed is None):
        raise ConfigError(f"{owner} needs exactly one of 'adapter' (a peft directory) and 'synthetic_seed'")
    rank = fields.get("synthetic_rank", 8)
    require_int(owner, "synthetic_rank", rank, 1)
    if seed is not None:
        require_int(owner, "synthetic_seed", seed)
        return VariantSpec(name, base=base, synthetic_seed=seed, synthetic_rank=rank)
    if not isinstance(adapter, str):
        raise ConfigError(f"{owner}: adapter must be a directory path, got {adapter!r}")
    return VariantSpec(name, base=base, adapter=base_dir / adapter)


def _server(data: object) -> ServerSpec:
    fields = fields_of("server", data, ("name", "storage_mb"), ("speed", "backhaul"))
    require_name("server", "name", fields["name"])
    owner = f"server {fields['name']!r}"
    require_number(owner, "storage_mb", fields["storage_mb"])
    speed = fields.get("speed", 1.0)
    require_number(owner, "speed", speed, minimum=1e-9)
    backhaul = link_from(fields.get("backhaul", "wan"), f"{owner} backhaul")
    return ServerSpec(fields["name"], int(fields["storage_mb"] * 1e6), float(speed), backhaul)


def _user(data: object) -> UserSpec:
    fields = fields_of("user", data, ("name", "latency_req_ms", "reach"))
    require_name("user", "name", fields["name"])
    owner = f"user {fields['name']!r}"
    require_number(owner, "latency_req_ms", fields["latency_req_ms"])
    reach = fields["reach"]
    if not isinstance(reach, dict):
        raise ConfigError(f"{owner} reach must be a table {{server = link}}, got {type(reach).__name__}")
    links = tuple((str(s), link_from(link, f"{owner} reach {s}")) for s, link in sorted(reach.items()))
    return UserSpec(fields["name"], float(fields["latency_req_ms"]), links)


def _phase(data: object) -> PhaseSpec:
    fields = fields_of("phase", data, ("name", "popularity"), ("zipf", "requests", "seed"))
    require_name("phase", "name", fields["name"])
    owner = f"phase {fields['name']!r}"
    popularity = list_of(owner, "popularity", fields["popularity"])
    if not popularity or not all(isinstance(v, str) for v in popularity):
        raise ConfigError(f"{owner} popularity must be a non-empty list of variant names")
    require_unique(f"{owner} popularity", popularity)
    zipf, requests, seed = fields.get("zipf", 1.0), fields.get("requests", 8), fields.get("seed", 0)
    require_number(owner, "zipf", zipf)
    require_int(owner, "requests", requests, 1)
    require_int(owner, "seed", seed)
    if not math.isfinite(zipf):
        raise ConfigError(f"{owner} zipf must be finite")
    return PhaseSpec(fields["name"], tuple(popularity), float(zipf), requests, seed)


def phase_demand(config: ApplyConfig, phase: PhaseSpec) -> tuple[tuple[float, ...], ...]:
    """[users][variants] request probabilities of `phase`: Zipf(zipf) over its popularity order, the same for
    every user, 0 for variants it does not list; each row sums to 1."""
    weights = {v: (rank + 1) ** -phase.zipf for rank, v in enumerate(phase.popularity)}
    total = sum(weights.values())
    row = tuple(weights.get(v.name, 0.0) / total for v in config.variants)
    return tuple(row for _ in config.users)


def summary(config: ApplyConfig) -> dict[str, Any]:
    """The config's emulated and modelled settings, for reports (every number they affect sits beside them)."""
    return {
        "servers": [{"name": s.name, "storage_bytes": s.storage_bytes, "speed": s.speed,
                     "backhaul": s.backhaul.to_json()} for s in config.servers],
        "users": [{"name": u.name, "latency_req_ms": u.latency_req_ms,
                   "reach": {s: link.to_json() for s, link in u.reach}} for u in config.users],
        "cloud_link": config.cloud_link.to_json(), "algorithm": config.algorithm,
    }  # fmt: skip
