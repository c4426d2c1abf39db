"""Split federated learning on Flower's simulation engine: many devices on one machine, rounds per minute, bytes per
round, exact match after training.

Two scales, each a real `edgellm finetune --engine flower` run (Flower's simulation engine runs the devices as
virtual devices in Ray worker processes; the edge servers are the project's own node processes over gRPC):

- `tiny`: `--tiny-clients` devices (default 100) on a tiny model: SmolLM2's tokenizer and architecture, 2 decoder
  layers of width 64, random weights (built here; it learns little, so its exact match measures nothing but the
  pipeline: the scale is the point). The device holds the embedding, layer 0 and the head; one edge server
  layer 1. Rows: every device in every round (`--fraction 1`), and a tenth of them per round (`--fraction 0.1`).
- `real`: `--real-clients` devices (default 10) on SmolLM2-135M-Instruct, the split of bench/train.py (device =
  embedding + layers 0-9 + head, edge1 = 10-19, edge2 = 20-29, chain), shared server adapters; scored before and
  after with `edgellm eval task`.

Every link is the emulated `6g` profile (300/500 Mbit/s, 1 ms RTT: docs/NETWORK.md). Rounds per minute is the
median of the per-round wall times (with its order-statistic interval, bench/record.py), the first round
excluded (it opens each device's sessions and loads the model in the Ray workers). Bytes per round: the
adapters Flower carries (the global device-side adapter to each sampled device and each device's back) and the
activations and gradients on the devices' links (summed over the round's devices and steps).

    .venv/bin/python bench/flower.py --json bench/results/flower.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from record import Recorder, add_record_arguments, machine_info, run_json, stamped, summary

ROOT = Path(__file__).resolve().parent.parent


def log(text: str) -> None:
    print(f"[flower] {text}", file=sys.stderr, flush=True)


def tiny_model(directory: Path) -> Path:
    """SmolLM2's tokenizer on a 2-layer, width-64 llama with random weights (seeded)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgellm.store import resolve_model

    real = resolve_model("smollm2-135m")
    config = AutoConfig.from_pretrained(real)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16})  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (real / name).exists():
            shutil.copy(real / name, directory / name)
    return directory


def topology(path: Path, model: str, cuts: list[int], max_sessions: int) -> Path:
    from edgellm.deploy.local_deployment import free_port
    from edgellm.deploy.topology import write_topology

    names = ["phone", *(f"edge{i + 1}" for i in range(len(cuts)))]
    write_topology(path, {
        "model": {"name": model, "cuts": cuts, "head": "device"},
        "deployment": {"route": names, "mode": "chain", "deadline_s": 120.0, "max_sessions": max_sessions},
        "nodes": [{"name": n, "role": "device" if i == 0 else "edge", "address": f"127.0.0.1:{free_port()}",
                   "threads": 1} for i, n in enumerate(names)],
        "links": [{"between": [a, b], "profile": "6g"} for a, b in zip(names, names[1:])],
    })  # fmt: skip
    return path


