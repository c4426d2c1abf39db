"""Prometheus metrics of one HTTP server, in a registry of its own (two apps in one process never share series).

Times are in seconds, Prometheus' base unit. Per-token node compute and link wire times come from each token's
`timing` when the engine gives one, else once per request from its report's per-token means. Engine state
(sessions and batch sizes per node or local stage, adapters) is read from the engine when scraped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

PREFIX = "edgellm"
# A decode step on a CPU takes milliseconds to a second; a first token up to tens of seconds for long prompts.
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServeMetrics:
    """The server's series, and what feeds them.

    Args:
        device: the device's node name: the `node` label of the stages this process runs (summed).
        stats: the engine's `stats()` (or a callable returning {}), read at each scrape.
        adapters: the engine's `adapters()` (or one returning []), read at each scrape.
    """

    def __init__(
        self, device: str, stats: Callable[[], dict[str, Any]], adapters: Callable[[], list[dict[str, Any]]]
    ) -> None:
        self.device = device
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP API requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "tokens generated", registry=r)
        self.tok_per_s = Gauge(f"{PREFIX}_decode_tokens_per_second", "decode speed of the last finished request",
                               registry=r)  # fmt: skip
        self.ttft = Histogram(f"{PREFIX}_ttft_seconds", "request received to first token", buckets=TTFT_BUCKETS_S,
                              registry=r)  # fmt: skip
        self.token_latency = Histogram(f"{PREFIX}_token_latency_seconds", "time between tokens of a request",
                                       buckets=TOKEN_BUCKETS_S, registry=r)  # fmt: skip
        self.node_compute = Histogram(f"{PREFIX}_node_compute_seconds", "per-token compute of each node",
                                      ["node"], buckets=TOKEN_BUCKETS_S, registry=r)  # fmt: skip
        self.link_wire = Histogram(f"{PREFIX}_link_wire_seconds", "per-token wire time of each link (emulated "
                                   "link + transport)", ["link"], buckets=TOKEN_BUCKETS_S, registry=r)  # fmt: skip
        self.link_bytes = Counter(f"{PREFIX}_link_bytes", "bytes over each link by direction (up: away from the "
                                  "device)", ["link", "direction"], registry=r)  # fmt: skip
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "generations running or streaming now", registry=r)
        r.register(_EngineCollector(stats, adapters))

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def observe_token(self, gap_ms: float, timing: dict[str, Any] | None, first: bool) -> None:
        """One token: its latency (the TTFT for the first) and, from `timing`, each hop's compute, wire, bytes."""
        if first:
            self.ttft.observe(gap_ms / 1e3)
        else:
            ms = timing.get("ms") if timing else None
            self.token_latency.observe((ms if isinstance(ms, (int, float)) else gap_ms) / 1e3)
        local = [s.get("compute_ms") for s in (timing or {}).get("local") or [] if isinstance(s, dict)]
        local_ms = [ms for ms in local if isinstance(ms, (int, float))]
        if local_ms:
            self.node_compute.labels(self.device).observe(sum(local_ms) / 1e3)
        for hop in (timing or {}).get("hops") or []:
            if not isinstance(hop, dict):
                continue
            if isinstance(hop.get("compute_ms"), (int, float)) and hop.get("node") is not None:
                self.node_compute.labels(str(hop["node"])).observe(hop["compute_ms"] / 1e3)
            link = hop.get("link")
            if link is None:
                continue
            if isinstance(hop.get("wire_ms"), (int, float)):
                self.link_wire.labels(str(link)).observe(hop["wire_ms"] / 1e3)
            for direction in ("up", "down"):
                value = hop.get(f"bytes_{direction}")
                if isinstance(value, (int, float)) and value >= 0:
                    self.link_bytes.labels(str(link), direction).inc(value)

    def observe_finish(self, prompt_tokens: int, completion_tokens: int, report: dict[str, Any], timed: bool) -> None:
        """A finished request; `timed`: its tokens carried timing (else the report's means are used once)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        speed = report.get("decode_tok_per_s")
        if isinstance(speed, (int, float)) and speed > 0:
            self.tok_per_s.set(speed)
        if timed:
            return
        for node in report.get("nodes") or []:
            per_token = node.get("compute_ms_per_token") if isinstance(node, dict) else None
            if isinstance(per_token, (int, float)):
                self.node_compute.labels(str(node.get("name"))).observe(per_token / 1e3)
        for link in report.get("links") or []:
            if not isinstance(link, dict):
                continue
            name = f"{link.get('from')}->{link.get('to')}"
            if isinstance(link.get("wire_ms_per_token"), (int, float)):
                self.link_wire.labels(name).observe(link["wire_ms_per_token"] / 1e3)
            if isinstance(link.get("bytes"), (int, float)):
                self.link_bytes.labels(name, "both").inc(link["bytes"])

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Series read from the engine at scrape time; an engine without `stats` or `adapters` gives fewer."""

    def __init__(self, stats: Callable[[], dict[str, Any]], adapters: Callable[[], list[dict[str, Any]]]) -> None:
        self._stats = stats
        self._adapters = adapters

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats() or {}
            adapters = self._adapters() or []
        except Exception:  # noqa: BLE001 - a scrape must not fail because the engine did; the log says why
            log.exception("reading the engine's stats for /metrics failed")
            return
        active = GaugeMetricFamily(f"{PREFIX}_active_generations", "generations the engine runs now")
        if isinstance(stats.get("active_generations"), (int, float)):
            active.add_metric([], stats["active_generations"])
        sessions = GaugeMetricFamily(f"{PREFIX}_node_sessions", "sessions (KV caches) each node holds", labels=["node"])
        batches = GaugeMetricFamily(f"{PREFIX}_node_batch_steps", "decode steps each node ran at each batch size, "
                                    "since it started", labels=["node", "batch_size"])  # fmt: skip
        nodes = stats.get("nodes")
        for name, node in nodes.items() if isinstance(nodes, dict) else []:
            if not isinstance(node, dict):
                continue
            if isinstance(node.get("sessions"), (int, float)):
                sessions.add_metric([str(name)], node["sessions"])
            sizes = node.get("batch_sizes")
            for size, count in sizes.items() if isinstance(sizes, dict) else []:
                if isinstance(count, (int, float)):
                    batches.add_metric([str(name), str(size)], count)
        loaded = GaugeMetricFamily(f"{PREFIX}_adapters_loaded", "LoRA adapters loaded in the engine")
        loaded.add_metric([], sum(1 for a in adapters if isinstance(a, dict) and a.get("loaded")))
        yield from (active, sessions, batches, loaded)
