"""`edgellm cache apply` end to end on the tiny chat model: placements realised on real node processes, requests
routed by the placement with the origin's tokens, a popularity shift migrating blocks under a running answer."""

from __future__ import annotations

import json

import pytest

from edgellm.cli.main import main
from edgellm.control.cache_apply_config import apply_config, phase_demand
from edgellm.errors import ConfigError

CONFIG = """
algorithm = "trimcaching"
max_new_tokens = 8
prompts = ["The cat sat on the", "Once upon a time"]

[[variants]]
name = "base"
model = "{model}"
{adapters}

[[servers]]
name = "edge1"
storage_mb = {small}
backhaul = {{ up_mbps = 1000, down_mbps = 1000, rtt_ms = 2 }}
[[servers]]
name = "edge2"
storage_mb = {small}
backhaul = "6g"

[[users]]
name = "alice"
latency_req_ms = 60000
reach = {{ edge1 = "5g" }}
[[users]]
name = "bob"
latency_req_ms = 60000
reach = {{ edge1 = "5g", edge2 = "wifi6" }}

[[phases]]
name = "morning"
popularity = ["lora-0", "lora-1", "base"]
requests = 6
[[phases]]
name = "evening"
popularity = ["lora-2", "lora-3"]
zipf = 0.5
requests = 6
seed = 1
"""


def config_text(model_dir, small_mb: float) -> str:
    adapters = "\n".join(f'[[variants]]\nname = "lora-{i}"\nbase = "base"\nsynthetic_seed = {i}\nsynthetic_rank = 4'
                         for i in range(4))  # fmt: skip
    return CONFIG.format(model=model_dir, adapters=adapters, small=small_mb)


def test_config_errors_name_the_field(tmp_path):
    import tomllib

    good = tomllib.loads(config_text("m", 1.0))
    config = apply_config(good, tmp_path)
    assert [row for row in phase_demand(config, config.phases[1])][0][:3] == (0.0, 0.0, 0.0)
    bad = {**good, "users": [{**good["users"][0], "reach": {"edge9": "5g"}}]}
    with pytest.raises(ConfigError, match="reaches unknown servers"):
        apply_config(bad, tmp_path)
    bad = {**good, "phases": [{"name": "p", "popularity": ["nope"]}]}
    with pytest.raises(ConfigError, match="unknown variants"):
        apply_config(bad, tmp_path)
    bad = {**good, "variants": [{"name": "x", "base": "base", "adapter": "a", "synthetic_seed": 1}]}
    with pytest.raises(ConfigError, match="exactly one of 'adapter'"):
        apply_config(bad, tmp_path)
    path = tmp_path / "bad.toml"
    path.write_text("algorithm = 3\n")
    assert main(["cache", "apply", "--config", str(path)]) == 2


@pytest.mark.multiprocess
def test_cache_apply_serves_routed_requests_with_the_origins_tokens(tiny_chat_dir, tmp_path, capsys):
    from edgellm.blocks import BlockStore
    from edgellm.blocks.chunk import publish_model

    base_mb = publish_model(BlockStore(tmp_path / "probe"), tiny_chat_dir, "base").size_bytes / 1e6
    path = tmp_path / "apply.toml"
    path.write_text(config_text(tiny_chat_dir, round(base_mb + 0.02, 6)))  # the base and about two adapters
    assert main(["cache", "apply", "--config", str(path), "--work-dir", str(tmp_path / "w"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    morning, evening = report["phases"]
    for phase in (morning, evening):
        assert phase["tokens_equal_origin"] == len(phase["requests"]) == 6
        assert all(a["refused"] == [] for a in phase["sync"].values())
        for node, held in phase["placement"].items():
            assert set(held) <= set(phase["popularity"]) | {"base"}
            assert phase["stored_bytes"][node] <= report["config"]["servers"][0]["storage_bytes"]
    assert morning["served_at_edge"] >= 4  # the popular LoRA variants are placed where both users reach
    assert all(r["node"] != "cloud" or not r["edge_hit"] for r in morning["requests"])
    carried = evening["carried_session"]
    assert carried is not None and carried["completed"] and carried["tokens_equal_origin"]
    evicted = sum(s["evicted_bytes"] + s["deferred_bytes"] for s in evening["sync"].values())
    assert evicted > 0  # the morning's adapters left for the evening's
    assert any("edge" in src for s in evening["sync"].values() for src in s["fetched_bytes"]) or all(
        not s["fetched_bytes"] or "cloud" in s["fetched_bytes"] for s in evening["sync"].values()
    )
    for store in report["stores"].values():
        if store["budget_bytes"] is not None:
            assert store["used_bytes"] <= store["budget_bytes"]
            assert store["used_bytes"] < store["independent_bytes"] or store["independent_bytes"] == 0


def test_the_shipped_example_config_parses():
    import tomllib
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "caching" / "apply.toml"
    config = apply_config(tomllib.loads(path.read_text()), path.parent)
    assert len(config.variants) == 7 and [s.name for s in config.servers] == ["edge1", "edge2", "edge3"]
    assert all(v.synthetic_rank == 64 for v in config.variants if v.base is not None)
