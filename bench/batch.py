"""Batched decode on the slot cache: 8 sessions in one forward pass per step, against one session alone.

Per scheme (`--schemes`: fp32 `none`, `int8`, `int4-g32,head=int8,embed=int8`), the whole model as one stage in
this process (`--engine`, default fast) on `--threads` threads, with one `edgellm.engine.slots.SlotCache` of
`--batch` slots, two rows:

- `batch 1 SCHEME`: session 0 alone: its prompt prefilled into slot 0, then `--tokens` decode steps, each a
  forward pass of one row.
- `batch 8 SCHEME`: sessions 0..7 (8 different chat prompts of different lengths, so the rows sit at different
  positions) prefilled one by one into slots 0..7, then `--tokens` decode steps, each one forward pass of all 8
  rows at their own positions; greedy (argmax) per row.

Throughput: rows x steps / the time of the decode steps (the prefill is not in it; its time is recorded). Every
row runs once as warm-up, then the rows take turns (ABBA), `--repeats` times; medians with the order-statistic
interval of bench/record.py; batch 8 / batch 1 is the median of the per-repeat ratios, taken side by side.

Target (issue 12): batch-8 throughput >= 4x batch 1, at each scheme.

Check: each session of the batch run against the same session decoded alone (batch 1 in slot 0; untimed, once
per scheme): the leading tokens they share, of `--tokens` + 1 (the prefill's token, then one per step). A batched
matrix product may round differently from one row's, so a greedy path may part at a near-tie; the count says where.

Memory: what each scheme's stage and slot cache added to this process's RSS (freed memory handed back first), and
this process's peak RSS (VmHWM; every scheme loaded at once).
"""

# ruff: noqa: E402  (the imports follow the OMP_WAIT_POLICY setting on purpose)

from __future__ import annotations

import sys

from record import set_omp_wait_policy

IN_PROCESS_OMP = set_omp_wait_policy(sys.argv[1:])

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bandwidth import peak_rss_mb
from engine_rows import load_scheme, scheme_setup
from record import (
    Recorder,
    add_omp_argument,
    add_record_arguments,
    format_target,
    machine_info,
    paired_ratios,
    schedule,
    stamped,
    summary,
    target_record,
)
from report import PROMPTS, ci_caption, markdown_table, same_prefix, with_ci

from edgellm.engine.slots import SlotCache
from edgellm.errors import ConfigError
from edgellm.model.prompt import encode_prompt
from edgellm.split.budget import release_freed_memory, rss_bytes, to_mb
from edgellm.store import DEFAULT_MODEL, resolve_model
from edgellm.store.weights import load_config, load_tokenizer

SCHEMES = ("none", "int8", "int4-g32,head=int8,embed=int8")
BATCH_TARGET = 4.0  # batch-8 decode tok/s / batch-1 decode tok/s
# Session b asks PROMPTS[b % 8] (bench/report.py).


@dataclass
class BatchRun:
    """One run: each session's tokens (the prefill's, then one per step) and the timings."""

    tokens: list[list[int]]  # [B][steps + 1]
    prefill_ms: float
    decode_ms: float
    repeat: int = -1  # -1: the warm-up
    stamp: dict[str, Any] = field(default_factory=dict)

    @property
    def tok_per_s(self) -> float:
        return len(self.tokens) * (len(self.tokens[0]) - 1) / (self.decode_ms / 1e3)

    def as_json(self) -> dict[str, Any]:
        return {"tok_per_s": round(self.tok_per_s, 3), "decode_ms": round(self.decode_ms, 3),
                "prefill_ms": round(self.prefill_ms, 3), "repeat": self.repeat, "stamp": self.stamp}  # fmt: skip


