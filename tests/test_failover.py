"""Stage replicas and failover (issue 17): the replica table, the topology's `replica_of`, the device's replica hop,
and generations over real processes that lose the replica serving them mid-answer and still give the tokens of a
run without failure."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
from test_deployment import PROMPTS, TOKEN, reference_tokens

from conftest import TINY_LAYERS
from edgellm.deploy.local_deployment import LocalDeployment, free_port
from edgellm.deploy.node_builder import device_hops
from edgellm.deploy.topology import parse_topology, write_topology
from edgellm.errors import ConfigError, SessionError
from edgellm.failover.hop import ReplicaHop
from edgellm.failover.replicas import ReplicaTable
from edgellm.net.messages import ForwardReply, ForwardRequest, HopTrace
from edgellm.net.rpc import NodeUnreachable
from edgellm.split.generator import GenerationConfig, Generator
from edgellm.split.host import SessionLimits
from edgellm.split.one_process import load_stages
from edgellm.split.pipeline import Pipeline

# ---------------------------------------------------------------- the table (pure)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_new_sessions_go_to_the_unmeasured_then_the_faster_less_loaded_replica():
    table = ReplicaTable([["a", "b"], ["c"]])
    assert table.route() == ("a", "c")  # nothing measured, no load: file order
    table.opened(("a", "c"))
    assert table.route() == ("b", "c")  # b is unmeasured and idle
    table.observe("a", 10.0)
    table.observe("b", 30.0)
    table.closed(("a", "c"))
    assert table.choose(0) == "a"  # 10 x 1 < 30 x 1
    table.opened(("a",) * 3)  # a now serves three sessions: 10 x 4 > 30 x 1
    assert table.choose(0) == "b"
    with pytest.raises(ConfigError, match="serves two stage positions"):
        ReplicaTable([["a"], ["a"]])


def test_a_failed_replica_is_avoided_then_probed_after_retry_s_and_rejoins():
    clock = Clock()
    table = ReplicaTable([["a", "b"]], retry_s=2.0, clock=clock)
    table.failed("a", "connection refused")
    assert not table.replicas["a"].up and table.choose(0) == "b"
    assert table.due_for_probe() == []  # not yet
    clock.now += 2.5
    assert table.due_for_probe() == ["a"]
    assert table.due_for_probe() == []  # one probe per retry_s
    table.rejoined("a")
    assert table.choose(0) == "b"  # settling: peers' channels may still be in reconnect backoff
    clock.now += table.settle_s
    assert table.choose(0) == "a"  # unmeasured since it rejoined: it comes first again
    report = table.report()["a"]
    assert report["up"] and report["failures"] == 1 and report["rejoins"] == 1
    table.failed("a", "x")
    table.failed("b", "y")
    assert table.choose(0) == "a"  # every replica down: the one down longest (it may be back)


# ---------------------------------------------------------------- the topology


def replica_document(model_dir: Path, mode: str = "chain", replicas: int = 1) -> dict:
    """device -> edge1 -> edge2 (tiny model), every server with `replicas` replicas on its own links' profile."""
    names = ["device", "edge1", "edge2"]
    pairs = list(zip(names, names[1:])) if mode == "chain" else [("device", n) for n in names[1:]]
    nodes = [{"name": n, "role": "device" if i == 0 else "edge", "address": f"127.0.0.1:{free_port()}"}
             for i, n in enumerate(names)]  # fmt: skip
    for server in names[1:]:
        for k in range(replicas):
            nodes.append({"name": f"{server}r{k + 1}", "role": "edge", "replica_of": server,
                          "address": f"127.0.0.1:{free_port()}"})  # fmt: skip
    return {
        "model": {"name": str(model_dir), "cuts": [1, 3], "head": "device"},
        "deployment": {"route": names, "mode": mode, "token": TOKEN, "deadline_s": 20.0},
        "nodes": nodes,
        "links": [{"between": [a, b], "profile": "none"} for a, b in pairs],
    }


def test_a_replica_runs_its_primarys_stage_over_its_primarys_links(tmp_path):
    topology = parse_topology(replica_document(tmp_path))
    assert topology.has_replicas and [n.name for n in topology.replicas("edge1")] == ["edge1", "edge1r1"]
    assert topology.stages_for("edge1r1", TINY_LAYERS) == topology.stages_for("edge1", TINY_LAYERS)
    assert topology.link_between("device", "edge1r1") == topology.link_between("device", "edge1")
    assert topology.link_between("edge1r1", "edge2r1") == topology.link_between("edge1", "edge2")
    assert topology.direction("edge2r1", "edge1r1") == "down"
    assert topology.next_hop("edge1r1").name == "edge2"  # type: ignore[union-attr]
    assert topology.route == ("device", "edge1", "edge2")  # replicas are not on the route


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["nodes"][3].update(replica_of="edge7"), "nodes[3].replica_of: 'edge7' is not a server"),
        (lambda d: d["nodes"][3].update(replica_of="device"), "'device' is not a server"),
        (lambda d: d["nodes"][4].update(replica_of="edge1r1"), "'edge1r1' is not a server"),
        (lambda d: d["nodes"][1].update(replica_of="edge2"), "nodes[1].replica_of: 'edge1' is on deployment.route"),
        (lambda d: d["nodes"][3].update(role="device"), "a replica serves a stage"),
        (lambda d: d["nodes"][3].pop("replica_of"), "'edge1r1' is not on deployment.route (nor a replica_of"),
    ],
)
def test_bad_replicas_are_refused_naming_the_field(tmp_path, change, message):
    doc = replica_document(tmp_path)
    change(doc)
    with pytest.raises(ConfigError) as refused:
        parse_topology(doc, source="t.toml")
    assert message in str(refused.value), refused.value


