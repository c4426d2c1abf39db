"""Split inference across processes: the cost of the process boundary, bytes on the wire, emulated links.

Every deployment is started with `edgellm.deploy.local_deployment.LocalDeployment` (one `edgellm node` process per
node, on loopback, gRPC) from a topology built as `edgellm.deploy.demo_scenarios` builds its own, and generates through
its device node, greedily, from the same chat prompt. TTFT and decode tok/s are those the device node reports
(its `Generator`, as in one process); this process only sends the prompt and reads the stream.

a) process split: device + 2 edge nodes in a chain (cuts at L/3 and 2L/3: 10,20 for the default model), head
   on the device, link profile `none`, codec `none`; against the same cuts in this process (the engine of
   `edgellm generate`), same threads. One warm-up each, then `--repeats` runs taking turns (ABBA); medians with
   their confidence intervals, and the median of the per-repeat ratios with its interval. Memory: each node's
   peak RSS (the device report's `nodes[*].memory.peak_rss_mb`, VmHWM), largest over the runs, and
   this process's (the one-process row) with its peak. Part a alone: `--skip-codecs --skip-profiles`.
b) bytes on the wire per decoded token, per link and direction, for each codec in `--codecs` (a deployment
   per codec, profile `none`, `--codec-repeats` runs of `--short-tokens` back to back: bytes do not depend on
   the machine's load): the device report's `links[*].bytes_up_per_token` and `bytes_down_per_token`, whole
   encoded frames (tensor payload, int8 scales, message header). Codec `none` reuses part a's runs and part c's
   codec reuses part c's (bytes do not depend on the link profile).
c) per link profile in `--profiles`: on-device (every layer in this process), split (as in a, every link on
   the profile, codec `--profile-codec`) and cloud (the device holds no layer, `cuts = [0]`: one cloud node runs
   the whole model and the head behind one link on the profile, as
   `edgellm.deploy.demo_scenarios.cloud_document`). Per profile, the split and cloud deployments are up at the
   same time; one warm-up of 2 tokens each, then the three setups take turns, `--profile-repeats` runs of
   `--short-tokens` each.

Every row reports medians with an order-statistic confidence interval of the median (bench/record.py); a
target is met only when the whole interval clears it. Node processes run with OMP_WAIT_POLICY
`--node-omp-wait-policy` (PASSIVE: the deployment launcher's setting, since nodes share the cores); this
process's in-process rows with `--omp-wait-policy`. Both are recorded.

Generations stop at the model's end-of-sequence token, as in any deployment; the tables show how many tokens
each run produced (the default prompt asks for a long answer).
"""

# ruff: noqa: E402  (the imports follow the OMP_WAIT_POLICY setting on purpose)

from __future__ import annotations

import sys

from record import set_omp_wait_policy

# Before torch loads libgomp, which reads OMP_WAIT_POLICY once: this process's one-process rows.
IN_PROCESS_OMP = set_omp_wait_policy(sys.argv[1:])

import argparse
import contextlib
import os
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bandwidth import peak_rss_mb
from record import (
    NODE_OMP_WAIT_POLICY,
    OMP_POLICIES,
    Recorder,
    add_omp_argument,
    add_record_arguments,
    format_target,
    machine_info,
    omp_env,
    paired_ratios,
    schedule,
    span,
    stamped,
    summary,
    target_record,
)
from report import PROMPT, ci_caption, markdown_table, same_prefix, with_ci

from edgellm.deploy.demo_scenarios import DemoConfig, cloud_document, per_token_breakdown, split_document
from edgellm.deploy.local_deployment import LocalDeployment
from edgellm.deploy.node_builder import channel_config
from edgellm.deploy.topology import write_topology
from edgellm.errors import EdgellmError
from edgellm.net.codec import bytes_per_token, parse_codec
from edgellm.net.link import PROFILES
from edgellm.net.rpc import RemoteHop
from edgellm.serve.local_engine import LocalSplitConfig, PromptConfig, generate_text, load_split
from edgellm.split.budget import rss_bytes, to_mb
from edgellm.store import DEFAULT_MODEL, resolve_model
from edgellm.store.weights import load_config

