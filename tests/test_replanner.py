"""The device's re-planner against a literal profile: it stays while the traffic matches the profile, and after a
link degrades it re-probes, re-solves and answers the layout the optimizer picks under the new link."""

from __future__ import annotations

import json

from edgellm.control.replanner import Replanner, current_plan
from edgellm.deploy.topology import parse_topology
from edgellm.net.messages import HopTrace

LAYERS = 4


def scheme(ms: float) -> dict:
    return {"name": "none", "layer_decode_ms": ms, "layer_prefill_ms_per_token": ms / 10, "layer_bytes": 1000,
            "embed_bytes": 500, "head_bytes": 500, "head_decode_ms": ms, "embed_decode_ms": 0.0}  # fmt: skip


def link(a: str, b: str, fixed_ms: float) -> dict:
    return {"a": a, "b": b, "up_fixed_ms": fixed_ms / 2, "up_ms_per_byte": 1e-5, "down_fixed_ms": fixed_ms / 2,
            "down_ms_per_byte": 1e-5}  # fmt: skip


def profile() -> dict:
    node = lambda role, ms: {"role": role, "schemes": [scheme(ms)], "emulated": {"memory_mb": None},  # noqa: E731
                             "base_bytes": 0, "stage_overhead_ms": 0.1}  # fmt: skip
    return {
        "format": "edgellm-profile",
        "version": 1,
        "route": ["phone", "edge1", "edge2"],
        "nodes": {"phone": node("device", 40.0), "edge1": node("edge", 1.0), "edge2": node("edge", 1.0)},
        "links": [link("phone", "edge1", 2.0), link("edge1", "edge2", 0.5), link("phone", "edge2", 3.0)],
        "model": {
            "num_layers": LAYERS,
            "hidden_size": 8,
            "max_context": 64,
            "header_bytes": 40,
            "tied_embeddings": True,
            "kv_bytes_per_token_per_layer": 64,
        },  # fmt: skip
        "quality": {"schemes": {"none": 0.0}, "codecs": {"none": 0.0}},
        "settings": {"prompt_tokens": 8},
    }


def topology(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(profile()))
    doc = {
        "model": {"name": "m", "cuts": [0, 2], "head": "server", "embed": "device"},
        "deployment": {"route": ["phone", "edge1", "edge2"]},
        "nodes": [
            {"name": n, "role": "device" if n == "phone" else "edge", "address": f"127.0.0.1:{5000 + i}"}
            for i, n in enumerate(["phone", "edge1", "edge2"])
        ],  # fmt: skip
        "links": [{"between": ["phone", "edge1"]}, {"between": ["edge1", "edge2"]}, {"between": ["phone", "edge2"]}],
        "control": {"replan": True, "profile": "p.json", "min_samples": 3, "hysteresis": 0.5, "margin": 0.1},
    }
    return parse_topology(doc, base_dir=tmp_path)


def trace(link: str, wire_ms: float) -> HopTrace:
    return HopTrace(node=link.split("->")[1], link=link, compute_ms=1.0, server_ms=2.0, wire_ms=wire_ms,
                    bytes_up=72, bytes_down=48)  # fmt: skip


def test_current_plan_reads_the_running_layout(tmp_path):
    plan = current_plan(topology(tmp_path), LAYERS)
    assert [(s.node, s.start, s.end) for s in plan.stages] == [("phone", 0, 0), ("edge1", 0, 2), ("edge2", 2, 4)]
    assert plan.head == "server" and plan.codecs == ("none", "none")


def test_stays_while_traffic_matches_and_reroutes_after_the_first_link_degrades(tmp_path):
    probes = []

    def probe(near: str, far: str) -> list[list[float]]:
        probes.append((near, far))
        # 60 ms round trips whatever the size: the link became a slow one
        return [[u, d, 0.060] for u, d in [(256, 256), (16384, 256), (65536, 256), (256, 16384), (256, 65536)]]

    replanner = Replanner(topology(tmp_path), LAYERS, probe, clock=iter(range(1000)).__next__)
    normal = [trace("phone->edge1", 2.0), trace("edge1->edge2", 0.5)]
    for step in range(1, 6):
        assert replanner.observe(step, normal) is None  # matches the profile: nothing to do
    assert probes == [] and replanner.events == []
    slow = [trace("phone->edge1", 60.0), trace("edge1->edge2", 0.5)]
    assert replanner.observe(6, slow) is None and replanner.observe(7, slow) is None  # hysteresis: 3 in a row
    layout = replanner.observe(8, slow)
    assert probes == [("phone", "edge1")]
    assert layout is not None and layout.route == ("edge2",)  # around the slow link: edge2 alone (no budgets)
    assert layout.device_embeds and layout.cuts[0] == 0
    assert replanner.events[-1]["decision"] == "migrate"
    assert replanner.events[-1]["new_decode_ms"] < replanner.events[-1]["current_decode_ms"]


def test_a_noisy_link_that_probes_fine_does_not_migrate(tmp_path):
    def probe(near: str, far: str) -> list[list[float]]:
        return [[u, d, 0.002] for u, d in [(256, 256), (16384, 256), (65536, 256), (256, 16384), (256, 65536)]]

    replanner = Replanner(topology(tmp_path), LAYERS, probe, clock=iter(range(1000)).__next__)
    noisy = [trace("phone->edge1", 9.0)]
    layouts = [replanner.observe(step, noisy) for step in range(1, 4)]
    assert layouts == [None, None, None]
    assert replanner.events and replanner.events[-1]["decision"] == "stay"
