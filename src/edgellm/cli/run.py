"""`edgellm run`: generate through a running deployment, via its device node."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from edgellm.cli.dp_options import add_dp_arguments, dp_fields, privacy_line
from edgellm.cli.generate import (
    add_chat_arguments,
    add_sampling_arguments,
    add_speculative_arguments,
    echo_text,
    print_loop_hint,
    print_speculative,
    read_prompt,
    sampling_from,
    speculative_from,
)
from edgellm.cli.plan import add_plan_arguments, plan_request
from edgellm.errors import ConfigError

# The library (torch, grpc) is imported inside `run`, not here: building the parser for `edgellm --help` must stay
# light (tests/test_cli_light.py).


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="generate through a running deployment",
        description="Send PROMPT to the device node of a running deployment (started with `edgellm node`); "
        "the device runs its layers and drives the edge nodes. Decoding is greedy unless --temperature, "
        "--top-k or --top-p is given. The chat template is applied unless --no-chat.",
    )
    parser.add_argument("prompt", metavar="PROMPT", nargs="?", default=None,
                        help="the prompt text; '-' or none (with stdin not a terminal) reads it from stdin")  # fmt: skip
    parser.add_argument("--topology", required=True, metavar="T.toml", help="the deployment's topology file")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="stop after N tokens (default: 64)")
    add_chat_arguments(parser)
    add_sampling_arguments(parser)
    add_speculative_arguments(parser)
    add_dp_arguments(parser)
    parser.add_argument("--plan", choices=["fixed", "auto"], default="fixed",
                        help="fixed: the layout the nodes run (default); auto: profile the deployment (cached), plan "
                        "it, and move the running nodes to the plan before generating (chain mode)")  # fmt: skip
    add_plan_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgellm.deploy.node_builder import channel_config
    from edgellm.deploy.topology import load_topology
    from edgellm.model.sampling import detect_loop
    from edgellm.net.rpc import RemoteHop

    args.prompt = read_prompt(args.prompt)
    sampling = sampling_from(args)
    speculative = speculative_from(args) or {}
    dp = dp_fields(args)  # the device node validates it (and refuses it where its topology sets a link's dp)
    topology = load_topology(args.topology)
    device = topology.device
    if device.address is None:
        raise ConfigError(f"{topology.source}: the device node {device.name!r} has no address to reach it at")
    hop = RemoteHop(device.name, device.address, channel_config(topology), sender="cli")
    hop.info()  # within the deployment's deadline: an unreachable device fails here, not after a long stream wait
    if args.plan == "auto":
        _plan_and_apply(args, topology)
    request = {
        "prompt": args.prompt,
        "chat": args.chat,
        "max_new_tokens": args.max_new_tokens,
        **sampling.to_json(),
        **speculative,
        **({"dp": dp} if dp is not None else {}),
    }
    report: dict[str, Any] = {}
    for event in hop.generate(request):
        if "report" in event:
            report = event["report"]
        elif not args.json:
            echo_text(event["text"])
    if args.json:
        print(json.dumps({**report, "loop_detected": detect_loop(report.get("new_tokens", []))}))
        return 0
    print()
    if not getattr(args, "quiet", False):
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the answer alone
            print_deployment_summary(report)
            print_loop_hint(report["new_tokens"], sampling)
    return 0


def print_deployment_summary(report: dict[str, Any]) -> None:
    """Nodes and links of a networked generation, after the streamed text."""
    print(
        f"\n{len(report['new_tokens'])} tokens, TTFT {report['ttft_ms']:.0f} ms, "
        f"{report['decode_tok_per_s']:.1f} tok/s decode ({report.get('mode', '?')} mode)"
    )
    print_speculative(report)
    if report.get("privacy"):
        print(f"privacy, {privacy_line(report['privacy'])}")
    print(f"{'node':<12} {'layers':>9} {'compute ms':>11} {'RSS/budget MB':>16}")
    for n in report["nodes"]:
        print(f"{n['name']:<12} {n['layers'][0]:>4}-{n['layers'][1]:<4} {n['compute_ms']:>11.1f} {_memory(n):>16}")
    for n in report["nodes"]:
        emulated = _emulated(n)
        if emulated:
            print(f"emulated: {n['name']} {emulated}")
    print(f"{'link':<22} {'bytes':>10} {'B/token':>9} {'wire ms':>9}")
    for link in report["links"]:
        per_token = "-" if link["bytes_per_token"] is None else f"{link['bytes_per_token']:.0f}"
        print(f"{link['from'] + '->' + link['to']:<22} {link['bytes']:>10} {per_token:>9} {link['wire_ms']:>9.1f}")


def _memory(node: dict[str, Any]) -> str:
    """`786/1100`: measured RSS against the budget, MB; `-` where the node did not report it."""
    memory = node.get("memory")
    if not isinstance(memory, dict) or memory.get("rss_mb") is None:
        return "-"
    budget = memory.get("budget_mb")
    return f"{memory['rss_mb']:.0f}/{'-' if budget is None else budget}"


def _emulated(node: dict[str, Any]) -> str:
    """`compute x4.0, memory 1100 MB (preset phone)`; empty for a node at this machine's own capabilities."""
    emulated = node.get("emulated") or {}
    parts = []
    if emulated.get("compute_scale", 1.0) != 1.0:
        parts.append(f"compute x{emulated['compute_scale']:.1f}")
    if emulated.get("memory_mb") is not None:
        parts.append(f"memory {emulated['memory_mb']} MB")
    if not parts:
        return ""
    preset = emulated.get("preset")
    return ", ".join(parts) + (f" (preset {preset})" if preset else "")


def _plan_and_apply(args: argparse.Namespace, topology: Any) -> None:
    """Profile (cached), plan, and move the running deployment to the plan; say what was chosen on stderr."""

    from edgellm.control.planning import apply_plan, obtain_profile, plan_from_profile

    request = plan_request(args)
    progress = (lambda _: None) if args.json else (lambda text: print(f"[{text}]", file=sys.stderr, flush=True))
    profile, _, _ = obtain_profile(topology, args.profile, on_progress=progress)
    solution = plan_from_profile(profile, request, topology.mode)
    applied = apply_plan(topology, solution.plan)
    stages = ", ".join(f"{s.node} {s.start}-{s.end} {s.scheme}" for s in solution.plan.stages)
    progress(f"plan: {stages}; head on {solution.plan.head}; codecs {', '.join(solution.plan.codecs) or '-'}; "
             f"predicted {solution.cost.decode_ms:.1f} ms/token; moved in {applied.get('ms', 0):.0f} ms")  # fmt: skip
