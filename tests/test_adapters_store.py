"""`AdapterStore` bookkeeping: bytes held per stage, LRU eviction under a budget, pins, slots, unload and reload,
bad input refused by name with the store left unchanged, and peft directories written by peft and by edgellm."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_LAYERS
from edgellm.adapters import AdapterStore, MultiLoraLinear
from edgellm.errors import BusyError, ConfigError
from edgellm.lora import LoraSpec, save_peft_adapter
from edgellm.model.stage import stage_specs
from edgellm.split.one_process import load_stages

# the tiny llama's projections: name -> (block part, in, out)
SHAPES = {
    "q_proj": ("self_attn", 32, 32), "k_proj": ("self_attn", 32, 16), "v_proj": ("self_attn", 32, 16),
    "o_proj": ("self_attn", 32, 32), "gate_proj": ("mlp", 32, 64), "up_proj": ("mlp", 32, 64),
    "down_proj": ("mlp", 64, 32),
}  # fmt: skip
IDS = torch.randint(4, 97, (3, 5), generator=torch.Generator().manual_seed(1))
POSITIONS = torch.arange(5).expand(3, -1)


def adapter(r=4, targets=("q_proj", "v_proj"), layers=range(TINY_LAYERS), seed=0, prefix="base_model.model."):
    """(peft config dict, tensors keyed as in peft's files) with random non-zero A and B."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers:
        for t in targets:
            part, d_in, d_out = SHAPES[t]
            module = f"{prefix}model.layers.{layer}.{part}.{t}"
            tensors[f"{module}.lora_A.weight"] = torch.randn(r, d_in, generator=gen) * 0.2
            tensors[f"{module}.lora_B.weight"] = torch.randn(d_out, r, generator=gen) * 0.2
    return {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets)}, tensors


def stage_bytes(tensors, layers):
    return sum(t.numel() * 4 for k, t in tensors.items() if any(f".layers.{i}." in k for i in layers))


@pytest.fixture(scope="module")
def stages(tiny_llama_dir):
    return load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [2]))


@pytest.fixture
def first(stages):
    """A fresh store on the first stage (layers [0, 2) + the embedding): it empties wrappers a previous one left."""
    return AdapterStore(stages[0])


def run(store, slots):
    with torch.no_grad(), store.rows(slots):
        return store.stage(IDS, POSITIONS)


def test_bytes_are_the_stages_own_tensors_and_a_stage_without_the_layers_holds_none(first):
    config, tensors = adapter(r=4)
    assert first.load("a", config, tensors) == stage_bytes(tensors, [0, 1]) == first.nbytes
    config, late = adapter(r=2, layers=[2, 3], seed=1)
    assert first.load("late", config, late) == 0  # only layers 2 and 3: none of this stage's
    assert first.nbytes == stage_bytes(tensors, [0, 1])
    base = run(first, [-1, -1, -1])
    assert torch.equal(run(first, [first.acquire("late")] * 3), base)
    assert not torch.equal(run(first, [first.acquire("a")] * 3), base)
    listing = {e["name"]: e for e in first.listing()}
    assert listing["a"] == {
        "name": "a", "slot": 0, "bytes": stage_bytes(tensors, [0, 1]), "rank": 4, "alpha": 8.0,
        "targets": ["q_proj", "v_proj"], "pinned": 1, "layers": [0, 1],
    }  # fmt: skip
    assert listing["late"]["layers"] == [] and listing["late"]["bytes"] == 0
    assert first.names() == ["a", "late"]


def test_budget_evicts_the_least_recently_used_and_never_a_pinned_adapter(first):
    size = stage_bytes(adapter()[1], [0, 1])
    store = AdapterStore(first.stage, budget_bytes=2 * size)
    store.load("a", *adapter(seed=1))
    store.load("b", *adapter(seed=2))
    store.release(store.acquire("a"))  # a used after b: b is the least recently used
    store.load("c", *adapter(seed=3))
    assert store.names() == ["a", "c"]
    run(store, [store.acquire("c"), -1, -1])  # a pass uses c (still pinned): a is now the least recently used
    store.load("d", *adapter(seed=4))
    assert store.names() == ["c", "d"]
    store.acquire("d")  # both pinned: nothing can go
    with pytest.raises(BusyError, match="held by adapters in use"):
        store.load("e", *adapter(seed=5))
    assert store.names() == ["c", "d"] and store.nbytes == 2 * size
    with pytest.raises(BusyError, match="more than the budget"):  # could never fit: evicts nothing either
        store.load("big", *adapter(r=9, seed=6))
    assert store.names() == ["c", "d"]


def test_pins_unload_reload_and_slot_reuse(first):
    a = adapter(seed=1)
    first.load("a", *a)
    first.load("b", *adapter(r=2, seed=2))
    base = run(first, [-1, -1, -1])
    slot = first.acquire("a")
    with_a = run(first, [slot, -1, slot])
    with pytest.raises(BusyError, match="in use by 1 session"):
        first.unload("a")
    with pytest.raises(BusyError, match="cannot be replaced"):
        first.load("a", *adapter(seed=9))
    first.release(slot)
    with pytest.raises(ConfigError, match="not acquired"):
        first.release(slot)
    first.release(-1)  # the base model: nothing to release
    first.unload("a")
    assert first.names() == ["b"]
    with pytest.raises(ConfigError, match=r"'a' is not loaded on this stage; loaded: \['b'\]"):
        first.acquire("a")
    with pytest.raises(ConfigError, match=r"adapter slots \[0\] are not loaded"):
        run(first, [slot, -1, -1])
    assert first.acquire(None) == -1
    assert torch.equal(run(first, [-1, -1, -1]), base)
    first.load("a2", *a)  # the freed slot is reused
    assert first.acquire("a2") == slot
    assert torch.equal(run(first, [slot, -1, slot]), with_a)
    with pytest.raises(ConfigError, match="not loaded"):
        first.unload("zzz")


