"""Chaos: generations that lose a replica to SIGKILL at a random token, and must still give the no-failure tokens.

A chain of SmolLM2-135M with two replicas per server stage: this process is the device (layers [0, 10) and the
head), stage [10, 20) runs on edge1 and edge1r, stage [20, 30) on edge2 and edge2r (four node processes, no link
emulation). First every prompt is answered once with no failure (the reference tokens). Then `--generations`
times: a prompt, greedy decoding of `--tokens` tokens, and at a random step one of the two replicas serving the
session (a random stage) is SIGKILLed; the generation fails over (`edgellm.failover`) and goes on. After it ends
the killed node is restarted and waited for (it rejoins at the next session after the retry interval), and a
prefill of the history the recovery replayed is timed on a fresh session of the same pipeline.

Recorded per generation: tokens equal to the reference (must be all), the recovery time (the failed call,
including the probes that found the dead node, plus the replay; if the replay itself fails, as it can through a
peer whose channel to a just-restarted node is still in reconnect backoff, every failed call and replay of the
generation) and the prefill of the same history, and their ratio (target <= 2). The kill lands between two steps:
the next step's call is the one that fails.

    python bench/chaos.py --json bench/results/chaos.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from record import Recorder, add_record_arguments, machine_info

PROMPTS = ["Tell me about the ocean.", "What is a prime number?", "Name three colours.", "Why is the sky blue?",
           "Write a line about a cat.", "What is the capital of France?", "How do plants grow?",
           "Explain what a computer does."]  # fmt: skip
RATIO_TARGET = 2.0


def topology_document(model: str, names: list[str]) -> dict[str, Any]:
    route = ["device", "edge1", "edge2"]
    nodes = [{"name": n, "role": "device" if n == "device" else "edge", "address": f"127.0.0.1:{_port()}"}
             for n in names]  # fmt: skip
    for node in nodes:
        if node["name"].endswith("r"):
            node["replica_of"] = node["name"][:-1]
    return {
        "model": {"name": model, "cuts": [10, 20], "head": "device"},
        "deployment": {"route": route, "mode": "chain", "token_env": "EDGELLM_CHAOS_TOKEN", "deadline_s": 60.0},
        "nodes": nodes,
        "links": [{"between": [a, b], "profile": "none", "codec": "none"} for a, b in zip(route, route[1:])],
    }


def _port() -> int:
    from edgellm.deploy.local_deployment import free_port

    return free_port()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per generation (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    add_record_arguments(parser, repeats=1, rows="run")
    args = parser.parse_args(argv)
    recorder = Recorder("chaos", args.json, args.allow_dirty)

    import torch
    from transformers import AutoTokenizer

    from edgellm.deploy.local_deployment import LocalDeployment
    from edgellm.deploy.node_builder import device_hops
    from edgellm.deploy.topology import write_topology
    from edgellm.failover.hop import ReplicaHop
    from edgellm.model.prompt import encode_prompt
    from edgellm.split.generator import GenerationConfig, Generator
    from edgellm.split.host import SessionLimits
    from edgellm.split.one_process import load_stages
    from edgellm.split.pipeline import Pipeline
    from edgellm.store import DEFAULT_MODEL, resolve_model
    from edgellm.store.weights import load_config

    model_dir = resolve_model(DEFAULT_MODEL)
    layers = int(load_config(model_dir).num_hidden_layers)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    os.environ["EDGELLM_CHAOS_TOKEN"] = secrets.token_hex(16)
    servers = ["edge1", "edge1r", "edge2", "edge2r"]
    doc = topology_document(str(model_dir), ["device", *servers])
    rng = random.Random(args.seed)
    config = GenerationConfig(max_new_tokens=args.tokens)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-chaos-") as work:
        path = Path(work) / "topology.toml"
        topology = write_topology(path, doc)
        with LocalDeployment(topology, path, Path(work), names=servers) as nodes:
            stages = load_stages(model_dir, topology.stages_for("device", layers))
            hops = device_hops(topology, "device", stages, SessionLimits())
            replica_hop = next(h for h in hops if isinstance(h, ReplicaHop))
            replica_hop.table.retry_s = 0.0  # a restarted node is probed at the next session
            prompts = [encode_prompt(tokenizer, p, True) for p in PROMPTS]
            reference = [Generator(Pipeline(hops), config).run(torch.tensor([p])).new_tokens[0] for p in prompts]
            for i in range(args.generations):
                k = rng.randrange(len(prompts))
                kill_after = rng.randint(1, args.tokens - 2)  # steps received before the kill
                position = rng.randrange(2)
                generator = Generator(Pipeline(hops), config)
                got: list[int] = []
                victim = ""
                for step in generator.stream(torch.tensor([prompts[k]])):
                    got.append(step.tokens[0])
                    if step.index + 1 == kill_after:
                        (route,) = replica_hop.open_routes().values()
                        victim = route[position]
                        nodes.kill(victim)
                result = generator.result
                assert result is not None
                recovery = result.recoveries[-1] if result.recoveries else None  # the one whose replay held
                nodes.restart(victim)
                row: dict[str, Any] = {"generation": i, "prompt": k, "victim": victim, "killed_after_step": kill_after,
                                       "tokens_equal": got == reference[k], "recoveries": len(result.recoveries)}  # fmt: skip
                if recovery is not None:
                    history = prompts[k] + got[: recovery["replayed_tokens"] - len(prompts[k])]
                    prefill_ms = time_prefill(Pipeline(hops), history)
                    # every failed call and replay of this generation: a replay may itself fail once (a peer's
                    # channel to a node that just came back); all of it is the recovery's time
                    failed_ms = sum(r["failed_call_ms"] for r in result.recoveries)
                    replay_ms = sum(r["replay_ms"] for r in result.recoveries)
                    recovery_ms = failed_ms + replay_ms
                    row |= {"history_tokens": len(history), "failed_call_ms": round(failed_ms, 3),
                            "replay_ms": round(replay_ms, 3), "recovery_ms": round(recovery_ms, 3),
                            "prefill_ms": round(prefill_ms, 3), "ratio": round(recovery_ms / prefill_ms, 3)}  # fmt: skip
                rows.append(row)
                print(f"[chaos {i + 1}/{args.generations}] killed {victim} after step {kill_after}: tokens "
                      f"{'equal' if row['tokens_equal'] else 'DIFFER'}, recovery {row.get('recovery_ms', 0):.0f} ms "
                      f"vs prefill {row.get('prefill_ms', 0):.0f} ms", file=sys.stderr, flush=True)  # fmt: skip
            report = replica_hop.report()
            replica_hop.shutdown()  # its channels: left to the garbage collector, gRPC can hang the exit
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    summary = {
        "generations": len(rows),
        "tokens_equal": sum(r["tokens_equal"] for r in rows),
        "recovered": sum(r["recoveries"] >= 1 for r in rows),
        "recoveries_over_one": sum(r["recoveries"] > 1 for r in rows),
        "ratio_median": round(statistics.median(ratios), 3) if ratios else None,
        "ratio_max": round(max(ratios), 3) if ratios else None,
        "recovery_ms_median": round(statistics.median(r["recovery_ms"] for r in rows if "recovery_ms" in r), 3)
        if ratios
        else None,
        "ratio_target": RATIO_TARGET,
        "total_s": round(time.monotonic() - started, 1),
    }
    summary["met"] = bool(summary["tokens_equal"] == len(rows) and ratios and max(ratios) <= RATIO_TARGET)
    print(json.dumps(summary, indent=1))
    recorder.write({"settings": vars(args) | {"json": None}, "summary": summary, "rows": rows,
                    "replicas": report["replicas"]}, machine_info(threads=0))  # fmt: skip
    return 0 if summary["tokens_equal"] == len(rows) else 1


def time_prefill(pipeline: Any, history: list[int]) -> float:
    """ms of one prefill of `history` on a fresh session (then closed): what the recovery is compared with."""
    import torch

    session = secrets.token_hex(8)
    ids = torch.tensor([history])
    start = time.perf_counter()
    pipeline.forward(session, ids, torch.arange(len(history)).view(1, -1), None, True, argmax=True)
    elapsed = (time.perf_counter() - start) * 1e3
    pipeline.close(session)
    return elapsed


if __name__ == "__main__":
    sys.exit(main())
