"""The fast engine against the generic path and llama.cpp: decode speed and TTFT per weight scheme, same threads.

Rows, all greedy from the same chat-prompt token ids, each generating exactly `--tokens` new tokens (end of
sequence does not stop a run), every stage in this process, no cut, head with the layers (`edgellm generate
--quant SCHEME` without cuts):

- `generic SCHEME`: the stages with transformers' decoder-block modules (`--engine generic`).
- `fast SCHEME`: the same stages with the fast engine's blocks (`--engine fast`, the default).
- `llama.cpp q4_1`: the model's original Q4_1 GGUF through llama-cpp-python, in a worker process at its own
  default settings (OMP_WAIT_POLICY unset: spinning threads), as in bench/decode.py.

Schemes (`--schemes`): fp32 (`none`), `int8`, and `int4-g32,head=int8,embed=int8` (the 4-bit setting of
docs/QUANTIZATION.md). Rows take turns (ABBA), `--repeats` times after one warm-up each; medians with the
order-statistic interval of bench/record.py; ratios are medians of per-repeat ratios taken side by side.

Targets (issue 12): fast 4-bit decode >= 1.0x llama.cpp's Q4_1; fast int8 >= 0.8x llama.cpp's Q4_1. The fast /
generic ratio is reported for every scheme, as is whether both give the same tokens.
"""

# ruff: noqa: E402  (the imports follow the OMP_WAIT_POLICY setting on purpose)

from __future__ import annotations

import sys

from record import set_omp_wait_policy

IN_PROCESS_OMP = set_omp_wait_policy(sys.argv[1:])

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import torch
from decode import Row, StagedEngine, measure, paired, start_llamacpp
from record import Recorder, add_omp_argument, add_record_arguments, format_target, machine_info, summary, target_record
from report import PROMPT, ci_caption, markdown_table, with_ci

from edgellm.model.prompt import encode_prompt
from edgellm.model.stage import stage_specs
from edgellm.quant.scheme import parse_quant
from edgellm.split.one_process import load_stages
from edgellm.store import DEFAULT_MODEL, resolve_model
from edgellm.store.weights import load_config, load_tokenizer

SCHEMES = ("none", "int8", "int4-g32,head=int8,embed=int8")
TARGETS = {"int4-g32,head=int8,embed=int8": 1.0, "int8": 0.8}  # fast decode / llama.cpp q4_1 decode


class SchemeEngine(StagedEngine):
    """The whole model as one stage at a weight scheme, run by one engine and the library's Generator."""

    def __init__(self, model_dir: Path, quant: str, engine: str) -> None:
        specs = stage_specs(int(load_config(model_dir).num_hidden_layers), (), "server")
        self.stages = load_stages(model_dir, specs, torch.float32, parse_quant(quant), engine)
        self.info = {"engine": self.stages[0].engine, "quant": quant}


def plan_rows(args: argparse.Namespace, model_dir: Path, notes: list[str]) -> tuple[list[Row], list[dict[str, str]]]:
    rows: list[Row] = []
    for quant in args.schemes.split(";"):
        generic = f"generic {quant}"
        rows.append(Row(generic, "edgellm", quant, lambda q=quant: SchemeEngine(model_dir, q, "generic")))
        rows.append(
            Row(f"fast {quant}", "edgellm", quant, lambda q=quant: SchemeEngine(model_dir, q, "fast"), baseline=generic)
        )
    skipped: list[dict[str, str]] = []
    gguf = model_dir / "source.gguf"
    if args.no_llamacpp or not gguf.is_file() or importlib.util.find_spec("llama_cpp") is None:
        skipped.append({"row": "llama.cpp", "reason": "--no-llamacpp, no source.gguf, or llama_cpp not installed"})
    else:
        build = lambda: start_llamacpp(gguf, args.threads, args.n_ctx, "auto", None, notes)  # noqa: E731
        rows.append(Row("llama.cpp q4_1", "llama.cpp", "q4_1", build, omp_wait_policy="unset"))
    return rows, skipped


