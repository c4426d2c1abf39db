"""Parameter-sharing edge caching on real nodes: `edgellm cache apply` under each placement algorithm.

For each algorithm (TrimCaching's sharing-aware greedy and independent caching, by default) the same config
(examples/caching/apply.toml: three edge cache nodes and a cloud as processes on this machine, SmolLM2-135M and six
LoRA variants of it, four users, two popularity phases) runs end to end: blocks published to the origin, nodes
synced to each phase's placement over their emulated backhaul, the phase's seeded requests routed and answered.
Recorded per algorithm and phase: the predicted and measured hit ratio, requests whose tokens equal the
origin's, bytes fetched per source and evicted, sync seconds, the generation kept running across the sync; per
node at the end: bytes stored against the same variants stored whole, and the process's RSS.

    python bench/caching_apply.py --json bench/results/caching-apply.json

Hit ratios do not depend on the machine (placements and requests are seeded; the measured costs per token only
decide a hit when a latency requirement is close); the seconds do. `--repeats` runs each algorithm that often,
taking turns.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from record import Recorder, add_record_arguments, machine_info, schedule, stamped

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "examples" / "caching" / "apply.toml"


def run_once(config_path: Path, algorithm: str) -> dict[str, Any]:
    import dataclasses

    from edgellm.control.cache_apply import apply
    from edgellm.control.cache_apply_config import apply_config

    config = apply_config(tomllib.loads(config_path.read_text()), config_path.parent)
    config = dataclasses.replace(config, algorithm=algorithm)
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-cache-") as work:
        return apply(config, Path(work))


def condensed(report: dict[str, Any]) -> dict[str, Any]:
    phases = []
    for p in report["phases"]:
        phases.append({
            "phase": p["phase"], "placement": p["placement"], "predicted_hit_ratio": p["predicted_hit_ratio"],
            "measured_hit_ratio": p["measured_hit_ratio"], "requests": len(p["requests"]),
            "tokens_equal_origin": p["tokens_equal_origin"], "sync_s": p["sync_s"],
            "fetched_bytes": {n: s["fetched_bytes"] for n, s in p["sync"].items()},
            "evicted_bytes": {n: s["evicted_bytes"] + s["deferred_bytes"] for n, s in p["sync"].items()},
            "refused_blocks": sum(len(s["refused"]) for s in p["sync"].values()),
            "carried_session": p["carried_session"], "stored_bytes": p["stored_bytes"],
        })  # fmt: skip
    return {"phases": phases, "stores": report["stores"], "measured_costs": report["measured_costs_ms_per_token"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="default: examples/caching/apply.toml")
    parser.add_argument("--algorithms", default="trimcaching,independent", help="comma-separated")
    add_record_arguments(parser, repeats=1, rows="algorithm, taking turns")
    args = parser.parse_args(argv)
    recorder = Recorder("caching-apply", args.json, args.allow_dirty)
    algorithms = args.algorithms.split(",")
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in algorithms}
    full: dict[str, Any] = {}
    for _, row in schedule(len(algorithms), args.repeats):
        name = algorithms[row]
        with stamped() as stamp:
            report = run_once(args.config, name)
        runs[name].append({**condensed(report), "stamp": stamp})
        full.setdefault("config", report["config"])
        full.setdefault("variants", report["variants"])
        full.setdefault("emulation", report["emulation"])
    results = {"settings": {"config": str(args.config), "algorithms": algorithms, "repeats": args.repeats},
               **full, "runs": runs}  # fmt: skip
    for name, reps in runs.items():
        for p in reps[-1]["phases"]:
            print(f"{name:<12} {p['phase']:<8} hit ratio predicted {p['predicted_hit_ratio']:.2f} measured "
                  f"{p['measured_hit_ratio']:.2f}; tokens equal {p['tokens_equal_origin']}/{p['requests']}; "
                  f"sync {p['sync_s']:.1f} s")  # fmt: skip
        stores = reps[-1]["stores"]
        used = sum(s["used_bytes"] for n, s in stores.items() if n != "cloud")
        whole = sum(s["independent_bytes"] for n, s in stores.items() if n != "cloud")
        print(f"{name:<12} edge stores {used / 1e6:.1f} MB holding what takes {whole / 1e6:.1f} MB stored whole")
    recorder.write(results, machine_info(threads=0))
    if args.json:
        print(json.dumps({"written": args.json}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