def edgellm(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgellm", *args]


def finetune_row(name: str, topo: Path, out: Path, clients: int, rounds: int, every: int, fraction: float,
                 task: str, common: list[str]) -> dict[str, Any]:  # fmt: skip
    cmd = edgellm("finetune", "--engine", "flower", "--topology", str(topo), "--output", str(out), "--task", task,
                  "--clients", str(clients), "--steps", str(rounds * every), "--aggregate-every", str(every),
                  "--fraction", str(fraction), "--json", "--quiet", *common)  # fmt: skip
    with stamped() as stamp:
        report = run_json(cmd)
    flower = report["flower"]
    walls = flower["round_wall_s"][1:] or flower["round_wall_s"]
    row = {
        "row": name, "clients": clients, "fraction": fraction, "rounds": flower["rounds"],
        "steps_per_round": every, "sampled_per_round": flower["sampled_per_round"],
        "round_s": summary(walls), "rounds_per_min": round(60.0 / statistics.median(walls), 2),
        "adapter_bytes_per_round": round(flower["adapter_bytes_per_round"]),
        "smashed_bytes_per_round": round(flower["smashed_bytes_per_round"]),
        "final_loss": report["final_loss"], "first_loss": statistics.mean(v[0] for v in report["losses"].values()),
        "wall_s": round(report["wall_s"], 1), "adapter": report["adapters"][0] if report["adapters"] else None,
        "dropped": report["dropped_clients"], "stamp": stamp, "round_wall_s": flower["round_wall_s"],
    }  # fmt: skip
    log(f"{name}: {clients} devices, {row['rounds_per_min']} rounds/min, {row['adapter_bytes_per_round'] / 1e6:.2f} MB "
        f"adapters + {row['smashed_bytes_per_round'] / 1e6:.1f} MB activations per round, loss "
        f"{row['first_loss']:.3f} -> {row['final_loss']:.3f}, {row['wall_s']} s")  # fmt: skip
    return row


def score(task: str, n: int, model: str, adapter: str | None) -> dict[str, Any]:
    cmd = edgellm("eval", "task", "--task", task, "--n", str(n), "--model", model, "--max-new-tokens", "12",
                  "--json", "--quiet")  # fmt: skip
    if adapter:
        cmd += ["--adapter", adapter]
    got = run_json(cmd)
    return {"exact_match": got["exact_match"], "eval_loss": got["eval_loss"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="dates", help="the task both scales train on (default: %(default)s)")
    parser.add_argument("--tiny-clients", type=int, default=100)
    parser.add_argument("--tiny-rounds", type=int, default=5)
    parser.add_argument("--real-clients", type=int, default=10)
    parser.add_argument("--real-rounds", type=int, default=4)
    parser.add_argument("--every", type=int, default=2, help="steps per device per round (default: %(default)s)")
    parser.add_argument("--eval-n", type=int, default=60)
    parser.add_argument("--only", default="tiny,real", help="scales to run (default: %(default)s)")
    add_record_arguments(parser, repeats=1, rows="rows")
    args = parser.parse_args(argv)
    recorder = Recorder("flower", args.json, args.allow_dirty)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    scores: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-flower-") as tmp:
        work = Path(tmp)
        if "tiny" in args.only:
            model = str(tiny_model(work / "tiny-model"))
            topo = topology(work / "tiny.toml", model, [1], args.tiny_clients + 8)
            common = ["--batch-size", "2", "--seq-len", "64", "--lora-rank", "4", "--lr", "5e-3"]
            for fraction in (1.0, 0.1):
                name = f"tiny-{args.tiny_clients}-f{fraction:g}"
                row = finetune_row(name, topo, work / name, args.tiny_clients, args.tiny_rounds, args.every, fraction,
                                   args.task, common)  # fmt: skip
                row["score"] = score(args.task, args.eval_n, model, row["adapter"])
                rows.append(row)
            scores["tiny-base"] = score(args.task, args.eval_n, model, None)
        if "real" in args.only:
            topo = topology(work / "real.toml", "smollm2-135m", [10, 20], args.real_clients + 8)
            common = ["--batch-size", "4", "--seq-len", "128"]
            name = f"real-{args.real_clients}"
            row = finetune_row(name, topo, work / name, args.real_clients, args.real_rounds, args.every, 1.0,
                               args.task, common)  # fmt: skip
            row["score"] = score(args.task, args.eval_n, "smollm2-135m", row["adapter"])
            rows.append(row)
            scores["real-base"] = score(args.task, args.eval_n, "smollm2-135m", None)
        for row in rows:
            row["adapter"] = None  # a temporary folder
    report = {"settings": vars(args) | {"json": None}, "emulated": {"links": "6g (300/500 Mbit/s, 1 ms RTT)"},
              "rows": rows, "base_scores": scores, "total_s": round(time.monotonic() - started, 1)}  # fmt: skip
    print(json.dumps({"rows": [{k: r[k] for k in ("row", "rounds_per_min", "adapter_bytes_per_round", "score")}
                               for r in rows], "base": scores}))  # fmt: skip
    recorder.write(report, machine_info(threads=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
