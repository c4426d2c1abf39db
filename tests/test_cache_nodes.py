"""Cache nodes as real processes: a placement realised by fetching and evicting blocks, generations routed to the
node holding the variant give that variant's tokens, a sync never interrupts a generation in progress."""

from __future__ import annotations

import threading

import pytest
from test_blocks import make_adapter

from edgellm.blocks import BlockStore
from edgellm.blocks.chunk import publish_adapter, publish_model
from edgellm.control.cache_nodes import CacheNodes, CacheNodeSpec
from edgellm.errors import ConfigError

pytestmark = pytest.mark.multiprocess

REQUEST = {"prompt": "The cat sat on the", "max_new_tokens": 12, "chat": False}


def reference_tokens(model_dir, adapters_dir, adapter, max_new_tokens=12):
    from edgellm.serve.local_device import local_device_engine

    engine = local_device_engine(str(model_dir), adapters_dir=adapters_dir)
    request = {**REQUEST, "max_new_tokens": max_new_tokens, "adapter": adapter}
    return [e["token"] for e in engine.generate(request) if "token" in e]


@pytest.fixture(scope="module")
def published(tiny_chat_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    origin = BlockStore(root / "origin")
    manifests = {"base": publish_model(origin, tiny_chat_dir, "base")}
    for i in range(2):
        adapter = make_adapter(tiny_chat_dir, root / "adapters" / f"lora-{i}", seed=10 + i)
        manifests[f"lora-{i}"] = publish_adapter(origin, adapter, f"lora-{i}", "base")
    return root, manifests


def test_a_placement_on_three_nodes_serves_each_variant_with_its_tokens(published, tiny_chat_dir, tmp_path):
    root, manifests = published
    want = {v: reference_tokens(tiny_chat_dir, root / "adapters", None if v == "base" else v) for v in manifests}
    assert len({tuple(t) for t in want.values()}) == 3  # the variants differ, so a wrong routing shows
    base_bytes = manifests["base"].size_bytes
    specs = [CacheNodeSpec("cloud", root / "origin")]
    specs += [CacheNodeSpec(f"edge{i}", tmp_path / f"edge{i}", base_bytes + 200_000) for i in (1, 2, 3)]
    placement = {"edge1": {"lora-0"}, "edge2": {"lora-1", "base"}, "edge3": {"base"}}
    order = {n: ["edge1", "edge2", "edge3", "cloud"] for n in placement}
    with CacheNodes(specs, tmp_path / "logs") as nodes:
        answers = nodes.sync(placement, manifests, order)
        assert nodes.held() == {"cloud": ["base", "lora-0", "lora-1"], "edge1": ["base", "lora-0"],
                                "edge2": ["base", "lora-1"], "edge3": ["base"]}  # fmt: skip
        assert all(a["refused"] == [] for a in answers.values())
        reports = nodes.reports()
        # the base is stored once beside the adapter: less than the two variants stored whole
        assert reports["edge1"]["used_bytes"] < reports["edge1"]["independent_bytes"]
        for node, variants in placement.items():
            for variant in variants:
                tokens, report = nodes.generate(node, variant, REQUEST)
                assert tokens == want[variant], (node, variant)
                assert report["model"] == variant and report["node"] == node
        for variant in ("lora-0", "lora-1", "base"):  # the cloud serves every variant from one engine
            assert nodes.generate("cloud", variant, REQUEST)[0] == want[variant]
        cloud = nodes.hops["cloud"].info()
        assert cloud["engines"] == ["base"]  # the base's weights are in memory once for its three variants
        with pytest.raises(ConfigError, match="does not hold variant 'lora-1'"):
            nodes.generate("edge1", "lora-1", REQUEST)

        # popularity shifts: edge1 swaps lora-0 for lora-1 while a long lora-0 answer runs on it
        long = {**REQUEST, "max_new_tokens": 200}
        events = nodes.stream("edge1", "lora-0", long)
        first = next(events)  # the generation holds lora-0's blocks from here on
        results: list = []
        runner = threading.Thread(target=lambda: results.append([first, *events]))
        runner.start()
        answer = nodes.sync({"edge1": {"lora-1"}}, manifests, {"edge1": ["edge2", "cloud"]})["edge1"]
        runner.join(120)
        tokens = [e["token"] for e in results[0] if "token" in e]
        assert tokens == reference_tokens(tiny_chat_dir, root / "adapters", "lora-0", 200)
        assert answer["deferred_bytes"] > 0  # lora-0's own blocks waited for the generation
        assert set(answer["fetched_bytes"]) == {"edge2"}  # lora-1 came from the peer, not the cloud
        assert nodes.held()["edge1"] == ["base", "lora-1"]
        assert nodes.reports()["edge1"]["used_bytes"] == base_bytes + manifests["lora-1"].size_bytes
        assert nodes.generate("edge1", "lora-1", REQUEST)[0] == want["lora-1"]
