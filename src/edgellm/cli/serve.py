"""`edgellm serve`: an OpenAI-compatible HTTP server, with Prometheus metrics and a web chat page, on the device."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

from edgellm.cli.choices import DTYPE_NAMES, ENGINES
from edgellm.cli.generate import add_speculative_arguments, speculative_config
from edgellm.errors import ConfigError
from edgellm.store import DEFAULT_MODEL

# FastAPI, uvicorn and the library (torch, transformers) are imported inside `run`, not here: building the parser
# for `edgellm --help` must stay light (tests/test_cli_light.py).

API_KEY_ENV = "EDGELLM_API_KEY"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000  # edgellm.serve.http.config.DEFAULT_PORT
MODEL_FLAGS = ("model", "quant", "dtype", "threads", "engine")  # set by the topology with --topology

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API, with metrics and a chat page",
        description="Serve OpenAI's /v1/chat/completions, /v1/completions and /v1/models over HTTP, plus /metrics "
        "(Prometheus), /v1/deployment and a web chat page at /. Without --topology the whole model runs in this "
        "process; with it, this process is the topology's device node and the edge nodes must be running "
        '(`edgellm node`). Prints one JSON line {"event": "ready", "url": ...} on stdout once it listens. '
        "See docs/SERVING.md.",
    )
    parser.add_argument("--topology", metavar="T.toml", default=None,
                        help="serve as this deployment's device node (its edge nodes must be running); the model "
                        "flags then come from the file")  # fmt: skip
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port to listen on (default: %(default)s)")
    model = parser.add_argument_group("model (without --topology)")
    model.add_argument("--model", default=None,
                       help=f"registered name, Hugging Face model directory, or .gguf file (default: {DEFAULT_MODEL})")  # fmt: skip
    model.add_argument("--quant", default=None, metavar="SCHEME",
                       help="weight quantization, as `edgellm generate --quant` (default: none)")  # fmt: skip
    model.add_argument("--dtype", choices=list(DTYPE_NAMES), default=None, help="weight precision (default: fp32)")
    model.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    model.add_argument("--engine", choices=ENGINES, default=None,
                       help="what runs the decoder blocks: fast or generic (default: fast)")  # fmt: skip
    adapters = parser.add_argument_group("LoRA adapters")
    adapters.add_argument("--adapters", metavar="DIR", default=None,
                          help="a directory whose subdirectories are peft adapters, each served as a model named "
                          "by its subdirectory (loaded on first use)")  # fmt: skip
    adapters.add_argument("--adapter-budget-mb", type=float, default=None, metavar="N",
                          help="memory the loaded adapters may take together; loading one more unloads the least "
                          "recently used ones no request is using (default: no limit)")  # fmt: skip
    add_speculative_arguments(parser)
    limits = parser.add_argument_group("access and limits")
    limits.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' on /v1, /admin and /metrics (default: ${API_KEY_ENV} "
                        "if set, else no key; / and /health stay open)")  # fmt: skip
    limits.add_argument("--max-concurrent", type=int, default=32, metavar="N",
                        help="generations in flight at once; more are refused with 429 (default: %(default)s)")  # fmt: skip
    limits.add_argument("--max-tokens-default", type=int, default=256, metavar="N",
                        help="new tokens when a request sets no max_tokens, within the context (default: %(default)s)")  # fmt: skip
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgellm.serve.http.config import ServeConfig

    if args.topology is not None:
        given = [f"--{name}" for name in MODEL_FLAGS if getattr(args, name) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} cannot be combined with --topology: the topology sets the model")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    speculative = speculative_config(args)  # a bad value fails before anything loads
    config = ServeConfig(api_key, args.max_concurrent, args.max_tokens_default,
                         speculative=None if speculative is None else speculative.to_json())  # fmt: skip
    sock = _listen(args.host, args.port)  # before loading the model: a taken port fails in a second
    engine = _engine(args)
    if speculative is not None:
        if engine.drafts is None:
            raise ConfigError("this deployment's device has no drafter: --speculative cannot be served")
        engine.drafts.get(speculative.draft)  # loaded now, not on the first request
    import uvicorn

    from edgellm.serve.http.app import create_app
    from edgellm.split.compute_thread import install as install_compute_thread

    app = create_app(engine, config)
    host, port = sock.getsockname()[:2]
    url = f"http://{_url_host(host)}:{port}/"
    if api_key is None and not _is_loopback(args.host):
        log.warning("serving on %s without an API key: anyone who reaches it can use the model", args.host)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    # The socket listens already: connections made from now on wait in its backlog until uvicorn accepts them.
    print(json.dumps({"event": "ready", "url": url, "model": app.state.service.model_id, "auth": api_key is not None}),
          flush=True)  # fmt: skip
    # The HTTP server runs on a side thread; this thread, which loaded the weights, runs every stage computation
    # (edgellm.split.compute_thread: torch is much slower on other threads here). A signal drains the server.
    compute = install_compute_thread()
    stopped = threading.Event()

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            stopped.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    threading.Thread(target=serve_http, name="edgellm-http", daemon=True).start()
    compute.serve(stopped)
    # Stopped (SIGINT/SIGTERM) and drained: exit 0, as `edgellm node` does, skipping interpreter teardown (seconds
    # of module finalization with torch loaded) so the port and the process go promptly.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _engine(args: argparse.Namespace) -> Any:
    from pathlib import Path

    adapters_dir = Path(args.adapters) if args.adapters is not None else None
    if adapters_dir is not None and not adapters_dir.is_dir():
        raise ConfigError(f"--adapters {args.adapters}: not a directory")
    if args.topology is not None:
        from edgellm.deploy.device_engine import topology_device_engine

        return topology_device_engine(args.topology, adapters_dir=adapters_dir,
                                      adapter_budget_mb=args.adapter_budget_mb)  # fmt: skip
    from edgellm.serve.local_device import local_device_engine

    return local_device_engine(
        args.model or DEFAULT_MODEL,
        quant=args.quant or "none",
        dtype=args.dtype or "fp32",
        engine=args.engine or "fast",
        threads=args.threads,
        adapters_dir=adapters_dir,
        adapter_budget_mb=args.adapter_budget_mb,
    )


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port. Raises ConfigError when the port is taken or the host is not ours."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse a port in TIME_WAIT
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} (in use, or not an address of this machine): "
                          f"{exc.strerror}") from exc  # fmt: skip
    return sock


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
