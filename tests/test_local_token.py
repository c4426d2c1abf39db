"""A deployment started whole on this machine gets a token when its `token_env` is unset (finetune, demo, profile)."""

from __future__ import annotations

from edgellm.deploy.local_deployment import ensure_local_token
from edgellm.deploy.topology import parse_topology


def topology(host: str = "127.0.0.1", **dep: str):
    return parse_topology({
        "model": {"name": "m", "cuts": [2]},
        "deployment": {"route": ["device", "edge"], **dep},
        "nodes": [{"name": "device", "role": "device", "address": f"{host}:5000"},
                  {"name": "edge", "role": "edge", "address": f"{host}:5001"}],
        "links": [{"between": ["device", "edge"]}],
    })  # fmt: skip


def test_an_unset_token_env_gets_a_fresh_token_on_loopback(monkeypatch):
    monkeypatch.delenv("EDGELLM_TEST_TOKEN", raising=False)
    t = topology(token_env="EDGELLM_TEST_TOKEN")
    assert ensure_local_token(t)
    first = t.resolve_token()
    assert first and len(first) == 32
    assert not ensure_local_token(t) and t.resolve_token() == first  # set now: left alone


def test_a_set_variable_an_inline_token_or_a_remote_node_is_left_alone(monkeypatch):
    monkeypatch.setenv("EDGELLM_TEST_TOKEN", "mine")
    assert not ensure_local_token(topology(token_env="EDGELLM_TEST_TOKEN"))
    assert topology(token_env="EDGELLM_TEST_TOKEN").resolve_token() == "mine"
    assert not ensure_local_token(topology(token="inline-secret"))
    monkeypatch.delenv("EDGELLM_TEST_TOKEN")
    assert not ensure_local_token(topology("10.0.0.7", token_env="EDGELLM_TEST_TOKEN"))
