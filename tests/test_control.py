"""The control channel (echo, probe_link, set_link, load_stage, migrate) and live migration.

Fast tests build every node of a tiny deployment in this process and serve each over gRPC on loopback (the same
handlers, hops and links as node processes); the marked tests start real node processes.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_LAYERS
from edgellm.deploy.local_deployment import LocalDeployment, free_port
from edgellm.deploy.node_builder import build_node, channel_config
from edgellm.deploy.topology import Topology, write_topology
from edgellm.errors import ConfigError, SessionError
from edgellm.model.stage import stage_specs
from edgellm.net.link import EmulatedLink, LinkProfile
from edgellm.net.messages import ForwardRequest
from edgellm.net.rpc import RemoteHop, serve
from edgellm.split.control import ControlOps, Field
from edgellm.split.generator import GenerationConfig, Generator
from edgellm.split.layout import Layout
from edgellm.split.one_process import load_stages, local_pipeline

TOKEN = "control-test-token"
PROMPT = [1, 5, 17, 42, 8, 66]


def document(model_dir: Path, cuts: list[int], head: str = "device", servers: int = 2) -> dict:
    names = ["device", *(f"edge{i + 1}" for i in range(servers))]
    return {
        "model": {"name": str(model_dir), "cuts": cuts, "head": head},
        "deployment": {"route": names, "mode": "chain", "token": TOKEN, "deadline_s": 20.0},
        "nodes": [
            {"name": n, "role": "device" if i == 0 else "edge", "address": f"127.0.0.1:{free_port()}"}
            for i, n in enumerate(names)
        ],
        "links": [{"between": [a, b], "profile": "none", "codec": "none"} for a, b in zip(names, names[1:])],
    }


class InProcess:
    """Every node of a topology built and served in this process (node_builder's wiring, real gRPC)."""

    def __init__(self, path: Path, doc: dict) -> None:
        self.topology: Topology = write_topology(path, doc)
        threads = torch.get_num_threads()  # build_node sets the node's own thread count
        try:
            self.built = {name: build_node(self.topology, name) for name in reversed(self.topology.route)}
        finally:
            torch.set_num_threads(threads)
        self.servers = [serve(b.handler, b.address, channel_config(self.topology))[0] for b in self.built.values()]

    def hop(self, name: str, **kw) -> RemoteHop:
        node = self.topology.node(name)
        return RemoteHop(name, node.address, channel_config(self.topology), **kw)

    def stop(self) -> None:
        for server in self.servers:
            server.stop(grace=0)


@pytest.fixture
def tiny_deployment(tiny_chat_dir, tmp_path):
    deployed = InProcess(tmp_path / "t.toml", document(tiny_chat_dir, [1, 3]))
    yield deployed
    deployed.stop()


def generate(device: RemoteHop, n: int = 16, prompt: str = "the cat sat on the mat and", **sampling) -> dict:
    request = {"prompt": prompt, "chat": False, "max_new_tokens": n, **sampling}
    return [e["report"] for e in device.generate(request) if "report" in e][0]


# -- the registry -----------------------------------------------------------------------------------------------


def test_control_ops_name_the_valid_ops_and_fields():
    ops = ControlOps()
    ops.register(
        "add", lambda r: {"sum": r["a"] + r["b"]}, {"a": Field(int, required=True), "b": Field(float, default=0.5)}
    )
    assert ops.dispatch({"op": "add", "a": 1}) == {"sum": 1.5}
    assert ops.dispatch({"op": "add", "a": 1, "b": 2}) == {"sum": 3.0}  # an int is a float
    with pytest.raises(ConfigError, match=r"unknown control op 'sub'; choose from \['add'\]"):
        ops.dispatch({"op": "sub"})
    with pytest.raises(ConfigError, match=r"unknown fields \['c'\].*valid: \['a', 'b'\]"):
        ops.dispatch({"op": "add", "a": 1, "c": 2})
    with pytest.raises(ConfigError, match="needs field 'a'"):
        ops.dispatch({"op": "add"})
    with pytest.raises(ConfigError, match="'a' must be int, got bool"):
        ops.dispatch({"op": "add", "a": True})


def test_layout_refuses_what_cannot_be_a_chain():
    assert Layout.from_json({"cuts": [4], "route": ["edge1"]}) == Layout((4,), ("edge1",))
    for bad, why in [
        ({"cuts": [4, 8], "route": ["edge1"]}, "one cut per server"),
        ({"cuts": [4, 8], "route": ["edge1", "edge1"]}, "more than once"),
        ({"cuts": [4], "route": ["edge1"], "head": "cloud"}, "unknown head placement"),
        ({"cuts": "4", "route": ["edge1"]}, "cuts must be a list"),
    ]:
        with pytest.raises(ConfigError, match=why):
            Layout.from_json(bad)


# -- the generator's replay -------------------------------------------------------------------------------------


@pytest.mark.parametrize("at", [1, 5, 11])
def test_a_migration_replays_to_the_same_tokens(tiny_llama_dir, at):
    def pipeline(cuts: list[int], head: str):
        return local_pipeline(load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, cuts, head)))

    config = GenerationConfig(max_new_tokens=12)
    want = Generator(pipeline([2], "device"), config).run(torch.tensor([PROMPT])).new_tokens[0]
    target = pipeline([1, 3], "server")
    target.layout = "after"
    seen = []

    def hook(step, fed):
        seen.append((step, [list(row) for row in fed]))
        return target if step == at else None

    result = Generator(pipeline([2], "device"), config, between_steps=hook).run(torch.tensor([PROMPT]))
    assert result.new_tokens[0] == want
    assert [m.step for m in result.migrations] == [at] and result.migrations[0].after == "after"
    assert result.migrations[0].replayed_tokens == len(PROMPT) + at - 1
    assert seen[at - 1] == (at, [PROMPT + want[: at - 1]])  # the pending token is not fed yet
    assert target.stats[0].calls == 1 + 12 - at  # the replay, then one call per remaining step


