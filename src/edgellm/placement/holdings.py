"""What each server holds (a `Placement`), what that achieves (hit ratio, where a request goes) and what changing
it costs (`migration`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgellm.errors import ConfigError
from edgellm.placement.edge_instance import PlacementInstance
from edgellm.placement.eligibility import Eligibility, eligibility, hits, union_bytes
from edgellm.placement.latency import fetch_s
from edgellm.plan.fields import list_of, require_name


@dataclass(frozen=True)
class Placement:
    """The models each server holds: {server name: frozenset of model names}; a server not listed holds none."""

    models: Mapping[str, frozenset[str]]

    def __post_init__(self) -> None:
        if not isinstance(self.models, Mapping):
            raise ConfigError(f"placement must map server names to model names, got {type(self.models).__name__}")
        clean = {}
        for server, names in self.models.items():
            require_name("placement", "server", server)
            held = frozenset(list_of(f"placement server {server!r}", "models", sorted(names)))
            for name in held:
                require_name(f"placement server {server!r}", "model", name)
            clean[server] = held
        object.__setattr__(self, "models", clean)

    def on(self, server: str) -> frozenset[str]:
        """The models `server` holds."""
        return self.models.get(server, frozenset())

    def to_json(self) -> dict[str, list[str]]:
        return {server: sorted(names) for server, names in sorted(self.models.items())}

    @classmethod
    def from_json(cls, data: object) -> Placement:
        """Raises ConfigError: not an object of server -> list of model names."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"placement must be an object of server -> [model, ...], got {type(data).__name__}")
        return cls({server: frozenset(list_of("placement", str(server), names)) for server, names in data.items()})


def placement_from(instance: PlacementInstance, held: np.ndarray) -> Placement:
    """The placement of a [S, M] bool matrix."""
    return Placement({
        s.name: frozenset(instance.models[m].name for m in np.flatnonzero(held[i]))
        for i, s in enumerate(instance.servers)
    })  # fmt: skip


def held_matrix(instance: PlacementInstance, placement: Placement) -> np.ndarray:
    """[S, M] bool of a placement.

    Raises:
        ConfigError: the placement names a server or model the instance does not have.
    """
    held = np.zeros((len(instance.servers), len(instance.models)), dtype=bool)
    for server, names in placement.models.items():
        if server not in instance.server_index:
            raise ConfigError(f"placement names unknown server {server!r}")
        for name in names:
            if name not in instance.model_index:
                raise ConfigError(f"placement puts unknown model {name!r} on server {server!r}")
            held[instance.server_index[server], instance.model_index[name]] = True
    return held


def hit_ratio(instance: PlacementInstance, placement: Placement, arrays: Eligibility | None = None) -> float:
    """The demand-weighted fraction of requests some server holding the model serves within the user's
    requirement (`arrays`: the instance's, to skip recomputing them)."""
    arrays = arrays if arrays is not None else eligibility(instance)
    return hits(arrays, held_matrix(instance, placement))


def stored_blocks(instance: PlacementInstance, placement: Placement, server: str) -> frozenset[str]:
    """The union of the blocks of the models `server` holds."""
    held_matrix(instance, placement)  # names checked
    return frozenset(b for name in placement.on(server) for b in instance.models[instance.model_index[name]].blocks)


def stored_bytes(instance: PlacementInstance, placement: Placement, server: str) -> int:
    """The bytes `server` stores: each block of its models once."""
    return sum(instance.block_bytes[b] for b in stored_blocks(instance, placement, server))


def overfull(instance: PlacementInstance, placement: Placement) -> list[str]:
    """The servers whose stored bytes exceed their storage, as messages (empty: the placement fits)."""
    used = union_bytes(eligibility(instance), held_matrix(instance, placement))
    return [f"server {s.name!r} stores {int(used[i])} bytes > storage {s.storage_bytes}"
            for i, s in enumerate(instance.servers) if used[i] > s.storage_bytes]  # fmt: skip


def route(
    instance: PlacementInstance, placement: Placement, user: str, model: str, arrays: Eligibility | None = None
) -> str | None:
    """The server that serves `user`'s request for `model`: the lowest-latency one in reach that holds it within
    the user's requirement; None when there is none (the request goes to the cloud).

    Raises:
        ConfigError: an unknown user or model.
    """
    if user not in instance.user_index:
        raise ConfigError(f"unknown user {user!r}")
    if model not in instance.model_index:
        raise ConfigError(f"unknown model {model!r}")
    arrays = arrays if arrays is not None else eligibility(instance)
    u, m = instance.user_index[user], instance.model_index[model]
    candidates = held_matrix(instance, placement)[:, m] & arrays.eligible[m, u]  # [S]
    if not candidates.any():
        return None
    latency = np.where(candidates, arrays.latency_ms[u, :, m], np.inf)
    return instance.servers[int(np.argmin(latency))].name


@dataclass(frozen=True)
class ServerMove:
    """What one server does to go from one placement to another.

    Attributes:
        fetch_bytes: blocks the new placement needs that the server does not hold yet.
        evict_bytes: blocks it holds that the new placement no longer needs.
        fetch_s: the fetch over its backhaul (`latency.fetch_s`).
    """

    fetch_bytes: int
    evict_bytes: int
    fetch_s: float

    def to_json(self) -> dict[str, Any]:
        return {"fetch_bytes": self.fetch_bytes, "evict_bytes": self.evict_bytes, "fetch_s": self.fetch_s}


def migration(instance: PlacementInstance, old: Placement, new: Placement) -> dict[str, ServerMove]:
    """Per server, the blocks to fetch and to evict to go from `old` to `new`, and the fetch time.

    Raises:
        ConfigError: either placement names an unknown server or model.
    """
    moves = {}
    for server in instance.servers:
        before = stored_blocks(instance, old, server.name)
        after = stored_blocks(instance, new, server.name)
        fetch = sum(instance.block_bytes[b] for b in after - before)
        evict = sum(instance.block_bytes[b] for b in before - after)
        moves[server.name] = ServerMove(fetch, evict, fetch_s(server.backhaul, fetch))
    return moves
