"""Where to cache models on edge servers, by the parameter blocks they share (TrimCaching): pure, no torch, no
sockets, no files.

An instance (`edge_instance`) lists servers (storage, compute speed, position, backhaul), users (position, latency
requirement), models (the parameter blocks they are made of and their per-token compute), each block's bytes, the
request probability of every (user, model) pair and which servers each user reaches over which link. The latency
model (`latency`) decides which servers can serve a request in time (`eligibility`); a placement (`holdings`) is
the set of models each server holds, its storage the union of their blocks. The algorithms (`algorithms`: the
independent baseline, the TrimCaching greedy, the few-shared-blocks dynamic program, the exact MILP) choose one;
`random_instances` and `sweep` generate instances and run the paper's families of experiments
(`edgellm cache simulate`, docs/CACHING.md).

Pure but for `figures` (the sweeps' chart, matplotlib, optional). The package sits above `edgellm.net` only for
the named link profiles (`edgellm.net.link.PROFILES`, pure data), and uses `edgellm.plan`'s field checks and
scheme costs.
"""

from __future__ import annotations

from edgellm.placement.algorithms import ALGORITHMS, Solution, solve
from edgellm.placement.edge_instance import (
    Link,
    Model,
    PlacementInstance,
    Reach,
    Server,
    User,
    Workload,
    link_from,
    reach_by_distance,
    zipf_demand,
)
from edgellm.placement.eligibility import Eligibility, eligibility
from edgellm.placement.holdings import Placement, ServerMove, hit_ratio, migration, route, stored_bytes
from edgellm.placement.latency import costs_from_scheme, fetch_s, inference_ms, request_latency_ms, transmission_ms

__all__ = [
    "ALGORITHMS",
    "Eligibility",
    "Link",
    "Model",
    "Placement",
    "PlacementInstance",
    "Reach",
    "Server",
    "ServerMove",
    "Solution",
    "User",
    "Workload",
    "costs_from_scheme",
    "eligibility",
    "fetch_s",
    "hit_ratio",
    "inference_ms",
    "link_from",
    "migration",
    "reach_by_distance",
    "request_latency_ms",
    "route",
    "solve",
    "stored_bytes",
    "transmission_ms",
    "zipf_demand",
]