CODECS = ("none", "fp16", "bf16", "int8", "int8+zstd", "fp16+lz4")
LINK_PROFILES = ("6g", "5g", "wifi6", "lte", "wan")
INT8_UP_TARGET_BYTES = 640
PROCESS_TARGET = 0.95  # decode tok/s, 3 processes / 1 process
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
            with omp_env(self.args.node_omp_wait_policy):  # the nodes' environment, copied at start
                deployment.start()
            up_s = time.perf_counter() - start
            self.wait_stopped()
            self.startups.append(
                {
                    "deployment": name,
                    "nodes": len(topology.route),
                    "startup_s": round(up_s, 2),
                    "omp_wait_policy": self.args.node_omp_wait_policy,
                }
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
        stopper = threading.Thread(target=deployment.stop, kwargs={"grace_s": STOP_GRACE_S}, name=f"stop-{name}")
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
        loaded = load_split(LocalSplitConfig(a.model, cuts, "device" if cuts else "server", "fp32", a.threads))
        return lambda n: generate_text(loaded, a.prompt, PromptConfig(chat=True, max_new_tokens=n))


def timing(report: dict[str, Any], stamp: dict[str, Any], repeat: int) -> dict[str, Any]:
    """The numbers of one run worth keeping (the full reports are large)."""
    return {
        "repeat": repeat,
        "stamp": stamp,
        "ttft_ms": report["ttft_ms"],
        "decode_tok_per_s": report["decode_tok_per_s"],
        "tokens": len(report["new_tokens"]),
        "new_tokens": report["new_tokens"],
        "links": report.get("links", []),
        "breakdown_ms_per_token": per_token_breakdown(_with_nodes(report)),
        "rss_mb": node_rss_mb(report),
    }


def node_rss_mb(report: dict[str, Any]) -> dict[str, float | None]:
    """Each node's peak RSS so far, as its report gives it (the device asks every server's Info; RSS at the end
    of the generation from a node too old to report its peak); an in-process report has no nodes: this
    process's RSS now."""
    if "nodes" not in report:
        return {"this process": to_mb(rss_bytes())}
    memory = [(n["name"], n.get("memory") or {}) for n in report["nodes"]]
    return {name: m.get("peak_rss_mb", m.get("rss_mb")) for name, m in memory}


def max_rss_mb(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per node, the largest RSS its runs reported (None where it reported none)."""
    out: dict[str, float | None] = {}
    for run in runs:
        for node, mb in run.get("rss_mb", {}).items():
            out[node] = mb if out.get(node) is None else max(out[node] or 0.0, mb or 0.0)
    return out


def measure(generate: Generate, max_new_tokens: int, repeat: int) -> dict[str, Any]:
    with stamped() as stamp:
        report = generate(max_new_tokens)
    return timing(report, stamp, repeat)


def _with_nodes(report: dict[str, Any]) -> dict[str, Any]:
    # An in-process report has stages, not nodes: count them all as the device's compute.
    if "nodes" in report:
        return report
    per_token = sum(s.get("compute_ms_per_token") or 0.0 for s in report.get("stages", []))
    return {**report, "nodes": [{"name": "device", "compute_ms_per_token": per_token}], "links": []}


def summarize(runs: list[dict[str, Any]], omp_wait_policy: str) -> dict[str, Any]:
    return {
        "ttft_ms": summary([r["ttft_ms"] for r in runs]),
        "decode_tok_per_s": summary([r["decode_tok_per_s"] for r in runs]),
        "tokens": min(r["tokens"] for r in runs),
        "omp_wait_policy": omp_wait_policy,
        "stamp": span([r["stamp"] for r in runs]),
        "runs": runs,
    }


def interleaved(
    setups: list[tuple[str, Generate]], max_new_tokens: int, repeats: int, warmup_tokens: int = 2
) -> dict[str, list[dict[str, Any]]]:
    """Warm every setup up once, then run them in turn (ABBA), `repeats` runs each."""
    for _, generate in setups:
        generate(warmup_tokens)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in setups}
    for repeat, index in schedule(len(setups), repeats):
        label, generate = setups[index]
        run = measure(generate, max_new_tokens, repeat)
        runs[label].append(run)
        log(
            f"run {repeat + 1}/{repeats} {label}: TTFT {run['ttft_ms']:.0f} ms, "
            f"{run['decode_tok_per_s']:.1f} tok/s, {run['tokens']} tokens"
        )
    return runs


def ratio_by_repeat(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Median and interval of a / b over the repeats, each pair measured next to each other."""
    x, y = {r["repeat"]: r[key] for r in a}, {r["repeat"]: r[key] for r in b}
    common = sorted(set(x) & set(y))
    return summary(paired_ratios([x[k] for k in common], [y[k] for k in common]))


def part_process(bench: Bench, results: dict[str, Any]) -> None:
    """a) 3 processes on loopback vs one process, same cuts, same threads."""
    a = bench.args
    document = bench.split("none", "none")
    cuts = tuple(document["model"]["cuts"])
    log(f"process split: loading cuts {cuts} in this process")
    local = bench.local(cuts)
    with bench.deployed("process-split", document) as remote:
        runs = interleaved([("3 processes", remote), ("1 process", local)], a.tokens, a.repeats, a.tokens)
    remote_runs, local_runs = runs["3 processes"], runs["1 process"]
    decode = ratio_by_repeat(remote_runs, local_runs, "decode_tok_per_s")
    results["process"] = {
        "cuts": list(cuts),
        "head": "device",
        "profile": "none",
        "codec": "none",
        "three_processes": summarize(remote_runs, a.node_omp_wait_policy),
        "one_process": summarize(local_runs, IN_PROCESS_OMP),
        "decode_ratio": decode,
        "ttft_ratio": ratio_by_repeat(remote_runs, local_runs, "ttft_ms"),
        "targets": [
            target_record("decode tok/s 3 processes / 1 process", PROCESS_TARGET, decode, higher_is_better=True)
        ],
        "same_tokens": same_prefix(remote_runs[-1]["new_tokens"], local_runs[-1]["new_tokens"]),
        # RSS at the end of each generation, largest over the runs; the nodes report no peak (VmHWM) yet.
        "rss_mb": {"three_processes": max_rss_mb(remote_runs), "one_process": max_rss_mb(local_runs)},
        "one_process_peak_rss_mb": peak_rss_mb(),  # this process (the one-process row's weights) so far
    }
    results["codec_runs"]["none"] = {"profile": "none", "runs": remote_runs}


def part_profiles(bench: Bench, results: dict[str, Any]) -> None:
    """c) on-device, split and cloud per link profile, taking turns within each profile."""
    a = bench.args
    log("on-device: every layer in this process")
    alone = bench.local(())
    rows = []
    for profile in a.profiles:
        row: dict[str, Any] = {"profile": profile}
        setups: list[tuple[str, Generate]] = [("on_device", alone)]
        with contextlib.ExitStack() as stack:
            for kind in ("split", "cloud"):
                # Each document is made after the previous deployment is up: its free ports stay free.
                document = bench.split(profile, a.profile_codec) if kind == "split" else bench.cloud(profile)
                try:
                    setups.append((kind, stack.enter_context(bench.deployed(f"{kind}-{profile}", document))))
                except EdgellmError as exc:
                    log(f"{kind} over {profile} failed: {exc}")
                    results["errors"].append({"deployment": f"{kind}-{profile}", "error": str(exc)})
                    row[kind] = None
            bench.wait_stopped()  # no node of an earlier deployment may still be exiting while these compute
            try:
                runs = interleaved(setups, a.short_tokens, a.profile_repeats)
            except EdgellmError as exc:
                log(f"profile {profile} failed: {exc}")
                results["errors"].append({"deployment": f"profile-{profile}", "error": str(exc)})
                runs = {}
        for kind, _ in setups:
            policy = IN_PROCESS_OMP if kind == "on_device" else a.node_omp_wait_policy
            row[kind] = summarize(runs[kind], policy) if runs.get(kind) else None
        if row.get("split") is not None:
            results["codec_runs"].setdefault(a.profile_codec, {"profile": profile, "runs": row["split"]["runs"]})
        rows.append(row)
    results["profiles"] = {"codec": a.profile_codec, "rows": rows}


def link_bytes(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per link: the bytes of every run, up and down per decoded token, and the prefill bytes."""
    links: dict[str, dict[str, Any]] = {}
    for run in runs:
        for link in run["links"]:
            entry = links.setdefault(f"{link['from']}->{link['to']}", {"up": [], "down": [], "prefill": []})
            for key, field in (("up", "bytes_up_per_token"), ("down", "bytes_down_per_token"),
                               ("prefill", "prefill_bytes")):  # fmt: skip
                if link.get(field) is not None:
                    entry[key].append(link[field])
    return [{"link": name, **values} for name, values in links.items()]


def part_codecs(bench: Bench, results: dict[str, Any]) -> None:
    """b) bytes per decoded token per link for each codec (deploying those no other part measured)."""
    a = bench.args
    for codec in a.codecs:
        if codec in results["codec_runs"]:
            continue
        try:
            with bench.deployed(f"codec-{codec}", bench.split("none", codec)) as generate:
                generate(2)
                runs = [measure(generate, a.short_tokens, repeat) for repeat in range(a.codec_repeats)]
        except EdgellmError as exc:
            log(f"codec {codec} failed: {exc}")
            results["errors"].append({"deployment": f"codec-{codec}", "error": str(exc)})
            continue
        log(f"codec {codec}: {len(runs)} runs")
        results["codec_runs"][codec] = {"profile": "none", "runs": runs}
    reference = results["codec_runs"].get("none")
    rows = []
    for codec in a.codecs:
        measured = results["codec_runs"].get(codec)
        if measured is None:
            continue
        last = measured["runs"][-1]
        for link in link_bytes(measured["runs"]):
            up = summary(link["up"], 1)
            target = None
            if codec == "int8" and up["n"]:
                target = target_record(
                    f"int8 bytes up per token {link['link']}", INT8_UP_TARGET_BYTES, up, higher_is_better=False
                )
            rows.append(
                {
                    "codec": codec,
                    "link": link["link"],
                    "bytes_up_per_token": up,
                    "bytes_down_per_token": summary(link["down"], 1),
                    "prefill_bytes": summary(link["prefill"], 1),
                    "payload_bytes_per_token": bytes_per_token(bench.hidden_size, parse_codec(codec)),
                    "target": target,
                    "same_tokens_as_none": None
                    if reference is None
                    else same_prefix(last["new_tokens"], reference["runs"][-1]["new_tokens"]),
                    "tokens": last["tokens"],
                    "runs": len(measured["runs"]),
                    "measured_on_profile": measured["profile"],
                }
            )
    results["codecs"] = {"hidden_size": bench.hidden_size, "rows": rows}


def print_tables(results: dict[str, Any], args: argparse.Namespace) -> None:
    if "process" in results:
        p = results["process"]
        print(
            "\n## a) 3 processes (device + 2 edge, chain, loopback, profile none, codec none, head device, "
            f"cuts {','.join(map(str, p['cuts']))}) vs 1 process; {args.threads} threads, "
            f"{args.tokens} tokens, {ci_caption(args.repeats)}\n"
        )
        rows = [
            [label, s["omp_wait_policy"], with_ci(s["ttft_ms"]), with_ci(s["decode_tok_per_s"]), s["tokens"]]
            for label, s in (("1 process", p["one_process"]), ("3 processes", p["three_processes"]))
        ]
        print(markdown_table(["setup", "OMP_WAIT_POLICY", "TTFT ms [CI]", "decode tok/s [CI]", "tokens"], rows))
        print(
            f"\nTTFT ratio 3 processes / 1 process: {with_ci(p['ttft_ratio'], 3)}; same tokens: "
            f"{p['same_tokens']} of {p['one_process']['tokens']}"
        )
        for target in p["targets"]:
            print(format_target(target))
        rss = ", ".join(f"{node} {mb}" for node, mb in p["rss_mb"]["three_processes"].items())
        print(f"peak RSS MB per node (VmHWM), largest of the runs: 3 processes: {rss}; 1 process: "
              f"{p['rss_mb']['one_process'].get('this process')} (peak {p['one_process_peak_rss_mb']})")  # fmt: skip
    if "codecs" in results:
        c = results["codecs"]
        print(
            f"\n## b) bytes on the wire per decoded token (hidden size {c['hidden_size']}, whole frames), "
            "median of each codec's runs [CI]\n"
        )
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
            "runs",
            "measured over",
        ]
        rows = [
            [
                r["codec"],
                r["link"],
                with_ci(r["bytes_up_per_token"], 0),
                with_ci(r["bytes_down_per_token"], 0),
                r["prefill_bytes"]["median"],
                r["payload_bytes_per_token"],
                None if r["target"] is None else r["target"]["verdict"],
                r["same_tokens_as_none"],
                r["tokens"],
                r["runs"],
                r["measured_on_profile"],
            ]
            for r in c["rows"]
        ]
        print(markdown_table(headers, rows, digits=0))
        for r in c["rows"]:
            if r["target"] is not None:
                print(format_target(r["target"], digits=1))
    if "profiles" in results:
        pr = results["profiles"]
        print(
            f"\n## c) per link profile: on-device vs split (device + 2 edge, chain, head device, codec "
            f"{pr['codec']}) vs cloud (cuts [0]), taking turns; {args.short_tokens} tokens, "
            f"{ci_caption(args.profile_repeats)}\n"
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
                cells += [None, None] if s is None else [with_ci(s["ttft_ms"]), with_ci(s["decode_tok_per_s"])]
            for kind in ("split", "cloud"):
                s = r.get(kind)
                cells.append(None if s is None else _wire_ms(s["runs"]))
            rows.append(cells)
        print(markdown_table(headers, rows))
    for e in results["errors"]:
        print(f"\nfailed: {e['deployment']}: {e['error']}")


def _wire_ms(runs: list[dict[str, Any]]) -> float | None:
    """Median over the runs of the summed wire ms per token of every link."""
    per_run = [float(sum(link.get("wire_ms_per_token") or 0.0 for link in run["links"])) for run in runs]
    return summary(per_run)["median"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="registered name or model directory (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads of every node and of this process (default: %(default)s)",
    )
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per run in part a (default: %(default)s)")
    parser.add_argument(
        "--short-tokens",
        type=int,
        default=16,
        help="new tokens per run in parts b and c (default: %(default)s)",
    )
    parser.add_argument(
        "--profile-repeats",
        type=int,
        default=5,
        help="measured runs per setup in part c, the three setups of a profile taking turns (default: %(default)s)",
    )
    parser.add_argument(
        "--codec-repeats",
        type=int,
        default=5,
        help="runs per codec deployment in part b, back to back (default: %(default)s)",
    )
    parser.add_argument("--codecs", default=",".join(CODECS), help="part b's codecs (default: %(default)s)")
    parser.add_argument(
        "--profiles", default=",".join(LINK_PROFILES), help="part c's link profiles (default: %(default)s)"
    )
    parser.add_argument("--profile-codec", default="int8", help="codec of part c's split links (default: %(default)s)")
    parser.add_argument("--prompt", default=PROMPT, help="user turn, wrapped in the chat template")
    parser.add_argument("--skip-process", action="store_true", help="skip part a")
    parser.add_argument("--skip-codecs", action="store_true", help="skip part b")
    parser.add_argument("--skip-profiles", action="store_true", help="skip part c")
    parser.add_argument(
        "--node-omp-wait-policy",
        choices=OMP_POLICIES,
        default=NODE_OMP_WAIT_POLICY,
        help="OMP_WAIT_POLICY of every node process (default: %(default)s, the deployment launcher's: nodes "
        "share the cores)",
    )
    add_omp_argument(parser, "this process: the one-process and on-device rows")
    add_record_arguments(parser, rows="setup in part a, the two setups taking turns")
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
    if min(args.repeats, args.profile_repeats, args.codec_repeats, args.threads) < 1:
        parser.error("--repeats, --profile-repeats, --codec-repeats and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the node processes are stopped either way.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    recorder = Recorder("network", args.json, args.allow_dirty)
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
        f"{info['cores']} cores, torch {info['torch']}; {recorder.header()}; {elapsed_s:.0f} s in all"
    )
    print_tables(results, args)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "allow_dirty")}
    recorder.write(
        {
            "elapsed_s": round(elapsed_s, 1),
            "settings": {**settings, "omp_wait_policy_in_process": IN_PROCESS_OMP},
            "startups": bench.startups,
            **results,
        },
        machine=info,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