def test_a_migration_needs_batch_one(tiny_llama_dir):
    stages = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [2], "device"))
    other = local_pipeline(stages)
    gen = Generator(local_pipeline(stages), GenerationConfig(max_new_tokens=4), between_steps=lambda s, f: other)
    with pytest.raises(ConfigError, match="batch of 2"):
        gen.run(torch.tensor([PROMPT, PROMPT]))


# -- echo, probe_link, set_link ---------------------------------------------------------------------------------


def test_echo_answers_the_bytes_asked_for(tiny_deployment):
    hop = tiny_deployment.hop("edge1")
    answer = hop.control({"op": "echo", "payload": base64.b64encode(b"abc").decode(), "reply_bytes": 1000})
    assert len(base64.b64decode(answer["payload"])) == 1000
    with pytest.raises(ConfigError, match="not base64"):
        hop.control({"op": "echo", "payload": "!!"})
    with pytest.raises(ConfigError, match="choose from .*'load_stage'.*'set_link'"):
        hop.control({"op": "reboot"})


def test_probe_follows_the_emulated_bandwidth_and_rtt(tiny_deployment):
    link = EmulatedLink(LinkProfile(up_mbps=16.0, down_mbps=32.0, rtt_ms=30.0))
    hop = tiny_deployment.hop("edge1", link=link)
    big = 200_000

    def best(up: int, down: int) -> float:
        return min(hop.probe(up, down) for _ in range(3))

    small, up, down = best(64, 64), best(big, 64), best(64, big)
    assert 0.030 <= small < 0.030 + 0.04  # the round trip shows, and little else on loopback
    assert (up - small) == pytest.approx(big * 8 / 16e6, rel=0.3)  # 100 ms at 16 Mbit/s
    assert (down - small) == pytest.approx(big * 8 / 32e6, rel=0.3)  # 50 ms at 32 Mbit/s


