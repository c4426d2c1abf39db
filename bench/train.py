"""Fine-tuning benchmark: centralized vs split vs federated vs split federated LoRA on a built-in task.

Every configuration is a real `edgellm finetune` run (real processes over gRPC for the split and federated
ones) with the same task, data seed, steps and adapter settings; each trained adapter is then scored with
`edgellm eval task` (exact match and mean response loss on held-out examples), as is the base model. Two short
extra runs time a split step over the `6g` and `5g` link profiles.

    .venv/bin/python bench/train.py --json bench/results/train.json

Split runs use bench/topologies/train-split.toml written here: the device holds the embedding, layers 0-9 and
the head; edge1 layers 10-19; edge2 layers 20-29 (chain), every process with one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def edgellm(*args: str) -> dict[str, Any]:
    """Run the CLI with --json; its last stdout line is the report."""
    cmd = [sys.executable, "-m", "edgellm", *args, "--json"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["command_s"] = time.perf_counter() - start
    print(f"  {' '.join(args[:2])}... {report['command_s']:.0f} s", file=sys.stderr)
    return report


def topology(path: Path, profile: str, codec: str, base_port: int) -> Path:
    names = ["phone", "edge1", "edge2"]
    lines = [
        "[model]", 'name = "smollm2-135m"', "cuts = [10, 20]", 'head = "device"', "",
        "[deployment]", 'route = ["phone", "edge1", "edge2"]', 'mode = "chain"', "deadline_s = 120.0", "",
    ]  # fmt: skip
    for i, name in enumerate(names):
        role = "device" if i == 0 else "edge"
        lines += ["[[nodes]]", f'name = "{name}"', f'role = "{role}"', f'address = "127.0.0.1:{base_port + i}"',
                  "threads = 1", ""]  # fmt: skip
    for a, b in zip(names, names[1:]):
        lines += ["[[links]]", f'between = ["{a}", "{b}"]', f'profile = "{profile}"', f'codec = "{codec}"', ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def evaluate(args: argparse.Namespace, adapter: str | None, quant: str | None = None) -> dict[str, Any]:
    extra = ["--adapter", adapter] if adapter else []
    extra += ["--quant", quant] if quant else []
    report = edgellm("eval", "task", "--task", args.task, "--n", str(args.eval_n), *extra)
    return {"exact_match": report["exact_match"], "eval_loss": report["eval_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="dates")
    parser.add_argument("--steps", type=int, default=30, help="steps per client")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--aggregate-every", type=int, default=5)
    parser.add_argument("--eval-n", type=int, default=100)
    parser.add_argument("--codec", default="fp16", help="smashed-data codec of the split runs' links")
    parser.add_argument("--timing-steps", type=int, default=6)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "train")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--only", default=None, metavar="RUN,...",
                        help="run only these (base, centralized, split, split-int8mu, split-qlora-nf4, federated, "
                        "split-federated, timing) and merge them into an existing --json file")  # fmt: skip
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None

    common = ["--task", args.task, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seed", "0"]
    split_topo = topology(args.work / "train-split.toml", "6g", args.codec, 50310)
    int8mu_topo = topology(args.work / "train-split-int8mu.toml", "6g", "int8mu", 50320)
    runs = {
        "centralized": [],
        "split": ["--topology", str(split_topo)],
        "split-int8mu": ["--topology", str(int8mu_topo)],
        "split-qlora-nf4": ["--topology", str(split_topo), "--quant", "nf4"],
        "federated": ["--clients", str(args.clients), "--aggregate-every", str(args.aggregate_every)],
        "split-federated": ["--topology", str(split_topo), "--clients", str(args.clients),
                            "--aggregate-every", str(args.aggregate_every)],
    }  # fmt: skip
    results: dict[str, Any] = {}
    if args.json and only and args.json.exists():
        results = json.loads(args.json.read_text())
    if only is None or "base" in only:
        results["base"] = evaluate(args, None)
    for name, extra in runs.items():
        if only is not None and name not in only:
            continue
        out = args.work / name
        subprocess.run(["rm", "-rf", str(out)], check=True)
        report = edgellm("finetune", *common, *extra, "--output", str(out))
        quant = extra[extra.index("--quant") + 1] if "--quant" in extra else None
        if quant is not None and "base-" + quant not in results:  # the quantized base model, before training
            results["base-" + quant] = evaluate(args, None, quant)
        results[name] = {
            **evaluate(args, report["adapters"][0], quant),  # scored on the base it was trained on
            "final_train_loss": report["final_loss"],
            "client_trainable_params": report["device_trainable_params"],
            "server_trainable_params": report["server_trainable_params"],
            "bytes_per_step": report["bytes_per_step"],
            "sync_bytes_per_client": report["sync_bytes_per_client"],
            "step_ms": report["step_ms"],
            "wall_s": report["wall_s"],
        }
    timing = results.get("timing", {})
    for profile in ("6g", "5g") if only is None or "timing" in only else ():
        out = args.work / f"timing-{profile}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        topo = topology(args.work / f"train-{profile}.toml", profile, args.codec, 50330)
        report = edgellm("finetune", "--task", args.task, "--steps", str(args.timing_steps), "--batch-size",
                         str(args.batch_size), "--topology", str(topo), "--output", str(out))  # fmt: skip
        timing[profile] = {"step_ms": report["step_ms"], "bytes_per_step": report["bytes_per_step"]}
    results["timing"] = timing
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    results["machine"] = {
        "cpus": os.cpu_count(), "platform": platform.platform(), "date": time.strftime("%Y-%m-%d"),
        "git_commit": commit.strip(), "load_average_at_end": os.getloadavg(),
    }  # fmt: skip
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "only"}
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


def table(results: dict[str, Any]) -> str:
    rows = ["| run | exact match | eval loss | final train loss | client trainable | ms/step (6g) | MB/step per link |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    base = results["base"]
    rows.append(f"| base model | {base['exact_match']:.2f} | {base['eval_loss']:.4f} | - | - | - | - |")
    for name in ("centralized", "split", "split-int8mu", "split-qlora-nf4", "federated", "split-federated"):
        if name not in results:
            continue
        r = results[name]
        links = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in r["bytes_per_step"].items()) or "-"
        rows.append(
            f"| {name} | {r['exact_match']:.2f} | {r['eval_loss']:.4f} | {r['final_train_loss']:.4f} | "
            f"{r['client_trainable_params']:,} | {r['step_ms']:.0f} | {links} |"
        )
    for profile, t in results["timing"].items():
        rows.append(f"\nsplit step over {profile}: {t['step_ms']:.0f} ms")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
