"""`edgellm cache [info] | clean`: what edgellm keeps on disk, by kind, and freeing it."""

from __future__ import annotations

import argparse
import json
import time

from edgellm.cli import cache_apply, cache_node, cache_simulate
from edgellm.errors import ConfigError
from edgellm.store.inventory import KINDS, REBUILT, clean_targets, human_bytes, parse_kinds, scan_cache, sections
from edgellm.store.paths import home
from edgellm.store.removal import cache_folders, removal_refusal, remove_entry

_KIND_HELP = {
    "models": "converted models (see `edgellm models list`; removed only when named)",
    "quant": "quantized stages, one folder per model",
    "profiles": "measured node, link, compute and perplexity profiles",
    "kernels": "native kernels compiled for this CPU",
    "checkpoints": "training checkpoints of server nodes started on their own",
    "partial": "leftovers of interrupted pulls and conversions",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="show what edgellm keeps on disk and free space",
        description="edgellm keeps models, quantized stages, profiles, compiled kernels and server-side training "
        "checkpoints under one folder ($EDGELLM_HOME, else $XDG_CACHE_HOME/edgellm, else ~/.cache/edgellm). "
        "`edgellm cache` (or `cache info`) shows each kind's size; `cache clean` frees space.",
    )
    parser.set_defaults(run=run_info, json=False)
    sub = parser.add_subparsers(dest="cache_command", metavar="ACTION")
    p_info = sub.add_parser("info", help="each kind of cached file, its count and size (the default action)")
    p_info.add_argument("--json", action="store_true", help="print one JSON object")
    p_info.set_defaults(run=run_info)
    p_clean = sub.add_parser(
        "clean",
        help="remove cached files of the kinds given",
        description="Remove cached files. Without --what: what edgellm rebuilds by itself when it needs it "
        f"({', '.join(REBUILT)}); --what all adds checkpoints; models are removed only with --what models (or "
        "one by one with `edgellm models rm`). Leftovers changed in the last hour are kept: a pull may still "
        "be writing them.",
    )
    p_clean.add_argument(
        "--what",
        action="append",
        metavar="KIND",
        help=f"{'|'.join([*KINDS, 'all'])}; repeat or separate with commas (default: {','.join(REBUILT)})",
    )
    p_clean.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    p_clean.add_argument("--json", action="store_true", help="print one JSON object")
    p_clean.set_defaults(run=run_clean)
    cache_simulate.add_parser(sub)
    cache_node.add_parser(sub)
    cache_apply.add_parser(sub)


def run_info(args: argparse.Namespace) -> int:
    scan = scan_cache()
    kinds = {kind: (len(entries), sum(e.size_bytes for e in entries)) for kind, entries in sections(scan).items()}
    other = sum(e.size_bytes for e in scan.other)
    total = sum(size for _, size in kinds.values()) + other
    if args.json:
        print(json.dumps({
            "home": str(scan.home), "total_bytes": total, "other_bytes": other,
            "kinds": {k: {"entries": n, "size_bytes": size} for k, (n, size) in kinds.items()},
        }))  # fmt: skip
        return 0
    print(f"cache: {scan.home}")
    for kind, (count, size) in kinds.items():
        print(f"  {kind:<12} {count:>4} {human_bytes(size):>9}  {_KIND_HELP[kind]}")
    if scan.other:
        print(f"  {'other':<12} {len(scan.other):>4} {human_bytes(other):>9}  not edgellm's: never removed")
    print(f"  {'total':<12} {'':>4} {human_bytes(total):>9}")
    return 0


def run_clean(args: argparse.Namespace) -> int:
    try:
        kinds = parse_kinds(args.what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    roots = cache_folders()
    targets, kept = clean_targets(scan_cache(), kinds, time.time())
    refused = [(e, reason) for _, e in targets if (reason := removal_refusal(e.path, roots)) is not None]
    chosen = [(k, e) for k, e in targets if all(e is not r for r, _ in refused)]
    total = sum(entry.size_bytes for _, entry in chosen)
    if not args.dry_run:
        for _, entry in chosen:
            remove_entry(entry.path, roots)
    if args.json:
        print(json.dumps({
            "home": str(home()), "kinds": list(kinds), "dry_run": args.dry_run, "freed_bytes": total,
            "removed": [{"kind": k, "path": str(e.path), "size_bytes": e.size_bytes} for k, e in chosen],
            "kept": [str(e.path) for e in kept], "refused": [reason for _, reason in refused],
        }))  # fmt: skip
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for kind, entry in chosen:
        print(f"{verb:<12} {kind:<12} {human_bytes(entry.size_bytes):>9}  {entry.path}")
    for entry in kept:
        print(
            f"{'kept':<12} {'partial':<12} {human_bytes(entry.size_bytes):>9}  {entry.path} (changed in the last hour)"
        )
    for _, reason in refused:
        print(f"{'kept':<12} {reason}")
    summary = "would free" if args.dry_run else "freed"
    print(f"{summary} {human_bytes(total)} ({', '.join(kinds)}) in {home()}")
    return 0
