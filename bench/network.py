"""Split inference across processes: the cost of the process boundary, bytes on the wire, emulated links.

Every deployment is started with `edgellm.deploy.launch.LocalDeployment` (one `edgellm node` process per
node, on loopback, gRPC) from a topology built as `edgellm.deploy.demo` builds its own, and generates through
its device node, greedily, from the same chat prompt. TTFT and decode tok/s are those the device node reports
(its `Generator`, as in one process); this process only sends the prompt and reads the stream.

a) process split: device + 2 edge nodes in a chain (cuts at L/3 and 2L/3: 10,20 for the default model), head
   on the device, link profile `none`, codec `none`; against the same cuts in this process (the engine of
   `edgellm generate`), same threads. One warm-up each, then `--repeats` runs taking turns; medians, ratio.
b) bytes on the wire per decoded token, per link and direction, for each codec in `--codecs` (a deployment
   per codec, profile `none`, `--short-tokens`): the device report's `links[*].bytes_up_per_token` and
   `bytes_down_per_token`, whole encoded frames (tensor payload, int8 scales, message header). Codec `none`
   reuses part a's deployment and part c's codec reuses part c's (bytes do not depend on the link profile).
c) per link profile in `--profiles`: on-device (every layer in this process; no network, so one measurement
   serves every profile), split (as in a, every link on the profile, codec `--profile-codec`) and cloud (the
   device holds no layer, `cuts = [0]`: one cloud node runs the whole model and the head behind one link on
   the profile, as `edgellm.deploy.demo.cloud_document`). One warm-up of 2 tokens per deployment, then
   `--profile-repeats` runs of `--short-tokens`.

Generations stop at the model's end-of-sequence token, as in any deployment; the tables show how many tokens
each run produced (the default prompt asks for a long answer).
"""

# ruff: noqa: E402  (the imports follow the OMP_WAIT_POLICY setting on purpose)

from __future__ import annotations

import os

# Set before torch loads libgomp, which reads it once. The node processes get PASSIVE from the launcher
# (idle stages must not spin on the cores the busy one needs); this process runs the one-process baselines,
# so it gets the same, and passes it on to the nodes (override it in the environment).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from report import PROMPT, load_average, machine_info, markdown_table, median, same_prefix, write_json

from edgellm.deploy.demo import DemoConfig, cloud_document, per_token_breakdown, split_document
from edgellm.deploy.launch import LocalDeployment
from edgellm.deploy.node import channel_config
from edgellm.deploy.topology import write_topology
from edgellm.errors import EdgellmError
from edgellm.net.codec import bytes_per_token, parse_codec
from edgellm.net.link import PROFILES
from edgellm.net.rpc import RemoteHop
from edgellm.serve.generate import LocalSplitConfig, PromptConfig, generate_text, load_split
from edgellm.store import DEFAULT_MODEL, resolve_model
from edgellm.store.weights import load_config

CODECS = ("none", "fp16", "bf16", "int8", "int8+zstd", "fp16+lz4")
LINK_PROFILES = ("6g", "5g", "wifi6", "lte", "wan")
INT8_UP_TARGET_BYTES = 640
STOP_GRACE_S = 15.0  # SIGTERM to SIGKILL; a node takes seconds to exit on a busy machine
Generate = Callable[[int], dict[str, Any]]  # max_new_tokens -> the device's report


def log(text: str) -> None:
    print(f"[network] {text}", file=sys.stderr, flush=True)


