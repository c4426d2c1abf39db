"""Fine-tuning benchmark: centralized vs split vs federated vs split federated LoRA on built-in tasks.

Every configuration is a real `edgellm finetune` run (real processes over gRPC for the split and federated
ones) with the same task, steps and adapter settings; each trained adapter is then scored with `edgellm eval
task` (exact match and mean response loss on the same held-out examples: eval seed 0), as is the base model.
Two short extra runs time a split step over the `6g` and `5g` link profiles.

Repeats: a repeat of a row is a whole run with another training seed (data order and adapter init: seed 0, 1,
...; the same seed gives the same numbers to the last digit, so repeating it would measure nothing). The rows
take turns, one run each per repeat (ABBA order); every number is reported as a median with an order-statistic
confidence interval of the median (bench/record.py), and split / centralized ratios as medians of the
per-seed ratios. Tasks: `--task` (comma-separated; default `dates`, which every setup saturates, and `sort`,
which leaves headroom).

Bytes per client, whole run: the activations and gradients on the client's own link (up + down, every step)
plus its adapter traffic (open, FedAvg rounds, export), for every setup.

    .venv/bin/python bench/train.py --json bench/results/train.json

Results are per row: each row keeps the commit, cleanliness, command and load it was produced with, so
`--only ROW,...` reruns those rows and replaces only them in an existing --json file. Split runs use
bench/work/train/train-split.toml written here: the device holds the embedding, layers 0-9 and the head; edge1
layers 10-19; edge2 layers 20-29 (chain), every process with one thread and OMP_WAIT_POLICY=PASSIVE (the
deployment launcher's setting: processes share the cores), recorded per row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from record import (
    NODE_OMP_WAIT_POLICY,
    Recorder,
    add_record_arguments,
    format_target,
    paired_ratios,
    schedule,
    span,
    stamped,
    summary,
    target_record,
)

ROOT = Path(__file__).resolve().parent.parent
SETUPS = ("centralized", "split", "split-int8mu", "split-qlora-nf4", "federated", "split-federated")
SPLIT_TARGET = 1.01  # split eval loss / centralized eval loss, same seed
DEVICE = "phone"  # the client's node name in the split topologies


def edgellm(*args: str) -> dict[str, Any]:
    """Run the CLI with --json; its last stdout line is the report."""
    cmd = [sys.executable, "-m", "edgellm", *args, "--json"]
    start = time.perf_counter()
    env = {**os.environ, "OMP_WAIT_POLICY": NODE_OMP_WAIT_POLICY}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["command_s"] = time.perf_counter() - start
    print(f"  {' '.join(args[:3])}... {report['command_s']:.0f} s", file=sys.stderr)
    return report  # type: ignore[no-any-return]


def topology(path: Path, profile: str, codec: str, base_port: int) -> Path:
    names = [DEVICE, "edge1", "edge2"]
    lines = [
        "[model]", 'name = "smollm2-135m"', "cuts = [10, 20]", 'head = "device"', "",
        "[deployment]", f"route = {json.dumps(names)}", 'mode = "chain"', "deadline_s = 120.0", "",
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


def evaluate(args: argparse.Namespace, task: str, adapter: str | None, quant: str | None = None) -> dict[str, Any]:
    extra = ["--adapter", adapter] if adapter else []
    extra += ["--quant", quant] if quant else []
    report = edgellm("eval", "task", "--task", task, "--n", str(args.eval_n), *extra)
    return {"exact_match": report["exact_match"], "eval_loss": report["eval_loss"]}


def client_bytes(report: dict[str, Any]) -> dict[str, Any]:
    """Bytes each client moves over the whole run, averaged over clients: activations and gradients on its own
    link (both directions, every step), adapter traffic (both directions), and their sum."""
    own = sum(v for k, v in report["bytes_per_step"].items() if k.startswith(f"{DEVICE}->"))
    clients = sorted(report["sync_bytes_per_client"]) or ["0"]
    per_client = []
    for client in clients:
        steps = len(report.get("losses", {}).get(client, [])) or report["steps"]
        activations = own * steps
        adapter = sum(report["sync_bytes_per_client"].get(client, {}).values())
        per_client.append({"client": client, "steps": steps, "activations_gradients": activations,
                           "adapter": adapter, "total": activations + adapter})  # fmt: skip
    mean = {k: sum(c[k] for c in per_client) / len(per_client) for k in ("activations_gradients", "adapter", "total")}
    return {**mean, "per_client": per_client}


def setup_args(args: argparse.Namespace) -> dict[str, list[str]]:
    split_topo = topology(args.work / "train-split.toml", "6g", args.codec, 50310)
    int8mu_topo = topology(args.work / "train-split-int8mu.toml", "6g", "int8mu", 50320)
    fed = ["--clients", str(args.clients), "--aggregate-every", str(args.aggregate_every)]
    return {
        "centralized": [],
        "split": ["--topology", str(split_topo)],
        "split-int8mu": ["--topology", str(int8mu_topo)],
        "split-qlora-nf4": ["--topology", str(split_topo), "--quant", "nf4"],
        "federated": fed,
        "split-federated": ["--topology", str(split_topo), *fed],
    }


def train_once(args: argparse.Namespace, task: str, setup: str, extra: list[str], seed: int) -> dict[str, Any]:
    """One finetune run and the score of its adapter."""
    out = args.work / f"{task}-{setup}-s{seed}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    common = ["--task", task, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seed", str(seed)]
    with stamped() as stamp:
        report = edgellm("finetune", *common, *extra, "--output", str(out))
        quant = extra[extra.index("--quant") + 1] if "--quant" in extra else None
        scores = evaluate(args, task, report["adapters"][0], quant)  # scored on the base it was trained on
    return {
        "seed": seed,
        "stamp": stamp,
        **scores,
        "final_train_loss": report["final_loss"],
        "client_trainable_params": report["device_trainable_params"],
        "server_trainable_params": report["server_trainable_params"],
        "bytes_per_step": report["bytes_per_step"],
        "sync_bytes_per_client": report["sync_bytes_per_client"],
        "bytes_per_client": client_bytes(report),
        "step_ms": report["step_ms"],
        "wall_s": report["wall_s"],
    }


def time_once(args: argparse.Namespace, task: str, profile: str, seed: int) -> dict[str, Any]:
    out = args.work / f"timing-{task}-{profile}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    topo = topology(args.work / f"train-{profile}.toml", profile, args.codec, 50330)
    with stamped() as stamp:
        report = edgellm("finetune", "--task", task, "--steps", str(args.timing_steps), "--batch-size",
                         str(args.batch_size), "--seed", str(seed), "--topology", str(topo),
                         "--output", str(out))  # fmt: skip
    return {"seed": seed, "stamp": stamp, "step_ms": report["step_ms"], "bytes_per_step": report["bytes_per_step"]}


def summarize_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ["exact_match", "eval_loss", "final_train_loss", "step_ms"]
    out = {k: summary([r[k] for r in runs], 4) for k in keys if runs and k in runs[0]}
    if runs and "bytes_per_client" in runs[0]:
        kinds = ("activations_gradients", "adapter", "total")
        out["bytes_per_client"] = {k: summary([r["bytes_per_client"][k] for r in runs], 0) for k in kinds}
    return out


def plan(args: argparse.Namespace, only: set[str] | None) -> list[tuple[str, str]]:
    """(task, run) pairs to measure in turns: the setups, then the timing runs (`timing-6g`, `timing-5g`)."""

    def wanted(run: str) -> bool:
        return only is None or run in only or (run.startswith("timing-") and "timing" in only)

    return [(task, run) for task in args.tasks for run in [*SETUPS, "timing-6g", "timing-5g"] if wanted(run)]


def run_row(args: argparse.Namespace, task: str, run: str, seed: int, setups: dict[str, list[str]]) -> dict[str, Any]:
    if run.startswith("timing-"):
        return time_once(args, task, run.removeprefix("timing-"), seed)
    return train_once(args, task, run, setups[run], seed)


def targets(rows: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """Split's eval loss within 1% of centralized's (per seed ratio), when both rows are there."""
    split, central = rows.get(f"{task}/split"), rows.get(f"{task}/centralized")
    if not split or not central:
        return []
    a = {r["seed"]: r["eval_loss"] for r in split["runs"]}
    b = {r["seed"]: r["eval_loss"] for r in central["runs"]}
    seeds = sorted(set(a) & set(b))
    ratio = summary(paired_ratios([a[s] for s in seeds], [b[s] for s in seeds]), 4)
    return [target_record(f"{task}: split / centralized eval loss", SPLIT_TARGET, ratio, higher_is_better=False)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--task",
        default="dates,sort",
        help="built-in task(s), comma-separated; every row runs on each (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=30, help="steps per client (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=3, help="clients of the federated runs (default: %(default)s)")
    parser.add_argument(
        "--aggregate-every", type=int, default=5, help="steps between FedAvg rounds (default: %(default)s)"
    )
    parser.add_argument("--eval-n", type=int, default=100, help="held-out prompts scored (default: %(default)s)")
    parser.add_argument(
        "--codec", default="fp16", help="smashed-data codec of the split runs' links (default: %(default)s)"
    )
    parser.add_argument("--timing-steps", type=int, default=6, help="steps of each timing run (default: %(default)s)")
    parser.add_argument(
        "--work",
        type=Path,
        default=ROOT / "bench" / "work" / "train",
        help="scratch folder for topologies and runs (default: bench/work/train)",
    )
    parser.add_argument("--only", default=None, metavar="RUN,...",
                        help=f"run only these ({', '.join(['base', *SETUPS, 'timing'])}) and replace only their rows "
                        "in an existing --json file")  # fmt: skip
    add_record_arguments(parser, rows="row, a run per training seed (seeds 0 to N-1), rows taking turns")
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    args.json = Path(args.json) if args.json else None
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    recorder = Recorder("train", args.json, args.allow_dirty)
    results: dict[str, Any] = {"rows": {}, "git_diffs": {}}
    if args.json and only and args.json.exists():
        results = json.loads(args.json.read_text())
        if "rows" not in results:
            raise SystemExit(f"{args.json} predates per-row records; rerun without --only")
        results.setdefault("git_diffs", {})
    provenance = {k: v for k, v in recorder.provenance.items() if k != "git_diff"}
    if recorder.provenance["git_diff"]:
        diff = recorder.provenance["git_diff"]
        provenance["git_diff_id"] = hashlib.sha256(diff.encode()).hexdigest()[:16]
        results["git_diffs"][provenance["git_diff_id"]] = diff
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("only", "json", "allow_dirty", "tasks")}  # fmt: skip
    row_meta = {"provenance": provenance, "settings": settings, "omp_wait_policy": NODE_OMP_WAIT_POLICY}

    for task in args.tasks if only is None or "base" in only else ():
        for run, quant in (("base", None), ("base-nf4", "nf4")):  # the base model, float and quantized: no seed
            with stamped() as stamp:
                scores = evaluate(args, task, None, quant)
            runs = [{"seed": None, "stamp": stamp, **scores}]
            results["rows"][f"{task}/{run}"] = {"task": task, "run": run, **row_meta, "runs": runs}
    setups = setup_args(args)
    rows = plan(args, only)
    fresh: dict[str, list[dict[str, Any]]] = {f"{task}/{run}": [] for task, run in rows}
    for repeat, index in schedule(len(rows), args.repeats):
        task, run = rows[index]
        print(f"repeat {repeat + 1}/{args.repeats}: {task} {run} (seed {repeat})", file=sys.stderr)
        fresh[f"{task}/{run}"].append(run_row(args, task, run, repeat, setups))
    for (task, run), key in zip(rows, fresh):
        runs = fresh[key]
        results["rows"][key] = {"task": task, "run": run, **row_meta, "stamp": span([r["stamp"] for r in runs]),
                                "summary": summarize_row(runs), "runs": runs}  # fmt: skip
    results["targets"] = [t for task in sorted({r["task"] for r in results["rows"].values()})
                          for t in targets(results["rows"], task)]  # fmt: skip
    used = {r["provenance"].get("git_diff_id") for r in results["rows"].values()}
    results["git_diffs"] = {k: v for k, v in results["git_diffs"].items() if k in used}
    print(table(results))
    for t in results["targets"]:
        print(format_target(t, digits=4))
    recorder.write({k: v for k, v in results.items() if k not in ("benchmark", "provenance")})
    return 0


def _cell(stats: dict[str, Any] | None, digits: int, scale: float = 1.0) -> str:
    if not stats or stats.get("median") is None:
        return "-"
    m, lo, hi = (stats[k] / scale for k in ("median", "ci_low", "ci_high"))
    return f"{m:.{digits}f}" if stats["n"] == 1 or lo == hi else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def table(results: dict[str, Any]) -> str:
    lines = ["| task | run | exact match | eval loss | final train loss | client trainable | ms/step (6g) | "
             "MB per client, whole run: activations+gradients / adapter / total | commit |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in results["rows"].values():
        p = row["provenance"]
        commit = (p.get("git_commit") or "?")[:7] + ("+dirty" if p.get("git_dirty") else "")
        if row["run"].startswith("timing"):
            continue
        if row["run"].startswith("base"):
            r = row["runs"][0]
            lines.append(f"| {row['task']} | {row['run']} | {r['exact_match']:.2f} | {r['eval_loss']:.4f} | - | - | - "
                         f"| - | {commit} |")  # fmt: skip
            continue
        s, first = row["summary"], row["runs"][0]
        b = s.get("bytes_per_client", {})
        traffic = " / ".join(_cell(b.get(k), 1, 1e6) for k in ("activations_gradients", "adapter", "total"))
        lines.append(
            f"| {row['task']} | {row['run']} | {_cell(s['exact_match'], 2)} | {_cell(s['eval_loss'], 4)} | "
            f"{_cell(s['final_train_loss'], 4)} | {first['client_trainable_params']:,} | {_cell(s['step_ms'], 0)} | "
            f"{traffic} | {commit} |"
        )
    for row in results["rows"].values():
        if row["run"].startswith("timing"):
            lines.append(f"\n{row['task']}: split step over {row['run'].removeprefix('timing-')}: "
                         f"{_cell(row['summary']['step_ms'], 0)} ms")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
