"""A caching instance: edge servers, users, models made of parameter blocks, demand, and who reaches whom.

Every number is an input: storage and compute speed of each server, each user's latency requirement, each model's
per-token compute on the reference node (speed 1.0; from the planner's cost model or a measured profile, see
`latency.costs_from_scheme`), each block's bytes, the request probability of every (user, model) pair, and the
link over which a user reaches a server (a named, emulated profile of `edgellm.net.link.PROFILES` or explicit
numbers). Each dataclass is frozen, checked in `__post_init__`, and round-trips through plain JSON
(`to_json` / `from_json`, the file format of docs/CACHING.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgellm.errors import ConfigError
from edgellm.net.link import PROFILES
from edgellm.plan.fields import fields_of, list_of, require_int, require_name, require_number, require_unique


@dataclass(frozen=True)
class Link:
    """A link's mean behaviour: bandwidth each way and round-trip time (jitter folded into the RTT, loss ignored).

    Attributes:
        up_mbps, down_mbps: user -> server and server -> user bandwidth in Mbit/s (> 0; `math.inf` unlimited).
        rtt_ms: round-trip time including mean jitter.
        profile: the named profile it came from (`5g`), None for explicit numbers; echoed in every report.
    """

    up_mbps: float
    down_mbps: float
    rtt_ms: float
    profile: str | None = None

    def __post_init__(self) -> None:
        for name in ("up_mbps", "down_mbps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"link {name} must be a positive number (inf for unlimited), got {value!r}")
        require_number("link", "rtt_ms", self.rtt_ms)

    def to_json(self) -> str | dict[str, Any]:
        if self.profile is not None:
            return self.profile
        return {"up_mbps": self.up_mbps, "down_mbps": self.down_mbps, "rtt_ms": self.rtt_ms}


def link_from(value: object, owner: str = "link") -> Link:
    """A `Link` from a profile name of `edgellm.net.link.PROFILES` or an object {up_mbps, down_mbps, rtt_ms}.

    A profile's mean jitter (half its bound each way) is added to its RTT; its loss is ignored.

    Raises:
        ConfigError: an unknown profile (naming the valid ones) or a bad object, naming `owner`.
    """
    if isinstance(value, Link):
        return value
    if isinstance(value, str):
        if value.lower() not in PROFILES:
            raise ConfigError(f"{owner}: unknown link profile {value!r}; choose from {sorted(PROFILES)}")
        p = PROFILES[value.lower()]
        return Link(p.up_mbps, p.down_mbps, p.rtt_ms + p.jitter_ms, profile=value.lower())
    values = fields_of(owner, value, ("up_mbps", "down_mbps", "rtt_ms"))
    return Link(**values)


_WAN = link_from("wan")


@dataclass(frozen=True)
class Server:
    """An edge server.

    Attributes:
        name: unique among servers.
        storage_bytes: what its model cache may hold (the union of its models' blocks).
        speed: compute relative to the reference node the models' per-token costs were measured on (2.0 = twice
            as fast).
        x_m, y_m: position in metres (for generated reach and plots).
        backhaul: the link blocks are fetched over when a placement changes (default: the `wan` profile).
    """

    name: str
    storage_bytes: int
    speed: float = 1.0
    x_m: float = 0.0
    y_m: float = 0.0
    backhaul: Link = _WAN

    def __post_init__(self) -> None:
        require_name("server", "name", self.name)
        owner = f"server {self.name!r}"
        require_int(owner, "storage_bytes", self.storage_bytes)
        require_number(owner, "speed", self.speed, minimum=1e-9)
        require_number(owner, "x_m", self.x_m, minimum=-math.inf)
        require_number(owner, "y_m", self.y_m, minimum=-math.inf)
        object.__setattr__(self, "backhaul", link_from(self.backhaul, f"{owner} backhaul"))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "storage_bytes": self.storage_bytes, "speed": self.speed, "x_m": self.x_m,
                "y_m": self.y_m, "backhaul": self.backhaul.to_json()}  # fmt: skip

    @classmethod
    def from_json(cls, data: object) -> Server:
        """Raises ConfigError on an unknown, missing or ill-typed field."""
        return cls(**fields_of("server", data, ("name", "storage_bytes"), ("speed", "x_m", "y_m", "backhaul")))


@dataclass(frozen=True)
class User:
    """A user: where it is and how long it may wait for an answer (`latency_req_ms`, end to end)."""

    name: str
    latency_req_ms: float
    x_m: float = 0.0
    y_m: float = 0.0

    def __post_init__(self) -> None:
        require_name("user", "name", self.name)
        owner = f"user {self.name!r}"
        require_number(owner, "latency_req_ms", self.latency_req_ms)
        require_number(owner, "x_m", self.x_m, minimum=-math.inf)
        require_number(owner, "y_m", self.y_m, minimum=-math.inf)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "latency_req_ms": self.latency_req_ms, "x_m": self.x_m, "y_m": self.y_m}

    @classmethod
    def from_json(cls, data: object) -> User:
        """Raises ConfigError on an unknown, missing or ill-typed field."""
        return cls(**fields_of("user", data, ("name", "latency_req_ms"), ("x_m", "y_m")))


@dataclass(frozen=True)
class Model:
    """A model as the cache sees it: the parameter blocks it is made of and its compute on the reference node.

    Attributes:
        name: unique among models.
        blocks: ids of its blocks (keys of the instance's `block_bytes`); blocks shared with other models (a common
            base under LoRA adapters or fine-tuned heads) are stored once per server.
        prefill_ms_per_token: prompt processing per token on the reference node (speed 1.0).
        decode_ms_per_token: one generated token on the reference node.
    """

    name: str
    blocks: tuple[str, ...]
    prefill_ms_per_token: float
    decode_ms_per_token: float

    def __post_init__(self) -> None:
        require_name("model", "name", self.name)
        owner = f"model {self.name!r}"
        blocks = tuple(list_of(owner, "blocks", self.blocks))
        if not blocks:
            raise ConfigError(f"{owner} blocks must not be empty")
        for block in blocks:
            require_name(owner, "block id", block)
        require_unique(f"{owner} block", list(blocks))
        object.__setattr__(self, "blocks", blocks)
        require_number(owner, "prefill_ms_per_token", self.prefill_ms_per_token)
        require_number(owner, "decode_ms_per_token", self.decode_ms_per_token)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "blocks": list(self.blocks), "prefill_ms_per_token": self.prefill_ms_per_token,
                "decode_ms_per_token": self.decode_ms_per_token}  # fmt: skip

    @classmethod
    def from_json(cls, data: object) -> Model:
        """Raises ConfigError on an unknown, missing or ill-typed field."""
        return cls(**fields_of("model", data, ("name", "blocks", "prefill_ms_per_token", "decode_ms_per_token")))


@dataclass(frozen=True)
class Reach:
    """User `user` reaches server `server` over `link` (a profile name or a `Link`)."""

    user: str
    server: str
    link: Link

    def __post_init__(self) -> None:
        require_name("reach", "user", self.user)
        require_name("reach", "server", self.server)
        object.__setattr__(self, "link", link_from(self.link, f"reach {self.user}->{self.server} link"))

    def to_json(self) -> dict[str, Any]:
        return {"user": self.user, "server": self.server, "link": self.link.to_json()}

    @classmethod
    def from_json(cls, data: object) -> Reach:
        """Raises ConfigError on an unknown, missing or ill-typed field."""
        return cls(**fields_of("reach", data, ("user", "server", "link")))


@dataclass(frozen=True)
class Workload:
    """The shape of one request: prompt and answer length in tokens, request and response bytes on the air."""

    prompt_tokens: int = 64
    output_tokens: int = 16
    request_bytes: int = 1024
    response_bytes: int = 512

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "output_tokens", "request_bytes", "response_bytes"):
            require_int("workload", name, getattr(self, name))

    def to_json(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "request_bytes": self.request_bytes, "response_bytes": self.response_bytes}  # fmt: skip

    @classmethod
    def from_json(cls, data: object) -> Workload:
        """Raises ConfigError on an unknown field."""
        return cls(**fields_of("workload", data, (), ("prompt_tokens", "output_tokens", "request_bytes",
                                                       "response_bytes")))  # fmt: skip


@dataclass(frozen=True, eq=False)
class PlacementInstance:
    """Everything a placement is chosen on.

    Attributes:
        servers, users, models: names unique within each.
        block_bytes: {block id: bytes} for every block a model names.
        demand: [users][models] request probabilities (or rates): row u, column m is how often user u asks for
            model m; the hit ratio weighs requests by it. `zipf_demand` builds the usual one.
        reach: which servers each user reaches, over which link; a user reaching no server is always a miss.
        workload: the request's shape (tokens, bytes).

    Raises:
        ConfigError: a repeated name, an unknown block, server or user, a demand of the wrong shape or a negative
            or non-finite entry, or a (user, server) pair listed twice in `reach`.
    """

    servers: tuple[Server, ...]
    users: tuple[User, ...]
    models: tuple[Model, ...]
    block_bytes: Mapping[str, int]
    demand: tuple[tuple[float, ...], ...]
    reach: tuple[Reach, ...]
    workload: Workload = field(default_factory=Workload)

    def __post_init__(self) -> None:
        for name, kind in (("servers", Server), ("users", User), ("models", Model), ("reach", Reach)):
            items = tuple(list_of("instance", name, getattr(self, name)))
            if not all(isinstance(item, kind) for item in items):
                raise ConfigError(f"instance {name} must hold {kind.__name__} objects")
            object.__setattr__(self, name, items)
        for name in ("servers", "users", "models"):
            require_unique(f"instance {name[:-1]}", [x.name for x in getattr(self, name)])
        if not self.servers or not self.users or not self.models:
            raise ConfigError("instance needs at least one server, one user and one model")
        self._check_blocks()
        self._check_demand()
        self._check_reach()

    def _check_blocks(self) -> None:
        if not isinstance(self.block_bytes, Mapping):
            raise ConfigError(f"instance block_bytes must be an object, got {type(self.block_bytes).__name__}")
        for block, nbytes in self.block_bytes.items():
            require_int(f"block {block!r}", "bytes", nbytes)
        for model in self.models:
            missing = [b for b in model.blocks if b not in self.block_bytes]
            if missing:
                raise ConfigError(f"model {model.name!r} names blocks {missing} that block_bytes does not list")
        object.__setattr__(self, "block_bytes", dict(self.block_bytes))

    def _check_demand(self) -> None:
        try:
            demand = np.asarray(self.demand, dtype=float)
        except (TypeError, ValueError):
            raise ConfigError("instance demand must be a [users][models] array of numbers") from None
        shape = (len(self.users), len(self.models))
        if demand.shape != shape:
            raise ConfigError(f"instance demand must be [users][models] = {list(shape)}, got {list(demand.shape)}")
        if not np.all(np.isfinite(demand)) or np.any(demand < 0):
            raise ConfigError("instance demand entries must be finite and >= 0")
        object.__setattr__(self, "demand", tuple(tuple(row) for row in demand.tolist()))

    def _check_reach(self) -> None:
        servers, users = set(self.server_index), set(self.user_index)
        seen: set[tuple[str, str]] = set()
        for r in self.reach:
            if r.user not in users:
                raise ConfigError(f"reach names unknown user {r.user!r}")
            if r.server not in servers:
                raise ConfigError(f"reach names unknown server {r.server!r}")
            if (r.user, r.server) in seen:
                raise ConfigError(f"reach lists user {r.user!r} -> server {r.server!r} twice")
            seen.add((r.user, r.server))

    @functools.cached_property
    def server_index(self) -> dict[str, int]:  # name -> position, the index of every array
        return {s.name: i for i, s in enumerate(self.servers)}

    @functools.cached_property
    def user_index(self) -> dict[str, int]:
        return {u.name: i for i, u in enumerate(self.users)}

    @functools.cached_property
    def model_index(self) -> dict[str, int]:
        return {m.name: i for i, m in enumerate(self.models)}

    def to_json(self) -> dict[str, Any]:
        return {
            "servers": [s.to_json() for s in self.servers],
            "users": [u.to_json() for u in self.users],
            "models": [m.to_json() for m in self.models],
            "block_bytes": dict(self.block_bytes),
            "demand": [list(row) for row in self.demand],
            "reach": [r.to_json() for r in self.reach],
            "workload": self.workload.to_json(),
        }

    @classmethod
    def from_json(cls, data: object) -> PlacementInstance:
        """The instance of a JSON (or TOML) object; `demand` may be {"zipf": s[, "seed": k]} and `reach`
        {"bands": [[metres, link], ...]} (each user reaches every server within the last band's distance, over
        the link of the first band it falls in).

        Raises:
            ConfigError: an unknown, missing or ill-typed field, named.
        """
        required = ("servers", "users", "models", "block_bytes", "demand", "reach")
        values = fields_of("instance", data, required, ("workload",))
        servers = tuple(Server.from_json(s) for s in list_of("instance", "servers", values["servers"]))
        users = tuple(User.from_json(u) for u in list_of("instance", "users", values["users"]))
        models = tuple(Model.from_json(m) for m in list_of("instance", "models", values["models"]))
        demand = values["demand"]
        if isinstance(demand, Mapping):
            spec = fields_of("instance demand", demand, ("zipf",), ("seed",))
            require_number("instance demand", "zipf", spec["zipf"])
            demand = zipf_demand(len(users), len(models), spec["zipf"], spec.get("seed"))
        reach = values["reach"]
        if isinstance(reach, Mapping):
            bands = fields_of("instance reach", reach, ("bands",))["bands"]
            reach = reach_by_distance(servers, users, _bands(bands))
        else:
            reach = tuple(Reach.from_json(r) for r in list_of("instance", "reach", reach))
        workload = Workload.from_json(values.get("workload", {}))
        return cls(servers, users, models, values["block_bytes"], demand, reach, workload)


def _bands(value: object) -> list[tuple[float, Link]]:
    bands = list_of("instance reach", "bands", value)
    for band in bands:
        if not isinstance(band, list | tuple) or len(band) != 2:
            raise ConfigError(f"instance reach bands entries must be [metres, link], got {band!r}")
        require_number("instance reach band", "metres", band[0])
    return [(float(m), link_from(link, "instance reach band link")) for m, link in bands]


def reach_by_distance(
    servers: Sequence[Server], users: Sequence[User], bands: Sequence[tuple[float, Link]]
) -> tuple[Reach, ...]:
    """Each user reaches each server within the last band's distance, over the first band's link that covers it.

    `bands`: (metres, link) in increasing metres: a server at distance d is reached over the link of the first
    band with d <= metres (nearer servers get the faster radio).

    Raises:
        ConfigError: the bands are empty or not in increasing order of distance.
    """
    limits = [m for m, _ in bands]
    if not bands or limits != sorted(limits):
        raise ConfigError(f"reach bands must be a non-empty list in increasing metres, got {limits}")
    reach = []
    for user in users:
        for server in servers:
            d = math.hypot(user.x_m - server.x_m, user.y_m - server.y_m)
            band = next((link for metres, link in bands if d <= metres), None)
            if band is not None:
                reach.append(Reach(user.name, server.name, band))
    return tuple(reach)


def zipf_demand(
    num_users: int, num_models: int, exponent: float, seed: int | None = None
) -> tuple[tuple[float, ...], ...]:
    """Zipf request probabilities: the model of popularity rank r is asked with probability ∝ r^-exponent, the
    same for every user; each row sums to 1.

    `seed` None ranks the models in their listed order; an int ranks them in a random order drawn from it.
    """
    weights = np.arange(1, num_models + 1, dtype=float) ** -float(exponent)
    weights /= weights.sum()
    if seed is not None:
        weights = weights[np.random.default_rng(seed).permutation(num_models)]
    row = tuple(weights.tolist())
    return tuple(row for _ in range(num_users))
