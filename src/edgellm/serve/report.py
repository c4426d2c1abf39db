"""Turn a finished generation's pipeline accounting into the JSON report of `generate`, `run` and `demo`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from edgellm.model.stage import Stage
from edgellm.net.messages import HopTrace
from edgellm.split.generate import GenerationResult
from edgellm.split.pipeline import HopStats


def weight_bytes(stage: Stage) -> int:
    """Bytes of a stage's parameters and buffers, counting a tied matrix once."""
    seen: set[int] = set()
    total = 0
    for t in list(stage.parameters()) + list(stage.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def link_report(traces: Sequence[HopTrace], decode_steps: int) -> list[dict[str, Any]]:
    """Per link: total bytes and wire time, and per decoded token (calls after each link's first, the prefill).

    `traces` are in call order; each link's first call in a session is the prompt (prefill).
    """
    by_link: dict[str, list[HopTrace]] = defaultdict(list)
    for t in traces:
        by_link[t.link].append(t)
    out = []
    for link, calls in by_link.items():
        sender, receiver = link.split("->", 1)
        decode = calls[1:]
        n = max(len(decode), 1)
        out.append(
            {
                "from": sender,
                "to": receiver,
                "calls": len(calls),
                "bytes": sum(c.bytes_up + c.bytes_down for c in calls),
                "wire_ms": round(sum(c.wire_ms for c in calls), 3),
                "prefill_bytes": calls[0].bytes_up + calls[0].bytes_down,
                "bytes_per_token": round(sum(c.bytes_up + c.bytes_down for c in decode) / n, 1) if decode else None,
                "wire_ms_per_token": round(sum(c.wire_ms for c in decode) / n, 3) if decode else None,
            }
        )
    return out


def node_compute(traces: Sequence[HopTrace]) -> dict[str, float]:
    """Total stage compute per remote node."""
    totals: dict[str, float] = defaultdict(float)
    for t in traces:
        totals[t.node] += t.compute_ms
    return dict(totals)


def stage_report(stages: Sequence[Stage], stats: Sequence[HopStats], nodes: Sequence[str] | None = None) -> list[dict]:
    """Per local stage: name, layers, where it ran, compute and weights."""
    rows = []
    for i, (stage, s) in enumerate(zip(stages, stats)):
        row = {
            "name": s.name,
            "layers": [stage.spec.start, stage.spec.end],
            "embed": stage.spec.embed,
            "head": stage.spec.head,
            "compute_ms": round(s.compute_ms, 3),
            "calls": s.calls,
            "weight_bytes": weight_bytes(stage),
        }
        if nodes is not None:
            row["node"] = nodes[i]
        rows.append(row)
    return rows


def timing_report(result: GenerationResult) -> dict[str, Any]:
    return {
        "ttft_ms": round(result.ttft_ms, 3),
        "decode_tok_per_s": round(result.decode_tok_per_s, 3),
        "decode_ms": round(result.decode_ms, 3),
        "steps": result.steps,
    }
