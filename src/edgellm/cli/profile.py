"""`edgellm profile`: measure a deployment's nodes and links for the planner, into a versioned JSON profile."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_SCHEMES = ("none", "int8", "int4-g32,head=int8,embed=int8")  # edgellm.control.profiler.DEFAULT_SCHEMES
DEFAULT_CODECS = ("none", "fp16", "int8", "int8mu")  # edgellm.control.profiler.DEFAULT_CODECS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="measure a deployment's nodes and links for the planner",
        description="Reach the nodes of a topology (or, when none answers, start them all on this machine) and "
        "measure what `edgellm plan` needs: per node, the decode and prefill time of a decoder layer, the "
        "embedding and the head at each weight scheme, scaled by the node's emulated compute_scale, and memory "
        "per layer; per link, echo probes of several sizes through the real transport and its emulation, one "
        "line fitted per direction; per model, KV bytes per token and the perplexity cost of each scheme and "
        "codec. The profile is reused until the topology's nodes or links, the model or edgellm's code change.",
    )
    parser.add_argument("--topology", required=True, type=Path, metavar="T.toml", help="the deployment to profile")
    parser.add_argument("--output", type=Path, default=None, metavar="P.json",
                        help="where to write the profile (default: edgellm's cache, keyed by topology, model and code)")  # fmt: skip
    parser.add_argument("--scheme", action="append", default=None, metavar="Q",
                        help=f"a weight scheme to measure; repeat for several (default: {', '.join(DEFAULT_SCHEMES)})")  # fmt: skip
    parser.add_argument("--codec", action="append", default=None, metavar="C",
                        help=f"a smashed-data codec to cost; repeat for several (default: {', '.join(DEFAULT_CODECS)})")  # fmt: skip
    parser.add_argument("--prompt-tokens", type=int, default=64, metavar="N",
                        help="prompt length prefill is timed at (default: 64)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="measure again even when a valid profile exists")
    parser.add_argument("--json", action="store_true", help="print the profile as JSON instead of a summary")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgellm.control.planning import obtain_profile
    from edgellm.deploy.topology import load_topology
    from edgellm.errors import ConfigError

    if args.prompt_tokens < 1:
        raise ConfigError(f"--prompt-tokens must be >= 1, got {args.prompt_tokens}")
    topology = load_topology(args.topology)
    progress = (lambda _: None) if args.json else (lambda text: print(f"[{text}]", file=sys.stderr, flush=True))
    profile, path, fresh = obtain_profile(
        topology, args.output, args.force, progress,
        schemes=tuple(args.scheme or DEFAULT_SCHEMES), codecs=tuple(args.codec or DEFAULT_CODECS),
        prompt_tokens=args.prompt_tokens,
    )  # fmt: skip
    if args.json:
        print(json.dumps(profile))
        return 0
    state = f"measured in {profile['seconds']:.0f} s" if fresh else f"reused (measured {profile['created']})"
    print(f"profile {path}: {state}")
    print_profile(profile)
    return 0


def print_profile(profile: dict[str, Any]) -> None:
    """Nodes (per scheme), links (fitted) and quality, as tables."""
    print(f"machine: {profile['machine']['cpu']}, {profile['machine']['cores']} cores")
    print(
        f"\n{'node':<10} {'scheme':<30} {'layer ms':>9} {'prefill ms/tok':>15} {'head ms':>8} {'layer MB':>9}   emulated"
    )
    for name, node in profile["nodes"].items():
        emu = node.get("emulated", {})
        note = f"compute x{emu.get('compute_scale', 1.0):g}, memory {emu.get('memory_mb') or 'unlimited'} MB"
        for row in node["schemes"]:
            print(f"{name:<10} {row['name']:<30} {row['layer_decode_ms']:>9.3f} {row['layer_prefill_ms_per_token']:>15.4f} "
                  f"{row['head_decode_ms']:>8.3f} {row['layer_bytes'] / 1e6:>9.2f}   {note}")  # fmt: skip
    print(f"\n{'link':<20} {'fixed ms':>9} {'up Mb/s':>9} {'down Mb/s':>10}   emulated profile")
    for link in profile["links"]:
        up = 8e-3 / link["up_ms_per_byte"] if link["up_ms_per_byte"] > 0 else float("inf")
        down = 8e-3 / link["down_ms_per_byte"] if link["down_ms_per_byte"] > 0 else float("inf")
        fixed = link["up_fixed_ms"] + link["down_fixed_ms"]
        print(f"{link['a'] + '->' + link['b']:<20} {fixed:>9.2f} {up:>9.0f} {down:>10.0f}   {link['profile']}")
    q = profile["quality"]
    schemes = ", ".join(f"{k} +{v:.2f}%" for k, v in q["schemes"].items())
    codecs = ", ".join(f"{k} +{v:.3f}%" for k, v in q["codecs"].items())
    print(f"\nperplexity on {q['text']} (base {q['base_ppl']:.3f}): weights {schemes}; smashed data (one cut) {codecs}")
