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
from edgellm.cli.dp_options import add_dp_arguments, dp_fields
from edgellm.cli.generate import (
    add_sampling_arguments,
    add_speculative_arguments,
    echo_text,
    print_speculative,
    sampling_from,
    speculative_from,
)
from edgellm.deploy.chart import PLOT_INSTALL, breakdown_chart, plotting_available
from edgellm.net.link import PROFILES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="split inference across local processes, planned, compared with device-only and cloud",
        description="With --plan auto (the default): deploy the paper's situation on this machine (a phone that "
        "cannot hold the full-precision model, two edge servers one 6G hop away, a cloud behind a WAN link; "
        "every emulated setting is printed), or the nodes of --topology; profile it (cached), let the planner "
        "choose cuts, schemes, codecs and head side, and run the plan as node processes over gRPC against two "
        "baselines: every layer on the device at the best scheme that fits it, and every layer on the cloud. "
        "--switch-link changes a link's emulated profile mid-answer: the device re-plans and migrates live. "
        "With --plan manual: a device and --hops edge nodes with even cuts over --profile links (the layout of "
        "edgellm 0.1). Prints predicted and measured TTFT and decode speed, a per-token latency breakdown and "
        "bytes per link, writes a PNG chart, and stops every process it started (also on Ctrl-C).",
    )
    parser.add_argument("prompt", nargs="?", default=DEMO_PROMPT, metavar="PROMPT",
                        help="the question (default: a built-in one); the chat template is always applied")  # fmt: skip
    parser.add_argument("--plan", choices=["auto", "manual"], default="auto",
                        help="auto: the planner chooses the split (default); manual: --hops/--profile/--codec/--head")  # fmt: skip
    parser.add_argument("--topology", type=Path, default=None, metavar="T.toml",
                        help="auto: the nodes and links to plan over, all on loopback (default: the paper topology)")  # fmt: skip
    parser.add_argument("--objective", choices=["latency", "ttft", "throughput"], default="latency",
                        help="auto: what the planner minimizes (default: latency, i.e. decode ms/token)")  # fmt: skip
    parser.add_argument("--max-ppl-increase", type=float, default=0.0, metavar="PCT",
                        help="auto: largest perplexity increase the split may cost, in percent (default: 0, "
                        "lossless: the split's tokens equal the whole model's)")  # fmt: skip
    parser.add_argument("--switch-link", default=None, metavar="A-B=PROFILE",
                        help=f"auto: after --switch-after tokens, emulate link A-B with PROFILE ({'|'.join(sorted(PROFILES))})")  # fmt: skip
    parser.add_argument(
        "--switch-after", type=int, default=16, metavar="N", help="auto: tokens before the switch (default: 16)"
    )
    parser.add_argument("--no-replan", action="store_true", help="auto: do not re-plan after a --switch-link")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="6g", help="manual: link profile (default: 6g)")
    parser.add_argument("--hops", type=int, default=2, help="manual: number of edge nodes in the chain (default: 2)")
    parser.add_argument("--codec", default="fp16",
                        help="manual: smashed-data codec: none|fp16|bf16|int8|int8mu, optionally +zstd or +lz4 (default: fp16)")  # fmt: skip
    parser.add_argument("--head", choices=["device", "server"], default="device",
                        help="manual: where the final norm + LM head run (default: device)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="stop after N tokens (default: 48)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per node (default: auto: each node preset's; manual: 2)")  # fmt: skip
    parser.add_argument("--chart", type=Path, default=Path("edgellm-demo.png"),
                        help="where to write the latency chart (default: ./edgellm-demo.png)")  # fmt: skip
    add_sampling_arguments(parser)
    add_speculative_arguments(parser)
    add_dp_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text and tables")
    parser.set_defaults(run=run)


def parse_switch(text: str | None) -> tuple[str, str, str] | None:
    """`"phone-edge1=lte"` -> `("phone", "edge1", "lte")`."""
    from edgellm.errors import ConfigError

    if text is None:
        return None
    pair, eq, profile = text.partition("=")
    a, dash, b = pair.partition("-")
    if not (eq and dash and a and b and profile):
        raise ConfigError(f"--switch-link must look like NODE-NODE=PROFILE (e.g. phone-edge1=lte), got {text!r}")
    return a, b, profile


def run(args: argparse.Namespace) -> int:
    sampling = sampling_from(args)
    speculative = speculative_from(args)
    dp = dp_fields(args)  # the split scenario's device applies it; the baselines send no smashed data
    if args.plan == "auto":
        from edgellm.control.demo import StoryConfig

        story = StoryConfig(args.prompt, args.max_new_tokens, sampling, args.threads, args.topology, args.objective,
                            args.max_ppl_increase, parse_switch(args.switch_link), args.switch_after,
                            not args.no_replan, speculative=speculative, dp=dp)  # fmt: skip
        return _guarded(args, lambda on_text, on_phase: _run_story(args, story, on_text, on_phase))
    from edgellm.deploy.demo_scenarios import DemoConfig  # heavy (torch): not at import, for --help

    cfg = DemoConfig(args.prompt, args.profile, args.hops, args.codec, args.head, args.max_new_tokens, sampling,
                     threads=args.threads or 2, speculative=speculative, dp=dp)  # fmt: skip
    return _guarded(args, lambda on_text, on_phase: _run_manual(args, cfg, on_text, on_phase))


def _guarded(args: argparse.Namespace, body: Any) -> int:
    """Run a demo body with Ctrl-C and SIGTERM unwinding it (so its nodes are stopped either way)."""
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
        print(f"Q: {args.prompt}\n")

    def on_phase(text: str) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        if not quiet:
            print(f"\n[{text}]", file=sys.stderr, flush=True)

    code = int(body(None if quiet else echo_text, on_phase))
    if interrupted.is_set():
        raise KeyboardInterrupt
    return code


def _run_story(args: argparse.Namespace, story: Any, on_text: Any, on_phase: Any) -> int:
    from edgellm.cli.demo_story import print_story, story_chart
    from edgellm.control.demo import run_story

    report = run_story(story, on_text=on_text, on_phase=on_phase)
    return _finish(args, report, lambda: story_chart(report, args.chart), print_story)


def _run_manual(args: argparse.Namespace, cfg: Any, on_text: Any, on_phase: Any) -> int:
    from edgellm.deploy.demo_scenarios import run_demo

    report = run_demo(cfg, on_text=on_text, on_phase=on_phase)
    title = f"{cfg.hops}-hop split over {cfg.profile} ({cfg.codec}, head on {cfg.head}) vs device only vs cloud (wan)"
    return _finish(args, report, lambda: breakdown_chart(report["breakdown"], args.chart, title), print_breakdown)


def _finish(args: argparse.Namespace, report: dict[str, Any], draw: Any, show: Any) -> int:
    """Draw the chart (matplotlib is the optional `plot` extra), then print the report as JSON or tables."""
    drawn = plotting_available()
    report["chart"] = str(draw()) if drawn else None
    if args.json:
        print(json.dumps(report))
    else:
        print()
        show(report)
        _print_drafting(report)
    if not drawn:
        print(f"chart skipped: matplotlib is not installed ({PLOT_INSTALL})", file=sys.stderr, flush=True)
    return 0


def _print_drafting(report: dict[str, Any]) -> None:
    """One line per scenario that drafted (`--speculative`)."""
    scenarios = report.get("scenarios") or {"split": report, **report.get("baselines", {})}
    for name, run in scenarios.items():
        if isinstance(run, dict) and run.get("speculative"):
            print(f"{name}: ", end="")
            print_speculative(run)


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