class SlotEngine:
    """One scheme's stage with a slot cache; `info` carries what the two added to this process's RSS."""

    def __init__(self, model_dir: Path, scheme: str, engine: str, slots: int, capacity: int) -> None:
        release_freed_memory()
        before = rss_bytes()
        self.stage, self.info = load_scheme(model_dir, scheme, engine)
        self.cache = SlotCache.for_stage(self.stage, load_config(model_dir), slots, capacity)
        release_freed_memory()
        self.info.update(rss_added_mb=to_mb(rss_bytes() - before), slot_cache_mb=to_mb(self.cache.nbytes()))

    def run(self, prompts: list[list[int]], steps: int) -> BatchRun:
        """Prefill `prompts[b]` into slot b, one by one; then `steps` greedy decode steps of every row at once."""
        slots = list(range(len(prompts)))
        with torch.inference_mode():
            for slot in slots:
                self.cache.reset(slot)
            start = time.perf_counter()
            first = []
            for slot, ids in zip(slots, prompts):
                rows = self.cache.rows([slot])
                logits = self.stage(torch.tensor([ids]), rows.positions(len(ids)), rows, last_only=True)  # [1, 1, V]
                first.append(logits[:, -1].argmax(-1))  # [1]
            token = torch.stack(first)  # [B, 1]
            prefilled = time.perf_counter()
            out = [token]
            rows = self.cache.rows(slots)
            for _ in range(steps):
                logits = self.stage(token, rows.positions(1), rows)  # [B, 1] -> [B, 1, V]
                token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
                out.append(token)
            end = time.perf_counter()
        return BatchRun(torch.cat(out, dim=1).tolist(), (prefilled - start) * 1e3, (end - prefilled) * 1e3)


@dataclass
class Row:
    scheme: str
    batch: int
    runs: list[BatchRun] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"batch {self.batch} {self.scheme}"


def measure(args: argparse.Namespace, engines: dict[str, SlotEngine], prompts: list[list[int]]) -> list[Row]:
    """Warm every row up once, then run the rows in turn (ABBA), `--repeats` times each."""
    rows = [Row(scheme, batch) for scheme in engines for batch in (1, args.batch)]
    for row in rows:
        engines[row.scheme].run(prompts[: row.batch], args.tokens)
    for repeat, index in schedule(len(rows), args.repeats):
        row = rows[index]
        time.sleep(args.pause_s)
        with stamped() as stamp:
            run = engines[row.scheme].run(prompts[: row.batch], args.tokens)
        run.repeat, run.stamp = repeat, stamp
        row.runs.append(run)
        log(f"run {repeat + 1}/{args.repeats} {row.name}: {run.tok_per_s:.1f} tok/s, prefill {run.prefill_ms:.0f} ms")
    return rows


