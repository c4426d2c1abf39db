"""`edgellm node`: run one node of a deployment (device, edge or cloud) until stopped."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# The library (torch, grpc) is imported inside `run`, not here: building the parser for `edgellm --help` must stay
# light (tests/test_cli_light.py).


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "node",
        help="serve one node of a deployment described by a topology file",
        description="Load only the layers the topology assigns to node NAME and serve them over gRPC on the "
        'node\'s address until SIGINT/SIGTERM. Prints one JSON line {"event": "ready", ...} on stdout once '
        "it accepts requests. A device node serves prompts (see `edgellm run`); edge/cloud nodes serve stages. "
        "With `[control] replan = true` in the topology, the device re-plans and migrates live when a link "
        "changes (docs/PLANNER.md).",
    )
    parser.add_argument("--topology", required=True, metavar="T.toml", help="the deployment's topology file")
    parser.add_argument("--name", required=True, help="which node of the topology to run")
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        metavar="DIR",
        help="where a server keeps its fine-tuning clients' checkpoints, as DIR/<run>/<node>/<adapter>/step-N.pt "
        "(default: <cache>/checkpoints; `edgellm finetune` gives the servers it starts <output>/checkpoints)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgellm.deploy.node_builder import run_node
    from edgellm.deploy.topology import load_topology

    topology = load_topology(args.topology)
    controller = None
    if topology.control.replan and topology.node(args.name).role == "device":
        from edgellm.control.replanner import Replanner, control_prober

        def controller(num_layers, reach):  # type: ignore[no-untyped-def]
            return Replanner(topology, num_layers, control_prober(topology, args.name, reach))

    code = run_node(topology, args.name, on_ready=_announce, controller=controller, checkpoint_dir=args.checkpoint_dir)
    # The server has drained; skip interpreter teardown (seconds of module finalization with torch loaded),
    # so a deployment stops promptly.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _announce(event: dict) -> None:
    print(json.dumps(event), flush=True)
    sys.stdout.flush()
