"""Serving across real processes: concurrent generations with mixed adapters through a 3-node chain, where each
server holds and applies only its own layers' part of each adapter (sent by the device over the control channel)
and batches the sessions' steps; every answer equals peft's alone."""

from __future__ import annotations

import pytest
from test_deployment import Deployed, document
from test_serving_engine import PROMPTS, STEPS, _greedy, _tokens, adapters_dir  # noqa: F401 - a fixture

from conftest import in_threads
from edgellm.deploy.device_engine import topology_device_engine

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.fixture(scope="module")
def deployed(tiny_chat_dir, tmp_path_factory):
    doc = document(tiny_chat_dir, 2, "server")
    server = Deployed(tmp_path_factory.mktemp("serve-split"), doc)
    yield server
    server.stop()


def test_mixed_adapters_through_a_split_equal_peft_and_each_node_holds_its_layers(deployed, adapters_dir):  # noqa: F811
    root, models = adapters_dir
    engine = topology_device_engine(str(deployed.path), adapters_dir=root)
    jobs = [(p, a) for p in PROMPTS[:3] for a in (None, "alice", "bob")]
    got = in_threads(lambda i: _tokens(engine, *jobs[i]), len(jobs), 180)
    for i, (prompt, adapter) in enumerate(jobs):
        model = models[adapter or "alice"]
        if adapter is None:
            with model.disable_adapter():
                want = _greedy(model, prompt, STEPS)
        else:
            want = _greedy(model, prompt, STEPS)
        assert got[i] == want[: len(got[i])], (prompt, adapter)
    held = {}
    for server in ("edge1", "edge2"):
        hop = deployed.servers._control_hop(server)
        listing = {a["name"]: a for a in hop.control({"op": "adapters"})["adapters"]}
        held[server] = listing
        assert set(listing) == {"alice", "bob"}
        info = hop.info()
        assert max(int(k) for k in info["batching"]["batch_sizes"]) > 1  # the server batched sessions' steps
        assert info["batching"]["row_messages"] > 0  # and received them several sessions to a message
    assert all(held["edge1"][a]["bytes"] > 0 and held["edge2"][a]["bytes"] > 0 for a in ("alice", "bob"))
    nodes = engine.stats()["nodes"]  # what /metrics reads: every server's batching too
    assert {"edge1", "edge2"} <= set(nodes) and all(
        int(max(nodes[n]["batch_sizes"], key=int)) > 1 for n in ("edge1", "edge2")
    )
    engine.unload_adapter("alice")
    hop = deployed.servers._control_hop("edge2")
    assert [a["name"] for a in hop.control({"op": "adapters"})["adapters"]] == ["bob"]


def test_speculative_generation_across_processes_equals_plain_decoding(deployed):
    """Drafts verified through a 3-node chain (head on the last server): the same tokens as plain decoding, and
    with the target itself as the drafter every draft is kept, several tokens per round trip."""
    engine = topology_device_engine(str(deployed.path))
    for prompt in PROMPTS[:2]:
        plain = _tokens(engine, prompt)
        for draft in ("int8", "none"):
            request = {"prompt_ids": prompt, "max_new_tokens": STEPS, "speculative": "3", "draft": draft}
            events = list(engine.generate(request))
            report = events[-1]["report"]
            assert [e["token"] for e in events[:-1]] == report["new_tokens"] == plain, draft
            spec = report["speculative"]
            assert spec["rounds"] >= 1 and spec["drafter"] == draft
            if draft == "none":
                assert spec["acceptance_rate"] == 1.0 and spec["tokens_per_round"] > 2
                assert report["links"][0]["calls"] == spec["rounds"] + 1  # one message per round, not per token
