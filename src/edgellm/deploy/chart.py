"""A stacked bar chart of per-token latency per scenario (compute per node, wire per link, other).

matplotlib is an optional dependency (the `plot` extra), imported only when a chart is drawn.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

PLOT_INSTALL = "pip install 'edgellm[plot]'"  # what installs matplotlib, for messages that skip the chart


def plotting_available() -> bool:
    """Whether matplotlib (the `plot` extra) is installed, without importing it."""
    return importlib.util.find_spec("matplotlib") is not None


def breakdown_chart(breakdown: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """Draw `{scenario: {"total": ms, "compute X": ms, "wire A->B": ms, "other": ms}}` as horizontal stacked bars.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (check `plotting_available()` first).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(breakdown)
    parts: list[str] = []
    for values in breakdown.values():
        parts += [k for k in values if k != "total" and k not in parts]
    parts.sort(key=lambda part: part == "other")  # stable: "other" last, the rest in first-seen order
    colors = _colors(parts)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.9 * len(scenarios)))
    for row, scenario in enumerate(scenarios):
        left = 0.0
        for part in parts:
            width = breakdown[scenario].get(part, 0.0)
            if width <= 0:
                continue
            ax.barh(row, width, left=left, color=colors[part], edgecolor="white",
                    hatch="//" if part.startswith("wire") else None, label=part)  # fmt: skip
            left += width
        ax.text(left, row, f"  {breakdown[scenario]['total']:.1f} ms", va="center", fontsize=9)
    ax.set_yticks(range(len(scenarios)), [s.replace("_", " ") for s in scenarios])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per decoded token")
    ax.set_title(title, fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)
    ax.set_xlim(0, max(v["total"] for v in breakdown.values()) * 1.25 or 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _colors(parts: list[str]) -> dict[str, Any]:
    import matplotlib

    compute = matplotlib.colormaps["Blues"]
    wire = matplotlib.colormaps["Oranges"]
    c = [p for p in parts if p.startswith("compute")]
    w = [p for p in parts if p.startswith("wire")]
    out: dict[str, Any] = {p: compute(0.4 + 0.5 * i / max(len(c), 1)) for i, p in enumerate(c)}
    out.update({p: wire(0.4 + 0.5 * i / max(len(w), 1)) for i, p in enumerate(w)})
    out["other"] = "lightgray"
    return out
