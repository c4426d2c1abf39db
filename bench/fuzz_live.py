"""Hostile input at a live node of the real model (issue 17's fuzz target): 10,000 seeded hostile messages
(`edgellm.net.fuzz`: truncated, bit-flipped, random, wrong version/shape/dtype, NaN/Inf, forged session ids, the
wrong token, floods of new sessions) at an edge node serving layers [10, 30) of SmolLM2-135M, a real session's
decode step every 100 messages, compared with the same stage run in this process (the largest difference relative to
the output's largest value: the node's kernels and threads differ from this process's, not its arithmetic).

Recorded: the statuses per kind, the violations (any INTERNAL/UNKNOWN status, any hostile kind accepted), whether
the node stayed up, the real session's steps (all equal to the local stage's), and the node's RSS, threads and file
descriptors before and after.

    python bench/fuzz_live.py --json bench/results/fuzz-live.json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from record import Recorder, add_record_arguments, machine_info, stamped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--cut", type=int, default=10, help="the node serves layers [cut, L) (default: 10)")
    add_record_arguments(parser, repeats=1, rows="run")
    args = parser.parse_args(argv)
    recorder = Recorder("fuzz-live", args.json, args.allow_dirty)

    import grpc
    import psutil
    import torch

    from edgellm.deploy.local_deployment import LocalDeployment, free_port
    from edgellm.deploy.topology import write_topology
    from edgellm.model.stage import stage_specs
    from edgellm.net.fuzz import fuzz, violations
    from edgellm.net.messages import ForwardRequest, decode, encode
    from edgellm.net.rpc import SERVICE, TOKEN_HEADER
    from edgellm.split.host import StageHost
    from edgellm.split.one_process import load_stages
    from edgellm.store import DEFAULT_MODEL, resolve_model
    from edgellm.store.weights import load_config

    model_dir = resolve_model(DEFAULT_MODEL)
    config = load_config(model_dir)
    layers, width = int(config.num_hidden_layers), int(config.hidden_size)
    token = secrets.token_hex(16)
    os.environ["EDGELLM_FUZZ_TOKEN"] = token
    doc = {
        "model": {"name": str(model_dir), "cuts": [args.cut], "head": "device"},
        "deployment": {"route": ["device", "edge1"], "mode": "chain", "token_env": "EDGELLM_FUZZ_TOKEN",
                       "deadline_s": 30.0},
        "nodes": [{"name": "device", "role": "device", "address": f"127.0.0.1:{free_port()}"},
                  {"name": "edge1", "role": "edge", "address": f"127.0.0.1:{free_port()}"}],
        "links": [{"between": ["device", "edge1"], "profile": "none", "codec": "none"}],
    }  # fmt: skip
    (stage,) = load_stages(model_dir, [stage_specs(layers, [args.cut], "device")[1]])
    local = StageHost(stage)
    steps: list[float] = []
    results: dict[str, Any] = {"settings": {"model": DEFAULT_MODEL, "cut": args.cut, "messages": args.messages}}
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-fuzz-") as work:
        path = Path(work) / "topology.toml"
        topology = write_topology(path, doc)
        with LocalDeployment(topology, path, Path(work), names=["edge1"]) as nodes:
            process = psutil.Process(nodes.processes["edge1"].pid)
            channel = grpc.insecure_channel(topology.node("edge1").address)
            position = [0]

            def real_step(n: int) -> None:
                data = torch.randn(1, n, width)
                request = ForwardRequest("real", data, torch.arange(position[0], position[0] + n).unsqueeze(0),
                                         new_session=position[0] == 0)  # fmt: skip
                reply = channel.unary_unary(f"/{SERVICE}/Forward")(encode(request), timeout=60,
                                                                    metadata=((TOKEN_HEADER, token),))  # fmt: skip
                want = local.forward(request).output
                steps.append(((decode(reply).output - want).abs().max() / want.abs().max()).item())
                position[0] += n

            real_step(8)
            before = {"rss_bytes": process.memory_info().rss, "threads": process.num_threads(),
                      "fds": process.num_fds()}  # fmt: skip
            started = time.perf_counter()
            with stamped() as stamp:
                counts = fuzz(channel, args.messages, width, token, seed=0, between=lambda i: real_step(1))
            seconds = time.perf_counter() - started
            alive = nodes.processes["edge1"].poll() is None
            after = {"rss_bytes": process.memory_info().rss, "threads": process.num_threads(),
                     "fds": process.num_fds()}  # fmt: skip
            channel.close()
    results.update({
        "counts": counts, "violations": violations(counts), "node_alive": alive, "seconds": round(seconds, 1),
        "real_session_steps": len(steps), "real_session_max_rel_diff": max(steps), "before": before, "after": after,
        "stamp": stamp,
    })  # fmt: skip
    print(json.dumps({k: results[k] for k in ("violations", "node_alive", "seconds", "real_session_steps",
                                              "real_session_max_rel_diff", "before", "after")}, indent=1))  # fmt: skip
    for kind, seen in sorted(counts.items()):
        print(f"{kind:<10} {seen}")
    recorder.write(results, machine_info(threads=0))
    return 0 if alive and not results["violations"] else 1


if __name__ == "__main__":
    sys.exit(main())
