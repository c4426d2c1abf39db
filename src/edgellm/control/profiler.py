"""`edgellm profile`: reach (or start) a deployment's nodes and measure what the planner needs.

Per node, through the `Control` RPC, `profile_compute`: the node times its own stages at each weight scheme on its
own threads (edgellm.deploy.compute_profile) and scales the times by its emulated `compute_scale`. Per link,
`probe_link` on the node at its near end: echo messages of several sizes through the real transport and the link's
emulation, one line fitted per direction. Per model: the frame header and the perplexity cost of each scheme and
codec (edgellm.control.quality). The result is a plain JSON profile (edgellm.control.profile_file).

When no node answers, the profiler starts the whole deployment on this machine (every address must be loopback),
in a profiling layout where each node holds a small stage (the device none: it must not need more memory than its
budget allows before the planner has chosen its scheme), and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from edgellm import __version__
from edgellm.control.documents import profiling_layout, read_document
from edgellm.control.profile_file import FORMAT, VERSION, fit_line, profile_key
from edgellm.control.quality import ppl_costs
from edgellm.deploy.compute_profile import _cpu_name
from edgellm.deploy.local_deployment import LocalDeployment, ensure_local_token
from edgellm.deploy.node_builder import channel_config
from edgellm.deploy.topology import Topology, write_topology
from edgellm.errors import ConfigError
from edgellm.net.codec import parse_codec
from edgellm.net.messages import ForwardRequest, encode
from edgellm.net.rpc import NodeUnreachable, RemoteHop
from edgellm.store import resolve_model
from edgellm.store.weights import load_config

log = logging.getLogger(__name__)

DEFAULT_SCHEMES = ("none", "int8", "int4-g32,head=int8,embed=int8")
DEFAULT_CODECS = ("none", "fp16", "int8", "int8mu")
PROBE_SIZES = (256, 16_384, 131_072, 524_288)  # bytes; the largest ~ a 900-token prompt at fp16


def _hop(topology: Topology, name: str) -> RemoteHop:
    node = topology.node(name)
    if node.address is None:
        raise ConfigError(f"{topology.source}: node {name!r} has no address to reach it at")
    return RemoteHop(name, node.address, channel_config(topology), sender="profiler")


def reachable(topology: Topology) -> dict[str, bool]:
    """Which nodes answer `Info` now."""
    out = {}
    for name in topology.route:
        hop = _hop(topology, name)
        try:
            hop.info(timeout_s=2.0)
            out[name] = True
        except NodeUnreachable:
            out[name] = False
        finally:
            hop.shutdown()
    return out


@contextlib.contextmanager
def nodes_running(topology: Topology, num_layers: int, on_progress: Callable[[str], None]) -> Iterator[Topology]:
    """Yield a running deployment of `topology`: the nodes already serving, or ones started here and stopped after.

    Raises:
        ConfigError: some nodes answer and others do not (name them), or nodes to start are not on loopback.
    """
    up = reachable(topology)
    if all(up.values()):
        yield topology
        return
    if any(up.values()):
        down = [n for n, ok in up.items() if not ok]
        raise ConfigError(f"nodes {down} do not answer while {[n for n, ok in up.items() if ok]} do; start them all")
    on_progress(f"no node of {topology.source} answers: starting all {len(topology.route)} on this machine")
    ensure_local_token(topology)
    with tempfile.TemporaryDirectory(prefix="edgellm-profile-") as tmp:
        path = Path(tmp) / "profiling.toml"
        running = write_topology(path, profiling_layout(read_document(Path(topology.source)), num_layers))
        with LocalDeployment(running, path, Path(tmp)):
            yield running


def header_bytes(hidden_size: int) -> int:
    """Bytes of a decode-step forward frame beyond its hidden-state payload (session id, flags, shapes...)."""
    spec = parse_codec("none")
    request = ForwardRequest("0" * 16, torch.zeros(1, 1, hidden_size), torch.zeros(1, 1, dtype=torch.long),
                             route=("edge-1",))  # fmt: skip
    return len(encode(request, spec)) - 4 * hidden_size


def probe_links(topology: Topology, sizes: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    """Every declared link, probed from its end nearer the device; one fitted line per direction."""
    out = []
    for link in topology.links:
        near, far = sorted((link.a, link.b), key=topology.route.index)
        hop = _hop(topology, near)
        try:
            answer = hop.control({"op": "probe_link", "to": far, "sizes": list(sizes), "repeats": repeats})
        finally:
            hop.shutdown()
        samples = answer["samples"]  # [[up_bytes, down_bytes, seconds], ...]
        small = min(sizes)
        ups = [(u, s * 1e3) for u, d, s in samples if d == small]
        downs = [(d, s * 1e3) for u, d, s in samples if u == small]
        up_fixed, up_slope = fit_line(ups)
        down_fixed, down_slope = fit_line(downs)
        fixed = (up_fixed + down_fixed) / 2  # one round trip's fixed cost, half charged to each direction
        out.append({
            "a": near, "b": far, "profile": link.profile_name, "emulated": vars(link.profile),
            "up_fixed_ms": fixed / 2, "up_ms_per_byte": up_slope,
            "down_fixed_ms": fixed / 2, "down_ms_per_byte": down_slope,
            "samples": samples, "probed_by": near,
        })  # fmt: skip
    return out


def llc_bytes() -> int | None:
    """The size of this machine's last-level CPU cache (Linux sysfs), or None."""
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        if best is None or level > best[0]:
            best = (level, size)
    return None if best is None else best[1]


