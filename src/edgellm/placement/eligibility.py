"""An instance as arrays, computed once: which servers could serve each (user, model) request in time, and the
blocks, bytes and storage every algorithm works with.

Index order everywhere: users u as `instance.users`, servers s as `instance.servers`, models m as
`instance.models`, blocks b in first-use order over the models.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from edgellm.errors import ConfigError
from edgellm.placement.edge_instance import PlacementInstance
from edgellm.placement.latency import inference_ms, transmission_ms

# A latency within this of the requirement counts as meeting it (sums of floats in a different order).
LATENCY_SLACK_MS = 1e-9


@dataclass(frozen=True, eq=False)
class Eligibility:
    """The arrays of one instance.

    Attributes:
        demand: [U, M] request weights.
        latency_ms: [U, S, M] end-to-end latency of u asking m of s; inf where u does not reach s.
        eligible: [M, U, S] bool: s would serve u's request for m in time if it held m.
        uses: [M, B] bool: model m is made of block b.
        block_bytes: [B] int64, in the order of `blocks`.
        blocks: block ids by column of `uses`.
        storage_bytes: [S] int64.
        model_bytes: [M] int64: each model stored alone.
    """

    demand: np.ndarray
    latency_ms: np.ndarray
    eligible: np.ndarray
    uses: np.ndarray
    block_bytes: np.ndarray
    blocks: tuple[str, ...]
    storage_bytes: np.ndarray
    model_bytes: np.ndarray

    @functools.cached_property
    def eligible_weights(self) -> np.ndarray:
        """[M, U, S] float64 of `eligible` (1.0 / 0.0), for matrix products; built once."""
        return self.eligible.astype(np.float64)

    @property
    def total_demand(self) -> float:
        return float(self.demand.sum())

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(users, servers, models, blocks)."""
        users, servers = self.latency_ms.shape[:2]
        return users, servers, self.uses.shape[0], self.uses.shape[1]


def eligibility(instance: PlacementInstance) -> Eligibility:
    """The instance's arrays: latencies of every reachable (user, server, model), and who could serve whom in time."""
    servers, models, workload = instance.servers, instance.models, instance.workload
    transmission = np.full((len(instance.users), len(servers)), np.inf)  # [U, S]
    for r in instance.reach:
        transmission[instance.user_index[r.user], instance.server_index[r.server]] = transmission_ms(r.link, workload)
    inference = np.array([[inference_ms(m, s, workload) for m in models] for s in servers]).reshape(
        len(servers), len(models)
    )  # [S, M]
    latency = transmission[:, :, None] + inference[None, :, :]  # [U, S, M]
    required = np.array([u.latency_req_ms for u in instance.users])  # [U]
    eligible = latency <= required[:, None, None] + LATENCY_SLACK_MS  # [U, S, M]
    blocks = tuple(dict.fromkeys(b for m in models for b in m.blocks))
    column = {b: i for i, b in enumerate(blocks)}
    uses = np.zeros((len(models), len(blocks)), dtype=bool)
    for i, model in enumerate(models):
        uses[i, [column[b] for b in model.blocks]] = True
    block_bytes = np.array([instance.block_bytes[b] for b in blocks], dtype=np.int64)
    return Eligibility(
        demand=np.asarray(instance.demand, dtype=float).reshape(len(instance.users), len(models)),
        latency_ms=latency,
        eligible=np.ascontiguousarray(eligible.transpose(2, 0, 1)),
        uses=uses,
        block_bytes=block_bytes,
        blocks=blocks,
        storage_bytes=np.array([s.storage_bytes for s in servers], dtype=np.int64),
        model_bytes=uses.astype(np.int64) @ block_bytes,
    )


def covered(arrays: Eligibility, held: np.ndarray) -> np.ndarray:
    """[U, M] bool: some server that holds m (`held`: [S, M] bool) would serve u's request for m in time."""
    users, _, models, _ = arrays.shape
    out = np.zeros((users, models), dtype=bool)
    for m in range(models):
        servers = np.flatnonzero(held[:, m])
        if servers.size:
            out[:, m] = arrays.eligible[m][:, servers].any(axis=1)
    return out


def hits(arrays: Eligibility, held: np.ndarray) -> float:
    """The demand-weighted fraction of requests that are hits under `held` ([S, M] bool); 0 without demand."""
    total = arrays.total_demand
    return float((arrays.demand * covered(arrays, held)).sum() / total) if total > 0 else 0.0


def union_bytes(arrays: Eligibility, held: np.ndarray) -> np.ndarray:
    """[S] int64: the bytes of the union of the blocks of the models each server holds."""
    stored = (held.astype(np.int64) @ arrays.uses.astype(np.int64)) > 0  # [S, B]
    return stored.astype(np.int64) @ arrays.block_bytes


@dataclass(frozen=True, eq=False)
class Chosen:
    """What an algorithm chose: `held` [S, M] bool, and whether it is proven optimal (None: not known)."""

    held: np.ndarray
    optimal: bool | None = None


class Unsuitable(ConfigError):
    """An algorithm cannot take this instance (dp: too many shared blocks; milp: too large); a sweep records it
    and goes on."""
