"""`edgellm plan`: choose cuts, schemes, codecs and the head side for a deployment from its profile."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

OBJECTIVES = ("latency", "ttft", "throughput")  # edgellm.plan.OBJECTIVES


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The planning options `plan`, `run --plan auto` and `demo` share."""
    parser.add_argument("--profile", type=Path, default=None, metavar="P.json",
                        help="a profile from `edgellm profile` (default: the cached one, measured now if missing)")  # fmt: skip
    parser.add_argument("--objective", choices=OBJECTIVES, default="latency",
                        help="latency: decode ms/token; ttft: time to first token; throughput: tokens/s of "
                        "--sessions concurrent sessions, stages pipelined (default: latency)")  # fmt: skip
    parser.add_argument("--max-ppl-increase", type=float, default=math.inf, metavar="PCT",
                        help="the largest perplexity increase allowed, in percent (default: no limit)")  # fmt: skip
    parser.add_argument("--prompt-tokens", type=int, default=None, metavar="N",
                        help="prompt length TTFT is predicted for (default: the profile's)")  # fmt: skip
    parser.add_argument("--sessions", type=int, default=1, metavar="N",
                        help="concurrent sessions to plan memory and throughput for (default: 1)")  # fmt: skip
    parser.add_argument("--lift-device-first", action="store_true",
                        help="allow the device to hold no layer (token ids then leave it); by default it runs the "
                        "embedding, so the raw text stays on it")  # fmt: skip


def plan_request(args: argparse.Namespace) -> Any:
    from edgellm.control.planning import PlanRequest
    from edgellm.errors import ConfigError

    if args.sessions < 1:
        raise ConfigError(f"--sessions must be >= 1, got {args.sessions}")
    if not args.max_ppl_increase >= 0:
        raise ConfigError(f"--max-ppl-increase must be >= 0, got {args.max_ppl_increase}")
    if args.prompt_tokens is not None and args.prompt_tokens < 1:
        raise ConfigError(f"--prompt-tokens must be >= 1, got {args.prompt_tokens}")
    return PlanRequest(args.objective, args.max_ppl_increase, args.prompt_tokens, args.sessions,
                       not args.lift_device_first)  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="choose cuts, schemes, codecs and head side for a deployment",
        description="Find the fastest way to run the model on the topology's nodes: which nodes take part and in "
        "which order, where to cut, the weight scheme of each node, the codec of each hop and where the head "
        "runs, within every node's memory budget and --max-ppl-increase. The search is exact (dynamic "
        "programming over layers and nodes) on the profile's cost model. Prints the plan with its predicted "
        "TTFT and decode ms/token and the constraint that binds; --write writes it as a runnable topology. An "
        "infeasible instance exits with code 2 and one line naming the constraint.",
    )
    parser.add_argument("--topology", required=True, type=Path, metavar="T.toml", help="the nodes and links to plan")
    add_plan_arguments(parser)
    parser.add_argument("--write", type=Path, default=None, metavar="OUT.toml", help="write the planned topology")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgellm.control.planning import obtain_profile, plan_from_profile, plan_report, write_plan
    from edgellm.deploy.topology import load_topology

    request = plan_request(args)
    topology = load_topology(args.topology)
    progress = (lambda _: None) if args.json else (lambda text: print(f"[{text}]", file=sys.stderr, flush=True))
    profile, path, _ = obtain_profile(topology, args.profile, on_progress=progress)
    solution = plan_from_profile(profile, request, topology.mode)
    report = plan_report(topology, profile, solution, request, path)
    if args.write is not None:
        write_plan(topology, solution.plan, args.write)
        report["written"] = str(args.write)
    if args.json:
        print(json.dumps(report))
    else:
        print_plan(report)
    return 0


def print_plan(report: dict[str, Any]) -> None:
    """The plan as a table with its predictions; every emulated quantity next to what it affects."""
    cap = report["max_ppl_increase_pct"]
    print(f"plan for {report['topology']}: objective {report['objective']}, "
          f"max ppl increase {'none' if cap is None else f'{cap}%'}, {report['mode']} mode, head on {report['head']}")  # fmt: skip
    print(f"profile {report['profile']} (measured {report['profile_created']} on {report['machine']['cpu']})")
    print(f"\n{'node':<10} {'role':<7} {'layers':<14} {'scheme':<30} {'memory MB':>10} {'budget':>7}   emulated")
    for n in report["nodes"]:
        parts = [f"{n['layers'][0]}-{n['layers'][1]}"] if n["layers"][1] > n["layers"][0] else []
        parts += [p for p, on in (("embed", n["embed"]), ("head", n["head"])) if on]
        emu = n["emulated"]
        note = f"compute x{emu.get('compute_scale', 1.0):g}" + (
            f" (preset {emu['preset']})" if emu.get("preset") else ""
        )
        budget = "-" if n["budget_mb"] is None else f"{n['budget_mb']}"
        print(f"{n['name']:<10} {n['role']:<7} {'+'.join(parts):<14} {n['scheme']:<30} {n['memory_mb']:>10.0f} "
              f"{budget:>7}   {note}")  # fmt: skip
    print(f"\n{'hop':<20} {'codec':<8} emulated link")
    for link in report["links"]:
        e = link["emulated"]
        print(f"{link['from'] + '->' + link['to']:<20} {link['codec']:<8} {link['profile']}: {e['up_mbps']:g}/"
              f"{e['down_mbps']:g} Mb/s up/down, {e['rtt_ms']:g} ms RTT")  # fmt: skip
    p = report["predicted"]
    print(f"\npredicted: TTFT {p['ttft_ms']:.0f} ms ({p['prompt_tokens']}-token prompt), decode "
          f"{p['decode_ms_per_token']:.1f} ms/token ({p['decode_tok_per_s']:.1f} tok/s), "
          f"ppl +{p['ppl_increase_pct']:.2f}%")  # fmt: skip
    print(f"binding constraint: {report['binding'] or 'none (the unconstrained optimum fits)'}; "
          f"solved in {report['solve_ms']:.1f} ms")  # fmt: skip
    if report.get("written"):
        print(f"wrote {report['written']}")
