"""Turn a finished generation's pipeline accounting into the JSON report of `generate`, `run` and `demo`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from edgellm.model.stage import Stage
from edgellm.net.messages import HopTrace
from edgellm.split.generator import GenerationResult
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


def link_report(traces: Sequence[HopTrace], calls_per_token: float = 1.0) -> list[dict[str, Any]]:
    """Per link: total bytes and wire time, and per decoded token (calls after each link's first, the prefill).

    `traces` are in call order; each link's first call in a session is the prompt (prefill). `calls_per_token`:
    decode calls per decoded token (1 in plain decoding; fewer when speculative rounds settle several tokens).
    """
    by_link: dict[str, list[HopTrace]] = defaultdict(list)
    for t in traces:
        by_link[t.link].append(t)
    out = []
    for link, calls in by_link.items():
        sender, receiver = link.split("->", 1)
        up = [c.bytes_up for c in calls[1:]]
        down = [c.bytes_down for c in calls[1:]]
        decode = calls[1:]
        n = max(len(decode), 1) / calls_per_token
        out.append(
            {
                "from": sender,
                "to": receiver,
                "calls": len(calls),
                "bytes": sum(c.bytes_up + c.bytes_down for c in calls),
                "wire_ms": round(sum(c.wire_ms for c in calls), 3),
                "prefill_bytes": calls[0].bytes_up + calls[0].bytes_down,
                "bytes_per_token": round(sum(c.bytes_up + c.bytes_down for c in decode) / n, 1) if decode else None,
                "bytes_up_per_token": round(sum(up) / n, 1) if decode else None,
                "bytes_down_per_token": round(sum(down) / n, 1) if decode else None,
                "wire_ms_per_token": round(sum(c.wire_ms for c in decode) / n, 3) if decode else None,
            }
        )
    return out


def node_compute(traces: Sequence[HopTrace]) -> dict[str, tuple[float, float | None]]:
    """Per remote node: (total stage compute, mean compute per decode step), from call-ordered traces."""
    calls: dict[str, list[float]] = defaultdict(list)
    for t in traces:
        calls[t.node].append(t.compute_ms)
    return {node: (sum(ms), sum(ms[1:]) / (len(ms) - 1) if len(ms) > 1 else None) for node, ms in calls.items()}


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
            "compute_ms_per_token": _round(s.decode_compute_ms_per_call),
            "calls": s.calls,
            "weight_bytes": weight_bytes(stage),
        }
        if nodes is not None:
            row["node"] = nodes[i]
        rows.append(row)
    return rows


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def timing_report(result: GenerationResult) -> dict[str, Any]:
    return {
        "ttft_ms": round(result.ttft_ms, 3),
        "decode_tok_per_s": round(result.decode_tok_per_s, 3),
        "decode_ms": round(result.decode_ms, 3),
        "decode_ms_per_token": round(1e3 / result.decode_tok_per_s, 3) if result.decode_tok_per_s else None,
        "steps": result.steps,
        "speculative": result.speculative,  # drafts, acceptance, tokens per round trip (`edgellm.spec`); None: off
    }
