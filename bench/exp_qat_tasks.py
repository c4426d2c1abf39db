"""Experiment 3, task accuracy: a LoRA fine-tune deployed with PTQ against the same fine-tune trained with QAT.

The perplexity part (`exp_qat.py`) compares models that were never trained on a task, whose exact match on the
tasks is zero whatever their bits. Here each task of `--tasks` is learned first: `edgellm finetune --task T`
(LoRA rank 8 on every linear layer, `--steps` steps, the defaults otherwise) and then

- **LoRA fp32**: the float adapter on the float model; **LoRA + PTQ int8 / int4-g64**: the same float adapter on
  the base quantized after training (`eval task --adapter A --quant S`: how QLoRA-style serving deploys it);
- **QAT int8 / int4-g64 LoRA**: the same run with `--qat S` (the adapter trains through the quantizer of its
  merged weight), served from its exported quantized model (`--model DIR/model --quant S`).

Per row: exact match and the teacher-forced response loss on `--eval-n` held-out examples.

    python bench/exp_qat_tasks.py --json bench/results/exp-qat-tasks.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from exp_qat import edgellm, log
from record import Recorder, add_record_arguments, machine_info, stamped


def evaluate(args: argparse.Namespace, task: str, *model_args: str) -> dict[str, Any]:
    r = edgellm("eval", "task", "--task", task, "--n", str(args.eval_n), *model_args)
    return {"exact_match": r["exact_match"], "eval_loss": r["eval_loss"], "n": r["n"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="antonyms")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-n", type=int, default=60)
    add_record_arguments(parser, repeats=1, rows="rows")
    args = parser.parse_args(argv)
    recorder = Recorder("exp-qat-tasks", args.json, args.allow_dirty)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-exp-qat-tasks-") as tmp:
        for task in args.tasks.split(","):
            common = ["--task", task, "--steps", str(args.steps), "--model", args.model]
            runs: dict[str, dict[str, Any]] = {}
            for name, qat in (("lora", None), ("qat-int8", "int8"), ("qat-int4", "int4-g64")):
                with stamped() as stamp:
                    extra = ["--qat", qat] if qat else []
                    runs[name] = edgellm("finetune", *common, "--output", str(Path(tmp) / f"{task}-{name}"), *extra)
                log(f"{task}: trained {name} in {stamp['s']:.0f} s, final loss {runs[name]['final_loss']:.3f}")
            adapter = runs["lora"]["adapters"][0]
            cases = [("LoRA fp32", "lora", ["--model", args.model, "--adapter", adapter]),
                     ("LoRA + PTQ int8", "lora", ["--model", args.model, "--adapter", adapter, "--quant", "int8"]),
                     ("LoRA + PTQ int4-g64", "lora",
                      ["--model", args.model, "--adapter", adapter, "--quant", "int4-g64"]),
                     ("QAT int8 LoRA", "qat-int8", ["--model", runs["qat-int8"]["exports"][0]["model"], "--quant", "int8"]),
                     ("QAT int4-g64 LoRA", "qat-int4",
                      ["--model", runs["qat-int4"]["exports"][0]["model"], "--quant", "int4-g64"])]  # fmt: skip
            for label, run, model_args in cases:
                with stamped() as stamp:
                    scored = evaluate(args, task, *model_args)
                rows.append({"task": task, "row": label, **scored, "train_final_loss": runs[run]["final_loss"],
                             "stamp": stamp})  # fmt: skip
                log(f"{task} {label}: EM {scored['exact_match']:.1%}, loss {scored['eval_loss']:.3f}")
    for r in rows:
        print(f"{r['task']:>9} {r['row']:>20}: exact match {r['exact_match']:6.1%}, eval loss {r['eval_loss']:.3f}")
    recorder.write({"settings": vars(args) | {"json": None}, "rows": rows,
                    "total_s": round(time.monotonic() - started, 1)}, machine_info(threads=0))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
