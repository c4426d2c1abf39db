"""The fast engine against the generic path, llama.cpp and the fp32 bandwidth limit: decode speed, TTFT, memory.

Every row runs in this process on `--threads` threads, every stage with no cut, head with the layers (`edgellm
generate --quant SCHEME` without cuts), greedy, each run generating exactly its number of new tokens (end of
sequence does not stop a run). Two phases, each row loaded once for both:

1. Decode, from the chat prompt (48 tokens for the default model), `--tokens` new tokens per run:
   - `generic SCHEME`: the stages with transformers' decoder-block modules (`--engine generic`).
   - `fast SCHEME`: the same stages with the fast engine's blocks (`--engine fast`, the default).
   - `llama.cpp q4_1`: the model's original Q4_1 GGUF through llama-cpp-python, in a worker process at its
     own default settings (OMP_WAIT_POLICY unset: spinning threads) but n_ctx (`--n-ctx`; by default the
     longest prompt + `--tokens`, at least 512: it sizes the KV buffer, a step attends over the cells in use),
     as in bench/decode.py.
   - `fp32 bandwidth limit` (with scheme `none`): the machine's read bandwidth (bench/bandwidth.py: median of
     `--bandwidth-passes` reads of a `--bandwidth-mb` buffer, in a worker process, same threads) divided by the
     bytes of fp32 weights a decode token reads (`engine_rows.fp32_weight_bytes`: every parameter once; the
     tied embedding counted once, as the head). Measured in turn with the other rows, so each repeat has its own.
2. TTFT of long prompts, for each length in `--prompt-tokens` (default 256 and 1024): the first N tokens of
   bench/texts/britannica.txt (plain text; `python bench/quant.py --fetch-texts bench/texts`), one new token
   per run; the `fast` rows and llama.cpp.

Schemes (`--schemes`): fp32 (`none`), `bf16` (every weight in bfloat16; nothing quantized), `int8`, and
`int4-g32,head=int8,embed=int8` (the 4-bit setting of docs/QUANTIZATION.md). Rows take turns (ABBA),
`--repeats` times after one warm-up each, in each phase; medians with the order-statistic interval of
bench/record.py; ratios are medians of per-repeat ratios taken side by side. TTFT: from the prefill call until
the first token id is chosen; decode tok/s: (tokens - 1) / the time from the first token to the last.

Targets (issue 12), each judged on the interval of its per-repeat ratio:
- decode tok/s: fast 4-bit >= 1.0x llama.cpp's Q4_1; fast int8 >= 0.8x llama.cpp's Q4_1; fast fp32 >= 0.8x
  the fp32 bandwidth limit.
- TTFT of the `--prompt-tokens` prompts: fast at every scheme <= 0.5x llama.cpp's.

Memory: each edgellm row's `rss_added_mb` (what its load added to this process's RSS, freed memory handed back
first), this process's RSS before any load and its peak (VmHWM; every row's weights at once), and the peak RSS
of the llama.cpp worker (llama.cpp alone, its mmapped GGUF included) and of the bandwidth worker.
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
from bandwidth import DEFAULT_PASSES, DEFAULT_SIZE_MB, peak_rss_mb
from decode import Row, measure, paired, start_llamacpp
from engine_rows import BandwidthLimit, Borrowed, SchemeEngine, fp32_weight_bytes, long_prompt, scheme_setup
from record import Recorder, add_omp_argument, add_record_arguments, format_target, machine_info, summary, target_record
from report import PROMPT, ci_caption, markdown_table, with_ci

from edgellm.errors import ConfigError
from edgellm.model.prompt import encode_prompt
from edgellm.split.budget import rss_bytes, to_mb
from edgellm.store import DEFAULT_MODEL, resolve_model
from edgellm.store.weights import load_tokenizer

SCHEMES = ("none", "bf16", "int8", "int4-g32,head=int8,embed=int8")
TARGETS = {"int4-g32,head=int8,embed=int8": 1.0, "int8": 0.8}  # fast decode / llama.cpp q4_1 decode
LIMIT_TARGET = 0.8  # fast fp32 decode / the fp32 bandwidth limit
TTFT_TARGET = 0.5  # fast TTFT / llama.cpp's, long prompts, every scheme
LLAMA, LIMIT = "llama.cpp q4_1", "fp32 bandwidth limit"


def plan_rows(args: argparse.Namespace, model_dir: Path, notes: list[str]) -> tuple[list[Row], list[dict[str, str]]]:
    rows: list[Row] = []
    for scheme in args.schemes:
        generic = f"generic {scheme}"
        rows.append(Row(generic, "edgellm", scheme, lambda s=scheme: SchemeEngine(model_dir, s, "generic")))
        rows.append(
            Row(f"fast {scheme}", "edgellm", scheme, lambda s=scheme: SchemeEngine(model_dir, s, "fast"), baseline=generic)
        )  # fmt: skip
    if "none" in args.schemes and not args.no_bandwidth:
        limit = lambda: BandwidthLimit(  # noqa: E731
            fp32_weight_bytes(model_dir), args.threads, args.bandwidth_mb, args.bandwidth_passes
        )
        rows.append(Row(LIMIT, "roofline", "none", limit))
    skipped: list[dict[str, str]] = []
    gguf = model_dir / "source.gguf"
    if args.no_llamacpp or not gguf.is_file() or importlib.util.find_spec("llama_cpp") is None:
        skipped.append({"row": "llama.cpp", "reason": "--no-llamacpp, no source.gguf, or llama_cpp not installed"})
    else:
        # Borrowed: `measure` leaves the worker running for phase 2; `main` closes it.
        build = lambda: Borrowed(start_llamacpp(gguf, args.threads, args.n_ctx, "auto", None, notes))  # noqa: E731
        rows.append(Row(LLAMA, "llama.cpp", "q4_1", build, omp_wait_policy="unset"))
    return rows, skipped


def decode_targets(row: Row, vs_llama: dict[str, Any] | None, vs_limit: dict[str, Any] | None) -> list[dict[str, Any]]:
    targets = []
    if row.name.startswith("fast ") and row.dtype in TARGETS and vs_llama is not None:
        name = f"decode tok/s {row.name} / {LLAMA}"
        targets.append(target_record(name, TARGETS[row.dtype], vs_llama, higher_is_better=True))
    if row.name == "fast none" and vs_limit is not None:
        targets.append(target_record(f"decode tok/s fast none / {LIMIT}", LIMIT_TARGET, vs_limit, True))
    return targets


def summarize(rows: list[Row]) -> list[dict[str, Any]]:
    by_name = {r.name: r for r in rows}
    llama, limit = by_name.get(LLAMA), by_name.get(LIMIT)
    out = []
    for row in rows:
        edgellm = row.engine == "edgellm"
        base = by_name.get(row.baseline) if row.baseline else None
        vs_generic = paired(row, base, lambda r: r.decode_tok_per_s) if base else None
        vs_llama = paired(row, llama, lambda r: r.decode_tok_per_s) if llama and edgellm else None
        ttft_vs_llama = paired(row, llama, lambda r: r.ttft_ms) if llama and edgellm else None
        vs_limit = (
            paired(row, limit, lambda r: r.decode_tok_per_s) if limit and row.dtype == "none" and edgellm else None
        )
        same = None if base is None or not row.runs or not base.runs else row.runs[-1].tokens == base.runs[-1].tokens
        out.append(
            {
                "name": row.name, "scheme": row.dtype, "engine_info": getattr(row.instance, "info", None),
                "omp_wait_policy": row.omp_wait_policy, "load_s": round(row.load_s, 3),
                "ttft_ms": summary([r.ttft_ms for r in row.runs]) if row is not limit else None,
                "decode_tok_per_s": summary([r.decode_tok_per_s for r in row.runs]),
                "bandwidth_gbps": summary([r.bandwidth_gbps for r in row.runs]) if row is limit else None,  # type: ignore[attr-defined]
                "decode_vs_generic": vs_generic, "decode_vs_llamacpp": vs_llama, "ttft_vs_llamacpp": ttft_vs_llama,
                "decode_vs_fp32_limit": vs_limit, "same_tokens_as_generic": same,
                "targets": decode_targets(row, vs_llama, vs_limit), "runs": [r.as_json() for r in row.runs],
            }
        )  # fmt: skip
    return out


def measure_ttft(args: argparse.Namespace, rows: list[Row], prompts: dict[int, list[int]],
                 skipped: list[dict[str, str]]) -> list[dict[str, Any]]:  # fmt: skip
    """Phase 2: the fast rows and llama.cpp again (already loaded), one new token from each long prompt."""
    lent = [r for r in rows if r.name.startswith("fast ") or r.name == LLAMA]
    out = []
    for length, prompt_ids in prompts.items():
        phase = [Row(r.name, r.engine, r.dtype, lambda e=r.instance: Borrowed(e), omp_wait_policy=r.omp_wait_policy)
                 for r in lent]  # fmt: skip
        phase = measure(phase, prompt_ids, argparse.Namespace(**{**vars(args), "tokens": 1}), skipped)
        llama = next((r for r in phase if r.name == LLAMA), None)
        for row in phase:
            ratio = paired(row, llama, lambda r: r.ttft_ms) if llama and row is not llama else None
            name = f"TTFT {row.name} / {LLAMA}, {length}-token prompt"
            out.append(
                {
                    "name": row.name, "scheme": row.dtype, "prompt_tokens": length,
                    "ttft_ms": summary([r.ttft_ms for r in row.runs]), "ttft_vs_llamacpp": ratio,
                    "targets": [] if ratio is None else [target_record(name, TTFT_TARGET, ratio, False)],
                    "runs": [{"ttft_ms": round(r.ttft_ms, 3), "repeat": r.repeat, "stamp": r.stamp,
                              "tokens": r.tokens} for r in row.runs],
                }
            )  # fmt: skip
    return out


def tables(rows: list[dict[str, Any]], ttft: list[dict[str, Any]]) -> str:
    headers = ["row", "TTFT ms [CI]", "decode tok/s [CI]", "fast / generic [CI]", "decode / llama.cpp [CI]",
               "TTFT / llama.cpp [CI]", "decode / fp32 limit [CI]", "same tokens as generic", "RSS added MB"]  # fmt: skip
    body = [
        [r["name"], with_ci(r["ttft_ms"], 1), with_ci(r["decode_tok_per_s"], 2), with_ci(r["decode_vs_generic"], 3),
         with_ci(r["decode_vs_llamacpp"], 3), with_ci(r["ttft_vs_llamacpp"], 3), with_ci(r["decode_vs_fp32_limit"], 3),
         r["same_tokens_as_generic"], (r["engine_info"] or {}).get("rss_added_mb")]
        for r in rows
    ]  # fmt: skip
    text = markdown_table(headers, body, digits=1)
    if ttft:
        body = [[r["name"], r["prompt_tokens"], with_ci(r["ttft_ms"], 1), with_ci(r["ttft_vs_llamacpp"], 3),
                 r["targets"][0]["verdict"] if r["targets"] else None] for r in ttft]  # fmt: skip
        headers = ["row", "prompt tokens", "TTFT ms [CI]", "TTFT / llama.cpp [CI]", f"<= {TTFT_TARGET}"]
        text += "\n\n### TTFT of long prompts (1 new token)\n\n" + markdown_table(headers, body)
    return text


def memory(rows: list[Row], baseline_mb: float) -> dict[str, Any]:
    info = {r.name: getattr(r.instance, "info", None) or {} for r in rows}
    return {
        "this_process_rss_before_loads_mb": baseline_mb,
        "this_process_peak_rss_mb": peak_rss_mb(),
        "rss_added_mb": {name: i["rss_added_mb"] for name, i in info.items() if "rss_added_mb" in i},
        "llamacpp_worker_peak_rss_mb": info.get(LLAMA, {}).get("peak_rss_mb"),
        "bandwidth_worker_peak_rss_mb": info.get(LIMIT, {}).get("peak_rss_mb"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered name or directory (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per decode run (default: %(default)s)")
    parser.add_argument("--schemes", default=";".join(SCHEMES), help="weight schemes, ';'-separated (default: %(default)s)")  # fmt: skip
    parser.add_argument("--prompt-tokens", default="256,1024",
                        help="phase 2's prompt lengths, ','-separated; '' skips phase 2 (default: %(default)s)")  # fmt: skip
    parser.add_argument("--n-ctx", type=int, default=None,
                        help="llama.cpp context (default: the longest prompt + --tokens, at least 512)")  # fmt: skip
    parser.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp row")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the fp32 bandwidth-limit row")
    parser.add_argument("--bandwidth-mb", type=int, default=DEFAULT_SIZE_MB, help="bandwidth buffer MB (default: %(default)s)")  # fmt: skip
    parser.add_argument("--bandwidth-passes", type=int, default=DEFAULT_PASSES, help="bandwidth passes per run (default: %(default)s)")  # fmt: skip
    parser.add_argument("--pause-s", type=float, default=0.2, help="idle pause before each run (default: %(default)s)")
    add_omp_argument(parser, "this process: the edgellm rows")
    add_record_arguments(parser)
    args = parser.parse_args(argv)
    args.schemes = [s.strip() for s in args.schemes.split(";") if s.strip()]
    args.prompt_tokens = [int(n) for n in args.prompt_tokens.split(",") if n.strip()]
    try:
        for scheme in args.schemes:
            scheme_setup(scheme)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.tokens < 2 or min([args.repeats, args.threads, *args.prompt_tokens], default=1) < 1:
        parser.error("--tokens must be >= 2; --repeats, --threads and --prompt-tokens >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorder = Recorder("engine", args.json, args.allow_dirty)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = encode_prompt(tokenizer, PROMPT, chat=True)
    long_prompts = {n: long_prompt(tokenizer, n) for n in args.prompt_tokens}
    args.n_ctx = args.n_ctx or max(512, max([len(prompt_ids), *long_prompts], default=0) + args.tokens)
    baseline_mb = to_mb(rss_bytes())
    notes: list[str] = []
    rows, skipped = plan_rows(args, model_dir, notes)
    rows = measure(rows, prompt_ids, args, skipped)
    result = summarize(rows)
    llama = next((r.instance for r in rows if r.name == LLAMA), None)
    ttft = measure_ttft(args, rows, long_prompts, skipped)
    close = getattr(getattr(llama, "engine", None), "close", None)
    if close is not None:
        close()
    mem = memory(rows, baseline_mb)
    print(f"\n## engine: {args.model}, {args.threads} threads, prompt {len(prompt_ids)} tokens, {args.tokens} new "
          f"tokens, greedy, {ci_caption(args.repeats)}\n")  # fmt: skip
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; {recorder.header()}\n")
    print(tables(result, ttft))
    for row in [*result, *ttft]:
        for target in row["targets"]:
            print(f"\n{format_target(target)}")
    for row in result:
        if row["bandwidth_gbps"] is not None:
            print(f"\n{LIMIT}: read bandwidth {with_ci(row['bandwidth_gbps'], 2)} GB/s / "
                  f"{row['engine_info']['bytes_per_token'] / 1e6:.1f} MB of fp32 weights per token")  # fmt: skip
    print(f"\npeak RSS MB: this process {mem['this_process_peak_rss_mb']} (every row loaded; "
          f"{mem['this_process_rss_before_loads_mb']} before any), llama.cpp worker "
          f"{mem['llamacpp_worker_peak_rss_mb']}, bandwidth worker {mem['bandwidth_worker_peak_rss_mb']}")  # fmt: skip
    for s in skipped:
        print(f"\nskipped {s['row']}: {s['reason']}")
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "allow_dirty")}
    recorder.write({"settings": {**settings, "omp_wait_policy_in_process": IN_PROCESS_OMP},
                    "prompt_tokens": prompt_ids, "long_prompt_tokens": long_prompts, "rows": result, "ttft": ttft,
                    "memory": mem, "skipped": skipped, "notes": notes}, machine=info)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