def alone(engine: SlotEngine, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Each session's tokens decoded by itself (batch 1, slot 0): the reference of the batch runs."""
    return [engine.run([ids], steps).tokens[0] for ids in prompts]


def summarize(rows: list[Row], reference: dict[str, list[list[int]]], steps: int) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        one = next(r for r in rows if r.scheme == row.scheme and r.batch == 1)
        ratio = None
        if row is not one:
            a, b = {r.repeat: r.tok_per_s for r in row.runs}, {r.repeat: r.tok_per_s for r in one.runs}
            ratio = summary(paired_ratios([a[k] for k in sorted(a)], [b[k] for k in sorted(a)]))
        same = [same_prefix(t, ref) for t, ref in zip(row.runs[-1].tokens, reference[row.scheme])]
        name = f"decode tok/s {row.name} / batch 1 {row.scheme}"
        out.append(
            {
                "name": row.name, "scheme": row.scheme, "batch": row.batch,
                "tok_per_s": summary([r.tok_per_s for r in row.runs]),
                "ms_per_step": summary([r.decode_ms / steps for r in row.runs]),
                "prefill_ms": summary([r.prefill_ms for r in row.runs]), "vs_batch_1": ratio,
                "targets": [] if ratio is None else [target_record(name, BATCH_TARGET, ratio, higher_is_better=True)],
                "same_tokens_as_alone": same, "all_same_as_alone": all(n == steps + 1 for n in same),
                "tokens_last_run": row.runs[-1].tokens, "runs": [r.as_json() for r in row.runs],
            }
        )  # fmt: skip
    return out


def table(rows: list[dict[str, Any]], engines: dict[str, SlotEngine], steps: int) -> str:
    headers = ["row", "tok/s [CI]", "ms/step [CI]", "prefill ms", "vs batch 1 [CI]", f">= {BATCH_TARGET}",
               f"same tokens as alone (min of sessions, of {steps + 1})", "RSS added MB"]  # fmt: skip
    body = [
        [r["name"], with_ci(r["tok_per_s"], 1), with_ci(r["ms_per_step"], 1), r["prefill_ms"]["median"],
         with_ci(r["vs_batch_1"], 2), r["targets"][0]["verdict"] if r["targets"] else None,
         min(r["same_tokens_as_alone"]), engines[r["scheme"]].info["rss_added_mb"]]
        for r in rows
    ]  # fmt: skip
    return markdown_table(headers, body)


def log(text: str) -> None:
    print(f"[batch] {text}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered name or directory (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per run (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="sessions of the batched row (default: %(default)s)")
    parser.add_argument("--schemes", default=";".join(SCHEMES), help="weight schemes, ';'-separated (default: %(default)s)")  # fmt: skip
    parser.add_argument("--engine", choices=("fast", "generic"), default="fast", help="block engine (default: %(default)s)")  # fmt: skip
    parser.add_argument("--pause-s", type=float, default=0.2, help="idle pause before each run (default: %(default)s)")
    add_omp_argument(parser, "this process")
    add_record_arguments(parser)
    args = parser.parse_args(argv)
    args.schemes = [s.strip() for s in args.schemes.split(";") if s.strip()]
    try:
        for scheme in args.schemes:
            scheme_setup(scheme)
    except ConfigError as exc:
        parser.error(str(exc))
    if min(args.tokens, args.batch, args.repeats, args.threads) < 1 or args.batch < 2:
        parser.error("--tokens, --repeats and --threads must be >= 1, --batch >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorder = Recorder("batch", args.json, args.allow_dirty)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    prompts = [encode_prompt(tokenizer, PROMPTS[b % len(PROMPTS)], chat=True) for b in range(args.batch)]
    capacity = max(len(p) for p in prompts) + args.tokens + 1
    baseline_mb = to_mb(rss_bytes())
    engines = {s: SlotEngine(model_dir, s, args.engine, args.batch, capacity) for s in args.schemes}
    reference = {}
    for scheme, engine in engines.items():
        log(f"{scheme}: {engine.info}; decoding each of {args.batch} sessions alone (the reference)")
        reference[scheme] = alone(engine, prompts, args.tokens)
    rows = summarize(measure(args, engines, prompts), reference, args.tokens)
    memory = {"this_process_rss_before_loads_mb": baseline_mb, "this_process_peak_rss_mb": peak_rss_mb(),
              "per_scheme": {s: e.info for s, e in engines.items()}}  # fmt: skip
    print(f"\n## batch: {args.model}, {args.engine} engine, {args.threads} threads, {args.batch} sessions (prompts "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens) vs 1, {args.tokens} decode steps, greedy, "
          f"{ci_caption(args.repeats)}\n")  # fmt: skip
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; {recorder.header()}\n")
    print(table(rows, engines, args.tokens))
    for row in rows:
        for target in row["targets"]:
            print(f"\n{format_target(target)}")
    print(f"\npeak RSS MB: this process {memory['this_process_peak_rss_mb']} (every scheme loaded; {baseline_mb} "
          "before any)")  # fmt: skip
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "allow_dirty")}
    recorder.write({"settings": {**settings, "capacity": capacity, "omp_wait_policy_in_process": IN_PROCESS_OMP},
                    "prompts": list(PROMPTS), "prompt_tokens": prompts, "reference_tokens": reference, "rows": rows,
                    "memory": memory}, machine=info)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
