"""`edgellm cache node`: run an edge cache node (a block store that serves the model variants it holds)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "node",
        help="run an edge cache node: a block store under a storage budget serving the variants it holds",
        description="Serve a block store over gRPC until SIGINT/SIGTERM: peers and `edgellm cache apply` tell it "
        "which model variants to hold (it fetches their blocks from peers or the origin, each checked against "
        "its SHA-256, and evicts the rest), and it answers Generate for the variants it holds. Prints one JSON "
        'line {"event": "ready", ...} on stdout once it accepts requests. docs/CACHING.md.',
    )
    parser.add_argument("--name", required=True, help="the node's name (in reports and errors)")
    parser.add_argument("--store", required=True, type=Path, metavar="DIR", help="its block store (created if new)")
    parser.add_argument(
        "--storage-mb", type=float, metavar="MB", help="the store's budget in MB (10^6 bytes); default: unbounded"
    )
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT", help="default: %(default)s")
    parser.add_argument(
        "--token-env",
        default="EDGELLM_TOKEN",
        metavar="VAR",
        help="environment variable holding the shared token every call must carry (default: %(default)s; "
        "unset: no token is asked, allowed on loopback only)",
    )
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="default: %(default)s")
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads (default: torch's)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgellm.deploy.cache_node import CacheNode, open_store, run_cache_node
    from edgellm.deploy.specs import is_loopback
    from edgellm.errors import ConfigError
    from edgellm.net.rpc import ChannelConfig

    token = os.environ.get(args.token_env, "").strip() or None
    host = args.listen.rsplit(":", 1)[0]
    if token is None and not is_loopback(host):
        raise ConfigError(f"--listen {args.listen} is off loopback: set {args.token_env} to the deployment's token")
    node = CacheNode(args.name, open_store(args.store, args.storage_mb), ChannelConfig(token=token),
                     dtype=args.dtype, threads=args.threads)  # fmt: skip
    code = run_cache_node(node, args.listen, on_ready=lambda e: print(json.dumps(e), flush=True))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as `edgellm node`: skip seconds of interpreter teardown with torch loaded
