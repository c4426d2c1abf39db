"""`edgellm serve` under concurrent load over its OpenAI API: continuous batching and many adapters on one base.

The server (`edgellm serve --port 0 --threads T [--quant Q] --adapters DIR`, the whole model in one process on
loopback) runs as a child process; clients are threads of this process streaming greedy chat completions of
`--tokens` tokens each (bench/serve_load.py). Rows:

- `concurrency C` (C in `--concurrency`, default 1, 4, 16, 32): C clients, 2C requests (at least 4), base model.
- `adapters MIX` at `--adapter-clients` clients (default 16), `--adapter-requests` requests (default 64):
  `base` (no adapter), `one` (every request on the same adapter), `mixed N` (N in 4, 16, 64: request i asks for
  adapter i mod N). Adapters: `--adapters-made` random rank-`--rank` LoRA adapters on q_proj and v_proj of every
  layer (non-zero, so each changes the answer), all loaded before the clock starts.
- `merge-and-swap` (in this process, after the server stopped): the baseline a server without mixed-adapter
  batches has. With 16 distinct adapters among 16 waiting requests no two share an adapter, so it serves them one
  at a time: merge the request's adapter into the base weights, generate, restore the weights. It runs the same
  engine without HTTP (which favours it), on the first 16 requests of `mixed 16`, on the thread that loaded the
  model (the fastest here). `--merge-only` runs it alone.

Every row is warmed up once, then the rows take turns, `--repeats` times. Throughput: completion tokens / wall
time of the row's requests. TTFT and TPOT per request (see serve_load.py); p50 and p99 over the row's requests of
every repeat. Ratios are medians of per-repeat ratios.

Targets (issue 13): 16 clients >= 4x one client's throughput; `mixed 16` >= 0.8x `one` and >= 4x merge-and-swap;
memory per extra adapter = its own size (server RSS after loading 1, 4, 16, 64 adapters, against the adapters'
bytes; met within 1.25x).

Emulation: none. One machine's cores serve every client; nothing here is a network or a slower device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from record import Recorder, add_record_arguments, format_target, machine_info, schedule, summary, target_record
from report import PROMPTS, markdown_table, with_ci
from serve_load import LoadRun, RequestRecord, Server, make_adapters, run_load, stream_chat

from edgellm.store import DEFAULT_MODEL, resolve_model
from edgellm.store.weights import load_config

TARGETS = {"concurrency": 4.0, "mixed_vs_one": 0.8, "mixed_vs_merge": 4.0, "memory_per_adapter": 1.25}


def log(text: str) -> None:
    print(f"[serve] {text}", file=sys.stderr, flush=True)


def rows_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = [{"name": f"concurrency {c}", "clients": c, "requests": max(4, 2 * c), "mix": None}
            for c in args.concurrency]  # fmt: skip
    for mix in ["base", "one", *(f"mixed {n}" for n in args.mixes)]:
        rows.append({"name": f"adapters {mix}", "clients": args.adapter_clients, "requests": args.adapter_requests,
                     "mix": mix})  # fmt: skip
    return rows


def model_of(row: dict[str, Any], index: int, base: str, names: list[str]) -> str:
    mix = row["mix"]
    if mix in (None, "base"):
        return base
    if mix == "one":
        return names[0]
    return names[index % int(mix.split()[1])]


def measure_server(args: argparse.Namespace, server: Server, names: list[str]) -> list[dict[str, Any]]:
    rows = rows_of(args)

    def once(row: dict[str, Any]) -> LoadRun:
        def send(i: int) -> Any:
            return stream_chat(server.url, model_of(row, i, server.model, names), PROMPTS[i % 8], args.tokens)

        return run_load(send, row["clients"], row["requests"])

    for row in rows:
        once({**row, "requests": row["clients"]})  # warm-up: every client once
        row["runs"] = []
    for repeat, index in schedule(len(rows), args.repeats):
        row = rows[index]
        run = once(row)
        row["runs"].append({"repeat": repeat, "tok_per_s": run.tok_per_s, "wall_s": run.wall_s,
                            "records": [vars(r) for r in run.records]})  # fmt: skip
        log(f"run {repeat + 1}/{args.repeats} {row['name']}: {run.tok_per_s:.1f} tok/s")
    return rows


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    ordered = sorted(values)
    return {"p50": round(statistics.median(ordered), 2), "p99": round(ordered[min(len(ordered) - 1,
            int(0.99 * len(ordered)))], 2)}  # fmt: skip


def merge_and_swap(args: argparse.Namespace, adapters: Path, names: list[str]) -> dict[str, Any]:
    """The per-request merge baseline, in this process (see the module docstring)."""
    import torch
    from safetensors.torch import load_file

    from edgellm.serve.local_device import local_device_engine

    engine = local_device_engine(args.model, quant=args.quant, threads=args.threads)
    stage = engine.hops[0].handler.stage  # type: ignore[attr-defined]
    modules = dict(stage.named_modules())
    deltas = {}
    for name in names[:16]:
        tensors = load_file(str(adapters / name / "adapter_model.safetensors"))
        pairs: dict[str, torch.Tensor] = {}
        for key, a in tensors.items():
            if ".lora_A." in key:
                module = key.split("model.layers.", 1)[1].split(".lora_A.")[0]
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                pairs[f"blocks.{module}"] = (b @ a) * 2.0  # alpha / r = 2
        deltas[name] = pairs

    def send(i: int) -> Any:
        name = names[i % 16]
        with torch.no_grad():
            saved = {m: modules[m].weight.detach().clone() for m in deltas[name]}
            for m, delta in deltas[name].items():
                modules[m].weight.add_(delta.to(modules[m].weight.dtype))
            try:
                events = list(engine.generate({"messages": [{"role": "user", "content": PROMPTS[i % 8]}],
                                               "max_new_tokens": args.tokens}))  # fmt: skip
            finally:
                for m, weight in saved.items():
                    modules[m].weight.copy_(weight)
        report = events[-1]["report"]
        return RequestRecord(name, report["ttft_ms"], None, len(report["new_tokens"]), report["text"])

    send(0)  # warm-up
    runs = []
    for repeat in range(args.repeats):
        # On this thread, which loaded the model: torch runs ~35% slower on any other (split/compute_thread.py).
        start = time.perf_counter()
        records = [send(i) for i in range(16)]
        run = LoadRun(records, time.perf_counter() - start)
        runs.append({"repeat": repeat, "tok_per_s": run.tok_per_s, "wall_s": run.wall_s,
                     "texts": [r.text for r in run.records]})  # fmt: skip
        log(f"run {repeat + 1}/{args.repeats} merge-and-swap: {run.tok_per_s:.1f} tok/s")
    return {"name": "merge-and-swap 16", "runs": runs, "tok_per_s": summary([r["tok_per_s"] for r in runs])}


def memory_rows(server: Server, names: list[str]) -> list[dict[str, Any]]:
    """Server RSS as adapters are loaded one after another, against the bytes the server says they hold."""
    out, before = [], server.rss_mb()
    for count, name in enumerate(names, 1):
        server.call("POST", "/admin/adapters", {"name": name})
        if count in (1, 4, 16, 64) or count == len(names):
            listing = server.call("GET", "/admin/adapters")
            held = sum(a.get("bytes", 0) for a in listing["data"] if a.get("loaded"))
            rss = server.rss_mb()
            out.append({"adapters": count, "rss_mb": round(rss, 1), "rss_added_mb": round(rss - before, 1),
                        "adapter_mb": round(held / 1e6, 2),
                        "rss_per_adapter_vs_size": round((rss - before) / (held / 1e6), 3) if held else None})  # fmt: skip
    return out


def ratio(rows: dict[str, dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    x = {r["repeat"]: r["tok_per_s"] for r in rows[a]["runs"]}
    y = {r["repeat"]: r["tok_per_s"] for r in rows[b]["runs"]}
    return summary([x[k] / y[k] for k in sorted(x) if k in y])


def report(rows: list[dict[str, Any]], merge: dict[str, Any], memory: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["name"]: r for r in rows}
    table = []
    for row in rows:
        records = [rec for run in row["runs"] for rec in run["records"]]
        row["tok_per_s"] = summary([r["tok_per_s"] for r in row["runs"]])
        row["ttft_ms"] = percentiles([r["ttft_ms"] for r in records])
        row["tpot_ms"] = percentiles([r["tpot_ms"] for r in records if r["tpot_ms"] is not None])
        table.append([row["name"], row["clients"], row["requests"], with_ci(row["tok_per_s"], 1),
                      row["ttft_ms"]["p50"], row["ttft_ms"]["p99"], row["tpot_ms"]["p50"], row["tpot_ms"]["p99"]])  # fmt: skip
    table.append([merge["name"], 1, 16, with_ci(merge["tok_per_s"], 1), None, None, None, None])
    first = by.get("concurrency 1")
    targets = []
    if first and "concurrency 16" in by:
        targets.append(target_record("throughput 16 clients / 1 client", TARGETS["concurrency"],
                                     ratio(by, "concurrency 16", "concurrency 1"), higher_is_better=True))  # fmt: skip
    if "adapters mixed 16" in by:
        targets.append(target_record("throughput mixed 16 adapters / one adapter", TARGETS["mixed_vs_one"],
                                     ratio(by, "adapters mixed 16", "adapters one"), higher_is_better=True))  # fmt: skip
        merged = {r["repeat"]: r["tok_per_s"] for r in merge["runs"]}
        mixed = {r["repeat"]: r["tok_per_s"] for r in by["adapters mixed 16"]["runs"]}
        targets.append(target_record("throughput mixed 16 adapters / merge-and-swap", TARGETS["mixed_vs_merge"],
                                     summary([mixed[k] / merged[k] for k in sorted(merged) if k in mixed]),
                                     higher_is_better=True))  # fmt: skip
    last = memory[-1]
    if last["rss_per_adapter_vs_size"] is not None:
        value, bound = last["rss_per_adapter_vs_size"], TARGETS["memory_per_adapter"]
        targets.append({"target": f"server RSS added by {last['adapters']} adapters / their bytes", "threshold": bound,
                        "higher_is_better": False, "median": value, "ci_low": value, "ci_high": value,
                        "ci_level": 1.0, "verdict": "met" if value <= bound else "missed"})  # fmt: skip
    headers = ["row", "clients", "requests", "tok/s [CI]", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms"]
    return {"table": markdown_table(headers, table), "targets": targets}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered name or directory (default: %(default)s)")
    parser.add_argument("--quant", default="none", help="the server's weight scheme (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of each request (default: %(default)s)")
    parser.add_argument("--concurrency", default="1,4,16,32", help="client counts (default: %(default)s)")
    parser.add_argument("--mixes", default="4,16,64", help="distinct adapters of the mixed rows (default: %(default)s)")
    parser.add_argument("--adapter-clients", type=int, default=16, help="clients of the adapter rows (default: 16)")
    parser.add_argument("--adapter-requests", type=int, default=64, help="requests per adapter row (default: 64)")
    parser.add_argument("--adapters-made", type=int, default=64, help="random adapters made (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=8, help="their LoRA rank (default: %(default)s)")
    parser.add_argument("--merge-only", action="store_true", help="run the merge-and-swap baseline alone")
    add_record_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.mixes = [int(n) for n in args.mixes.split(",")]
    if max(args.mixes) > args.adapters_made or args.adapters_made < 16:
        parser.error("--adapters-made must cover the largest mix and the 16 adapters of merge-and-swap")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorder = Recorder("serve", args.json, args.allow_dirty)
    info = machine_info(args.threads)
    config = load_config(resolve_model(args.model))
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-adapters-") as tmp:
        adapters = Path(tmp)
        names = make_adapters(adapters, args.adapters_made, config, args.rank, ("q_proj", "v_proj"), seed=13)
        if args.merge_only:
            merge = merge_and_swap(args, adapters, names)
            print(f"merge-and-swap: {merge['tok_per_s']}")
            recorder.write({"settings": {k: v for k, v in vars(args).items() if k not in ("json", "allow_dirty")},
                            "merge_and_swap": merge, "emulation": "none"}, machine=info)  # fmt: skip
            return 0
        log(f"{len(names)} adapters of rank {args.rank} written; starting the server")
        server = Server(["--model", args.model, "--quant", args.quant, "--threads", str(args.threads),
                         "--adapters", str(adapters), "--max-concurrent", "64"])  # fmt: skip
        try:
            base_rss = server.rss_mb()
            memory = memory_rows(server, names)
            rows = measure_server(args, server, names)
        finally:
            server.stop()
        merge = merge_and_swap(args, adapters, names)
    out = report(rows, merge, memory)
    print(f"\n## serve: {args.model}, quant {args.quant}, {args.threads} threads, {args.tokens} tokens per request, "
          f"greedy, {args.repeats} repeats\n")  # fmt: skip
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; {recorder.header()}\n")
    print(out["table"])
    print("\nmemory: " + "; ".join(f"{m['adapters']} adapters +{m['rss_added_mb']} MB RSS for {m['adapter_mb']} MB"
                                   for m in memory))  # fmt: skip
    for target in out["targets"]:
        print(format_target(target))
    recorder.write({"settings": {k: v for k, v in vars(args).items() if k not in ("json", "allow_dirty")},
                    "server_rss_mb_before_adapters": base_rss, "rows": rows, "merge_and_swap": merge,
                    "memory": memory, "targets": out["targets"], "emulation": "none"}, machine=info)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