class Bench:
    """The settings and scratch directory shared by every deployment of a run."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.token_file = work / "token"
        self.token_file.write_text(secrets.token_hex(16))
        os.chmod(self.token_file, 0o600)
        config = load_config(resolve_model(args.model))
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.startups: list[dict[str, Any]] = []
        self.stoppers: list[threading.Thread] = []

    def demo_config(self, profile: str = "none", codec: str = "none") -> DemoConfig:
        a = self.args
        return DemoConfig(
            prompt=a.prompt,
            profile=profile,
            hops=2,
            codec=codec,
            head="device",
            model=a.model,
            threads=a.threads,
            cloud_profile=profile,
        )

    def split(self, profile: str, codec: str) -> dict[str, Any]:
        """Device + 2 edge nodes in a chain, head on the device, every link on `profile` with `codec`."""
        return split_document(self.demo_config(profile, codec), self.num_layers, self.token_file)

    def cloud(self, profile: str) -> dict[str, Any]:
        """The device holds no layer; one cloud node runs everything behind one `profile` link."""
        return cloud_document(self.demo_config(profile), self.token_file)

    def request(self, max_new_tokens: int) -> dict[str, Any]:
        return {"prompt": self.args.prompt, "chat": True, "max_new_tokens": max_new_tokens, "greedy": True}

    @contextlib.contextmanager
    def deployed(self, name: str, document: dict[str, Any]) -> Iterator[Generate]:
        """Start the nodes of `document`; yield a function that generates through its device; stop them.

        The nodes are stopped in the background (a node takes seconds to exit: interpreter teardown),
        overlapping the next deployment's start-up; every earlier deployment is gone before this one is
        measured.
        """
        path = self.work / f"{name}.toml"
        topology = write_topology(path, document)
        log_dir = self.work / name
        log_dir.mkdir()
        start = time.perf_counter()
        deployment = LocalDeployment(topology, path, log_dir)
        try:
            deployment.start()
            up_s = time.perf_counter() - start
            self.wait_stopped()
            self.startups.append(
                {"deployment": name, "nodes": len(topology.route), "startup_s": round(up_s, 2)}
            )
            log(f"{name}: {len(topology.route)} nodes up in {up_s:.1f} s")
            device = topology.device
            assert device.address is not None
            hop = RemoteHop(device.name, device.address, channel_config(topology), sender="bench")

            def generate(max_new_tokens: int) -> dict[str, Any]:
                report: dict[str, Any] = {}
                for event in hop.generate(self.request(max_new_tokens)):
                    report = event.get("report", report)
                return report

            try:
                yield generate
            finally:
                hop.shutdown()
        except BaseException:
            deployment.stop()
            raise
        # A generous grace: the next start-up takes longer anyway, and nodes then exit on their own.
        stopper = threading.Thread(
            target=deployment.stop, kwargs={"grace_s": STOP_GRACE_S}, name=f"stop-{name}"
        )
        stopper.start()
        self.stoppers.append(stopper)

    def wait_stopped(self) -> None:
        """Wait until every deployment stopped in the background has exited."""
        for stopper in self.stoppers:
            stopper.join()
        self.stoppers.clear()

    def local(self, cuts: tuple[int, ...]) -> Generate:
        """The same model in this process (`edgellm generate`'s engine), cut at `cuts`, head on the device."""
        a = self.args
        loaded = load_split(
            LocalSplitConfig(a.model, cuts, "device" if cuts else "server", "fp32", a.threads)
        )
        return lambda n: generate_text(loaded, a.prompt, PromptConfig(chat=True, max_new_tokens=n))


def timing(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one run worth keeping (the full reports are large)."""
    return {
        "ttft_ms": report["ttft_ms"],
        "decode_tok_per_s": report["decode_tok_per_s"],
        "tokens": len(report["new_tokens"]),
        "new_tokens": report["new_tokens"],
        "links": report.get("links", []),
        "breakdown_ms_per_token": per_token_breakdown(_with_nodes(report)),
    }


def _with_nodes(report: dict[str, Any]) -> dict[str, Any]:
    # An in-process report has stages, not nodes: count them all as the device's compute.
    if "nodes" in report:
        return report
    per_token = sum(s.get("compute_ms_per_token") or 0.0 for s in report.get("stages", []))
    return {**report, "nodes": [{"name": "device", "compute_ms_per_token": per_token}], "links": []}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "ttft_ms": median([r["ttft_ms"] for r in runs]),
        "decode_tok_per_s": median([r["decode_tok_per_s"] for r in runs]),
        "tokens": min(r["tokens"] for r in runs),
        "runs": runs,
    }


def part_process(bench: Bench, results: dict[str, Any]) -> None:
    """a) 3 processes on loopback vs one process, same cuts, same threads."""
    a = bench.args
    document = bench.split("none", "none")
    cuts = tuple(document["model"]["cuts"])
    log(f"process split: loading cuts {cuts} in this process")
    local = bench.local(cuts)
    remote_runs: list[dict[str, Any]] = []
    local_runs: list[dict[str, Any]] = []
    with bench.deployed("process-split", document) as remote:
        remote(a.tokens)  # warm-up
        local(a.tokens)
        for repeat in range(a.repeats):
            pair = [(remote, remote_runs, "3 processes"), (local, local_runs, "1 process")]
            for generate, runs, label in pair if repeat % 2 == 0 else pair[::-1]:  # ABBA against drift
                runs.append(timing(generate(a.tokens)))
                log(
                    f"run {repeat + 1}/{a.repeats} {label}: TTFT {runs[-1]['ttft_ms']:.0f} ms, "
                    f"{runs[-1]['decode_tok_per_s']:.1f} tok/s, {runs[-1]['tokens']} tokens"
                )
    remote_sum, local_sum = summary(remote_runs), summary(local_runs)
    results["process"] = {
        "cuts": list(cuts),
        "head": "device",
        "profile": "none",
        "codec": "none",
        "three_processes": remote_sum,
        "one_process": local_sum,
        "decode_ratio": remote_sum["decode_tok_per_s"] / local_sum["decode_tok_per_s"],
        "ttft_ratio": remote_sum["ttft_ms"] / local_sum["ttft_ms"],
        "same_tokens": same_prefix(remote_runs[-1]["new_tokens"], local_runs[-1]["new_tokens"]),
    }
    results["codec_runs"]["none"] = {"profile": "none", **remote_runs[-1]}


def deploy_and_run(bench: Bench, name: str, document: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Start a deployment, warm it up with 2 tokens, run `repeats` generations of `--short-tokens`."""
    runs = []
    with bench.deployed(name, document) as generate:
        generate(2)
        for _ in range(repeats):
            runs.append(timing(generate(bench.args.short_tokens)))
            log(
                f"{name}: TTFT {runs[-1]['ttft_ms']:.0f} ms, {runs[-1]['decode_tok_per_s']:.1f} tok/s, "
                f"{runs[-1]['tokens']} tokens"
            )
    return summary(runs)


def part_profiles(bench: Bench, results: dict[str, Any]) -> None:
    """c) on-device, split and cloud per link profile."""
    a = bench.args
    log("on-device: every layer in this process")
    alone = bench.local(())
    bench.wait_stopped()  # no node of an earlier deployment may still be exiting while this one computes
    alone(2)
    on_device = summary([timing(alone(a.short_tokens)) for _ in range(a.profile_repeats)])
    rows = []
    for profile in a.profiles:
        row: dict[str, Any] = {"profile": profile, "on_device": on_device}
        for kind, document in (
            ("split", bench.split(profile, a.profile_codec)),
            ("cloud", bench.cloud(profile)),
        ):
            try:
                row[kind] = deploy_and_run(bench, f"{kind}-{profile}", document, a.profile_repeats)
            except EdgellmError as exc:
                log(f"{kind} over {profile} failed: {exc}")
                results["errors"].append({"deployment": f"{kind}-{profile}", "error": str(exc)})
                row[kind] = None
        if row["split"] is not None:
            results["codec_runs"].setdefault(
                a.profile_codec, {"profile": profile, **row["split"]["runs"][-1]}
            )
        rows.append(row)
    results["profiles"] = {"codec": a.profile_codec, "rows": rows}


def part_codecs(bench: Bench, results: dict[str, Any]) -> None:
    """b) bytes per decoded token per link for each codec (deploying those no other part measured)."""
    for codec in bench.args.codecs:
        if codec in results["codec_runs"]:
            continue
        try:
            run = deploy_and_run(bench, f"codec-{codec}", bench.split("none", codec), 1)["runs"][-1]
        except EdgellmError as exc:
            log(f"codec {codec} failed: {exc}")
            results["errors"].append({"deployment": f"codec-{codec}", "error": str(exc)})
            continue
        results["codec_runs"][codec] = {"profile": "none", **run}
    reference = results["codec_runs"].get("none")
    rows = []
    for codec in bench.args.codecs:
        run = results["codec_runs"].get(codec)
        if run is None:
            continue
        for link in run["links"]:
            up = link["bytes_up_per_token"]
            rows.append(
                {
                    "codec": codec,
                    "link": f"{link['from']}->{link['to']}",
                    "bytes_up_per_token": up,
                    "bytes_down_per_token": link["bytes_down_per_token"],
                    "prefill_bytes": link["prefill_bytes"],
                    "payload_bytes_per_token": bytes_per_token(bench.hidden_size, parse_codec(codec)),
                    "int8_up_target_met": (up is not None and up <= INT8_UP_TARGET_BYTES)
                    if codec == "int8"
                    else None,
                    "same_tokens_as_none": None
                    if reference is None
                    else same_prefix(run["new_tokens"], reference["new_tokens"]),
                    "tokens": run["tokens"],
                    "measured_on_profile": run["profile"],
                }
            )
    results["codecs"] = {"hidden_size": bench.hidden_size, "rows": rows}


def print_tables(results: dict[str, Any], args: argparse.Namespace) -> None:
    if "process" in results:
        p = results["process"]
        print(
            "\n## a) 3 processes (device + 2 edge, chain, loopback, profile none, codec none, head device, "
            f"cuts {','.join(map(str, p['cuts']))}) vs 1 process; {args.threads} threads, "
            f"{args.tokens} tokens, median of {args.repeats}\n"
        )
        rows = [
            [label, s["ttft_ms"], s["decode_tok_per_s"], s["tokens"]]
            for label, s in (("1 process", p["one_process"]), ("3 processes", p["three_processes"]))
        ]
        print(markdown_table(["setup", "TTFT ms", "decode tok/s", "tokens"], rows))
        print(
            f"\ndecode tok/s ratio 3 processes / 1 process: {p['decode_ratio']:.3f} (target >= 0.95); "
            f"TTFT ratio {p['ttft_ratio']:.3f}; same tokens: {p['same_tokens']} of "
            f"{p['one_process']['tokens']}"
        )
    if "codecs" in results:
        c = results["codecs"]
        print(f"\n## b) bytes on the wire per decoded token (hidden size {c['hidden_size']}, whole frames)\n")
        headers = [
            "codec",
            "link",
            "B/token up",
            "B/token down",
            "prefill B (up+down)",
            "tensor payload B/token",
            f"int8 up <= {INT8_UP_TARGET_BYTES}",
            "same tokens as none",
            "tokens",
            "measured over",
        ]
        rows = [
            [
                r["codec"],
                r["link"],
                r["bytes_up_per_token"],
                r["bytes_down_per_token"],
                r["prefill_bytes"],
                r["payload_bytes_per_token"],
                _yes_no(r["int8_up_target_met"]),
                r["same_tokens_as_none"],
                r["tokens"],
                r["measured_on_profile"],
            ]
            for r in c["rows"]
        ]
        print(markdown_table(headers, rows, digits=0))
    if "profiles" in results:
        pr = results["profiles"]
        print(
            f"\n## c) per link profile: on-device vs split (device + 2 edge, chain, head device, codec "
            f"{pr['codec']}) vs cloud (cuts [0]); {args.short_tokens} tokens, "
            f"median of {args.profile_repeats}\n"
        )
        headers = [
            "profile",
            "on-device TTFT ms",
            "on-device tok/s",
            "split TTFT ms",
            "split tok/s",
            "cloud TTFT ms",
            "cloud tok/s",
            "split wire ms/token",
            "cloud wire ms/token",
        ]
        rows = []
        for r in pr["rows"]:
            cells: list[Any] = [r["profile"]]
            for kind in ("on_device", "split", "cloud"):
                s = r.get(kind)
                cells += [None, None] if s is None else [s["ttft_ms"], s["decode_tok_per_s"]]
            for kind in ("split", "cloud"):
                s = r.get(kind)
                cells.append(None if s is None else _wire_ms(s["runs"][-1]))
            rows.append(cells)
        print(markdown_table(headers, rows))
    for e in results["errors"]:
        print(f"\nfailed: {e['deployment']}: {e['error']}")


def _wire_ms(run: dict[str, Any]) -> float:
    return float(sum(link.get("wire_ms_per_token") or 0.0 for link in run["links"]))


def _yes_no(value: bool | None) -> str | None:
    return None if value is None else ("yes" if value else "no")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="registered name or model directory (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads of every node and of this process (default: %(default)s)",
    )
    parser.add_argument(
        "--tokens", type=int, default=64, help="new tokens per run in part a (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="measured runs per setup in part a (default: %(default)s)"
    )
    parser.add_argument(
        "--short-tokens",
        type=int,
        default=16,
        help="new tokens per run in parts b and c (default: %(default)s)",
    )
    parser.add_argument(
        "--profile-repeats",
        type=int,
        default=1,
        help="measured runs per deployment in part c (default: %(default)s)",
    )
    parser.add_argument("--codecs", default=",".join(CODECS), help="part b's codecs (default: %(default)s)")
    parser.add_argument(
        "--profiles", default=",".join(LINK_PROFILES), help="part c's link profiles (default: %(default)s)"
    )
    parser.add_argument(
        "--profile-codec", default="int8", help="codec of part c's split links (default: %(default)s)"
    )
    parser.add_argument("--prompt", default=PROMPT, help="user turn, wrapped in the chat template")
    parser.add_argument("--skip-process", action="store_true", help="skip part a")
    parser.add_argument("--skip-codecs", action="store_true", help="skip part b")
    parser.add_argument("--skip-profiles", action="store_true", help="skip part c")
    parser.add_argument("--json", metavar="PATH", help="also write every number and the machine info here")
    args = parser.parse_args(argv)
    args.codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    args.profiles = [p.strip().lower() for p in args.profiles.split(",") if p.strip()]
    try:
        for codec in [*args.codecs, args.profile_codec]:
            parse_codec(codec)
    except EdgellmError as exc:
        parser.error(str(exc))
    unknown = [p for p in args.profiles if p not in PROFILES]
    if unknown:
        parser.error(f"unknown profile(s) {unknown}; choose from {sorted(PROFILES)}")
    if min(args.tokens, args.short_tokens) < 2:
        parser.error("--tokens and --short-tokens must be >= 2 (the first token is the prefill's)")
    if min(args.repeats, args.profile_repeats, args.threads) < 1:
        parser.error("--repeats, --profile-repeats and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the node processes are stopped either way.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    info = machine_info(args.threads)
    results: dict[str, Any] = {"codec_runs": {}, "errors": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        if not args.skip_process:
            part_process(bench, results)
        if not args.skip_profiles:
            part_profiles(bench, results)
        if not args.skip_codecs:
            part_codecs(bench, results)
        bench.wait_stopped()
    elapsed_s = time.perf_counter() - start
    print(
        f"\n# network: {args.model}, {args.threads} threads per process; {info['cpu']}, "
        f"{info['cores']} cores, torch {info['torch']}, {info['date']}; {elapsed_s:.0f} s in all"
    )
    print_tables(results, args)
    write_json(
        args.json,
        {
            "benchmark": "network",
            "machine": info,
            "elapsed_s": round(elapsed_s, 1),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "startups": bench.startups,
            "load_average_at_end": load_average(),
            **results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