def test_a_server_probes_and_sets_its_own_downstream_link(tiny_deployment):
    edge1 = tiny_deployment.hop("edge1", route=None)  # requests name their own route
    answer = edge1.control({"op": "probe_link", "to": "edge2", "sizes": [64, 20_000], "repeats": 2})
    assert answer["from"] == "edge1" and answer["to"] == "edge2" and answer["profile"]["up_mbps"] is None
    assert sorted({(u, d) for u, d, _ in answer["samples"]}) == [(64, 64), (64, 20_000), (20_000, 64)]
    assert len(answer["samples"]) == 6 and all(s > 0 for _, _, s in answer["samples"])

    def forward_s() -> float:
        start = time.perf_counter()
        data, positions = torch.randn(1, 2, 32), torch.tensor([[0, 1]])
        edge1.forward(ForwardRequest("s-link", data, positions, new_session=True, route=("edge2",)))
        return time.perf_counter() - start

    before = min(forward_s() for _ in range(2))
    set_answer = edge1.control({"op": "set_link", "to": "edge2", "profile": {"rtt_ms": 250.0}})
    assert set_answer["profile"]["rtt_ms"] == 250.0 and set_answer["profile"]["up_mbps"] is None
    after = forward_s()  # the very next message pays the new round trip (sleeps of 125 ms each way), on top of
    assert after >= 0.25 and after - before >= 0.2  # its compute, which varies with the machine's load
    info = edge1.info()
    assert info["link_emulation"] == [{"to": "edge2", "profile": set_answer["profile"]}]
    assert edge1.control({"op": "set_link", "to": "edge2", "profile_name": "lte"})["profile"]["rtt_ms"] == 50.0
    for bad, why in [
        ({"to": "edge9", "profile_name": "lte"}, r"no link to 'edge9'; it has links to \['edge2'\]"),
        ({"to": "edge2", "profile_name": "7g"}, "unknown link profile '7g'"),
        ({"to": "edge2", "profile": {"rtt": 3}}, "unknown link profile fields"),
        ({"to": "edge2", "profile": {"loss_pct": 100}}, "loss_pct"),
        ({"to": "edge2"}, "needs profile_name, profile"),
    ]:
        with pytest.raises(ConfigError, match=why):
            edge1.control({"op": "set_link", **bad})


def test_the_device_probes_and_sets_its_link_to_the_first_server(tiny_deployment):
    device = tiny_deployment.hop("device")
    answer = device.control({"op": "set_link", "to": "edge1", "profile_name": "5g"})
    assert answer["profile"]["rtt_ms"] == 10.0
    assert device.info()["link_emulation"] == [{"to": "edge1", "profile": answer["profile"]}]
    samples = device.control({"op": "probe_link", "to": "edge1", "sizes": [64], "repeats": 2})["samples"]
    assert all(s >= 0.010 for _, _, s in samples)
    assert generate(device, 4)["link_emulation"][0]["profile"]["rtt_ms"] == 10.0


# -- load_stage -------------------------------------------------------------------------------------------------


def test_load_stage_swaps_the_stage_and_drops_its_sessions(tiny_deployment):
    edge2 = tiny_deployment.hop("edge2")
    data = torch.randn(1, 2, 32)
    edge2.forward(ForwardRequest("s-old", data, torch.tensor([[0, 1]]), new_session=True))
    answer = edge2.control({"op": "load_stage", "start": 2, "end": 4}, timeout_s=60)
    assert answer["layers"] == [2, 4] and answer["next"] is None and answer["load_ms"] > 0
    assert edge2.info()["layers"] == [2, 4]
    with pytest.raises(SessionError, match="unknown session"):
        edge2.forward(ForwardRequest("s-old", data[:, :1], torch.tensor([[2]])))
    for bad, why in [
        ({"start": 2, "end": 9}, "pass the model's 4 layers"),
        ({"start": 3, "end": 2}, "not a valid range"),
        ({"start": 1, "end": 3, "embed": True}, "starts at layer 0"),
        ({"start": 2, "end": 3, "head": True}, "ends at the last layer"),
        ({"start": 2, "end": 4, "quant": "int9"}, "unknown quantization scheme 'int9'"),
        ({"start": 2, "end": 4, "next": "edge9"}, "no node 'edge9'"),
        ({"start": 2, "end": 4, "next": "edge2"}, "not a server 'edge2' can forward to"),
        ({"start": 2, "end": 4, "next": "device"}, "not a server"),
        ({"start": 2, "end": 4, "layers": 3}, r"unknown fields \['layers'\]"),
    ]:
        with pytest.raises(ConfigError, match=why):
            edge2.control({"op": "load_stage", **bad}, timeout_s=60)
    assert edge2.info()["layers"] == [2, 4]  # refused: the node keeps its stage
    reply = edge2.forward(ForwardRequest("s-new", data, torch.tensor([[0, 1]]), new_session=True))
    assert reply.output.shape == (1, 2, 32)


