"""`edgellm cache apply`: realise placements on real cache nodes, route requests to them, follow popularity."""

from __future__ import annotations

import argparse
import json
import tempfile
import tomllib
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "apply",
        help="run real cache nodes: place variants by shared blocks, route requests, migrate as popularity shifts",
        description="Publish the config's model variants (base models and LoRA variants) as blocks into an origin "
        "store, start a cloud node on it and one cache node per edge server (processes on this machine, each with "
        "its storage budget), then for each phase: compute the placement of the phase's popularity, make the "
        "nodes fetch (from peers, then the cloud, over their emulated backhaul) and evict blocks to realise it "
        "while a generation that loses its variant keeps running, and route the phase's requests to a node in "
        "reach holding the variant (else the cloud), checking each answer's tokens against the cloud's. "
        "Config format: docs/CACHING.md (example: examples/caching/apply.toml).",
    )
    parser.add_argument("--config", required=True, type=Path, metavar="C.toml", help="variants, servers, users, phases")
    parser.add_argument(
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="the origin and node stores, adapters and node logs (default: a temporary folder, removed after)",
    )
    parser.add_argument("--algorithm", help="placement algorithm, overriding the config's")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="default: %(default)s")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the whole report)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from edgellm.control.cache_apply import apply
    from edgellm.control.cache_apply_config import apply_config
    from edgellm.errors import ConfigError
    from edgellm.placement.algorithms import algorithm

    try:
        data = tomllib.loads(args.config.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {args.config}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{args.config} is not valid TOML: {exc}") from None
    try:
        config = apply_config(data, args.config.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    if args.algorithm:
        config = dataclasses.replace(config, algorithm=args.algorithm)
    algorithm(config.algorithm)  # an unknown name fails before any node starts
    on_phase = None if args.json else _print_phase
    if args.work_dir is not None:
        report = apply(config, args.work_dir, on_phase, args.dtype)
    else:
        with tempfile.TemporaryDirectory(prefix="edgellm-cache-apply-") as tmp:
            report = apply(config, Path(tmp), on_phase, args.dtype)
    if args.json:
        print(json.dumps(report))
    else:
        _print_summary(report)
    failures = sum(len(p["requests"]) - p["tokens_equal_origin"] for p in report["phases"])
    return 0 if failures == 0 else 1


def _mb(n: int | None) -> str:
    from edgellm.store.inventory import human_bytes

    return "unbounded" if n is None else human_bytes(n)


def _print_phase(p: dict[str, Any]) -> None:
    print(f"phase {p['phase']}: popularity {', '.join(p['popularity'])} (Zipf {p['zipf']})")
    for node, variants in p["placement"].items():
        sync = p["sync"][node]
        fetched = ", ".join(f"{_mb(b)} from {src}" for src, b in sync["fetched_bytes"].items()) or "nothing"
        print(f"  {node:<10} holds {', '.join(variants) or '-':<40} fetched {fetched}; evicted "
              f"{_mb(sync['evicted_bytes'])}, deferred {_mb(sync['deferred_bytes'])}; {sync['seconds']:.1f} s")  # fmt: skip
    carried = p["carried_session"]
    if carried:
        print(f"  a generation of {carried['variant']} on {carried['node']} ran through the sync: "
              f"{carried['tokens']} tokens, equal to the origin's: {carried['tokens_equal_origin']}")  # fmt: skip
    n = len(p["requests"])
    print(f"  requests: {p['served_at_edge']}/{n} served at the edge (predicted hit ratio "
          f"{p['predicted_hit_ratio']:.2f}), {p['served_by_cloud']} by the cloud; tokens equal to the origin's: "
          f"{p['tokens_equal_origin']}/{n}")  # fmt: skip


def _print_summary(report: dict[str, Any]) -> None:
    print("stores at the end (bytes on disk vs the same variants stored whole):")
    for node, s in report["stores"].items():
        print(f"  {node:<10} {_mb(s['used_bytes']):>10} of {_mb(s['budget_bytes'])}; stored whole: "
              f"{_mb(s['independent_bytes'])}")  # fmt: skip
    for key, text in report["emulation"].items():
        print(f"emulated ({key}): {text}")
