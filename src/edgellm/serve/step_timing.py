"""What one generated token cost, hop by hop: the per-token timing a device streams next to each token."""

from __future__ import annotations

import time
from typing import Any

from edgellm.split.pipeline import Pipeline


class StepTimer:
    """Reads a pipeline's accounting after each step and reports what changed since the step before.

    The first step is the prompt (prefill); each later one a decode step. Network hops report their node's
    compute and the link's wire time (emulated link included) and bytes; stages in this process their compute.
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self._start = time.perf_counter()
        self._mark(pipeline)

    def _mark(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._traces = len(pipeline.traces)
        self._compute = [s.compute_ms for s in pipeline.stats]

    def step(self, pipeline: Pipeline) -> dict[str, Any]:
        """{"ms": wall time since the last step, "hops": [{node, link, compute_ms, wire_ms, bytes_up,
        bytes_down}], "local": [{stage, compute_ms}]} for the step just made."""
        now = time.perf_counter()
        if pipeline is not self._pipeline:  # a live migration: the new pipeline's accounting starts afresh
            self._traces, self._compute = 0, [0.0] * len(pipeline.stats)
        hops = [
            {"node": t.node, "link": t.link, "compute_ms": round(t.compute_ms, 3), "wire_ms": round(t.wire_ms, 3),
             "bytes_up": t.bytes_up, "bytes_down": t.bytes_down}
            for t in pipeline.traces[self._traces :]
        ]  # fmt: skip
        local = [
            {"stage": stats.name, "compute_ms": round(stats.compute_ms - before, 3)}
            for hop, stats, before in zip(pipeline.hops, pipeline.stats, self._compute)
            if not hasattr(hop, "probe")  # a stage in this process (network hops report through their traces)
        ]
        timing = {"ms": round((now - self._start) * 1e3, 3), "hops": hops, "local": local}
        self._start = now
        self._mark(pipeline)
        return timing
