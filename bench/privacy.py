"""Privacy of the smashed data (issue 16): what an honest-but-curious edge server recovers, and what DP noise costs.

Three parts, one process, the model loaded once (`edgellm.eval.privacy_engine`, as `edgellm eval privacy`):

1. the privacy-utility curve: nearest-neighbour and learned (noise-aware) inversion, perplexity increase and
   epsilon over noise multipliers at a few cuts;
2. the default: the smallest multiplier of the curve whose strongest inversion recovers <= 10% of the tokens at
   every cut of the curve; then every attack (nn, learned, optimize, labels) at every cut, with no defence and with
   the default;
3. the task's exact match after a short split fine-tuning (the defence on during training and decoding) at one cut,
   with no defence and with the default (more with --em-noise).

Attacks, perplexity and fine-tuning are seeded and deterministic on one machine, so each setting runs once.

    .venv/bin/python bench/privacy.py --json bench/results/privacy.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from record import Recorder, add_record_arguments, machine_info, stamped

RECOVERY_TARGET = 0.10
EM_DROP_TARGET = 0.02
PPL_TARGET_PCT = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", default="1,2,4,8,10,15,20", help="cuts of part 2 (default: %(default)s)")
    parser.add_argument("--curve-cuts", default="1,10,20", help="cuts of the curve (default: %(default)s)")
    parser.add_argument("--curve-noise", default="0.002,0.005,0.01,0.02,0.05,0.2,0.5,1", help="multipliers of the curve (default: %(default)s)")  # fmt: skip
    parser.add_argument("--clip", type=float, default=2.0, help="bound / median row norm (default: %(default)s)")
    parser.add_argument("--task", default="dates", help="built-in task of part 3 (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps of part 3 (default: %(default)s)")
    parser.add_argument("--task-n", type=int, default=40, help="eval examples of part 3 (default: %(default)s)")
    parser.add_argument("--em-cut", type=int, default=10, help="the cut of part 3 (default: %(default)s)")
    parser.add_argument("--em-noise", default="", help="extra multipliers of part 3 (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=512, help="held-out tokens attacked (default: %(default)s)")
    parser.add_argument("--train-tokens", type=int, default=16000, help="public tokens (default: %(default)s)")
    parser.add_argument("--optimize-tokens", type=int, default=16, help="rows per optimisation attack (default: %(default)s)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--figures", type=Path, default=Path("docs"), help="where the two PNGs go (default: docs)")
    add_record_arguments(parser, repeats=1, rows="setting (seeded and deterministic: 1)")
    return parser.parse_args(argv)


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def strongest(row: dict[str, Any]) -> float:
    from edgellm.eval.privacy_plot import strongest as best

    return best(row)


def choose_default(rows: list[dict[str, Any]], noise: tuple[float, ...]) -> float:
    """The smallest multiplier whose strongest inversion is <= the target at every cut (else the largest)."""
    for z in sorted(noise):
        if all(strongest(r) <= RECOVERY_TARGET for r in rows if r["noise"] == z):
            return z
    return max(noise)


def run_rows(config: Any, harness: Any, plan: list[tuple[int, float]], label: str) -> list[dict[str, Any]]:
    from edgellm.eval.privacy_engine import evaluate_setting

    rows = []
    for cut, z in plan:
        with stamped() as stamp:
            row = evaluate_setting(config, harness, cut, z)
        row["stamp"] = stamp
        rows.append(row)
        scores = " ".join(f"{a} {s['recovery']:.1%}" for a, s in row["attacks"].items())
        em = f" EM {row['task']['exact_match']:.0%}" if "task" in row else ""
        print(f"[privacy {label}] cut {cut} noise {z:g}: {scores} ppl {row['ppl_increase_pct']:+.1f}%{em} "
              f"({stamp['s']:.0f} s)", file=sys.stderr)  # fmt: skip
    return rows


def verdicts(per_cut: list[dict[str, Any]], em: list[dict[str, Any]], default: float) -> dict[str, Any]:
    worst = max((strongest(r) for r in per_cut if r["noise"] == default), default=None)
    ppl = max((r["ppl_increase_pct"] for r in per_cut if r["noise"] == default), default=None)
    base_em = next((r["task"]["exact_match"] for r in em if r["noise"] == 0), None)
    def_em = next((r["task"]["exact_match"] for r in em if r["noise"] == default), None)
    drop = None if base_em is None or def_em is None else round(base_em - def_em, 4)
    eps = next((r for r in per_cut if r["noise"] == default), {})
    return {
        "default_noise": default,
        "epsilon_row": eps.get("epsilon_row"),
        "epsilon_answer": eps.get("epsilon_answer"),
        "recovery_max_over_cuts": worst,
        "recovery_met": worst is not None and worst <= RECOVERY_TARGET,
        "ppl_increase_pct_max_over_cuts": ppl,
        "ppl_met": ppl is not None and ppl <= PPL_TARGET_PCT,
        "exact_match_no_defence": base_em,
        "exact_match_default": def_em,
        "exact_match_drop": drop,
        "exact_match_met": drop is not None and drop <= EM_DROP_TARGET,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorder = Recorder("privacy", args.json, args.allow_dirty)
    import torch

    torch.set_num_threads(args.threads)
    from edgellm.eval.privacy_engine import PrivacyConfig, make_report, prepare
    from edgellm.eval.privacy_plot import plot_report
    from edgellm.privacy.attacks.optimize import OptimizeConfig

    cuts = tuple(int(c) for c in args.cuts.split(","))
    curve_cuts = tuple(int(c) for c in args.curve_cuts.split(","))
    curve_noise = floats(args.curve_noise)
    config = PrivacyConfig(cuts=tuple(sorted(set(cuts) | set(curve_cuts) | {args.em_cut})), clip=args.clip,
                           tokens=args.tokens, train_tokens=args.train_tokens, optimize_tokens=args.optimize_tokens,
                           label_steps=1, optimize=OptimizeConfig())  # fmt: skip
    start = time.perf_counter()
    harness = prepare(config)
    light = dataclasses.replace(config, attacks=("nn", "learned"))
    curve = run_rows(light, harness, [(c, z) for c in curve_cuts for z in (0.0, *curve_noise)], "curve")
    default = choose_default(curve, curve_noise)
    print(f"[privacy] default noise multiplier: {default:g}", file=sys.stderr)
    per_cut = run_rows(config, harness, [(c, z) for c in cuts for z in (0.0, default)], "per-cut")
    tuned = dataclasses.replace(config, attacks=(), task=args.task, steps=args.steps, task_n=args.task_n)
    em_noise = sorted({0.0, *floats(args.em_noise), default})
    em = run_rows(tuned, harness, [(args.em_cut, z) for z in em_noise], "task")
    result = verdicts(per_cut, em, default)
    print(json.dumps(result, indent=1), file=sys.stderr)
    reports = {name: make_report(config if name == "per_cut" else light, harness, rows)
               for name, rows in (("curve", curve), ("per_cut", per_cut), ("task", em))}  # fmt: skip
    args.figures.mkdir(parents=True, exist_ok=True)
    plot_report(reports["per_cut"], args.figures / "privacy-recovery.png", ("recovery",))
    plot_report(reports["curve"], args.figures / "privacy-utility.png", ("utility",))
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "allow_dirty", "figures")}
    data = {"settings": settings, "targets": {"recovery_max": RECOVERY_TARGET, "exact_match_drop_max": EM_DROP_TARGET,
            "ppl_increase_pct_max": PPL_TARGET_PCT}, "verdict": result, **reports,
            "total_s": round(time.perf_counter() - start, 1)}  # fmt: skip
    recorder.write(data, machine_info(args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
