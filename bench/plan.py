"""The control plane: predicted vs measured, solve time, the bandwidth trade-off, and re-planning after a link change.

a) accuracy: on each topology of `TOPOLOGIES` (different compute slowdowns, memory budgets, link profiles, hop
   counts, head sides, modes), `edgellm profile` (cached while the topology, model and code are unchanged), the
   optimizer's plan, then the planned deployment as node processes (edgellm.deploy.local_deployment), one warm-up
   and `--repeats` greedy generations of `--tokens` tokens from the same chat prompt. Per run: the device's TTFT
   and decode ms/token against the cost model's prediction for that prompt length. Target: every topology's
   measured/predicted ratio within 0.85..1.15 (its median's interval inside it), for TTFT and decode.
b) solve time: `edgellm.plan.benchmark_instance` (64 layers x 8 nodes x 5 schemes x 4 codecs), seeds x repeats,
   the realistic link graph and the fully connected one. Target: median under 100 ms (realistic graph).
c) the trade-off (the seed's "split depth vs communication overhead"): on the profiled laptop-edge topology, the
   device<->edge link's bandwidth swept from 10 kb/s to 10 Gb/s in the profile (RTT and the transport's own
   per-byte cost kept), re-solved for decode latency and for TTFT: the layers the device keeps, its scheme and the
   hop's codec. A chart.
f) story (`--parts story`, not in the default parts): the default demo, `--repeats` times; the planned split
   against device-only and cloud. Target: the split decodes faster than both.
e) depth (`--parts depth`, not in the default parts): ms per decode step of a stage of 1..30 layers per scheme,
   one thread, and the whole depth on two: why the profile times layers at the whole depth.
d) re-planning: the paper topology; after `--switch-after` tokens the phone<->edge1 link becomes `lte`; with the
   device's re-planner on and off (`[control] replan`), `--repeats` runs each, taking turns; ms/token after the
   switch. Target: the migrated deployment decodes faster than staying put.

Every emulated setting is recorded with the numbers it affects. Node processes run with OMP_WAIT_POLICY PASSIVE
(the launcher's default). Runs of one topology are back to back (its deployment is up once); topologies in turn.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from record import Recorder, add_record_arguments, machine_info, stamped, summary, target_record
from report import PROMPT, markdown_table, with_ci

from edgellm.control.demo import StoryConfig, run_scenario
from edgellm.control.documents import planned_document, read_document
from edgellm.control.paper_topology import paper_document
from edgellm.control.planning import obtain_profile, predicted
from edgellm.control.profile_file import instance_from_profile
from edgellm.deploy.local_deployment import LocalDeployment, free_port
from edgellm.deploy.node_builder import channel_config
from edgellm.deploy.topology import load_topology, write_topology
from edgellm.model.prompt import encode_prompt
from edgellm.net.rpc import RemoteHop
from edgellm.plan import benchmark_instance, solve
from edgellm.store import DEFAULT_MODEL, resolve_model
from edgellm.store.weights import load_tokenizer

ACCURACY = (0.85, 1.15)
SWEEP_TOPOLOGY = "laptop-edge-wifi6"  # a device only 2x slower than the edge: the cut moves within the range
SWEEP_MBPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 300, 1000, 10000)
SOLVE_TARGET_MS = 100.0


def log(text: str) -> None:
    print(f"[plan] {text}", file=sys.stderr, flush=True)


def _node(name: str, role: str, threads: int | None, **extra: Any) -> dict[str, Any]:
    node = {"name": name, "role": role, "address": f"127.0.0.1:{free_port()}", **extra}
    return node if threads is None else {**node, "threads": threads}


def _doc(nodes: list[dict[str, Any]], links: list[tuple[str, str, str]], token: Path, mode: str = "chain",
         head: str = "server") -> dict[str, Any]:  # fmt: skip
    route = [n["name"] for n in nodes]
    servers = len(route) - 1
    return {
        "model": {
            "name": DEFAULT_MODEL,
            "cuts": [0, *(round(30 * i / servers) for i in range(1, servers))],
            "head": head,
        },  # fmt: skip
        "deployment": {"route": route, "mode": mode, "token_file": str(token)},
        "nodes": nodes,
        "links": [{"between": [a, b], "profile": p} for a, b, p in links],
    }


# name -> (topology document, plan options). Each differs from the others in slowdown, budget, link, hops, head.
def topologies(token: Path, threads: int | None) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    t = threads
    return {
        "phone-edge-6g": (_doc([_node("phone", "device", t, preset="phone"), _node("edge", "edge", t)],
                               [("phone", "edge", "6g")], token), {}),
        "phone-2edges-5g-head-device": (_doc(
            [_node("phone", "device", t, preset="phone"), _node("edge1", "edge", t, memory_mb=900),
             _node("edge2", "edge", t, memory_mb=900)],
            [("phone", "edge1", "5g"), ("edge1", "edge2", "metro")], token), {"heads": ("device",)}),
        "laptop-edge-wifi6": (_doc([_node("laptop", "device", t, preset="laptop"), _node("edge", "edge", t)],
                                   [("laptop", "edge", "wifi6")], token), {}),
        "phone-edge-lte": (_doc([_node("phone", "device", t, compute_scale=2.0, memory_mb=1500),
                                 _node("edge", "edge", t)], [("phone", "edge", "lte")], token), {}),
        "phone-2edges-star-6g": (_doc(
            [_node("phone", "device", t, preset="phone"), _node("edge1", "edge", t, memory_mb=900),
             _node("edge2", "edge", t, memory_mb=900)],
            [("phone", "edge1", "6g"), ("phone", "edge2", "6g")], token, mode="star"), {}),
        "phone-edge-cloud-wan": (_doc(
            [_node("phone", "device", t, preset="phone"), _node("edge", "edge", t, compute_scale=1.5, memory_mb=750),
             _node("cloud", "cloud", t)],
            [("phone", "edge", "5g"), ("edge", "cloud", "wan")], token), {}),
        "paper": (paper_document(token, t), {}),
    }  # fmt: skip


@contextlib.contextmanager
def deployed(path: Path, work: Path) -> Iterator[Callable[[int], dict[str, Any]]]:
    topology = load_topology(path)
    with LocalDeployment(topology, path, work):
        device = topology.device
        assert device.address is not None
        hop = RemoteHop(device.name, device.address, channel_config(topology), sender="bench")

        def generate(tokens: int) -> dict[str, Any]:
            report: dict[str, Any] = {}
            request = {"prompt": PROMPT, "chat": True, "max_new_tokens": tokens, "greedy": True}
            for event in hop.generate(request):
                report = event.get("report", report)
            return report

        try:
            yield generate
        finally:
            hop.shutdown()


def part_accuracy(args: argparse.Namespace, work: Path, token: Path, prompt_tokens: int) -> list[dict[str, Any]]:
    rows = []
    for name, (doc, options) in topologies(token, args.threads).items():
        if args.only and name not in args.only:
            continue
        source = work / f"{name}.toml"
        topology = write_topology(source, doc)
        log(f"{name}: profile")
        profile, profile_path, fresh = obtain_profile(topology, on_progress=log)
        instance = instance_from_profile(profile, topology.mode, prompt_tokens)
        solution = solve(instance, "latency", args.max_ppl_increase, **options)
        pred = predicted(instance, solution.plan, profile)
        planned = work / f"{name}-planned.toml"
        write_topology(planned, planned_document(read_document(source), solution.plan))
        log(f"{name}: plan {solution.plan.to_json()}; predicted decode {pred['decode_ms']:.1f} ms/token")
        runs = []
        with deployed(planned, work) as generate:
            generate(4)  # warm-up
            for repeat in range(args.repeats):
                with stamped() as stamp:
                    report = generate(args.tokens)
                decode_ms = 1e3 / report["decode_tok_per_s"] if report.get("decode_tok_per_s") else math.nan
                runs.append({"repeat": repeat, "ttft_ms": report["ttft_ms"], "decode_ms": decode_ms,
                             "tokens": len(report["new_tokens"]), "prompt_tokens": len(report["prompt_tokens"]),
                             **stamp})  # fmt: skip
        ttft_ratio = [r["ttft_ms"] / pred["ttft_ms"] for r in runs]
        decode_ratio = [r["decode_ms"] / pred["decode_ms"] for r in runs]
        row = {
            "topology": name, "document": doc, "options": {k: list(v) for k, v in options.items()},
            "profile": str(profile_path), "profile_fresh": fresh, "profile_created": profile["created"],
            "plan": solution.plan.to_json(), "binding": solution.binding,
            "predicted": pred, "calibration": profile.get("calibration"),
            "emulation": {"nodes": {n: v["emulated"] for n, v in profile["nodes"].items()}, "links": [
                {"between": [k["a"], k["b"]], "profile": k["profile"], **k["emulated"]} for k in profile["links"]]},
            "ttft_ms": summary([r["ttft_ms"] for r in runs]), "decode_ms": summary([r["decode_ms"] for r in runs]),
            "ttft_ratio": summary(ttft_ratio), "decode_ratio": summary(decode_ratio), "runs": runs,
        }  # fmt: skip
        row["targets"] = [_within(f"{name} {k} measured/predicted", row[k]) for k in ("ttft_ratio", "decode_ratio")]
        rows.append(row)
        log(f"{name}: TTFT ratio {with_ci(row['ttft_ratio'], 3)}, decode ratio {with_ci(row['decode_ratio'], 3)}")
    return rows


def _within(name: str, stats: dict[str, Any]) -> dict[str, Any]:
    low = target_record(name, ACCURACY[0], stats, higher_is_better=True)
    high = target_record(name, ACCURACY[1], stats, higher_is_better=False)
    verdicts = {low["verdict"], high["verdict"]}
    verdict = "met" if verdicts == {"met"} else "missed" if "missed" in verdicts else "not settled"
    return {**low, "target": f"{name} in [{ACCURACY[0]}, {ACCURACY[1]}]", "threshold": list(ACCURACY),
            "verdict": verdict}  # fmt: skip


def part_solve(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for graph in ("realistic", "full"):
        times = []
        for seed in range(args.solve_seeds):
            instance = benchmark_instance(seed, fully_connected=graph == "full")
            for _ in range(3):
                start = time.perf_counter()
                solve(instance, "latency")
                times.append((time.perf_counter() - start) * 1e3)
        out[graph] = summary(times)
        log(f"solve 64x8x5x4 ({graph} links): {with_ci(out[graph], 1)} ms")
    out["target"] = target_record("solve ms (realistic links)", SOLVE_TARGET_MS, out["realistic"], False)
    return out


def part_sweep(args: argparse.Namespace, work: Path, token: Path, prompt_tokens: int) -> dict[str, Any]:
    doc, _ = topologies(token, args.threads)[SWEEP_TOPOLOGY]
    source = work / "sweep.toml"
    topology = write_topology(source, doc)
    profile, _, _ = obtain_profile(topology, on_progress=log)
    base = instance_from_profile(profile, "chain", prompt_tokens)
    link = base.links[0]
    transport_ms_per_byte = max(link.up_ms_per_byte - 8e-3 / 250.0, 0.0)  # what is left of the wifi6 line
    points = []
    for mbps in SWEEP_MBPS:
        per_byte = 8e-3 / mbps + transport_ms_per_byte
        changed = dataclasses.replace(link, up_ms_per_byte=per_byte, down_ms_per_byte=per_byte)
        instance = dataclasses.replace(base, links=(changed,))
        for objective in ("latency", "ttft"):
            sol = solve(instance, objective, args.max_ppl_increase)
            first = sol.plan.stages[0]
            on_device = first.end - first.start if first.node == instance.nodes[0].name else 0
            points.append({"mbps": mbps, "objective": objective, "device_layers": on_device,
                           "device_scheme": first.scheme, "codec": sol.plan.codecs[0] if sol.plan.codecs else None,
                           "head": sol.plan.head, "decode_ms": sol.cost.decode_ms, "ttft_ms": sol.cost.ttft_ms})  # fmt: skip
    return {"topology": SWEEP_TOPOLOGY, "points": points}


def part_migration(args: argparse.Namespace, work: Path, token: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"replan": [], "stay": []}
    cfg = {mode: StoryConfig(PROMPT, args.switch_tokens, switch=("phone", "edge1", "lte"),
                             switch_after=args.switch_after, replan=mode == "replan", threads=args.threads)
           for mode in runs}  # fmt: skip
    from edgellm.control.demo import _with_control

    source = work / "migration.toml"
    topology = write_topology(source, paper_document(token, args.threads))
    profile, profile_path, _ = obtain_profile(topology, on_progress=log)
    instance = instance_from_profile(profile, "chain", 48)
    solution = solve(instance, "latency", 0.0)
    request = {"prompt": PROMPT, "chat": True, "max_new_tokens": args.switch_tokens, "greedy": True}
    for repeat in range(args.repeats):
        for mode in ("replan", "stay") if repeat % 2 == 0 else ("stay", "replan"):
            path = work / f"migration-{mode}.toml"
            doc = _with_control(planned_document(read_document(source), solution.plan), profile_path, cfg[mode])
            topo = write_topology(path, doc)
            report = run_scenario(topo, path, work, request, cfg[mode], switch=True)
            times = report["token_times_s"]
            k = args.switch_after
            tail = times[-8:]
            after = (tail[-1] - tail[0]) / (len(tail) - 1) * 1e3
            runs[mode].append({"repeat": repeat, "ms_per_token_last8": after, "migrations": report.get("migrations", []),
                               "tokens": len(times), "switch_after": k, "new_tokens": report["new_tokens"]})  # fmt: skip
            log(f"migration {mode} repeat {repeat}: {after:.1f} ms/token over the last 8 tokens")
    stats = {m: summary([r["ms_per_token_last8"] for r in rs]) for m, rs in runs.items()}
    ratios = [a["ms_per_token_last8"] / b["ms_per_token_last8"] for a, b in zip(runs["replan"], runs["stay"])]
    return {"runs": runs, "ms_per_token_after": stats, "replan_over_stay": summary(ratios),
            "target": target_record("ms/token after the switch, re-planned / stayed", 1.0, summary(ratios), False)}  # fmt: skip


def part_story(args: argparse.Namespace) -> dict[str, Any]:
    """The default demo (`edgellm demo`: the paper topology, planned, lossless) `--repeats` times: each scenario's
    measured TTFT and decode ms/token, and the split against device-only and cloud, paired by repeat."""
    from edgellm.control.demo import run_story

    runs = []
    for repeat in range(args.repeats):
        with stamped() as stamp:
            report = run_story(StoryConfig(PROMPT, args.tokens), on_phase=log)
        scenarios = report["scenarios"]
        row = {"repeat": repeat, **stamp, "same_tokens_as_whole_model": report["same_tokens_as_whole_model"]}
        for name, r in scenarios.items():
            if r.get("fits", True):
                row[name] = {"ttft_ms": r["ttft_ms"], "decode_ms": r["breakdown"]["total"], "plan": r["plan"],
                             "predicted": r["predicted"], "emulation": r["emulation"]}  # fmt: skip
        runs.append(row)
        log(f"story repeat {repeat}: " + ", ".join(f"{k} {v['decode_ms']:.1f} ms/token" for k, v in row.items()
                                                   if isinstance(v, dict) and "decode_ms" in v))  # fmt: skip
    out: dict[str, Any] = {"runs": runs}
    for name in ("split", "device_only", "cloud"):
        if all(name in r for r in runs):
            out[name] = {k: summary([r[name][k] for r in runs]) for k in ("ttft_ms", "decode_ms")}
    for base in ("device_only", "cloud"):
        if base in out:
            ratio = summary([r["split"]["decode_ms"] / r[base]["decode_ms"] for r in runs])
            out[f"split_over_{base}"] = ratio
            out[f"target_{base}"] = target_record(f"split / {base} decode ms per token", 1.0, ratio, False)
    return out


DEPTHS = (1, 5, 10, 15, 20, 30)


def part_depth(args: argparse.Namespace) -> dict[str, Any]:
    """Why the profile times layers at the whole depth: ms per decode step of a stage of k layers, per scheme, one
    thread (and two, at the whole depth), in a child process per scheme and thread count (OMP_WAIT_POLICY PASSIVE,
    as in the nodes); the median of `--repeats` x 7 steps."""
    import json
    import subprocess

    code = (
        "import json, sys, torch\n"
        "torch.set_num_threads(int(sys.argv[2]))\n"
        "from edgellm.store import resolve_model\n"
        "from edgellm.split.one_process import load_stages\n"
        "from edgellm.model.stage import StageSpec\n"
        "from edgellm.quant.scheme import parse_quant\n"
        "from edgellm.deploy.compute_profile import _decode_ms\n"
        "md = resolve_model('smollm2-135m'); q = parse_quant(sys.argv[1]); out = {}\n"
        "for k in json.loads(sys.argv[3]):\n"
        "    st = load_stages(md, [StageSpec(0, k)], torch.float32, q)[0]\n"
        "    out[k] = _decode_ms(st, 576, 64, int(sys.argv[4])); del st\n"
        "print(json.dumps(out))\n"
    )
    rows = []
    for scheme in ("none", "int8", "int4-g32,head=int8,embed=int8"):
        for threads, depths in ((1, DEPTHS), (2, (30,))):
            env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
            done = subprocess.run([sys.executable, "-c", code, scheme, str(threads), json.dumps(depths),
                                   str(7 * args.repeats)], capture_output=True, text=True, env=env, check=True)  # fmt: skip
            ms = {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
            rows.append({"scheme": scheme, "threads": threads, "ms_per_step": ms,
                         "ms_per_layer": {k: ms[k] / k for k in ms}})  # fmt: skip
            log(f"depth {scheme} x{threads}: {ms}")
    return {"rows": rows, "context_tokens": 64}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per accuracy run (default: 24)")
    parser.add_argument("--threads", type=int, default=None, help="threads per node (default: each preset's)")
    parser.add_argument("--max-ppl-increase", type=float, default=1.0)
    parser.add_argument("--only", type=lambda s: s.split(","), default=None, help="comma-separated topology names")
    parser.add_argument("--parts", type=lambda s: s.split(","), default=["accuracy", "solve", "sweep", "migration"])
    parser.add_argument("--solve-seeds", type=int, default=5)
    parser.add_argument("--switch-after", type=int, default=12)
    parser.add_argument("--switch-tokens", type=int, default=40)
    parser.add_argument("--chart", type=Path, default=Path("docs/plan-bandwidth.png"))
    parser.add_argument("--redraw", type=Path, default=None, metavar="JSON",
                        help="only draw --chart from the sweep of a results file, then exit")  # fmt: skip
    add_record_arguments(parser, rows="topology (part a) and re-plan setting (part d), back to back")
    args = parser.parse_args()
    if args.redraw is not None:
        import json

        sweep_chart(json.loads(args.redraw.read_text())["sweep"], args.chart)
        return 0
    recorder = Recorder("plan", args.json, args.allow_dirty)
    log(recorder.header())
    prompt_tokens = len(encode_prompt(load_tokenizer(resolve_model(DEFAULT_MODEL)), PROMPT, True))
    results: dict[str, Any] = {"prompt": PROMPT, "prompt_tokens": prompt_tokens, "settings": vars(args) | {
        "chart": str(args.chart), "json": str(args.json)}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-plan-") as tmp:
        work = Path(tmp)
        token = work / "token"
        token.write_text(secrets.token_hex(16))
        token.chmod(0o600)
        if "solve" in args.parts:
            results["solve"] = part_solve(args)
        if "accuracy" in args.parts:
            results["accuracy"] = part_accuracy(args, work, token, prompt_tokens)
        if "sweep" in args.parts:
            results["sweep"] = part_sweep(args, work, token, prompt_tokens)
            sweep_chart(results["sweep"], args.chart)
        if "migration" in args.parts:
            results["migration"] = part_migration(args, work, token)
        if "depth" in args.parts:
            results["depth"] = part_depth(args)
        if "story" in args.parts:
            results["story"] = part_story(args)
    print_tables(results)
    recorder.write(results, machine_info(args.threads))
    return 0


def sweep_chart(sweep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, objective in zip(axes, ("latency", "ttft")):
        pts = [p for p in sweep["points"] if p["objective"] == objective]
        xs = [p["mbps"] for p in pts]
        ax.step(xs, [p["device_layers"] for p in pts], where="mid", label="layers on the device")
        last = None
        for p in pts:  # label each run of equal choices once, at its first point
            choice = (p["device_layers"], p["device_scheme"], p["codec"], p["head"])
            if choice != last:
                scheme = p["device_scheme"].split(",")[0]
                text = f"device: {scheme}, head on {p['head']}" if p["device_layers"] else f"codec {p['codec']}"
                ax.annotate(text, (p["mbps"], p["device_layers"]), fontsize=7, xytext=(4, 6),
                            textcoords="offset points")  # fmt: skip
            last = choice
        ax.set_xscale("log")
        ax.set_xlabel("device<->edge bandwidth, Mb/s (emulated; RTT 5 ms, wifi6's)")
        ax.set_title(f"objective: {'decode ms/token' if objective == 'latency' else 'TTFT'}", fontsize=9)
    axes[0].set_ylabel("decoder layers the device keeps")
    fig.suptitle("Optimal split depth, the device's scheme and the codec vs bandwidth; device: laptop preset "
                 "(compute x2, 4000 MB), edge x1; max ppl increase 1%", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_tables(results: dict[str, Any]) -> None:
    if "accuracy" in results:
        rows = [[r["topology"], r["predicted"]["ttft_ms"], with_ci(r["ttft_ms"]), with_ci(r["ttft_ratio"], 3),
                 r["predicted"]["decode_ms"], with_ci(r["decode_ms"]), with_ci(r["decode_ratio"], 3),
                 "/".join(t["verdict"] for t in r["targets"])] for r in results["accuracy"]]  # fmt: skip
        print(markdown_table(["topology", "TTFT pred ms", "TTFT meas ms", "ratio", "decode pred ms", "decode meas ms",
                              "ratio", "within ±15%"], rows))  # fmt: skip
    if "solve" in results:
        s = results["solve"]
        print(f"\nsolve 64x8x5x4: realistic {with_ci(s['realistic'], 1)} ms, fully connected {with_ci(s['full'], 1)} ms"
              f" -> {s['target']['verdict']}")  # fmt: skip
    if "migration" in results:
        m = results["migration"]
        print(f"\nafter the switch: re-planned {with_ci(m['ms_per_token_after']['replan'])} ms/token, stayed "
              f"{with_ci(m['ms_per_token_after']['stay'])} -> {m['target']['verdict']}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
