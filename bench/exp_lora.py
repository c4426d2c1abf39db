"""The seed's experiment 2: LoRA with different ranks, target modules (and frozen layers): trainable parameters
against task performance and memory.

Each row fine-tunes SmolLM2-135M in one process (`edgellm finetune`, centralized: the split adds no numerics,
docs/TRAINING.md shows it matches) on a built-in task for `--steps` steps with one LoRA setting, then scores the
exported adapter with `edgellm eval task` (exact match and response loss on `--eval-n` held-out prompts). Each
fine-tuning runs in a fresh process so its peak RSS (VmHWM: weights, adapters, optimizer states, activations,
the runtime) is its own. Rows: every rank in `--ranks` with every module set in `--modules` (all layers), then
the `--frozen` fractions of the bottom layers left without adapters (rank 8, all seven projections).

    python bench/exp_lora.py --json bench/results/exp-lora.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from record import Recorder, add_record_arguments, machine_info, run_json, stamped

MODULE_SETS = {"qv": "q_proj,v_proj", "qkvo": "q_proj,k_proj,v_proj,o_proj",
               "all": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"}  # fmt: skip
# Where each module sits in a Llama decoder layer (`model.layers.N.PARENT.MODULE`).
PARENT = {**dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), "self_attn"),
          **dict.fromkeys(("gate_proj", "up_proj", "down_proj"), "mlp")}  # fmt: skip


def log(text: str) -> None:
    print(f"[exp-lora] {text}", file=sys.stderr, flush=True)


def worker(argv: list[str]) -> int:
    """`edgellm finetune ARGV` in this process; prints its JSON report with this process's peak RSS added."""
    import contextlib
    import io

    from edgellm.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["finetune", *argv])
    report = json.loads(out.getvalue().strip().splitlines()[-1]) if code == 0 else {"exit_code": code}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            report["peak_rss_mb"] = round(int(line.split()[1]) * 1024 / 1e6, 1)
    print(json.dumps(report))
    return code


def targets(row: dict[str, Any], layers: int) -> str:
    """The row's target modules; with frozen bottom layers, the modules of the layers above them by full name
    (targets match as dotted suffixes, as in peft, so `layers.12.self_attn.q_proj` names one module)."""
    modules = MODULE_SETS[row["modules"]]
    if not row["frozen"]:
        return modules
    first = round(row["frozen"] * layers)
    return ",".join(f"layers.{i}.{PARENT[m]}.{m}" for i in range(first, layers) for m in modules.split(","))


def rows_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = [
        {"rank": r, "modules": m, "frozen": 0.0}
        for m in args.modules.split(",")
        for r in map(int, args.ranks.split(","))
    ]
    rows += [{"rank": 8, "modules": "all", "frozen": float(f)} for f in args.frozen.split(",") if f and float(f) > 0]
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="antonyms")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ranks", default="2,8,32")
    parser.add_argument("--modules", default="qv,all", help=f"module sets: {MODULE_SETS}")
    parser.add_argument("--frozen", default="0.5,0.8", help="fractions of the bottom layers without adapters")
    parser.add_argument("--eval-n", type=int, default=60)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=30, help="the model's decoder layers (default: %(default)s)")
    add_record_arguments(parser, repeats=1, rows="rows")
    args = parser.parse_args(argv)
    recorder = Recorder("exp-lora", args.json, args.allow_dirty)
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-exp-lora-") as tmp:
        for i, row in enumerate(rows_of(args)):
            out = Path(tmp) / f"run{i}"
            ft = ["--task", args.task, "--steps", str(args.steps), "--model", args.model, "--output", str(out),
                  "--lora-rank", str(row["rank"]), "--lora-alpha", str(2 * row["rank"]),
                  "--target-modules", targets(row, args.layers), "--json", "--quiet"]  # fmt: skip
            with stamped() as stamp:
                trained = run_json([sys.executable, __file__, "--worker", *ft])
                adapter = trained["adapters"][0]
                scored = run_json([sys.executable, "-m", "edgellm", "eval", "task", "--task", args.task, "--n",
                                   str(args.eval_n), "--model", args.model, "--adapter", adapter, "--json", "--quiet"])  # fmt: skip
            result = {**row, "trainable_params": trained["device_trainable_params"],
                      "peak_rss_mb": trained.get("peak_rss_mb"), "final_loss": trained["final_loss"],
                      "step_ms": trained["step_ms"], "exact_match": scored["exact_match"],
                      "eval_loss": scored["eval_loss"], "stamp": stamp}  # fmt: skip
            results.append(result)
            log(f"rank {row['rank']} {row['modules']} frozen {row['frozen']:.0%}: {result['trainable_params']:,} "
                f"params, EM {result['exact_match']:.0%}, eval loss {result['eval_loss']:.3f}, "
                f"{result['peak_rss_mb']} MB peak")  # fmt: skip
    base = run_json([sys.executable, "-m", "edgellm", "eval", "task", "--task", args.task, "--n", str(args.eval_n),
                     "--model", args.model, "--json", "--quiet"])  # fmt: skip
    report = {"settings": vars(args) | {"json": None}, "base": {"exact_match": base["exact_match"],
              "eval_loss": base["eval_loss"]}, "rows": results, "total_s": round(time.monotonic() - started, 1)}  # fmt: skip
    print(json.dumps({k: report[k] for k in ("base", "total_s")}))
    recorder.write(report, machine_info(threads=0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
