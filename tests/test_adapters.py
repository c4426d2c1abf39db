"""Many LoRA adapters in one batch (`edgellm.adapters`): a mixed batch equals peft run on each row alone (generic
and fast engine, whole and split), ranks mix exactly, a quantized stage equals single-adapter LoRA row by row, and
wrapping changes nothing while no row has an adapter.

Reference: peft 0.21 on the transformers model, fp32. Tolerances are stated per test.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import TINY_LAYERS, reference_model
from edgellm.adapters import AdapterStore, MultiLoraLinear, bgmv_delta
from edgellm.engine.select import use_engine
from edgellm.lora import LoraSpec, inject_lora, load_adapter_state, load_peft_adapter, use_adapter
from edgellm.model.stage import stage_specs
from edgellm.quant.scheme import QuantConfig
from edgellm.quant.walker import quantize_module
from edgellm.split.one_process import load_stages

LOGITS_ATOL = 1e-4  # fp32: our stages vs transformers + peft, rows batched vs alone
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> (rank, alpha, targets): three ranks, overlapping targets (so the fused q/k/v and gate/up mix wrappers
# holding different adapters, and modules no adapter of a row targets)
ADAPTERS = {
    "a": (4, 8, ("q_proj", "v_proj")),
    "b": (2, 4, ("o_proj", "gate_proj", "down_proj")),
    "c": (8, 16, ALL),
}
ROWS = ["c", None, "a", "b", "a"]  # the mixed batch: an adapter per row, None = the base model
IDS = torch.randint(4, 97, (len(ROWS), 6), generator=torch.Generator().manual_seed(3))  # [B, S]


def make_peft_adapter(model_dir, directory, r, alpha, targets, seed):
    """A peft model with random non-zero A and B (so the adapter changes the output), saved to `directory`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    model = get_peft_model(reference_model(model_dir), config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def peft_adapters(tiny_llama_dir, tmp_path_factory):
    """name -> (its peft directory, peft's logits of each row of IDS run alone with it); None -> base logits."""
    out = {}
    with torch.no_grad():
        for seed, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items()):
            directory = tmp_path_factory.mktemp(f"adapter-{name}")
            model = make_peft_adapter(tiny_llama_dir, directory, r, alpha, targets, seed + 20)
            out[name] = (directory, torch.cat([model(input_ids=IDS[b : b + 1]).logits for b in range(len(IDS))]))
        base = reference_model(tiny_llama_dir)
        out[None] = (None, torch.cat([base(input_ids=IDS[b : b + 1]).logits for b in range(len(IDS))]))
    return out


def stores_for(stages, peft_adapters):
    stores = [AdapterStore(stage) for stage in stages]
    for store in stores:
        for name in ADAPTERS:
            store.load_dir(name, peft_adapters[name][0])
    return stores


def run_rows(stages, stores, ids, names, caches=None, start=0):
    """ids: [B, S] -> logits [B, S, V] through the chained stages, row b with adapter names[b]."""
    positions = torch.arange(start, start + ids.shape[1]).expand(ids.shape[0], -1)
    h = ids
    with torch.no_grad():
        for i, (stage, store) in enumerate(zip(stages, stores)):
            slots = [store.acquire(n) for n in names]
            with store.rows(slots):
                h = stage(h, positions, None if caches is None else caches[i])
            for slot in slots:
                store.release(slot)
    return h


