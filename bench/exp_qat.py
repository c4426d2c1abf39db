"""The seed's experiment 3: 4-bit post-training quantization against 8-bit and 4-bit quantization-aware training.

SmolLM2-135M-Instruct, every weight of its 30 decoder layers trained (`edgellm finetune --train-layers 0:30
--no-lora`) for `--steps` steps on `--train-text` (the Python tutorial), then scored on text of another kind
(`--heldout-text`, the Encyclopaedia Britannica's article on Shakespeare, its first `--ppl-tokens` tokens):

- **fp32**: the published model, unquantized; **PTQ int8** and **PTQ int4-g64** (round to nearest) of it (the
  calibrated `-gptq` schemes are left out: their calibration text is the rest of the held-out article);
- **QAT int8**, **QAT int4-g64**: trained through the fake quantizer (`--qat`), served from the exported stage;
- the controls that separate training from quantization-awareness: **FT fp32** (the same steps without `--qat`)
  and **FT + PTQ int4-g64** (that model quantized after training).

Per row: weight bytes (what `eval ppl` loads), held-out perplexity, decode tok/s (`edgellm generate`, greedy,
`--tokens` tokens, the median of `--repeats`, rows taking turns), and on each task of `--tasks` the exact match and
the teacher-forced response loss (`edgellm eval task`, `--eval-n` held-out examples; the models are not trained
on the tasks, so the loss, not the exact match, is what separates them). The target (issue 18): 4-bit QAT
recovers at least half of 4-bit PTQ's perplexity gap to fp32.

    python bench/quant.py --fetch-texts bench/texts      # once: the two texts (PyPI, Debian)
    python bench/exp_qat.py --json bench/results/exp-qat.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from record import Recorder, add_record_arguments, machine_info, schedule, stamped, summary

PROMPT = "Explain in a few sentences how a rainbow forms."
HERE = Path(__file__).resolve().parent


def log(text: str) -> None:
    print(f"[exp-qat] {text}", file=sys.stderr, flush=True)


def edgellm(*args: str) -> dict[str, Any]:
    """`edgellm ARGS --json --quiet` in a fresh process; its JSON report."""
    cmd = [sys.executable, "-m", "edgellm", *args, "--json", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:8])}... exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train(args: argparse.Namespace, out: Path, qat: str | None) -> tuple[str, dict[str, Any]]:
    """Full fine-tuning of every layer (through `qat`'s quantizer if given); -> the exported model dir, report."""
    extra = ["--qat", qat] if qat else []
    report = edgellm("finetune", "--data", str(args.train_text), "--steps", str(args.steps), "--model", args.model,
                     "--train-layers", f"0:{args.layers}", "--no-lora", "--lr", str(args.lr), "--batch-size",
                     str(args.batch_size), "--seq-len", str(args.seq_len), "--output", str(out), *extra)  # fmt: skip
    return report["exports"][0]["model"], report


def score(args: argparse.Namespace, model: str, quant: str) -> dict[str, Any]:
    """Held-out perplexity and weight bytes, and each task's exact match and response loss."""
    ppl = edgellm("eval", "ppl", "--model", model, "--quant", quant, "--text", str(args.heldout_text),
                  "--max-tokens", str(args.ppl_tokens), "--ctx", str(args.ctx))  # fmt: skip
    tasks = {}
    for task in args.tasks.split(","):
        r = edgellm("eval", "task", "--task", task, "--n", str(args.eval_n), "--model", model, "--quant", quant)
        tasks[task] = {"exact_match": r["exact_match"], "eval_loss": r["eval_loss"]}
    return {"ppl": ppl["ppl"], "weight_bytes": ppl["weight_bytes"], "ppl_tokens": ppl["tokens"], "tasks": tasks}


def decode_speed(model: str, quant: str, tokens: int) -> float:
    r = edgellm("generate", "--model", model, "--quant", quant, "--max-new-tokens", str(tokens), "--greedy", PROMPT)
    return float(r["decode_tok_per_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=30, help="the model's decoder layers (default: %(default)s)")
    parser.add_argument("--train-text", type=Path, default=HERE / "texts/python-tutorial.txt")
    parser.add_argument("--heldout-text", type=Path, default=HERE / "texts/britannica.txt")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ppl-tokens", type=int, default=1024)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--tasks", default="antonyms,plays")
    parser.add_argument("--eval-n", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per decode run (default: %(default)s)")
    add_record_arguments(parser, repeats=3, rows="rows")
    args = parser.parse_args(argv)
    for path in (args.train_text, args.heldout_text):
        if not path.is_file():
            parser.error(f"{path} is missing: run `python bench/quant.py --fetch-texts bench/texts` first")
    recorder = Recorder("exp-qat", args.json, args.allow_dirty)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-exp-qat-") as tmp:
        models: dict[str, str] = {"published": args.model}
        training: dict[str, Any] = {}
        for name, qat in (("ft", None), ("qat-int8", "int8"), ("qat-int4", "int4-g64")):
            with stamped() as stamp:
                models[name], report = train(args, Path(tmp) / name, qat)
            training[name] = {"qat": qat, "final_loss": report.get("final_loss"), "step_ms": report.get("step_ms"),
                              "stamp": stamp}  # fmt: skip
            log(f"trained {name}: final loss {report.get('final_loss')}, {stamp['s']:.0f} s")
        rows = [("fp32", "published", "none"), ("PTQ int8", "published", "int8"),
                ("PTQ int4-g64", "published", "int4-g64"),
                ("FT fp32", "ft", "none"), ("FT + PTQ int4-g64", "ft", "int4-g64"),
                ("QAT int8", "qat-int8", "int8"), ("QAT int4-g64", "qat-int4", "int4-g64")]  # fmt: skip
        results = []
        for label, model, quant in rows:
            with stamped() as stamp:
                scored = score(args, models[model], quant)
            results.append({"row": label, "model": model, "quant": quant, **scored, "stamp": stamp})
            log(f"{label}: ppl {scored['ppl']:.2f}, {scored['weight_bytes'] / 1e6:.1f} MB, {scored['tasks']}")
        speeds: list[list[float]] = [[] for _ in rows]
        for _, index in schedule(len(rows), args.repeats):
            _, model, quant = rows[index]
            speeds[index].append(decode_speed(models[model], quant, args.tokens))
        for result, runs in zip(results, speeds):
            result["decode_tok_per_s"] = summary(runs)
    by = {r["row"]: r for r in results}
    fp32, ptq4, qat4 = (by[k]["ppl"] for k in ("fp32", "PTQ int4-g64", "QAT int4-g64"))
    recovered = (ptq4 - qat4) / (ptq4 - fp32)
    target = {"name": "4-bit QAT recovers >= half of 4-bit PTQ's perplexity gap to fp32", "recovered": recovered,
              "verdict": "met" if recovered >= 0.5 else "missed"}  # fmt: skip
    for r in results:
        tasks = ", ".join(f"{t} EM {v['exact_match']:.0%} loss {v['eval_loss']:.3f}" for t, v in r["tasks"].items())
        print(f"{r['row']:>18}: {r['weight_bytes'] / 1e6:7.1f} MB, ppl {r['ppl']:7.2f}, "
              f"{r['decode_tok_per_s']['median']:5.1f} tok/s, {tasks}")  # fmt: skip
    print(f"gap recovered by 4-bit QAT: {recovered:.0%} ({target['verdict']})")
    settings = vars(args) | {"json": None, "train_text": str(args.train_text), "heldout_text": str(args.heldout_text)}
    recorder.write({"settings": settings, "training": training, "rows": results, "target": target,
                    "total_s": round(time.monotonic() - started, 1)}, machine_info(threads=0))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
