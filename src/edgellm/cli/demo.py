"""`edgellm demo`: the main job. A device and edge nodes as processes on loopback, against two baselines."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from edgellm.cli.choices import DEMO_PROMPT
from edgellm.cli.generate import add_sampling_arguments, echo_text, sampling_from
from edgellm.deploy.chart import PLOT_INSTALL, breakdown_chart, plotting_available
from edgellm.net.link import PROFILES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="split inference across local processes, compared with device-only and cloud",
        description="Start a device and --hops edge nodes as separate processes on loopback, connected over "
        "gRPC through emulated --profile links; stream a chat answer from the default model; then run the same "
        "prompt with all layers on the device and with all layers on a cloud node over the wan profile. Prints "
        "a per-token latency breakdown and bytes per link, writes it as a PNG chart, and stops every process it "
        "started (also on Ctrl-C).",
    )
    parser.add_argument("prompt", nargs="?", default=DEMO_PROMPT, metavar="PROMPT",
                        help="the question (default: a built-in one); the chat template is always applied")  # fmt: skip
    parser.add_argument("--profile", choices=sorted(PROFILES), default="6g", help="link profile (default: 6g)")
    parser.add_argument("--hops", type=int, default=2, help="number of edge nodes in the chain (default: 2)")
    parser.add_argument("--codec", default="fp16",
                        help="smashed-data codec: none|fp16|bf16|int8|int8mu, optionally +zstd or +lz4 (default: fp16)")  # fmt: skip
    parser.add_argument("--head", choices=["device", "server"], default="device",
                        help="where the final norm + LM head run (default: device)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="stop after N tokens (default: 48)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per node (default: 2)")
    parser.add_argument("--chart", type=Path, default=Path("edgellm-demo.png"),
                        help="where to write the latency chart (default: ./edgellm-demo.png)")  # fmt: skip
    add_sampling_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text and tables")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edgellm.deploy.demo_scenarios import DemoConfig, run_demo  # heavy (torch): not at import, for --help

    sampling = sampling_from(args)
    cfg = DemoConfig(args.prompt, args.profile, args.hops, args.codec, args.head, args.max_new_tokens, sampling,
                     threads=args.threads)  # fmt: skip
    # SIGTERM unwinds like Ctrl-C, so the nodes started below are stopped either way. The flag catches an
    # interrupt that lands inside a gRPC wait, which may end the call quietly instead of raising.
    interrupted = threading.Event()

    def on_signal(*_: Any) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    quiet = args.json
    if not quiet:
        print(f"Q: {cfg.prompt}\n")

    def on_phase(text: str) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        if not quiet:
            print(f"\n[{text}]", file=sys.stderr, flush=True)

    report = run_demo(cfg, on_text=None if quiet else echo_text, on_phase=on_phase)
    if interrupted.is_set():
        raise KeyboardInterrupt
    title = f"{cfg.hops}-hop split over {cfg.profile} ({cfg.codec}, head on {cfg.head}) vs device only vs cloud (wan)"
    drawn = plotting_available()  # matplotlib is the optional `plot` extra
    report["chart"] = str(breakdown_chart(report["breakdown"], args.chart, title)) if drawn else None
    if quiet:
        print(json.dumps(report))
    else:
        print()
        print_breakdown(report)
    if not drawn:
        print(f"chart skipped: matplotlib is not installed ({PLOT_INSTALL})", file=sys.stderr, flush=True)
    return 0


def print_breakdown(report: dict[str, Any]) -> None:
    rows = [
        ("split", report),
        ("device_only", report["baselines"]["device_only"]),
        ("cloud", report["baselines"]["cloud"]),
    ]
    print(f"\n{'scenario':<12} {'TTFT ms':>8} {'tok/s':>7} {'ms/token':>9}   breakdown per decoded token")
    for name, r in rows:
        parts = report["breakdown"][name]
        detail = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if k != "total")
        print(f"{name:<12} {r['ttft_ms']:>8.0f} {r['decode_tok_per_s']:>7.1f} {parts['total']:>9.1f}   {detail}")
    print(f"\n{'link':<18} {'B/token up':>11} {'B/token down':>13} {'wire ms/token':>14}")
    for name, r in rows:
        for link in r.get("links", []):
            up, down, wire = (
                link.get("bytes_up_per_token"),
                link.get("bytes_down_per_token"),
                link.get("wire_ms_per_token"),
            )
            label = f"{link['from']}->{link['to']}"
            print(f"{label:<18} {_num(up):>11} {_num(down):>13} {_num(wire, 2):>14}   ({name})")
    if report["chart"] is not None:
        print(f"\nchart: {report['chart']}")


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
