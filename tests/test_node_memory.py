"""Node capabilities: the memory budget (predicted, measured, per session) and the emulated compute slowdown.

A tiny seeded llama stands in for the model; only the refusal of a real `edgellm node` process starts one.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_LAYERS, make_tiny_model
from edgellm.deploy import memory_budget, node_builder
from edgellm.deploy.memory_budget import (
    MemoryNeed,
    NodeStatus,
    check_need,
    effective_max_context,
    ledger_after_load,
    predict_need,
    session_kv_bytes,
)
from edgellm.deploy.node_builder import build_node
from edgellm.deploy.topology import parse_topology, write_topology
from edgellm.errors import BusyError, ConfigError, SessionError
from edgellm.model.build import meta_stages
from edgellm.model.stage import StageSpec, stage_specs
from edgellm.net.messages import CloseSession, ForwardRequest
from edgellm.net.rpc import NodeUnreachable
from edgellm.quant.memory import kv_bytes_per_token, planned_weight_bytes, stage_memory
from edgellm.quant.scheme import parse_quant
from edgellm.quant.walker import quantize_module
from edgellm.split import host as host_module
from edgellm.split.budget import MB, MemoryLedger, NodeEmulation, StageMemory, rss_bytes
from edgellm.split.host import SessionLimits, StageHost
from edgellm.split.one_process import load_stages
from edgellm.split.server import StageServer
from edgellm.store.weights import load_config

IDS = torch.tensor([[1, 5, 17, 42, 8]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-memory"))


@pytest.fixture(scope="module")
def stage(model_dir):
    return load_stages(model_dir, [StageSpec(0, 2, embed=True)])[0]


def request(session: str, ids: torch.Tensor = IDS, start: int = 0, new: bool = False) -> ForwardRequest:
    positions = torch.arange(start, start + ids.shape[1]).expand(ids.shape[0], -1)
    return ForwardRequest(session, ids, positions, new_session=new)


def topology(model_dir: Path, **phone: object):
    doc = {
        "model": {"name": str(model_dir), "cuts": [2], "head": "device"},
        "deployment": {"route": ["phone", "edge1"], "token": "t", "max_context": 64},
        "nodes": [
            {"name": "phone", "role": "device", "address": "127.0.0.1:50170", **phone},
            {"name": "edge1", "role": "edge", "address": "127.0.0.1:50171", "memory_mb": 10},
        ],
        "links": [{"between": ["phone", "edge1"]}],
    }
    return doc, parse_topology(doc, source="deploy.toml")


@pytest.mark.parametrize("quant", [None, "int8", "int4-g32", "nf4-g32,head=none", "int8-g32,embed=int4-g32"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_predicted_weights_equal_the_loaded_stages(tmp_path, arch, quant):
    model_dir = make_tiny_model(arch, tmp_path)
    config = load_config(model_dir)
    for head in ("device", "server"):
        specs = stage_specs(TINY_LAYERS, [2], head)
        config_q = parse_quant(quant)
        for meta, real in zip(meta_stages(config, specs), load_stages(model_dir, specs)):
            assert all(p.is_meta for p in meta.parameters())  # nothing was allocated for the prediction
            if config_q is not None:
                quantize_module(real, config_q)
            assert planned_weight_bytes(meta, config_q) == stage_memory(real).weight_bytes, (head, real.spec)


def test_reserved_kv_equals_a_full_cache(model_dir, stage):
    """What a session reserves is what its KV cache holds once it reaches max_context tokens."""
    config = load_config(model_dir)
    cache = stage.new_cache()
    with torch.inference_mode():
        stage(torch.randint(0, 90, (1, 100)), torch.arange(100).view(1, -1), cache)  # capacity doubles to 128
    assert cache.nbytes() == session_kv_bytes(config, stage.spec.num_layers, 100, torch.float32)
    assert session_kv_bytes(config, 0, 100, torch.float32) == 0


def test_node_refuses_a_stage_over_budget_before_loading(model_dir, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the stages were loaded; the budget should have refused them first")

    monkeypatch.setattr(node_builder, "load_stages", no_loading)
    _, topo = topology(model_dir)
    pattern = (
        r"^deploy\.toml: edge1: needs \d+ MB \(runtime \d+ \+ weights 0 \+ KV for 64 tokens 0 \+ activations 0\), "
        r"over its memory_mb of 10; quantize its stages"
    )  # the tiny model's parts round to 0 MB; the runtime alone passes 10 MB
    with pytest.raises(ConfigError, match=pattern):
        build_node(topo, "edge1")


def test_predicted_need_names_every_part(model_dir):
    config = load_config(model_dir)
    specs = [StageSpec(0, 2, embed=True), StageSpec(TINY_LAYERS, TINY_LAYERS, head=True)]
    need = predict_need(config, specs, None, torch.float32, 100, runtime_bytes=400 * MB)
    assert need.weight_bytes == sum(stage_memory(s).weight_bytes for s in load_stages(model_dir, specs))
    assert need.kv_bytes == (kv_bytes_per_token(config, 2) + 1) * 128  # buffers at full capacity, + validity mask
    assert 0 < need.activation_bytes < 1 * MB
    with pytest.raises(ConfigError) as info:
        check_need("phone", MemoryNeed(900 * MB, 538 * MB, 94 * MB, 12 * MB, 2048), 800, "deploy.toml")
    assert str(info.value).startswith(
        "deploy.toml: phone: needs 1544 MB (runtime 900 + weights 538 + KV for 2048 tokens 94 + activations 12), "
        "over its memory_mb of 800"
    )
    check_need("phone", MemoryNeed(700 * MB, 0, 90 * MB, 10 * MB, 2048, measured=True), 800)  # exactly fits
    check_need("phone", need, None)  # no budget, no limit


def test_measured_rss_is_checked_after_loading(monkeypatch):
    predicted = MemoryNeed(300 * MB, 100 * MB, 20 * MB, 30 * MB, 2048)
    monkeypatch.setattr(memory_budget, "rss_bytes", lambda: 760 * MB)  # loading left more behind than predicted
    with pytest.raises(ConfigError, match=r"phone: needs 810 MB \(measured RSS after loading 760 \+ KV for 2048 "):
        ledger_after_load("phone", predicted, 800)
    ledger = ledger_after_load("phone", predicted, 900)
    assert (ledger.baseline_bytes, ledger.weight_bytes, ledger.activation_bytes) == (760 * MB, 100 * MB, 30 * MB)


def test_host_refuses_a_session_past_the_budget_and_accepts_after_a_close(model_dir, stage):
    config = load_config(model_dir)
    per_session = session_kv_bytes(config, 2, 64, torch.float32)
    ledger = MemoryLedger("edge1", 500 * MB + 2 * per_session + 10, baseline_bytes=499 * MB, activation_bytes=MB)
    memory = StageMemory(ledger, kv_bytes_per_token(config, 2))
    now = [0.0]
    host = StageHost(stage, SessionLimits(idle_timeout_s=10, max_context=64), lambda: now[0], memory=memory)
    host.forward(request("a", new=True))
    host.forward(request("b", new=True))
    assert (ledger.reserved_bytes, ledger.sessions) == (2 * per_session, 2)
    host.forward(request("a", new=True))  # restarting a held session reserves nothing more
    with pytest.raises(BusyError) as info:
        host.forward(request("c", new=True))
    message = str(info.value)
    assert message.startswith("edge1: a new session needs") and "reserved by 2 session(s)" in message
    assert f"memory_mb of {ledger.budget_bytes // MB}" in message and "for 64 tokens" in message
    assert host.session_count == 2
    host.close(CloseSession("b"))
    assert ledger.sessions == 1
    host.forward(request("c", new=True))
    now[0] = 30.0  # both sessions expire: their reservations go with them
    host.forward(request("d", new=True))
    assert (host.session_count, ledger.sessions, ledger.reserved_bytes) == (1, 1, per_session)


def test_a_host_over_its_budget_evicts_an_idle_session_to_make_room(model_dir, stage):
    config = load_config(model_dir)
    per_session = session_kv_bytes(config, 2, 64, torch.float32)
    ledger = MemoryLedger("edge1", 500 * MB + 2 * per_session + 10, baseline_bytes=499 * MB, activation_bytes=MB)
    now = [0.0]
    limits = SessionLimits(max_context=64, evict_idle_s=60)
    host = StageHost(stage, limits, lambda: now[0], memory=StageMemory(ledger, kv_bytes_per_token(config, 2)))
    host.forward(request("a", new=True))
    now[0] = 5.0
    host.forward(request("b", new=True))
    now[0] = 64.0  # a: 64 s idle (evictable), b: 59 s
    host.forward(request("c", new=True))  # room for two: a's reservation went with it
    assert (host.session_count, ledger.sessions, ledger.reserved_bytes) == (2, 2, 2 * per_session)
    with pytest.raises(SessionError, match="unknown session 'a'"):
        host.forward(request("a", IDS[:, :1], start=IDS.shape[1]))
    with pytest.raises(BusyError, match="a new session needs"):  # b and c are both recent: nothing to evict
        host.forward(request("d", new=True))


def test_host_refuses_positions_past_max_context(stage):
    host = StageHost(stage, SessionLimits(max_context=8))
    host.forward(request("a", IDS, new=True))
    host.forward(request("a", IDS[:, :3], start=5))  # positions 5..7: the last one allowed
    with pytest.raises(ConfigError, match="position 8 is past this deployment's max_context of 8 tokens"):
        host.forward(request("a", IDS[:, :1], start=8))


def test_max_context_is_clamped_to_the_model(model_dir):
    config = load_config(model_dir)  # 128 positions
    assert effective_max_context(2048, config) == 128
    assert effective_max_context(64, config) == 64


def test_compute_scale_makes_a_forward_take_scale_times_its_compute(stage, monkeypatch):
    slept: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(host_module.time, "sleep", sleep)
    host = StageHost(stage, emulation=NodeEmulation(compute_scale=4.0))
    start = time.perf_counter()
    reply = host.forward(request("a", new=True))
    elapsed_s = time.perf_counter() - start
    assert reply.compute_ms > 0 and len(slept) == 1
    measured_s = reply.compute_ms / 4.0 / 1e3
    assert slept[0] == pytest.approx(3.0 * measured_s, rel=1e-9)  # (scale - 1) x what it measured
    assert elapsed_s >= reply.compute_ms / 1e3  # the caller waited the emulated time
    StageHost(stage).forward(request("b", new=True))  # an unscaled host does not sleep
    assert len(slept) == 1


def test_info_reports_memory_and_emulation(model_dir, stage):
    config = load_config(model_dir)
    budget_mb = rss_bytes() // MB + 500  # this test process's size varies by machine and by the tests run before it
    emulation = NodeEmulation(compute_scale=4.0, memory_mb=budget_mb, preset="phone")
    ledger = MemoryLedger(
        "edge1", budget_mb * MB, baseline_bytes=rss_bytes(), weight_bytes=stage_memory(stage).weight_bytes
    )
    host = StageHost(stage, SessionLimits(max_context=64), emulation=emulation,
                     memory=StageMemory(ledger, kv_bytes_per_token(config, 2)))  # fmt: skip
    host.forward(request("a", new=True))
    info = StageServer("edge1", host).info()
    assert info["emulated"] == {"compute_scale": 4.0, "memory_mb": budget_mb, "preset": "phone"}
    memory = info["memory"]
    assert memory["budget_mb"] == budget_mb and memory["sessions"] == 1 and memory["rss_mb"] > 10
    assert memory["peak_rss_mb"] >= memory["rss_mb"]
    assert memory["kv_reserved_mb"] == round(session_kv_bytes(config, 2, 64, torch.float32) / MB, 1)
    assert memory["weights_mb"] == round(stage_memory(stage).weight_bytes / MB, 1)
    plain = StageServer("edge2", StageHost(stage)).info()
    assert plain["emulated"]["compute_scale"] == 1.0 and plain["memory"]["budget_mb"] is None


def test_node_status_merges_emulation_and_memory_and_skips_a_silent_server():
    asked: list[str] = []

    def answering(timeout_s: float) -> dict:
        asked.append("edge1")
        return {"memory": {"rss_mb": 500.0, "budget_mb": None}}

    def silent(timeout_s: float) -> dict:
        asked.append("edge2")
        raise NodeUnreachable("node edge2 did not answer")

    ledger = MemoryLedger("phone", 1100 * MB, baseline_bytes=700 * MB)
    emulations = {"phone": NodeEmulation(4.0, 1100, "phone"), "edge1": NodeEmulation(), "edge2": NodeEmulation()}
    status = NodeStatus(emulations, ("phone", ledger), {"edge1": answering, "edge2": silent})
    first = status()
    assert first["phone"]["emulated"] == {"compute_scale": 4.0, "memory_mb": 1100, "preset": "phone"}
    assert first["phone"]["memory"]["budget_mb"] == 1100 and first["edge1"]["memory"]["rss_mb"] == 500.0
    assert "memory" not in first["edge2"] and first["edge2"]["emulated"]["compute_scale"] == 1.0
    status()
    assert asked == ["edge1", "edge2", "edge1"]  # the silent one is not asked again


def test_device_node_emulates_and_reports_memory_per_generation(tiny_chat_dir):
    doc = {
        "model": {"name": str(tiny_chat_dir), "cuts": [], "head": "device"},  # a device-only deployment
        "deployment": {"route": ["phone"], "token": "t", "max_context": 64},
        "nodes": [{"name": "phone", "role": "device", "address": "127.0.0.1:50172", "preset": "phone",
                   "memory_mb": 5000}],  # the phone preset, with room for this test process
    }  # fmt: skip
    engine = build_node(parse_topology(doc), "phone").handler.engine  # type: ignore[attr-defined]
    assert engine.info()["emulated"] == {"compute_scale": 4.0, "memory_mb": 5000, "preset": "phone"}
    assert engine.info()["max_context"] == 64
    first = engine.hops[0]._handler  # the device's first stage: a local StageHost
    assert first.emulation.compute_scale == 4.0 and first.limits.max_context == 64
    assert first.memory is not None and first.memory.ledger.budget_bytes == 5000 * MB
    events = list(engine.generate({"prompt": "hi", "max_new_tokens": 3}))
    (node,) = events[-1]["report"]["nodes"]
    assert node["emulated"] == {"compute_scale": 4.0, "memory_mb": 5000, "preset": "phone"}
    assert node["memory"]["budget_mb"] == 5000 and node["memory"]["rss_mb"] > 10
    assert node["memory"]["sessions"] == 0  # the generation closed its session, and released its reservation


@pytest.mark.multiprocess
def test_edgellm_node_refuses_to_start_over_budget(model_dir, tmp_path):
    doc, _ = topology(model_dir)
    path = tmp_path / "deploy.toml"
    write_topology(path, doc)
    done = subprocess.run(
        [sys.executable, "-m", "edgellm", "node", "--topology", str(path), "--name", "edge1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "edge1: needs" in done.stderr and "over its memory_mb of 10" in done.stderr


def test_run_summary_prints_rss_against_budget_and_the_emulation(capsys):
    from edgellm.cli.run import print_deployment_summary

    phone = {"name": "phone", "layers": [0, 10], "compute_ms": 928.1,
             "emulated": {"compute_scale": 4.0, "memory_mb": 1100, "preset": "phone"},
             "memory": {"rss_mb": 807.6, "budget_mb": 1100}}  # fmt: skip
    edge = {"name": "edge1", "layers": [10, 30], "compute_ms": 157.2, "memory": {"rss_mb": 529.1, "budget_mb": None},
            "emulated": {"compute_scale": 1.0, "memory_mb": None, "preset": "edge-server"}}  # fmt: skip
    old = {"name": "edge2", "layers": [30, 30], "compute_ms": 1.0}  # a node that reports neither
    report = {"new_tokens": [1, 2], "ttft_ms": 388.0, "decode_tok_per_s": 7.3, "mode": "chain",
              "nodes": [phone, edge, old], "links": []}  # fmt: skip
    print_deployment_summary(report)
    out = capsys.readouterr().out
    assert "RSS/budget MB" in out and "808/1100" in out and "529/-" in out
    assert "emulated: phone compute x4.0, memory 1100 MB (preset phone)" in out
    assert "emulated: edge1" not in out and "emulated: edge2" not in out
