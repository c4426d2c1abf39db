"""The latency model that decides a hit, and the time to fetch blocks over a backhaul.

A request of user u for model m served by server s takes, end to end,

    transmission(u, s) = rtt + request_bytes * 8 / up_bandwidth + response_bytes * 8 / down_bandwidth
    inference(m, s)    = (prompt_tokens * prefill_ms_per_token(m) + output_tokens * decode_ms_per_token(m)) / speed(s)

over the link u reaches s by (a named, emulated profile of `edgellm.net.link.PROFILES` or explicit numbers). It is
a hit when s holds every block of m and the sum is within u's `latency_req_ms`; otherwise the request goes to the
cloud (a miss). Missing blocks are never fetched on demand: fetching is what changing the placement costs
(`holdings.migration`), over each server's backhaul (`fetch_s`).

The per-token costs are inputs: the planner's cost model gives them from a profiled scheme (`costs_from_scheme`,
the same sums as `edgellm.plan.cost.stage_decode_ms` / `stage_prefill_ms` for a whole model on one node).
"""

from __future__ import annotations

from edgellm.placement.edge_instance import Link, Model, PlacementInstance, Reach, Server, Workload
from edgellm.plan.instance import SchemeCost


def transmission_ms(link: Link, workload: Workload) -> float:
    """Round trip plus the request up and the response down at the link's bandwidth."""
    bits_up, bits_down = 8 * workload.request_bytes, 8 * workload.response_bytes
    return link.rtt_ms + bits_up / (link.up_mbps * 1e3) + bits_down / (link.down_mbps * 1e3)


def inference_ms(model: Model, server: Server, workload: Workload) -> float:
    """Prefill of the prompt plus decode of the answer, at the server's speed relative to the reference node."""
    reference_ms = workload.prompt_tokens * model.prefill_ms_per_token + workload.output_tokens * (
        model.decode_ms_per_token
    )
    return reference_ms / server.speed


def request_latency_ms(instance: PlacementInstance, reach: Reach, model: Model) -> float:
    """End-to-end latency of `reach.user` asking `model` of `reach.server` (whether or not it holds it)."""
    server = instance.servers[instance.server_index[reach.server]]
    return transmission_ms(reach.link, instance.workload) + inference_ms(model, server, instance.workload)


def costs_from_scheme(scheme: SchemeCost, num_layers: int, stage_overhead_ms: float = 0.0) -> tuple[float, float]:
    """(prefill_ms_per_token, decode_ms_per_token) of a whole model at a profiled scheme on one node.

    The planner's cost model per stage (`edgellm.plan.cost`) with every layer, the embedding and the head on one
    node: decode = overhead + layers * layer_decode_ms + embed_decode_ms + head_decode_ms; prefill per token =
    layers * layer_prefill_ms_per_token (the per-call parts are charged to decode). Times are the node's own
    (divide by its speed relative to the reference node first if it is not the reference).
    """
    decode_ms = stage_overhead_ms + num_layers * scheme.layer_decode_ms + scheme.embed_decode_ms
    return num_layers * scheme.layer_prefill_ms_per_token, decode_ms + scheme.head_decode_ms


def fetch_s(link: Link, nbytes: int) -> float:
    """Seconds to fetch `nbytes` over a backhaul link (one round trip, then the bytes downstream)."""
    if nbytes <= 0:
        return 0.0
    return link.rtt_ms / 1e3 + 8 * nbytes / (link.down_mbps * 1e6)