def test_replacing_an_adapter_keeps_its_slot_and_changes_its_output(first):
    first.load("a", *adapter(seed=1))
    slot = first.acquire("a")
    first.release(slot)
    before = run(first, [slot] * 3)
    first.load("a", *adapter(r=3, targets=("k_proj",), seed=2))
    assert first.acquire("a") == slot and first.listing()[0]["targets"] == ["k_proj"]
    assert not torch.equal(run(first, [slot] * 3), before)


def _unknown_module(config, tensors):
    tensors["base_model.model.model.layers.0.self_attn.zz_proj.lora_A.weight"] = torch.zeros(4, 32)
    tensors["base_model.model.model.layers.0.self_attn.zz_proj.lora_B.weight"] = torch.zeros(32, 4)
    config["target_modules"].append("zz_proj")


def _set(key_part, value):
    def change(config, tensors):
        key = next(k for k in tensors if key_part in k)
        tensors[key] = value(tensors[key])

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_unknown_module, "unknown module model.layers.0.self_attn.zz_proj: layer 0 has no 'self_attn.zz_proj'"),
        (_set("layers.1.self_attn.v_proj.lora_B", lambda t: torch.zeros(32, 4)), r"lora_B \(32, 4\) do not fit"),
        (_set("layers.0.self_attn.q_proj.lora_A", lambda t: torch.zeros(3, 32)), "do not fit rank r=4"),
        (_set("layers.3.self_attn.q_proj.lora_A", lambda t: t.index_fill(1, torch.tensor([2]), float("nan"))),
         "layers.3.self_attn.q_proj.lora_A.weight' holds non-finite values"),
        (lambda c, t: c.update(use_dora=True), "field use_dora is True"),
        (lambda c, t: c.update(peft_type="IA3"), "field peft_type is 'IA3'"),
        (lambda c, t: c.update(target_modules=["q_proj"]), "v_proj is not among the config's target_modules"),
        (lambda c, t: t.update({"model.layers.0.mlp.up_proj.lora_C.weight": torch.zeros(1)}), "not a LoRA A or B"),
        (lambda c, t: t.pop(next(k for k in t if "lora_B" in k)), "needs both lora_A and lora_B"),
        (lambda c, t: t.update({"model.embed_tokens.lora_A.weight": torch.zeros(4, 32),
                                "model.embed_tokens.lora_B.weight": torch.zeros(32, 4)}), "not inside a decoder layer"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_by_name_and_leaves_the_store_unchanged(first, change, message):
    first.load("a", *adapter(seed=1))
    slot = first.acquire("a")
    first.release(slot)
    before, listing = run(first, [slot, -1, slot]), first.listing()
    wrappers = [m for m in first.stage.modules() if isinstance(m, MultiLoraLinear)]
    config, tensors = adapter(seed=2)
    change(config, tensors)
    with pytest.raises(ConfigError, match=message):
        first.load("b", config, tensors)
    with pytest.raises(ConfigError, match=message):  # nor does it replace an adapter of that name
        first.load("a", config, tensors)
    assert first.listing() == listing
    assert [m for m in first.stage.modules() if isinstance(m, MultiLoraLinear)] == wrappers
    assert torch.equal(run(first, [slot, -1, slot]), before)


def test_bad_names_budgets_and_slots_are_refused(first):
    with pytest.raises(ConfigError, match="adapter name must be"):
        first.load("../etc", *adapter())
    with pytest.raises(ConfigError, match="budget_bytes must be >= 0"):
        AdapterStore(first.stage, budget_bytes=-1)
    with pytest.raises(ConfigError, match=r"adapter slots \[7\] are not loaded"):
        run(first, torch.tensor([7, -1, -1]))


def test_load_dir_reads_peft_and_edgellm_adapter_directories(first, tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from conftest import reference_model

    config, tensors = adapter(r=4, targets=("q_proj", "down_proj"), seed=3)
    first.load("mem", config, tensors)
    want = run(first, [first.acquire("mem")] * 3)

    own = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    save_peft_adapter(tmp_path / "ours", LoraSpec(r=4, alpha=8, target_modules=("q_proj", "down_proj")), own, "x")
    peft_model = get_peft_model(
        reference_model(tiny_llama_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:
                p.copy_(tensors[name.replace(".default.", ".")])
    peft_model.save_pretrained(tmp_path / "peft")

    for name, directory in (("ours", tmp_path / "ours"), ("peft", tmp_path / "peft")):
        assert first.load_dir(name, directory) == stage_bytes(tensors, [0, 1])
        assert torch.equal(run(first, [first.acquire(name)] * 3), want), name
    with pytest.raises(ConfigError, match="adapter_config.json is missing"):
        first.load_dir("none", tmp_path / "nowhere")


def test_in_memory_keys_and_a_mixed_batch_of_ranks(first):
    first.load("r2", *adapter(r=2, seed=1, prefix=""))  # edgellm's in-memory keys
    first.load("r8", *adapter(r=8, targets=("q_proj", "up_proj"), seed=2))
    s2, s8 = first.acquire("r2"), first.acquire("r8")
    mixed = run(first, [s8, -1, s2])
    alone = [run(first, [s8] * 3)[0], run(first, [-1] * 3)[1], run(first, [s2] * 3)[2]]
    for row in range(3):
        torch.testing.assert_close(mixed[row], alone[row], atol=1e-5, rtol=0)