def _machine() -> dict[str, Any]:
    return {"llc_bytes": llc_bytes(), "cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}  # fmt: skip


def profile_deployment(
    topology: Topology,
    schemes: Sequence[str] = DEFAULT_SCHEMES,
    codecs: Sequence[str] = DEFAULT_CODECS,
    prompt_tokens: int = 64,
    probe_repeats: int = 3,
    on_progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Measure the deployment of `topology` (see the module doc); returns the profile as a dict."""
    for codec in codecs:
        parse_codec(codec)
    model_dir = resolve_model(topology.model.name)
    config = load_config(model_dir)
    num_layers = int(config.num_hidden_layers)
    config_sha = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:16]
    start = dt.datetime.now(dt.UTC)
    nodes: dict[str, Any] = {}
    with nodes_running(topology, num_layers, on_progress) as running:
        for name in topology.route:
            on_progress(f"node {name}: timing layers, embedding and head at {len(schemes)} scheme(s)")
            hop = _hop(running, name)
            try:
                request = {"op": "profile_compute", "schemes": list(schemes), "prompt_tokens": prompt_tokens,
                           "max_context": topology.limits.max_context}  # fmt: skip
                nodes[name] = hop.control(request, timeout_s=900.0)
            finally:
                hop.shutdown()
        on_progress(f"links: probing {len(topology.links)} link(s) with {len(PROBE_SIZES)} sizes each way")
        links = probe_links(running, PROBE_SIZES, probe_repeats)
        on_progress("calibration: a short generation through the running layout")
        calibration_run = generate_once(running)
    on_progress("quality: perplexity of each scheme and codec (cached after the first run)")
    quality = ppl_costs(topology.model.name, model_dir, num_layers, schemes, codecs)
    kv = next(iter(nodes.values()))["kv_bytes_per_token_per_layer"] if nodes else 0
    hidden = int(config.hidden_size)
    profile = {
        "format": FORMAT,
        "version": VERSION,
        "key": profile_key(topology, config_sha),
        "created": start.isoformat(timespec="seconds"),
        "seconds": round((dt.datetime.now(dt.UTC) - start).total_seconds(), 1),
        "edgellm": __version__,
        "topology_file": topology.source,
        "machine": _machine(),
        "settings": {
            "schemes": list(schemes),
            "codecs": list(codecs),
            "prompt_tokens": prompt_tokens,
            "probe_sizes": list(PROBE_SIZES),
            "probe_repeats": probe_repeats,
        },  # fmt: skip
        "route": list(topology.route),
        "mode": topology.mode,
        "model": {
            "name": topology.model.name,
            "num_layers": num_layers,
            "hidden_size": hidden,
            "vocab_size": int(config.vocab_size),
            "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "kv_bytes_per_token_per_layer": kv,
            "max_context": getattr(topology.limits, "max_context", 2048),
            "header_bytes": header_bytes(hidden),
            "token_bytes": 8,
        },  # fmt: skip
        "nodes": nodes,
        "links": links,
        "quality": quality,
    }
    profile["calibration"] = calibrate(profile, running, calibration_run, num_layers)
    return profile


CALIBRATION_PROMPT = "Describe the water cycle in a few sentences."


def generate_once(topology: Topology, tokens: int = 24) -> dict[str, Any]:
    """One greedy generation through the deployment's device (a warm-up first); its report."""
    hop = _hop(topology, topology.route[0])
    report: dict[str, Any] = {}
    try:
        for n in (4, tokens):
            request = {"prompt": CALIBRATION_PROMPT, "chat": True, "max_new_tokens": n, "greedy": True}
            for event in hop.generate(request):
                report = event.get("report", report)
    finally:
        hop.shutdown()
    return report


def calibrate(profile: dict[str, Any], running: Topology, report: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """What a real generation costs beyond the microbenchmarks, measured once on the profiling layout and applied to
    every plan's predictions alike:

    - `step_overhead_ms`: per token, beyond its stages' compute and its links' wire time, as the device itself
      accounts them (the breakdown's "other": its generation loop, sampling, the token stream to the client);
    - `compute_factor`: the stages' compute per token in the running deployment over what the profile's timings
      predict for the same layout (node processes serving gRPC, sharing the machine, run a little slower than
      the same stage timed alone)."""
    from edgellm.control.profile_file import instance_from_profile
    from edgellm.control.replanner import current_plan
    from edgellm.deploy.demo_scenarios import per_token_breakdown
    from edgellm.plan import evaluate
    from edgellm.plan.cost import layout, stage_decode_ms

    plan = current_plan(running, num_layers)
    instance = instance_from_profile(profile, running.mode, len(report["prompt_tokens"]))
    cost = evaluate(instance, plan)
    breakdown = per_token_breakdown(report)
    other = breakdown.get("other", 0.0)
    runs, _ = layout(instance, plan)
    model_compute = sum(stage_decode_ms(r) for r in runs)
    measured_compute = sum(v for k, v in breakdown.items() if k.startswith("compute "))
    factor = measured_compute / model_compute if model_compute > 0 and measured_compute > 0 else 1.0
    return {
        "step_overhead_ms": other,
        "ttft_overhead_ms": other,
        "compute_factor": factor,
        "measured": {
            "decode_ms": breakdown["total"],
            "ttft_ms": report["ttft_ms"],
            "breakdown": breakdown,
            "tokens": len(report["new_tokens"]),
            "prompt_tokens": len(report["prompt_tokens"]),
        },  # fmt: skip
        "model": {"decode_ms": cost.decode_ms, "ttft_ms": cost.ttft_ms},
        "plan": plan.to_json(),
    }
