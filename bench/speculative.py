"""Speculative decoding through a split deployment: tokens per round trip and decode speed against plain decoding.

For each link profile in `--profiles`, one deployment as `edgellm demo --plan manual` builds it (a device and two
edge nodes in a chain, one `edgellm node` process each on loopback over gRPC, cuts at L/3 and 2L/3, head on the
device, every link on the profile with codec `--codec`), the device optionally emulated slower
(`--device-scale`: its `compute_scale`, which its drafter pays too). On that deployment the setups take turns
(ABBA) on every chat prompt of `PROMPTS`, `--repeats` times: plain decoding, then for each drafter of `--drafts`
speculative decoding with `k = auto` and with `k` fixed at `--fixed-k`. Greedy decoding: every speculative run's
tokens are checked against plain decoding's for the same prompt (`same_tokens`).

Per setup: decode ms per token (the device's report: decode time over tokens after the first), tokens per round
trip and acceptance rate (the report's `speculative` account), with medians and order-statistic intervals
(bench/record.py); the speed-up is the median of the per-run ratios plain ms / speculative ms, each pair measured
next to each other on the same prompt.

Targets (issue 14): >= 2 tokens per round trip on chat prompts; >= 1.5x faster decode over `lte` and `wan`;
`auto` never slower than plain decoding on any profile (its speed-up interval's upper end >= 1, and the median
>= 1: a median below 1 is reported as a miss).
"""

# ruff: noqa: E402  (the imports follow the OMP_WAIT_POLICY setting on purpose)

from __future__ import annotations

import sys

from record import set_omp_wait_policy

IN_PROCESS_OMP = set_omp_wait_policy(sys.argv[1:])

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from network import Bench, log
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

from edgellm.deploy.demo_scenarios import split_document
from edgellm.net.link import PROFILES
from edgellm.store import DEFAULT_MODEL

PROMPTS = (
    "Explain in two sentences why running a language model at the network edge reduces latency.",
    "What is the capital of France, and what is it famous for?",
    "Write a short poem about the sea.",
    "Give three tips for staying productive when working from home.",
    "How does a refrigerator keep food cold?",
)
LINK_PROFILES = ("6g", "5g", "wifi6", "lte", "wan")
TOKENS_PER_ROUND_TARGET = 2.0
SPEEDUP_TARGET = 1.5  # over lte and wan
SLOW_PROFILES = ("lte", "wan")


class SpecBench(Bench):
    """`bench/network.py`'s deployments, with the device's emulated compute scale; `current` says which prompt
    and speculative fields the next generation sends."""

    current: tuple[str, dict[str, str]] = (PROMPTS[0], {})

    def split_with_device_scale(self, profile: str) -> dict[str, Any]:
        document = split_document(self.demo_config(profile, self.args.codec), self.num_layers, self.token_file)
        if self.args.device_scale != 1.0:
            document["nodes"][0]["compute_scale"] = self.args.device_scale
        return document

    def request(self, max_new_tokens: int) -> dict[str, Any]:
        prompt, fields = self.current
        return {"prompt": prompt, "chat": True, "max_new_tokens": max_new_tokens, "greedy": True, **fields}


def setups(args: argparse.Namespace) -> list[tuple[str, dict[str, str]]]:
    out: list[tuple[str, dict[str, str]]] = [("plain", {})]
    for draft in args.drafts.split(","):
        out.append((f"{draft} auto", {"speculative": "auto", "draft": draft}))
        if args.fixed_k:
            out.append((f"{draft} k={args.fixed_k}", {"speculative": str(args.fixed_k), "draft": draft}))
    return out


def one_run(report: dict[str, Any], stamp: dict[str, Any], repeat: int, prompt: int) -> dict[str, Any]:
    spec = report.get("speculative") or {}
    return {
        "repeat": repeat,
        "prompt": prompt,
        "stamp": stamp,
        "tokens": len(report["new_tokens"]),
        "new_tokens": report["new_tokens"],
        "ttft_ms": report["ttft_ms"],
        "decode_ms_per_token": report["decode_ms_per_token"],
        "decode_tok_per_s": report["decode_tok_per_s"],
        "tokens_per_round": spec.get("tokens_per_round"),
        "acceptance_rate": spec.get("acceptance_rate"),
        "k_counts": spec.get("k_counts"),
        "draft_ms": spec.get("draft_ms"),
        "verify_ms_per_round": spec.get("verify_ms_per_round"),
        "drafter": {key: spec[key] for key in ("drafter", "draft_weight_mb", "draft_compute_scale") if key in spec},
        "links": [{key: link[key] for key in ("from", "to", "calls", "bytes", "wire_ms")} for link in report["links"]],
    }


