"""The device engine `edgellm serve` drives: concurrent generations, each with its own adapter, each exactly what
it gets alone (and, with an adapter, what peft gives); adapters load on demand, under a budget, and unload."""

from __future__ import annotations

import pytest
import torch
from test_adapters import make_peft_adapter

from conftest import in_threads
from edgellm.errors import BusyError, ConfigError
from edgellm.serve.local_device import local_device_engine

PROMPTS = [[1, 5, 17, 42, 8], [1, 9, 71, 30, 12, 44, 7, 66], [1, 30, 12], [2, 8, 40, 41]]
STEPS = 8


@pytest.fixture(scope="module")
def adapters_dir(tiny_chat_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    models = {}
    for seed, name in enumerate(["alice", "bob"]):
        models[name] = make_peft_adapter(tiny_chat_dir, root / name, 4, 8, ("q_proj", "v_proj", "down_proj"), seed)
    return root, models


def _greedy(model, prompt, steps):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
    return ids[0, len(prompt) :].tolist()


def _tokens(engine, prompt, adapter=None):
    events = list(engine.generate({"prompt_ids": prompt, "max_new_tokens": STEPS, "adapter": adapter}))
    report = events[-1]["report"]
    assert [e["token"] for e in events[:-1]] == report["new_tokens"]
    assert all("timing" in e and e["timing"]["ms"] >= 0 for e in events[:-1])
    return report["new_tokens"]


@pytest.fixture(scope="module")
def engine(tiny_chat_dir, adapters_dir):
    return local_device_engine(str(tiny_chat_dir), adapters_dir=adapters_dir[0])


def test_an_adapter_generates_what_peft_generates_and_differs_from_the_base(engine, adapters_dir):
    _, models = adapters_dir
    for name, model in models.items():
        want = _greedy(model, PROMPTS[1], STEPS)
        got = _tokens(engine, PROMPTS[1], name)
        assert got == want[: len(got)]
    with models["alice"].disable_adapter():
        base = _greedy(models["alice"], PROMPTS[1], STEPS)
    assert _tokens(engine, PROMPTS[1]) == base[: len(_tokens(engine, PROMPTS[1]))]
    assert _tokens(engine, PROMPTS[1], "alice") != _tokens(engine, PROMPTS[1], "bob")  # adapters change the output


def test_concurrent_generations_with_mixed_adapters_get_what_each_gets_alone(engine):
    jobs = [(p, a) for p in PROMPTS for a in (None, "alice", "bob")]
    want = [_tokens(engine, p, a) for p, a in jobs]
    got = in_threads(lambda i: _tokens(engine, *jobs[i]), len(jobs), 120)
    assert got == want
    stats = engine.stats()
    (host,) = stats["stages"].values()
    assert max(int(k) for k in host["batch_sizes"]) > 1 and host["sessions"] == 0
    assert stats["active_generations"] == 0


def test_adapters_load_on_demand_under_a_budget_and_unload(tiny_chat_dir, adapters_dir):
    root, _ = adapters_dir
    size = sum(f.stat().st_size for f in (root / "alice").glob("*.safetensors"))
    engine = local_device_engine(str(tiny_chat_dir), adapters_dir=root, adapter_budget_mb=size * 1.5 / 1e6)
    assert [(a["name"], a["loaded"]) for a in engine.adapter_listing()] == [("alice", False), ("bob", False)]
    _tokens(engine, PROMPTS[0], "alice")
    _tokens(engine, PROMPTS[0], "bob")  # alice is evicted to make room: the budget holds one
    assert {a["name"]: a["loaded"] for a in engine.adapter_listing()} == {"alice": False, "bob": True}
    engine.unload_adapter("bob")
    assert not any(a["loaded"] for a in engine.adapter_listing())
    with pytest.raises(ConfigError, match="not loaded"):
        engine.unload_adapter("bob")
    with pytest.raises(ConfigError, match="unknown adapter"):
        list(engine.generate({"prompt_ids": [1, 2], "adapter": "carol"}))
    engine.load_adapter("carol", str(root / "alice"))  # a new name for a directory, at run time
    assert _tokens(engine, PROMPTS[0], "carol") == _tokens(engine, PROMPTS[0], "alice")


def test_an_adapter_in_use_is_neither_unloaded_nor_evicted(tiny_chat_dir, adapters_dir):
    root, _ = adapters_dir
    size = sum(f.stat().st_size for f in (root / "alice").glob("*.safetensors"))
    engine = local_device_engine(str(tiny_chat_dir), adapters_dir=root, adapter_budget_mb=size * 1.5 / 1e6)
    stream = engine.generate({"prompt_ids": [1, 2, 3], "max_new_tokens": 4, "adapter": "alice"})
    next(stream)  # alice is now pinned by a running generation
    with pytest.raises(BusyError, match="in use"):
        engine.unload_adapter("alice")
    with pytest.raises(BusyError, match="does not fit"):
        list(engine.generate({"prompt_ids": [1, 2], "adapter": "bob"}))
    stream.close()  # the consumer stops early: the generation ends and unpins
    _tokens(engine, PROMPTS[0], "bob")


def test_bad_prompt_ids_are_refused(engine):
    for bad, message in [([], "at least one"), ([1, -2], "non-negative"), ([1, 10**6], "past the vocabulary")]:
        with pytest.raises(ConfigError, match=message):
            list(engine.generate({"prompt_ids": bad}))
