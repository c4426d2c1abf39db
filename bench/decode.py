"""Staged vs monolithic: decode speed and time to first token of one model in one process, same threads.

Rows, all greedy from the same prompt token ids on the same number of threads, each generating exactly
`--tokens` new tokens (end-of-sequence does not stop a run, so every row does the same number of steps):

- `hf-monolithic`: transformers' `AutoModelForCausalLM` from the cached model directory with its own
  `DynamicCache`, driven by a hand-written loop: prefill `model(ids, use_cache=True, logits_to_keep=1)`,
  argmax, then `model(token, cache=cache, use_cache=True, logits_to_keep=1)` and argmax per step.
  `logits_to_keep=1` makes it compute the LM head for the last position only, as edgellm's stages do.
- `edgellm-staged`: the same weights as edgellm stages (`edgellm.split.one_process.load_stages`) chained by
  in-process hops (`local_pipeline`) and driven by `edgellm.split.generator.Generator`, as `edgellm generate`
  runs them; without cuts, and cut at `--cuts` with the head on the last server stage or on the device.
- `llama.cpp`: the original Q4_1 GGUF (`source.gguf` in the model directory) through llama-cpp-python's
  low-level loop, in a child process (bench/llamacpp_worker.py): `Llama.eval(prompt_ids)`, then
  `Llama.sample(temp=0)` (greedy) and `Llama.eval([token])` per step. Skipped, with a note, when `llama_cpp`
  is not installed (the optional extra `llamacpp`).
- `hf-monolithic bf16`, `edgellm-staged bf16`: the first two rows with bfloat16 weights (`--no-bf16`).

TTFT: from the prefill call until the first token id is chosen (prefill + LM head + argmax).
Decode tok/s: (tokens - 1) / the time from the first token to the last.
Every row runs once as warm-up; then the rows take turns, `--repeats` times (ABBA order), and the table
reports medians with an order-statistic confidence interval of the median (bench/record.py); ratios against
the baseline row are medians of the per-repeat ratios, with their interval. A target is met only when the
whole interval clears it.

Each engine runs at its own best OpenMP setting: the in-process rows with `--omp-wait-policy` (set before torch
loads), llama.cpp's worker with OMP_WAIT_POLICY removed from its environment (llama.cpp's default spinning
threads) unless `--llamacpp-omp-wait-policy` sets one. Each row records its policy.
"""

# ruff: noqa: E402  (the imports follow the OMP_WAIT_POLICY setting on purpose)

from __future__ import annotations

import sys

from record import set_omp_wait_policy

# Before torch loads libgomp, which reads OMP_WAIT_POLICY once.
IN_PROCESS_OMP = set_omp_wait_policy(sys.argv[1:])

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from record import (
    Recorder,
    add_omp_argument,
    add_record_arguments,
    format_target,
    machine_info,
    paired_ratios,
    schedule,
    span,
    stamped,
    summary,
    target_record,
)
from report import PROMPT, ci_caption, markdown_table, median, same_prefix, with_ci

from edgellm.model.prompt import encode_prompt
from edgellm.model.sampling import SamplingConfig
from edgellm.model.stage import parse_cuts, stage_specs
from edgellm.split.generator import GenerationConfig, Generator
from edgellm.split.one_process import load_stages, local_pipeline
from edgellm.store import DEFAULT_MODEL, resolve_model
from edgellm.store.weights import load_config, load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WORKER = Path(__file__).resolve().parent / "llamacpp_worker.py"
STAGED_TARGET = 0.97  # edgellm-staged / hf-monolithic decode tok/s, same dtype, with and without cuts


@dataclass
class Run:
    """One generation's tokens and timings."""

    tokens: list[int]
    ttft_ms: float
    decode_ms: float
    repeat: int = -1  # -1: the warm-up
    stamp: dict[str, Any] = field(default_factory=dict)

    @property
    def decode_tok_per_s(self) -> float:
        return (len(self.tokens) - 1) / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "ttft_ms": round(self.ttft_ms, 3),
            "decode_ms": round(self.decode_ms, 3),
            "decode_tok_per_s": round(self.decode_tok_per_s, 3),
            "repeat": self.repeat,
            "stamp": self.stamp,
            "tokens": self.tokens,
        }