def run_profile(bench: SpecBench, profile: str) -> dict[str, list[dict[str, Any]]]:
    """Every setup on every prompt on one deployment, taking turns (ABBA per prompt); -> runs by setup."""
    args = bench.args
    rows = setups(args)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in rows}
    with bench.deployed(f"split-{profile}", bench.split_with_device_scale(profile)) as generate:
        for _, fields in rows:  # warm-up: loads each drafter, fills the caches
            bench.current = (PROMPTS[0], fields)
            generate(4)
        for p, prompt in enumerate(PROMPTS[: args.prompts]):
            for repeat, index in schedule(len(rows), args.repeats):
                label, fields = rows[index]
                bench.current = (prompt, fields)
                with stamped() as stamp:
                    report = generate(args.tokens)
                run = one_run(report, stamp, repeat, p)
                runs[label].append(run)
                log(f"{profile} prompt {p} run {repeat + 1}/{args.repeats} {label}: "
                    f"{run['decode_ms_per_token']:.1f} ms/token, {run['tokens_per_round'] or 1:.2f} tokens/round, "
                    f"{run['tokens']} tokens")  # fmt: skip
    plain = {(r["prompt"], r["repeat"]): r for r in runs["plain"]}
    for rs in runs.values():
        for r in rs:
            r["same_tokens"] = r["new_tokens"] == plain[(r["prompt"], r["repeat"])]["new_tokens"]
    return runs


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    plain = {(r["prompt"], r["repeat"]): r["decode_ms_per_token"] for r in runs["plain"]}
    out = {}
    for label, rs in runs.items():
        rounds = [r["tokens_per_round"] for r in rs if r["tokens_per_round"] is not None]
        accept = [r["acceptance_rate"] for r in rs if r["acceptance_rate"] is not None]
        pairs = [(plain[(r["prompt"], r["repeat"])], r["decode_ms_per_token"]) for r in rs]
        out[label] = {
            "decode_ms_per_token": summary([r["decode_ms_per_token"] for r in rs]),
            "tokens_per_round": summary(rounds) if rounds else None,
            "acceptance_rate": summary(accept) if accept else None,
            "speedup": summary(paired_ratios([a for a, _ in pairs], [b for _, b in pairs])),
            "same_tokens": all(r["same_tokens"] for r in rs),
            "tokens": sum(r["tokens"] for r in rs),
            "runs": rs,
        }
    return out


def targets(results: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for profile, rows in results["profiles"].items():
        for label, row in rows.items():
            if label == "plain":
                continue
            if row["tokens_per_round"] is not None:
                out.append(target_record(f"{profile} {label}: tokens per round trip", TOKENS_PER_ROUND_TARGET,
                                         row["tokens_per_round"], True))  # fmt: skip
            if profile in SLOW_PROFILES:
                out.append(target_record(f"{profile} {label}: decode speed-up", SPEEDUP_TARGET, row["speedup"], True))
            if label.endswith("auto"):
                out.append(target_record(f"{profile} {label}: never slower (speed-up)", 1.0, row["speedup"], True))
    return out


def print_tables(results: dict[str, Any]) -> None:
    print(f"device compute_scale {results['settings']['device_scale']} (emulated); links as named (emulated)")
    print(f"{'profile':<7} {'setup':<18} {'ms/token':>18} {'tok/round':>16} {'accept':>8} {'speed-up':>18} same")
    for profile, rows in results["profiles"].items():
        for label, row in rows.items():
            ms = row["decode_ms_per_token"]
            tpr = row["tokens_per_round"]
            acc = row["acceptance_rate"]
            up = row["speedup"]
            print(f"{profile:<7} {label:<18} {_ci(ms, 1):>18} {_ci(tpr, 2):>16} "
                  f"{'-' if acc is None else format(acc['median'], '.0%'):>8} {_ci(up, 2):>18} "
                  f"{'yes' if row['same_tokens'] else 'NO'}")  # fmt: skip
    for t in results["targets"]:
        print(format_target(t))


def _ci(stats: dict[str, Any] | None, digits: int) -> str:
    if stats is None:
        return "-"
    return f"{stats['median']:.{digits}f} [{stats['ci_low']:.{digits}f}, {stats['ci_high']:.{digits}f}]"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--profiles", default=",".join(LINK_PROFILES), help="link profiles, comma-separated")
    parser.add_argument("--drafts", default="int4-g32", help="drafters (--draft values), comma-separated")
    parser.add_argument("--fixed-k", type=int, default=4, help="the fixed-k setup's drafts per round (0: none)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"chat prompts used (1..{len(PROMPTS)})")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per generation (default: 48)")
    parser.add_argument("--codec", default="fp16", help="smashed-data codec of every link (default: fp16)")
    parser.add_argument("--device-scale", type=float, default=1.0,
                        help="the device's emulated compute_scale (default 1: this machine's speed; the phone "
                        "preset's is 4)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads per node (default: 2)")
    parser.add_argument("--node-omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY of the node processes")
    parser.add_argument("--prompt", default=PROMPTS[0], help=argparse.SUPPRESS)
    add_omp_argument(parser, "this process")
    add_record_arguments(parser, repeats=2, rows="setup and prompt, taking turns across setups")
    args = parser.parse_args(argv)
    for name in args.profiles.split(","):
        if name not in PROFILES:
            parser.error(f"unknown link profile {name!r}; choose from {sorted(PROFILES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorder = Recorder("speculative", args.json, args.allow_dirty)
    settings = {key: getattr(args, key) for key in ("model", "profiles", "drafts", "fixed_k", "prompts", "tokens",
                                                    "codec", "device_scale", "threads", "repeats")}  # fmt: skip
    results: dict[str, Any] = {"settings": settings, "prompts": list(PROMPTS[: args.prompts]), "profiles": {}}
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-spec-") as work:
        bench = SpecBench(args, Path(work))
        for profile in args.profiles.split(","):
            results["profiles"][profile] = summarize(run_profile(bench, profile))
            results["link_emulation"] = {name: vars(PROFILES[name]) for name in args.profiles.split(",")}
        bench.wait_stopped()
    results["targets"] = targets(results, args)
    print_tables(results)
    recorder.write(results, machine_info(args.threads))
    if args.json:
        print(json.dumps({"written": args.json}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