def summarize(rows: list[Row]) -> list[dict[str, Any]]:
    by_name = {r.name: r for r in rows}
    llama = by_name.get("llama.cpp q4_1")
    out = []
    for row in rows:
        base = by_name.get(row.baseline) if row.baseline else None
        vs_generic = paired(row, base, lambda r: r.decode_tok_per_s) if base else None
        vs_llama = paired(row, llama, lambda r: r.decode_tok_per_s) if llama and row is not llama else None
        ttft_vs_llama = paired(row, llama, lambda r: r.ttft_ms) if llama and row is not llama else None
        targets = []
        if row.name.startswith("fast ") and row.dtype in TARGETS and vs_llama is not None:
            name = f"decode tok/s {row.name} / llama.cpp q4_1"
            targets.append(target_record(name, TARGETS[row.dtype], vs_llama, higher_is_better=True))
        same = None if base is None or not row.runs or not base.runs else row.runs[-1].tokens == base.runs[-1].tokens
        out.append(
            {
                "name": row.name, "scheme": row.dtype, "engine_info": getattr(row.instance, "info", None),
                "omp_wait_policy": row.omp_wait_policy, "load_s": round(row.load_s, 3),
                "ttft_ms": summary([r.ttft_ms for r in row.runs]),
                "decode_tok_per_s": summary([r.decode_tok_per_s for r in row.runs]),
                "decode_vs_generic": vs_generic, "decode_vs_llamacpp": vs_llama, "ttft_vs_llamacpp": ttft_vs_llama,
                "same_tokens_as_generic": same, "targets": targets, "runs": [r.as_json() for r in row.runs],
            }
        )  # fmt: skip
    return out


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["row", "TTFT ms [CI]", "decode tok/s [CI]", "fast / generic [CI]", "decode / llama.cpp [CI]",
               "TTFT / llama.cpp [CI]", "same tokens as generic"]  # fmt: skip
    body = [
        [r["name"], with_ci(r["ttft_ms"], 1), with_ci(r["decode_tok_per_s"], 2), with_ci(r["decode_vs_generic"], 3),
         with_ci(r["decode_vs_llamacpp"], 3), with_ci(r["ttft_vs_llamacpp"], 3), r["same_tokens_as_generic"]]
        for r in rows
    ]  # fmt: skip
    return markdown_table(headers, body, digits=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered name or directory (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per run (default: %(default)s)")
    parser.add_argument("--schemes", default=";".join(SCHEMES), help="weight schemes, ';'-separated")
    parser.add_argument("--n-ctx", type=int, default=512, help="llama.cpp context (default: %(default)s)")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp row")
    parser.add_argument("--pause-s", type=float, default=0.2, help="idle pause before each run (default: %(default)s)")
    add_omp_argument(parser, "this process: the edgellm rows")
    add_record_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorder = Recorder("engine", args.json, args.allow_dirty)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    model_dir = resolve_model(args.model)
    prompt_ids = encode_prompt(load_tokenizer(model_dir), PROMPT, chat=True)
    notes: list[str] = []
    rows, skipped = plan_rows(args, model_dir, notes)
    rows = measure(rows, prompt_ids, args, skipped)
    result = summarize(rows)
    print(f"\n## engine: {args.model}, {args.threads} threads, prompt {len(prompt_ids)} tokens, {args.tokens} new "
          f"tokens, greedy, {ci_caption(args.repeats)}\n")  # fmt: skip
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; {recorder.header()}\n")
    print(table(result))
    for row in result:
        for target in row["targets"]:
            print(f"\n{format_target(target)}")
    for s in skipped:
        print(f"\nskipped {s['row']}: {s['reason']}")
    settings = {"model": args.model, "threads": args.threads, "tokens": args.tokens, "repeats": args.repeats,
                "schemes": args.schemes, "n_ctx": args.n_ctx, "omp_wait_policy_in_process": IN_PROCESS_OMP}  # fmt: skip
    recorder.write({"settings": settings, "prompt_tokens": prompt_ids, "rows": result, "skipped": skipped,
                    "notes": notes}, machine=info)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
