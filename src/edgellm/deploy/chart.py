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

    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.9 * len(breakdown)))
    _bars(ax, breakdown)
    ax.set_yticks(range(len(breakdown)), [s.replace("_", " ") for s in breakdown])
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


def story_chart(
    breakdown: dict[str, dict[str, float]],
    predicted: dict[str, float],
    path: Path,
    title: str,
    timeline: dict[str, Any] | None = None,
) -> Path:
    """The breakdown bars with each scenario's predicted ms/token marked, and, when a link was switched
    mid-answer, a second panel: ms per token along the answer, with the switch and the migration marked.

    `timeline`: {"times_s": [arrival of each token], "switch_after": k, "migrated_at": [steps], "label": str}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if timeline else 1
    fig, axes = plt.subplots(rows, 1, figsize=(9, 1.6 + 0.9 * len(breakdown) + 2.6 * (rows - 1)), squeeze=False)
    ax = axes[0][0]
    scenarios = list(breakdown)
    _bars(ax, breakdown)
    for row, scenario in enumerate(scenarios):
        if scenario in predicted:
            ax.plot([predicted[scenario]] * 2, [row - 0.4, row + 0.4], color="black", lw=1.5, ls="--",
                    label="predicted (planner)")  # fmt: skip
    ax.set_yticks(range(len(scenarios)), [s.replace("_", " ") for s in scenarios])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per decoded token (measured; dashed: predicted)")
    ax.set_title(title, fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    ax.set_xlim(0, max([v["total"] for v in breakdown.values()] + list(predicted.values())) * 1.3 or 1)
    if timeline:
        times = timeline["times_s"]
        ax2 = axes[1][0]
        gaps = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
        ax2.plot(range(2, len(times) + 1), gaps, marker=".", lw=1, color="tab:blue")
        ax2.axvline(timeline["switch_after"], color="tab:red", ls="--", label=timeline["label"])
        for step in timeline.get("migrated_at", []):
            ax2.axvline(step, color="tab:green", ls=":", label="re-planned and migrated")
        ax2.set_xlabel("token")
        ax2.set_ylabel("ms since the previous token")
        ax2.set_yscale("log")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bars(ax: Any, breakdown: dict[str, dict[str, float]]) -> None:
    """One horizontal stacked bar per scenario (compute blue, wire orange hatched, other grey), total at its end."""
    parts: list[str] = []
    for values in breakdown.values():
        parts += [k for k in values if k != "total" and k not in parts]
    parts.sort(key=lambda part: part == "other")  # stable: "other" last, the rest in first-seen order
    colors = _colors(parts)
    for row, scenario in enumerate(breakdown):
        left = 0.0
        for part in parts:
            width = breakdown[scenario].get(part, 0.0)
            if width <= 0:
                continue
            ax.barh(row, width, left=left, color=colors[part], edgecolor="white",
                    hatch="//" if part.startswith("wire") else None, label=part)  # fmt: skip
            left += width
        ax.text(left, row, f"  {breakdown[scenario]['total']:.1f} ms", va="center", fontsize=9)
