"""The figures of docs/EXPERIMENTS.md, drawn from the JSON records of the three experiment scripts.

    python bench/exp_plots.py        # reads bench/results/exp-{split,lora,qat}.json, writes docs/experiments-*.png

A record that is missing is skipped (saying so); nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        print(f"[exp-plots] {path} is missing: skipped", file=sys.stderr)
        return None
    return json.loads(path.read_text())


def stamp(record: dict[str, Any]) -> str:
    p, m = record["provenance"], record.get("machine", {})
    cpu = m.get("cpu", m.get("cpu_model", "?"))
    return f"commit {str(p.get('git_commit'))[:10]}, {p['started_at'][:10]}, {cpu}"


def split_figure(record: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    rows = record["rows"]
    profiles = list(dict.fromkeys(r["profile"] for r in rows))
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    by = {(r["profile"], r["setup"]): r for r in rows}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / len(setups)
    panels = [("decode tok/s (median)", lambda r: r["decode_tok_per_s"]["median"]),
              ("time to first token, ms (median)", lambda r: r["ttft_ms"]["median"]),
              ("smashed data per token, bytes (all links)",
               lambda r: sum((x["bytes_up_per_token"] or 0) + (x["bytes_down_per_token"] or 0) for x in r["links"]))]  # fmt: skip
    for ax, (title, value) in zip(axes, panels):
        for i, setup in enumerate(setups):
            xs = [p + i * width for p in range(len(profiles))]
            ax.bar(xs, [value(by[(p, setup)]) for p in profiles], width, label=setup.replace("_", " "))
        ax.set_xticks([p + width * (len(setups) - 1) / 2 for p in range(len(profiles))], profiles)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("device link profile (emulated)")
    axes[0].legend()
    fig.suptitle(f"Experiment 1: 2-hop split vs one edge server (SmolLM2-135M, {record['settings']['codec']} "
                 f"codec; every node on one machine's 2 cores) - {stamp(record)}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def lora_figure(record: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    rows = record["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(axes, ("exact_match", "eval_loss", "peak_rss_mb"),
                              ("exact match", "eval loss (response tokens)", "peak RSS of the run, MB")):  # fmt: skip
        for r in rows:
            label = f"r{r['rank']} {r['modules']}" + (f" frozen {r['frozen']:.0%}" if r["frozen"] else "")
            marker = "s" if r["frozen"] else {"qv": "o", "qkvo": "^", "all": "D"}.get(r["modules"], "o")
            ax.scatter(r["trainable_params"], r[key], marker=marker)
            ax.annotate(label, (r["trainable_params"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key != "peak_rss_mb":
            ax.axhline(record["base"][key], color="grey", linestyle=":", label="base model, no adapter")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_title(title, fontsize=10)
    s = record["settings"]
    fig.suptitle(f"Experiment 2: LoRA on {s['task']}, {s['steps']} steps - {stamp(record)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def qat_figure(record: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    rows = record["rows"]
    labels = [r["row"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    panels = [("held-out perplexity", [r["ppl"] for r in rows]),
              ("weights, MB", [r["weight_bytes"] / 1e6 for r in rows]),
              ("decode tok/s (median)", [r["decode_tok_per_s"]["median"] for r in rows])]  # fmt: skip
    for ax, (title, values) in zip(axes, panels):
        ax.bar(range(len(rows)), values, color=["C0" if "QAT" not in lb else "C2" for lb in labels])
        ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    t = record["target"]
    fig.suptitle(f"Experiment 3: PTQ vs QAT (SmolLM2-135M); 4-bit QAT recovers {t['recovered']:.0%} of 4-bit PTQ's "
                 f"gap ({t['verdict']}) - {stamp(record)}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    for name, draw in (("split", split_figure), ("lora", lora_figure), ("qat", qat_figure)):
        record = load(args.results / f"exp-{name}.json")
        if record is not None:
            out = args.out / f"experiments-{name}.png"
            draw(record, out)
            print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
