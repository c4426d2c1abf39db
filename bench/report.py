"""What every benchmark shares: the workload (prompt) and the printed tables. Provenance, statistics and the JSON
record are in record.py.

Imported by the scripts next to it (`python bench/decode.py` puts `bench/` on `sys.path`); not part of the
package.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

# One user turn, wrapped by the model's chat template (48 tokens for SmolLM2-135M-Instruct, its system
# turn included), asking for a long answer, so that the measured generations rarely stop at end-of-sequence.
PROMPT = "Explain step by step how a transformer language model generates text, from tokenization to sampling."
# Eight chat prompts asking for long answers, so that no session's text ends early (batch.py, serve.py).
PROMPTS = (
    PROMPT,
    "Describe in detail how a compiler turns source code into machine code, stage by stage.",
    "Explain how the heart pumps blood through the body.",
    "Write a detailed guide to planting and caring for a vegetable garden through the seasons.",
    "Explain how a CPU cache works and why it makes programs faster, with examples.",
    "Describe the water cycle in detail.",
    "Explain step by step how public-key cryptography keeps a connection to a website secure.",
    "Tell the history of the printing press and how it changed Europe.",
)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def same_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two generations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: floats rounded, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> str:
    """A GitHub markdown table; numeric columns are right-aligned."""
    cells = [[fmt(v, digits) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def with_ci(stats: dict[str, Any] | None, digits: int = 1) -> str | None:
    """A table cell for `record.summary(...)`: "median [ci_low, ci_high]" (None when nothing was measured)."""
    if not stats or stats.get("median") is None:
        return None
    return f"{stats['median']:.{digits}f} [{stats['ci_low']:.{digits}f}, {stats['ci_high']:.{digits}f}]"


def ci_caption(n: int) -> str:
    """How the intervals of a table with `n` repeats per row were made, for its heading."""
    from record import median_ranks

    lo, hi, level = median_ranks(n)
    return f"median of {n} [{100 * level:.1f}% CI of the median: order statistics {lo} and {hi} of {n}]"