class Engine(Protocol):
    def run(self, prompt_ids: list[int], new_tokens: int) -> Run: ...


class HFEngine:
    """transformers' whole model with its own KV cache and a hand-written greedy loop."""

    def __init__(self, model_dir: Path, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    def run(self, prompt_ids: list[int], new_tokens: int) -> Run:
        ids = torch.tensor([prompt_ids])  # [1, S]
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model(ids, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1)  # [1]
            first = time.perf_counter()
            tokens = [int(token)]
            cache = out.cache
            for _ in range(new_tokens - 1):
                out = self.model(token.view(1, 1), cache=cache, use_cache=True, logits_to_keep=1)
                cache = out.cache
                token = out.logits[:, -1].argmax(-1)
                tokens.append(int(token))
            end = time.perf_counter()
        return Run(tokens, (first - start) * 1e3, (end - first) * 1e3)


class StagedEngine:
    """edgellm stages chained in this process, driven by the library's Generator (as `edgellm generate`)."""

    def __init__(self, model_dir: Path, cuts: tuple[int, ...], head: str, dtype: torch.dtype) -> None:
        num_layers = int(load_config(model_dir).num_hidden_layers)
        specs = stage_specs(num_layers, cuts, head)  # type: ignore[arg-type]
        self.stages = load_stages(model_dir, specs, dtype)

    def run(self, prompt_ids: list[int], new_tokens: int) -> Run:
        config = GenerationConfig(new_tokens, SamplingConfig(greedy=True), stop_ids=())
        generator = Generator(local_pipeline(self.stages), config)
        with torch.inference_mode():
            result = generator.run(torch.tensor([prompt_ids]))
        return Run(result.new_tokens[0], result.ttft_ms, result.decode_ms)


class EngineCrashed(RuntimeError):
    """An engine's worker process died (e.g. SIGILL from a llama.cpp build this CPU cannot run)."""


class LlamaCppEngine:
    """llama.cpp in a child process (bench/llamacpp_worker.py): eval/sample loop, greedy (temp 0).

    The child keeps llama.cpp's OpenMP runtime away from torch's and turns a crash into `EngineCrashed`. Its
    environment has no OMP_WAIT_POLICY (llama.cpp's default, spinning threads) unless `omp_wait_policy` is given:
    the in-process engines' setting does not leak into it.
    """

    def __init__(
        self, gguf: Path, threads: int, n_ctx: int, extra_bufts: bool, omp_wait_policy: str | None = None
    ) -> None:
        cmd = [sys.executable, str(WORKER), str(gguf), str(threads), str(n_ctx)]
        cmd += [] if extra_bufts else ["--no-extra-bufts"]
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if omp_wait_policy and omp_wait_policy != "unset":
            env["OMP_WAIT_POLICY"] = omp_wait_policy
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = {**self._read(), "omp_wait_policy": env.get("OMP_WAIT_POLICY", "unset")}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise EngineCrashed(
                f"llama.cpp worker exited with code {code}" + (f" ({signal.Signals(-code).name})" if code < 0 else "")
            )
        return json.loads(line)  # type: ignore[no-any-return]

    def run(self, prompt_ids: list[int], new_tokens: int) -> Run:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"prompt_ids": prompt_ids, "tokens": new_tokens}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died; _read says how
        reply = self._read()
        self.info["peak_rss_mb"] = reply.get("peak_rss_mb")  # the worker's, so far
        return Run(reply["tokens"], reply["ttft_ms"], reply["decode_ms"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def start_llamacpp(
    gguf: Path, threads: int, n_ctx: int, mode: str, omp: str | None, notes: list[str]
) -> LlamaCppEngine:
    """Start llama.cpp with its extra buffer types (AMX, repacking) unless `mode` is "off".

    With "auto", fall back to starting without them when a probe generation crashes (the SIGILL of an AMX
    build on a VM that does not enable AMX).
    """
    engine = LlamaCppEngine(gguf, threads, n_ctx, extra_bufts=mode != "off", omp_wait_policy=omp)
    if mode != "auto":
        return engine
    try:
        engine.run([1, 2, 3, 4], 2)  # a probe: the crash comes at the first matrix product, not at load
    except EngineCrashed as exc:
        notes.append(
            f"llama.cpp: {exc} with its extra buffer types (AMX/repacking kernels); measured with "
            "use_extra_bufts=False instead"
        )
        log(notes[-1])
        engine.close()
        engine = LlamaCppEngine(gguf, threads, n_ctx, extra_bufts=False, omp_wait_policy=omp)
    return engine


@dataclass
class Row:
    """One line of the table: an engine configuration and its measurements."""

    name: str
    engine: str  # "transformers" | "edgellm" | "llama.cpp"
    dtype: str
    build: Callable[[], Engine]
    cuts: tuple[int, ...] = ()
    head: str = "-"
    baseline: str | None = None  # the row this one's ratios are taken against
    omp_wait_policy: str = IN_PROCESS_OMP
    load_s: float = 0.0
    warmup: Run | None = None
    runs: list[Run] = field(default_factory=list)
    instance: Engine | None = None

    def ttft_ms(self) -> float:
        return median([r.ttft_ms for r in self.runs])

    def tok_per_s(self) -> float:
        return median([r.decode_tok_per_s for r in self.runs])


def plan_rows(args: argparse.Namespace, model_dir: Path, notes: list[str]) -> tuple[list[Row], list[dict[str, str]]]:
    """The rows to measure, and the ones skipped with the reason."""
    cuts = parse_cuts(args.cuts)
    label = ",".join(map(str, cuts))
    rows: list[Row] = []
    skipped: list[dict[str, str]] = []
    for dtype in ("fp32", *(() if args.no_bf16 else ("bf16",))):
        suffix = "" if dtype == "fp32" else f" {dtype}"
        mono = f"hf-monolithic{suffix}"
        torch_dtype = DTYPES[dtype]
        rows.append(Row(mono, "transformers", dtype, lambda d=torch_dtype: HFEngine(model_dir, d)))
        rows.append(
            Row(
                f"edgellm-staged{suffix}",
                "edgellm",
                dtype,
                lambda d=torch_dtype: StagedEngine(model_dir, (), "server", d),
                baseline=mono,
            )
        )
        if dtype != "fp32" or not cuts:
            continue
        for head in ("server", "device"):
            rows.append(
                Row(
                    f"edgellm-staged cuts {label} head {head}",
                    "edgellm",
                    dtype,
                    lambda h=head: StagedEngine(model_dir, cuts, h, torch.float32),
                    cuts,
                    head,
                    mono,
                )
            )
    gguf = model_dir / "source.gguf"
    if args.no_llamacpp:
        skipped.append({"row": "llama.cpp", "reason": "--no-llamacpp"})
    elif not gguf.is_file():
        skipped.append({"row": "llama.cpp", "reason": f"no source.gguf in {model_dir}"})
    elif importlib.util.find_spec("llama_cpp") is None:
        skipped.append(
            {
                "row": "llama.cpp",
                "reason": "llama_cpp is not importable; install the optional extra "
                "(pip install -e '.[llamacpp]', compiles llama.cpp: several minutes)",
            }
        )
    else:
        llama = Row(
            "llama.cpp",
            "llama.cpp",
            "q4_1",
            baseline="hf-monolithic",
            build=lambda: start_llamacpp(
                gguf, args.threads, args.n_ctx, args.llamacpp_extra_bufts, args.llamacpp_omp_wait_policy, notes
            ),
            omp_wait_policy=args.llamacpp_omp_wait_policy or "unset",
        )
        rows.insert(len([r for r in rows if r.dtype == "fp32"]), llama)
    return rows, skipped


def measure(
    rows: list[Row], prompt_ids: list[int], args: argparse.Namespace, skipped: list[dict[str, str]]
) -> list[Row]:
    """Load every row, warm each up once, then run them in turn `repeats` times (drift hits all rows alike).

    Returns the rows that completed; a row whose engine crashes is moved to `skipped`.
    """
    live = list(rows)

    def attempt(row: Row, step: Callable[[], None]) -> None:
        try:
            step()
        except EngineCrashed as exc:
            log(f"{row.name}: {exc}; dropping the row")
            skipped.append({"row": row.name, "reason": str(exc)})
            live.remove(row)

    def load(row: Row) -> None:
        start = time.perf_counter()
        row.instance = row.build()
        row.load_s = time.perf_counter() - start
        log(f"loaded {row.name} in {row.load_s:.1f} s")

    def warm(row: Row) -> None:
        assert row.instance is not None
        time.sleep(args.pause_s)
        row.warmup = row.instance.run(prompt_ids, args.tokens)
        log(f"warm-up {row.name}: TTFT {row.warmup.ttft_ms:.0f} ms, {row.warmup.decode_tok_per_s:.1f} tok/s")

    def once(row: Row, repeat: int) -> None:
        assert row.instance is not None
        time.sleep(args.pause_s)  # let the previous engine's worker threads stop spinning
        with stamped() as stamp:
            run = row.instance.run(prompt_ids, args.tokens)
        run.repeat, run.stamp = repeat, stamp
        row.runs.append(run)
        log(f"run {repeat + 1}/{args.repeats} {row.name}: TTFT {run.ttft_ms:.0f} ms, {run.decode_tok_per_s:.1f} tok/s")

    for row in list(live):
        attempt(row, lambda row=row: load(row))
    for row in list(live):
        attempt(row, lambda row=row: warm(row))
    order = list(live)
    for repeat, index in schedule(len(order), args.repeats):  # rows take turns, ABBA
        row = order[index]
        if row in live:
            attempt(row, lambda row=row, repeat=repeat: once(row, repeat))
    for row in rows:
        close = getattr(row.instance, "close", None)
        if close is not None:
            close()
    return live


def by_repeat(row: Row, metric: Callable[[Run], float]) -> dict[int, float]:
    return {r.repeat: metric(r) for r in row.runs}


def paired(row: Row, base: Row, metric: Callable[[Run], float]) -> dict[str, Any]:
    """Median and interval of row / base over the repeats both measured (taken next to each other)."""
    a, b = by_repeat(row, metric), by_repeat(base, metric)
    common = sorted(set(a) & set(b))
    return summary(paired_ratios([a[k] for k in common], [b[k] for k in common]))


def summarize(rows: list[Row]) -> list[dict[str, Any]]:
    by_name = {r.name: r for r in rows}
    reference = by_name.get("hf-monolithic")
    out = []
    for row in rows:
        base = by_name.get(row.baseline) if row.baseline else None
        tokens = row.runs[-1].tokens if row.runs else []
        ref_tokens = reference.runs[-1].tokens if reference and reference.runs else []
        decode = paired(row, base, lambda r: r.decode_tok_per_s) if base else None
        ttft = paired(row, base, lambda r: r.ttft_ms) if base else None
        targets = []
        if row.engine == "edgellm" and decode is not None:
            name = f"decode tok/s {row.name} / {row.baseline}"
            targets.append(target_record(name, STAGED_TARGET, decode, higher_is_better=True))
        out.append(
            {
                "name": row.name,
                "engine": row.engine,
                "dtype": row.dtype,
                "cuts": list(row.cuts),
                "head": row.head,
                "omp_wait_policy": row.omp_wait_policy,
                "load_s": round(row.load_s, 3),
                "ttft_ms": summary([r.ttft_ms for r in row.runs]),
                "decode_tok_per_s": summary([r.decode_tok_per_s for r in row.runs]),
                "ttft_ms_median": round(row.ttft_ms(), 3),
                "decode_tok_per_s_median": round(row.tok_per_s(), 3),
                "baseline": row.baseline,
                "decode_ratio_vs_baseline": decode,
                "ttft_ratio_vs_baseline": ttft,
                "targets": targets,
                "same_tokens_as_hf_fp32": same_prefix(tokens, ref_tokens),
                "engine_info": getattr(row.instance, "info", None),
                "stamp": span([r.stamp for r in row.runs]),
                "warmup": None if row.warmup is None else row.warmup.as_json(),
                "runs": [r.as_json() for r in row.runs],
            }
        )
    return out


def table(summary: list[dict[str, Any]], tokens: int) -> str:
    headers = [
        "row",
        "dtype",
        "OMP_WAIT_POLICY",
        "TTFT ms [CI]",
        "decode tok/s [CI]",
        "decode vs baseline [CI]",
        "TTFT vs baseline [CI]",
        f"same tokens as hf fp32 (of {tokens})",
    ]
    rows = [
        [
            s["name"],
            s["dtype"],
            s["omp_wait_policy"],
            with_ci(s["ttft_ms"], 1),
            with_ci(s["decode_tok_per_s"], 2),
            with_ci(s["decode_ratio_vs_baseline"], 3),
            with_ci(s["ttft_ratio_vs_baseline"], 3),
            s["same_tokens_as_hf_fp32"],
        ]
        for s in summary
    ]
    return markdown_table(headers, rows, digits=2)


def log(text: str) -> None:
    print(f"[decode] {text}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="registered name or model directory (default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per run (default: %(default)s)")
    parser.add_argument("--cuts", default="10,20", help="cuts of the split rows (default: %(default)s)")
    parser.add_argument("--prompt", default=PROMPT, help="user turn, wrapped in the chat template")
    parser.add_argument("--n-ctx", type=int, default=512, help="llama.cpp context (default: %(default)s)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp row")
    parser.add_argument(
        "--llamacpp-extra-bufts",
        choices=("auto", "on", "off"),
        default="auto",
        help="llama.cpp's extra buffer types (AMX, weight repacking): on, off, or on unless a probe "
        "generation crashes (default: %(default)s)",
    )
    parser.add_argument(
        "--llamacpp-omp-wait-policy",
        choices=("PASSIVE", "ACTIVE"),
        default=None,
        help="OMP_WAIT_POLICY of the llama.cpp worker (default: none: the variable is removed from the worker's "
        "environment, whatever this process has, so llama.cpp runs with its own default, spinning threads)",
    )
    add_omp_argument(parser, "this process: the transformers and edgellm rows")
    parser.add_argument("--pause-s", type=float, default=0.2, help="idle pause before each run (default: %(default)s)")
    add_record_arguments(parser)
    args = parser.parse_args(argv)
    if args.tokens < 2:
        parser.error("--tokens must be >= 2 (one prefill token plus at least one decode step)")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorder = Recorder("decode", args.json, args.allow_dirty)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = encode_prompt(tokenizer, args.prompt, chat=True)
    if len(prompt_ids) + args.tokens > args.n_ctx:
        raise SystemExit(f"prompt ({len(prompt_ids)}) + --tokens ({args.tokens}) exceed --n-ctx {args.n_ctx}")
    notes: list[str] = []
    rows, skipped = plan_rows(args, model_dir, notes)
    log(
        f"{args.model}: prompt {len(prompt_ids)} tokens, {args.tokens} new tokens, {args.threads} threads, "
        f"{len(rows)} rows x (1 warm-up + {args.repeats})"
    )
    rows = measure(rows, prompt_ids, args, skipped)
    summary = summarize(rows)
    print(
        f"\n## decode: {args.model}, {args.threads} threads, prompt {len(prompt_ids)} tokens, "
        f"{args.tokens} new tokens, greedy, {ci_caption(args.repeats)}\n"
    )
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; {recorder.header()}\n")
    print(table(summary, args.tokens))
    for row in summary:
        for target in row["targets"]:
            print(f"\n{format_target(target)}")
    for s in skipped:
        print(f"\nskipped {s['row']}: {s['reason']}")
    for note in notes:
        print(f"\nnote: {note}")
    reference = next((r for r in rows if r.name == "hf-monolithic"), None)
    text = tokenizer.decode(reference.runs[-1].tokens) if reference and reference.runs else ""
    recorder.write(
        {
            "settings": {
                "model": args.model,
                "model_dir": str(model_dir),
                "threads": args.threads,
                "tokens": args.tokens,
                "repeats": args.repeats,
                "warmup_runs": 1,
                "cuts": args.cuts,
                "n_ctx": args.n_ctx,
                "pause_s": args.pause_s,
                "greedy": True,
                "stop_at_eos": False,
                "llamacpp_extra_bufts": args.llamacpp_extra_bufts,
                "omp_wait_policy_in_process": IN_PROCESS_OMP,
                "omp_wait_policy_llamacpp": args.llamacpp_omp_wait_policy or "unset",
            },
            "prompt": args.prompt,
            "prompt_tokens": prompt_ids,
            "reference_text": text,
            "rows": summary,
            "skipped": skipped,
            "notes": notes,
        },
        machine=info,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
