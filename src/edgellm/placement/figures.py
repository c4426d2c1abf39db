"""The sweeps' figure: one panel per family, hit ratio against x, a line per algorithm.

The one module of the package that writes a file; matplotlib is optional (the `plot` extra) and imported only
when a figure is drawn (check `edgellm.deploy.chart.plotting_available()` first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from edgellm.placement.sweep import FamilyResult

_STYLE = {"independent": ("tab:gray", "s"), "trimcaching": ("tab:blue", "o"), "dp": ("tab:green", "^"),
          "milp": ("black", "x")}  # fmt: skip


def hit_ratio_figure(results: Sequence[FamilyResult], path: Path, title: str) -> Path:
    """Draw every family's hit ratio per algorithm into `path` (PNG).

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(results), 3)
    rows = math.ceil(len(results) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax, result in zip(axes.flat, results):
        for name, ratios in result.hit_ratio.items():
            points = [(x, r) for x, r in zip(result.values, ratios) if r is not None]
            if not points:
                continue
            color, marker = _STYLE.get(name, (None, "."))
            ax.plot([x for x, _ in points], [r for _, r in points], marker=marker, color=color, label=name,
                    linestyle=":" if name == "milp" else "-")  # fmt: skip
        ax.set_xlabel(result.label, fontsize=9)
        ax.set_ylabel("hit ratio", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(results) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
