"""Soak: many concurrent sessions on one deployment for minutes, some clients vanishing mid-answer.

A 3-node chain of SmolLM2-135M (this process is the device with layers [0, 10) and the head; edge1 [10, 20) and
edge2 [20, 30) are node processes; no link emulation), `--clients` threads each generating answers back to back
for `--minutes`; a client abandons its answer at a random step with probability `--abandon` (it stops without
closing its session, as a phone that crashes or walks away does). Every `--sample-s` the edges' RSS, threads,
file descriptors and session counts are recorded. At the end, after the nodes' idle timeout (`--idle-timeout-s`,
set in the topology), every session must be gone.

Recorded: answers completed and abandoned, errors (must be 0), recoveries (sessions rebuilt by replay), each
edge's samples, and the RSS slope over the run after the first sample.

    python bench/soak.py --json bench/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from record import Recorder, add_record_arguments, machine_info

PROMPTS = ["Tell me about the ocean.", "What is a prime number?", "Name three colours.", "Why is the sky blue?",
           "Write a line about a cat.", "What is the capital of France?"]  # fmt: skip


class NoClose:
    """A pipeline whose close does nothing: an abandoned answer leaves its session on the servers."""

    def __init__(self, pipeline: Any) -> None:
        self._pipeline = pipeline

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def close(self, session: str) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--abandon", type=float, default=0.2, help="probability a client abandons an answer")
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--idle-timeout-s", type=float, default=20.0)
    add_record_arguments(parser, repeats=1, rows="run")
    args = parser.parse_args(argv)
    recorder = Recorder("soak", args.json, args.allow_dirty)

    import psutil
    import torch
    from transformers import AutoTokenizer

    from edgellm.deploy.local_deployment import LocalDeployment, free_port
    from edgellm.deploy.node_builder import device_hops
    from edgellm.deploy.topology import write_topology
    from edgellm.model.prompt import encode_prompt
    from edgellm.net.rpc import ChannelConfig, RemoteHop
    from edgellm.split.generator import GenerationConfig, Generator
    from edgellm.split.host import SessionLimits
    from edgellm.split.one_process import load_stages
    from edgellm.split.pipeline import Pipeline
    from edgellm.store import DEFAULT_MODEL, resolve_model
    from edgellm.store.weights import load_config

    model_dir = resolve_model(DEFAULT_MODEL)
    layers = int(load_config(model_dir).num_hidden_layers)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    os.environ["EDGELLM_SOAK_TOKEN"] = token = secrets.token_hex(16)
    names = ["device", "edge1", "edge2"]
    doc = {
        "model": {"name": str(model_dir), "cuts": [10, 20], "head": "device"},
        "deployment": {"route": names, "mode": "chain", "token_env": "EDGELLM_SOAK_TOKEN", "deadline_s": 120.0,
                       "idle_timeout_s": args.idle_timeout_s},
        "nodes": [{"name": n, "role": "device" if n == "device" else "edge", "address": f"127.0.0.1:{free_port()}"}
                  for n in names],
        "links": [{"between": [a, b], "profile": "none", "codec": "none"} for a, b in zip(names, names[1:])],
    }  # fmt: skip
    done = {"completed": 0, "abandoned": 0, "errors": [], "recoveries": 0, "tokens": 0}
    lock = threading.Lock()
    samples: dict[str, list[dict[str, Any]]] = {"edge1": [], "edge2": []}
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-soak-") as work:
        path = Path(work) / "topology.toml"
        topology = write_topology(path, doc)
        with LocalDeployment(topology, path, Path(work), names=["edge1", "edge2"]) as nodes:
            stages = load_stages(model_dir, topology.stages_for("device", layers))
            hops = device_hops(topology, "device", stages, SessionLimits(max_sessions=256))
            procs = {n: psutil.Process(nodes.processes[n].pid) for n in samples}
            infos = {n: RemoteHop(n, topology.node(n).address, ChannelConfig(token=token)) for n in samples}
            stop_at = time.monotonic() + args.minutes * 60
            started = time.monotonic()

            def client(k: int) -> None:
                rng = random.Random(k)
                while time.monotonic() < stop_at:
                    prompt = torch.tensor([encode_prompt(tokenizer, rng.choice(PROMPTS), True)])
                    abandon = rng.random() < args.abandon
                    pipeline = Pipeline(hops)
                    generator = Generator(NoClose(pipeline) if abandon else pipeline,  # type: ignore[arg-type]
                                          GenerationConfig(max_new_tokens=rng.randint(8, 32)))  # fmt: skip
                    quit_at = rng.randint(1, 6)
                    try:
                        for step in generator.stream(prompt):
                            if abandon and step.index + 1 >= quit_at:
                                break
                        with lock:
                            done["abandoned" if abandon else "completed"] += 1
                            if generator.result is not None:
                                done["recoveries"] += len(generator.result.recoveries)
                                done["tokens"] += sum(len(t) for t in generator.result.new_tokens)
                    except Exception as exc:  # noqa: BLE001 - counted: the soak's verdict
                        with lock:
                            done["errors"].append(f"{type(exc).__name__}: {str(exc)[:200]}")

            def sample() -> None:
                for name, proc in procs.items():
                    info = infos[name].info(timeout_s=30)
                    samples[name].append({"t_s": round(time.monotonic() - started, 1), "rss_bytes":
                                          proc.memory_info().rss, "threads": proc.num_threads(),
                                          "fds": proc.num_fds(), "sessions": info["sessions"]})  # fmt: skip

            threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                sample()
                print(
                    f"[soak] {time.monotonic() - started:.0f} s: {done['completed']} completed, "
                    f"{done['abandoned']} abandoned, {len(done['errors'])} errors; "
                    f"{ {n: s[-1]['sessions'] for n, s in samples.items()} } sessions",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(args.sample_s)
            time.sleep(args.idle_timeout_s + 5)  # abandoned sessions expire
            sample()
            for hop in infos.values():
                hop.shutdown()
    slopes = {}
    for name, rows in samples.items():
        xs = [r["t_s"] for r in rows[1:-1]]
        ys = [r["rss_bytes"] / 1e6 for r in rows[1:-1]]
        if len(xs) >= 2:
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slopes[name] = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs) * 60
    results = {"settings": vars(args) | {"json": None}, "done": done, "samples": samples,
               "rss_slope_mb_per_min": slopes,
               "sessions_left": {n: rows[-1]["sessions"] for n, rows in samples.items()}}  # fmt: skip
    print(json.dumps({k: results[k] for k in ("rss_slope_mb_per_min", "sessions_left")} | {
        "completed": done["completed"], "abandoned": done["abandoned"], "errors": len(done["errors"]),
        "recoveries": done["recoveries"]}, indent=1))  # fmt: skip
    recorder.write(results, machine_info(threads=0))
    return 0 if not done["errors"] and not any(results["sessions_left"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