@pytest.mark.parametrize("engine", ["fast", "generic"])
@pytest.mark.parametrize("cuts", [[], [2]])
def test_mixed_batch_equals_peft_row_by_row(tiny_llama_dir, peft_adapters, engine, cuts):
    base = peft_adapters[None][1]
    for name in ADAPTERS:  # each adapter changes every row: the comparison below is not vacuous
        assert (peft_adapters[name][1] - base).abs().amax(dim=(1, 2)).min() > 1e-3, name
    stages = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, cuts), engine=engine)
    assert {s.engine for s in stages} == {engine}
    stores = stores_for(stages, peft_adapters)
    ours = run_rows(stages, stores, IDS, ROWS)
    for b, name in enumerate(ROWS):
        torch.testing.assert_close(ours[b], peft_adapters[name][1][b], atol=LOGITS_ATOL, rtol=0)
    for name in ADAPTERS:  # one adapter on every row: the single-adapter path
        torch.testing.assert_close(
            run_rows(stages, stores, IDS, [name] * len(IDS)), peft_adapters[name][1], atol=LOGITS_ATOL, rtol=0
        )


def test_cached_decode_with_mixed_rows_equals_the_full_forward(tiny_llama_dir, peft_adapters):
    stages = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [2]))
    stores = stores_for(stages, peft_adapters)
    caches = [s.new_cache() for s in stages]
    run_rows(stages, stores, IDS[:, :-1], ROWS, caches)
    step = run_rows(stages, stores, IDS[:, -1:], ROWS, caches, start=IDS.shape[1] - 1)  # one token per row
    whole = run_rows(stages, stores, IDS, ROWS)
    torch.testing.assert_close(step[:, -1], whole[:, -1], atol=LOGITS_ATOL, rtol=0)


def test_fused_projections_keep_their_fusion_with_adapters(tiny_llama_dir, peft_adapters):
    (stage,) = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, []))
    (store,) = stores_for([stage], peft_adapters)
    attn = stage.blocks[0].self_attn
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    assert all(isinstance(p, MultiLoraLinear) for p in projections)
    fused_qkv, _ = stage.blocks[0].__dict__["_edgellm_fused"]
    x = torch.randn(len(ROWS), 3, 32)
    with torch.no_grad(), store.rows([store.acquire(n) for n in ROWS]):
        fused = fused_qkv(projections, x)
        separate = [p(x) for p in projections]
    assert fused is not None  # the fused path did not step aside for the wrappers
    for f, s in zip(fused, separate):
        torch.testing.assert_close(f, s, atol=1e-5, rtol=0)


def test_bgmv_delta_mixes_ranks_exactly():
    gen = torch.Generator().manual_seed(0)
    ranks, d_in, d_out = (1, 3, 5), 12, 7
    a = [torch.randn(r, d_in, generator=gen) for r in ranks]
    b = [torch.randn(d_out, r, generator=gen) for r in ranks]
    a_stack = torch.zeros(3, 5, d_in)
    b_stack = torch.zeros(3, d_out, 5)
    for i, r in enumerate(ranks):
        a_stack[i, :r], b_stack[i, :, :r] = a[i], b[i]
    x = torch.randn(6, 4, d_in, generator=gen)
    for slots in ([2, -1, 0, 1, 1, -1], [1] * 6, [-1, 0, -1, 0, -1, -1], [-1] * 6, torch.tensor([0, 1, 2, 0, 1, 2])):
        got = bgmv_delta(x, a_stack, b_stack, slots)
        for row, s in enumerate(slots.tolist() if isinstance(slots, torch.Tensor) else slots):
            want = torch.zeros(4, d_out) if s < 0 else x[row] @ a[s].T @ b[s].T
            torch.testing.assert_close(got[row], want, atol=1e-5, rtol=0)
    assert bgmv_delta(x[:, 0], a_stack, b_stack, [0, 1, 2, -1, 0, 0]).shape == (6, d_out)  # [B, in] inputs too


def _int8_stage(model_dir, engine):
    (stage,) = load_stages(model_dir, stage_specs(TINY_LAYERS, []), engine="generic")
    quantize_module(stage, QuantConfig("int8"))  # in memory: load_stages(quant=...) would write a cache file
    use_engine([stage], "llama", engine)  # packs (fuses) the int8 projections for the fast engine
    return stage


