"""Figures of an `edgellm eval privacy` report: token recovery per cut (with and without noise), and the
privacy-utility curve (recovery of the strongest inversion attack against the perplexity increase, labelled with
epsilon per answer). matplotlib is optional (`pip install edgellm[plot]`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError

INVERSIONS = ("nn", "learned", "optimize")  # attacks on the smashed data (labels read the gradients)
PANELS = ("recovery", "utility")


def strongest(row: dict[str, Any]) -> float:
    """The highest token recovery of the inversion attacks a row ran."""
    return max((row["attacks"][a]["recovery"] for a in INVERSIONS if a in row["attacks"]), default=0.0)


def _recovery(ax: Any, report: dict[str, Any]) -> None:
    styles = {"nn": ":", "learned": "-", "optimize": "--", "labels": "-."}
    for z in report["noise"]:
        rows = [r for r in report["rows"] if r["noise"] == z]
        for attack in report["attacks"]:
            points = [(r["cut"], r["attacks"][attack]["recovery"]) for r in rows if attack in r["attacks"]]
            if points:
                label = f"{attack}, {'no defence' if z == 0 else f'noise {z:g}'}"
                ax.plot(*zip(*points), styles.get(attack, "-"), marker="o", label=label)
    ax.axhline(0.10, color="grey", lw=0.8)
    ax.axhline(report["baseline_recovery"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("cut k (device holds layers [0, k))")
    ax.set_ylabel("token recovery")
    ax.set_ylim(0, 1.02)
    ax.set_title("recovery per cut (grey: 10% target; dotted: most-frequent-token guess)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)


def _utility(ax: Any, report: dict[str, Any]) -> None:
    for cut in report["cuts"]:
        rows = sorted((r for r in report["rows"] if r["cut"] == cut), key=lambda r: r["noise"])
        xs = [max(r["ppl_increase_pct"], 0.01) for r in rows]
        ax.plot(xs, [strongest(r) for r in rows], marker="o", label=f"cut {cut}")
        for r, x in zip(rows, xs):
            eps = r["epsilon_answer"]
            ax.annotate(f"z={r['noise']:g}" + (f", eps={eps:.3g}" if eps is not None else ""), (x, strongest(r)),
                        fontsize=5)  # fmt: skip
    ax.set_xscale("log")
    ax.axhline(0.10, color="grey", lw=0.8)
    ax.axvline(5.0, color="grey", lw=0.8)
    ax.set_xlabel("perplexity increase (%, log)")
    ax.set_ylabel("token recovery (strongest inversion)")
    ax.set_title(f"privacy-utility (eps per answer of {report['answer_rows']} rows, delta {report['delta']:g})",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=6)


def plot_report(report: dict[str, Any], path: Path, panels: tuple[str, ...] = PANELS) -> None:
    """Draw `panels` side by side into `path` (PNG).

    Raises:
        ConfigError: matplotlib is missing, or an unknown panel.
    """
    unknown = set(panels) - set(PANELS)
    if unknown:
        raise ConfigError(f"unknown panel(s) {sorted(unknown)}; choose from {list(PANELS)}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'edgellm[plot]'") from None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        (_recovery if panel == "recovery" else _utility)(ax, report)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