def test_load_stage_at_another_scheme_reports_it(tiny_deployment):
    edge1 = tiny_deployment.hop("edge1")
    answer = edge1.control({"op": "load_stage", "start": 1, "end": 3, "quant": "int8", "next": "edge2"}, timeout_s=60)
    assert answer["quant"] == "int8" and answer["next"] == "edge2"
    info = edge1.info()
    assert info["quant"] == "int8" and info["next"] == "edge2"
    assert info["engine"] == "fast"  # the node process runs its blocks on the fast engine (the default)


# -- migrate ----------------------------------------------------------------------------------------------------


def test_a_device_migrates_mid_generation_to_the_same_tokens(tiny_deployment):
    device = tiny_deployment.hop("device")
    want = generate(device)
    queued = device.control({"op": "migrate", "cuts": [2, 3], "route": ["edge1", "edge2"], "at_step": 4})
    assert queued["queued"] and queued["at_step"] == 4
    device.control({"op": "migrate", "cuts": [1], "route": ["edge1"], "head": "server", "at_step": 9})
    got = generate(device)
    assert got["new_tokens"] == want["new_tokens"]
    steps = [(m["step"], m["before"], m["after"]) for m in got["migrations"]]
    assert [s for s, _, _ in steps] == [4, 9]
    assert [row["layers"] for row in steps[0][1]] == [[0, 1], [1, 3], [3, 4], [4, 4]]
    assert [row["layers"] for row in steps[0][2]] == [[0, 2], [2, 3], [3, 4], [4, 4]]
    assert [(row["node"], row["layers"]) for row in steps[1][2]] == [("device", [0, 1]), ("edge1", [1, 4])]
    assert got["migrations"][0]["replayed_tokens"] == len(got["prompt_tokens"]) + 3
    assert {row["name"] for row in got["nodes"]} == {"device", "edge1"}
    assert tiny_deployment.hop("edge1").info()["head"] is True
    assert generate(device)["new_tokens"] == want["new_tokens"]  # and it stays there


def test_a_guarded_generation_with_the_head_on_a_server_equals_one_process_and_survives_a_migration(
    tiny_chat_dir, tmp_path
):
    """The repetition guard's fields reach the device, which then gets logits from the server's head and chooses:
    the tokens equal a one-process guarded generation, also across a live migration (the history is kept)."""
    from edgellm.model.prompt import stop_ids
    from edgellm.model.sampling import SamplingConfig
    from edgellm.store.weights import load_config, load_tokenizer

    guard = {"repetition_penalty": 1.3, "no_repeat_ngram": 2}
    deployed = InProcess(tmp_path / "t.toml", document(tiny_chat_dir, [1, 3], head="server"))
    try:
        device = deployed.hop("device")
        plain, guarded = generate(device), generate(device, **guard)
        assert guarded["new_tokens"] != plain["new_tokens"]  # the guard reached the device and changed the answer
        stops = stop_ids(load_tokenizer(tiny_chat_dir), load_config(tiny_chat_dir))
        config = GenerationConfig(16, SamplingConfig(**guard), stops)
        stages = load_stages(tiny_chat_dir, stage_specs(4, [1, 3], "server"))
        local = Generator(local_pipeline(stages), config).run(torch.tensor([guarded["prompt_tokens"]]))
        assert local.new_tokens[0] == guarded["new_tokens"]
        device.control({"op": "migrate", "cuts": [2], "route": ["edge1"], "head": "device", "at_step": 5})
        migrated = generate(device, **guard)
        assert [m["step"] for m in migrated["migrations"]] == [5]
        assert migrated["new_tokens"] == guarded["new_tokens"]
    finally:
        deployed.stop()