def test_local_deployment_starts_the_replicas_too(tmp_path):
    topology = parse_topology(replica_document(tmp_path))
    assert LocalDeployment(topology, tmp_path / "t.toml", tmp_path).names == [
        "device", "edge1", "edge2", "edge1r1", "edge2r1"]  # fmt: skip


# ---------------------------------------------------------------- the hop (fake replicas)


class FakeReplica:
    def __init__(self, name: str) -> None:
        self.name, self.alive, self.calls, self.closed = name, True, [], []

    def forward(self, request: ForwardRequest) -> ForwardReply:
        if not self.alive:
            raise NodeUnreachable(f"node {self.name} is down")
        self.calls.append((request.session, request.route))
        trace = HopTrace(self.name, f"device->{self.name}", 1.0, 1.0, 0.5, 10, 10)
        return ForwardReply(request.data, 1.0, 1.0, (trace,))

    def close(self, request) -> None:
        self.closed.append(request.session)


def request(session: str, new: bool) -> ForwardRequest:
    return ForwardRequest(session, torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long), None, new)


def test_the_hop_routes_sessions_and_fails_over_to_a_live_replica():
    a, b = FakeReplica("a"), FakeReplica("b")
    alive = {"a": True, "b": True, "c": True}
    hop = ReplicaHop("r", ReplicaTable([["a", "b"], ["c"]]), {"a": a, "b": b}, lambda n: alive[n])
    hop.forward(request("s1", True))
    assert a.calls == [("s1", ("c",))]  # the route's tail rides in the request
    hop.forward(request("s2", True))
    assert b.calls == [("s2", ("c",))]  # load spreads
    a.alive = alive["a"] = False
    with pytest.raises(SessionError, match="down: a"):
        hop.forward(request("s1", False))
    with pytest.raises(SessionError, match="has no route"):  # the session was forgotten: the generator replays
        hop.forward(request("s1", False))
    hop.forward(request("s1", True))
    assert b.calls[-1] == ("s1", ("c",)) and hop.open_routes()["s1"] == ("b", "c")
    report = hop.report()
    assert report["replicas"]["a"]["up"] is False and report["failovers"][0]["down"] == ["a"]
    hop.close(request("s1", False))  # type: ignore[arg-type]
    assert "s1" in b.closed and "s1" not in hop.open_routes()


# ---------------------------------------------------------------- real processes


class ReplicaDeployment:
    """Every server and replica as a process; the device's pipeline (first stage and head) in this process."""

    def __init__(self, tmp: Path, doc: dict) -> None:
        self.path = tmp / f"replicas-{free_port()}.toml"
        self.topology = write_topology(self.path, doc)
        names = [n.name for n in self.topology.nodes if n.role != "device"]
        self.nodes = LocalDeployment(self.topology, self.path, tmp, names=names)
        self.nodes.start(timeout_s=120)

    def pipeline(self, doc: dict | None = None) -> Pipeline:
        topology = self.topology if doc is None else write_topology(self.path.with_suffix(".other.toml"), doc)
        specs = topology.stages_for("device", TINY_LAYERS)
        return Pipeline(device_hops(topology, "device", load_stages(Path(topology.model.name), specs), SessionLimits()))


@pytest.fixture(scope="module")
def replicated(tiny_llama_dir, tmp_path_factory):
    deployment = ReplicaDeployment(tmp_path_factory.mktemp("replicas"), replica_document(tiny_llama_dir))
    yield deployment
    deployment.nodes.stop()


def replica_hops(pipeline: Pipeline) -> list[ReplicaHop]:
    return [hop for hop in pipeline.hops if isinstance(hop, ReplicaHop)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["chain", "star"])