@pytest.mark.parametrize("engine", ["fast", "generic"])
def test_int8_stage_mixed_batch_equals_single_adapter_lora_row_by_row(tiny_llama_dir, peft_adapters, engine):
    ids = IDS[:, :3]  # B * S = 15 rows and 3 rows alone: both through the int8 kernel (at most 16 rows)
    positions = torch.arange(ids.shape[1]).view(1, -1)
    stage = _int8_stage(tiny_llama_dir, engine)
    (store,) = stores_for([stage], peft_adapters)
    with torch.no_grad():
        ours = run_rows([stage], [store], ids, ROWS)
        reference = _int8_stage(tiny_llama_dir, engine)  # the same quantized stage, with edgellm.lora's adapters
        for name, (r, alpha, targets) in ADAPTERS.items():
            inject_lora(reference, "model.layers", LoraSpec(r=r, alpha=alpha, target_modules=targets), name)
            load_adapter_state(reference, name, load_peft_adapter(peft_adapters[name][0])[1])
        for b, name in enumerate(ROWS):
            with use_adapter(reference, name):
                want = reference(ids[b : b + 1], positions)[0]
            with use_adapter(reference, None):
                base = reference(ids[b : b + 1], positions)[0]
            if name is not None:
                assert (want - base).abs().max() > 1e-3
            torch.testing.assert_close(ours[b], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("engine", ["fast", "generic"])
def test_rows_without_adapters_are_bit_identical_to_the_unwrapped_stage(tiny_llama_dir, peft_adapters, engine):
    stages = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [2]), engine=engine)
    positions = torch.arange(IDS.shape[1]).expand(len(IDS), -1)

    def run(rows=None):
        h = IDS
        with torch.no_grad():
            for i, stage in enumerate(stages):
                with contextlib.nullcontext() if rows is None else stores[i].rows(rows):
                    h = stage(h, positions)
        return h

    stores = [AdapterStore(stage) for stage in stages]
    before = run()
    stores = stores_for(stages, peft_adapters)
    assert sum(isinstance(m, MultiLoraLinear) for s in stages for m in s.modules()) == 7 * TINY_LAYERS
    assert torch.equal(run(), before)
    assert torch.equal(run([-1] * len(IDS)), before)
    mixed = run([stores[0].acquire("a"), -1, -1, -1, -1])  # row 0 only: the others keep their exact values
    assert not torch.equal(mixed[0], before[0]) and torch.equal(mixed[1:], before[1:])


def test_projections_fused_after_the_adapters_were_loaded(tiny_llama_dir, peft_adapters):
    stages = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [2]), engine="generic")
    stores = stores_for(stages, peft_adapters)
    use_engine(stages, "llama", "fast")  # packs q/k/v and gate/up under wrappers that already exist
    assert all(f is not None for s in stages for b in s.blocks for f in b.__dict__["_edgellm_fused"])
    ours = run_rows(stages, stores, IDS, ROWS)
    for b, name in enumerate(ROWS):
        torch.testing.assert_close(ours[b], peft_adapters[name][1][b], atol=LOGITS_ATOL, rtol=0)


def test_bf16_stage_holds_bf16_adapters_and_mixes_rows_as_it_runs_them_alone(tiny_llama_dir, peft_adapters):
    stages = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [2]), dtype=torch.bfloat16)
    stores = stores_for(stages, peft_adapters)
    stacks = [m.a_stack for s in stages for m in s.modules() if isinstance(m, MultiLoraLinear)]
    assert stacks and all(t is not None and t.dtype == torch.bfloat16 for t in stacks)
    mixed = run_rows(stages, stores, IDS, ROWS)
    for b, name in enumerate(ROWS):
        alone = run_rows(stages, stores, IDS[b : b + 1], [name])[0]
        torch.testing.assert_close(mixed[b], alone, atol=5e-2, rtol=0)  # bf16: batched vs one-row kernels
        assert (mixed[b] - peft_adapters[name][1][b]).abs().max() < 0.5  # and near fp32 peft