def test_an_idle_device_migrates_at_once_and_refuses_bad_layouts(tiny_deployment):
    device = tiny_deployment.hop("device")
    want = generate(device, 8)
    answer = device.control({"op": "migrate", "cuts": [0, 2], "route": ["edge1", "edge2"]}, timeout_s=60)
    assert answer["migrated"] and [row["node"] for row in answer["layout"]] == ["edge1", "edge2", "device"]
    assert generate(device, 8)["new_tokens"] == want["new_tokens"]  # a thin device: edge1 embeds
    for bad, why in [
        ({"cuts": [2, 9], "route": ["edge1", "edge2"]}, "cut 9 is out of range"),
        ({"cuts": [2], "route": ["edge2"]}, "no link between 'device' and 'edge2'"),
        ({"cuts": [2, 3], "route": ["edge1", "edge9"]}, "no node 'edge9'"),
        ({"cuts": [2], "route": ["edge1"], "quant": {"edge1": "int9"}}, "unknown quantization scheme"),
        ({"cuts": [2], "route": ["edge1"], "at_step": 0}, "decode step >= 1"),
    ]:
        with pytest.raises(ConfigError, match=why):
            device.control({"op": "migrate", **bad})
    assert device.info()["layout"] == answer["layout"]


# -- node processes ---------------------------------------------------------------------------------------------


def processes(tmp: Path, doc: dict) -> tuple[LocalDeployment, Topology]:
    path = tmp / "deploy.toml"
    topology = write_topology(path, doc)
    return LocalDeployment(topology, path, tmp), topology


@pytest.mark.multiprocess
def test_a_migration_asked_for_mid_run_moves_node_processes(tiny_chat_dir, tmp_path):
    doc = document(tiny_chat_dir, [1, 3])
    doc["links"][0]["rtt_ms"] = 20.0  # a step takes a round trip: the control call lands mid-generation
    deployment, topology = processes(tmp_path, doc)
    with deployment:
        device = RemoteHop("device", topology.device.address, channel_config(topology))
        want = generate(device, 24)
        request = {"prompt": "the cat sat on the mat and", "chat": False, "max_new_tokens": 24}
        report, tokens = {}, 0
        for event in device.generate(request):
            if "report" in event:
                report = event["report"]
                continue
            tokens += 1
            if tokens == 3:  # no step named: the running generation applies it at its next step boundary
                assert device.control({"op": "migrate", "cuts": [2], "route": ["edge1"]})["queued"]
        assert report["new_tokens"] == want["new_tokens"]
        assert len(report["migrations"]) == 1 and report["migrations"][0]["step"] >= 3


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.real_model
def test_live_migration_of_the_real_model_gives_the_same_tokens(real_model_dir, tmp_path):
    doc = document(real_model_dir, [10, 20])
    deployment, topology = processes(tmp_path, doc)
    request = {"prompt": "The history of the Roman Empire begins", "chat": False, "max_new_tokens": 24}
    with deployment:
        device = RemoteHop("device", topology.device.address, channel_config(topology))
        want = [e["report"] for e in device.generate(request) if "report" in e][0]
        assert len(want["new_tokens"]) == 24 and want["migrations"] == []
        device.control({"op": "migrate", "cuts": [4, 26], "route": ["edge1", "edge2"], "at_step": 8})
        device.control({"op": "migrate", "cuts": [4], "route": ["edge1"], "at_step": 16})  # edge2 leaves
        got = [e["report"] for e in device.generate(request) if "report" in e][0]
    assert got["new_tokens"] == want["new_tokens"]
    moves = got["migrations"]
    assert [m["step"] for m in moves] == [8, 16]
    assert [(r["node"], r["layers"]) for r in moves[0]["before"]] == [
        ("device", [0, 10]), ("edge1", [10, 20]), ("edge2", [20, 30]), ("device", [30, 30])]  # fmt: skip
    assert [(r["node"], r["layers"]) for r in moves[0]["after"]] == [
        ("device", [0, 4]), ("edge1", [4, 26]), ("edge2", [26, 30]), ("device", [30, 30])]  # fmt: skip
    assert [(r["node"], r["layers"]) for r in moves[1]["after"]] == [
        ("device", [0, 4]), ("edge1", [4, 30]), ("device", [30, 30])]  # fmt: skip
    assert all(m["ms"] > 0 and m["replay_bytes"] for m in moves)