def test_a_generation_survives_the_sigkill_of_the_replica_serving_it(replicated, tiny_llama_dir, mode):
    doc = None
    if mode == "star":  # the same processes, called one by one by the device
        doc = replica_document(tiny_llama_dir, "star")
        doc["nodes"] = [{k: v for k, v in vars(n).items() if k in ("name", "role", "address", "replica_of") and v}
                        for n in replicated.topology.nodes]  # fmt: skip
    pipeline = replicated.pipeline(doc)
    hops = replica_hops(pipeline)
    assert len(hops) == (1 if mode == "chain" else 2)
    prompt = PROMPTS[0]
    want = reference_tokens(tiny_llama_dir, prompt, 12)
    generator = Generator(pipeline, GenerationConfig(max_new_tokens=12))
    steps = generator.stream(torch.tensor([prompt]))
    got = [next(steps).tokens[0] for _ in range(5)]
    serving = [name for hop in hops for route in hop.open_routes().values() for name in route]
    victim = serving[-1]  # the last stage's replica: in chain mode the device does not call it directly
    replicated.nodes.kill(victim)
    try:
        got += [step.tokens[0] for step in steps]
        assert got == want  # the tokens of a run without the failure
        result = generator.result
        # Usually one recovery; under load a first retry can go through a node whose own link to the victim has
        # not failed yet, and the device recovers again (seen once in a full suite run, 2026-12-04).
        assert result is not None and 1 <= len(result.recoveries) <= 2
        assert result.recoveries[-1]["replayed_tokens"] == len(prompt) + 4
        events = [e for hop in hops for e in hop.failovers]
        assert events and events[-1]["down"] == [victim]
        marked = {name for e in events for name in e["down"]}
        assert all(victim not in route for hop in hops for route in hop.open_routes().values())
    finally:
        replicated.nodes.restart(victim)
    # the node is back: after retry_s the next session probes it, and it rejoins
    for hop in hops:
        hop.table.retry_s = 0.0
    assert generate_once(pipeline, prompt) == want
    assert all(r["up"] for hop in hops for r in hop.report()["replicas"].values())
    assert sum(r["rejoins"] for hop in hops for r in hop.report()["replicas"].values()) == len(marked)


def generate_once(pipeline: Pipeline, prompt: list[int]) -> list[int]:
    return Generator(pipeline, GenerationConfig(max_new_tokens=12)).run(torch.tensor([prompt])).new_tokens[0]


@pytest.mark.multiprocess
def test_without_a_live_replica_the_generation_fails_clearly(tiny_llama_dir, tmp_path):
    doc = replica_document(tiny_llama_dir, replicas=0)
    doc = copy.deepcopy(doc)
    doc["nodes"].append(
        {"name": "edge2r1", "role": "edge", "replica_of": "edge2", "address": f"127.0.0.1:{free_port()}"}
    )
    deployment = ReplicaDeployment(tmp_path, doc)
    try:
        pipeline = deployment.pipeline()
        deployment.nodes.kill("edge2")
        deployment.nodes.kill("edge2r1")
        start = time.monotonic()
        with pytest.raises(SessionError, match="edge2"):
            generate_once(pipeline, PROMPTS[0])
        assert time.monotonic() - start < 15  # refused fast, not after every deadline
    finally:
        deployment.nodes.stop()


@pytest.mark.real_model
@pytest.mark.multiprocess
@pytest.mark.slow
def test_the_real_model_keeps_its_tokens_when_the_serving_replica_is_killed(real_model_dir, tmp_path):
    """SmolLM2-135M, device [0, 10) + head, one server stage [10, 30) on two replicas; greedy, 16 tokens."""
    from edgellm.model.prompt import encode_prompt
    from edgellm.store.weights import load_tokenizer

    doc = {
        "model": {"name": str(real_model_dir), "cuts": [10], "head": "device"},
        "deployment": {"route": ["device", "edge1"], "mode": "chain", "token": TOKEN, "deadline_s": 60.0},
        "nodes": [{"name": "device", "role": "device", "address": f"127.0.0.1:{free_port()}"},
                  {"name": "edge1", "role": "edge", "address": f"127.0.0.1:{free_port()}"},
                  {"name": "edge1b", "role": "edge", "replica_of": "edge1", "address": f"127.0.0.1:{free_port()}"}],
        "links": [{"between": ["device", "edge1"], "profile": "none"}],
    }  # fmt: skip
    path = tmp_path / "real.toml"
    topology = write_topology(path, doc)
    prompt = torch.tensor([encode_prompt(load_tokenizer(real_model_dir), "Name three colours.", True)])
    with LocalDeployment(topology, path, tmp_path, names=["edge1", "edge1b"]) as nodes:
        specs = topology.stages_for("device", 30)
        pipeline = Pipeline(device_hops(topology, "device", load_stages(real_model_dir, specs), SessionLimits()))
        config = GenerationConfig(max_new_tokens=16)
        want = Generator(pipeline, config).run(prompt).new_tokens[0]
        generator = Generator(pipeline, config)
        got = []
        for step in generator.stream(prompt):
            got.append(step.tokens[0])
            if step.index == 6:
                (hop,) = replica_hops(pipeline)
                ((serving,),) = hop.open_routes().values()
                nodes.kill(serving)
        assert got == want
        assert generator.result is not None and len(generator.result.recoveries) == 1
