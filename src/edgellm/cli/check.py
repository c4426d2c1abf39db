"""`edgellm check`: preflight a running deployment against its topology before the first prompt."""

from __future__ import annotations

import argparse
import json

# The library (torch, grpc) is imported inside `run`, not here: building the parser for `edgellm --help` must stay
# light (tests/test_cli_light.py).


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="preflight a running deployment: every node up, tokens, names, roles and layers as the topology says",
        description="Validate the topology, show which node holds which layers and the memory each needs (weights, "
        "KV cache at max_context and activations, predicted from the model's config without loading it, against "
        "the node's memory_mb), then ask every node who it is and what it serves (Info), and ask each node to "
        "reach its next hop (the ping_peer control op), so a node that is down, a token that differs between "
        "this command and a node or between two nodes, a process at a node's address that says it is another "
        "node, or a role or layer range other than the topology's shows before the first prompt, one line per "
        "problem naming the node. Exits 0 when all is well, 2 when the configuration must be fixed (tokens, "
        "names, roles, layers, memory), else 3 when a node is down or unreachable.",
    )
    parser.add_argument("--topology", required=True, metavar="T.toml", help="the deployment's topology file")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S",
                        help="seconds each node may take to answer (default: 5)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgellm.deploy.preflight import render, verdict_json
    from edgellm.deploy.survey import survey
    from edgellm.deploy.topology import load_topology
    from edgellm.errors import ConfigError

    if not 0 < args.timeout <= 60:
        raise ConfigError(f"--timeout must be in (0, 60] seconds, got {args.timeout}")
    topology = load_topology(args.topology)
    verdict = survey(topology, args.timeout)
    if args.json:
        print(json.dumps(verdict_json(verdict, str(args.topology))))
    else:
        print(render(verdict, str(args.topology)))
    return verdict.exit_code
