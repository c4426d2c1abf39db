"""Fused projections (`edgellm.engine.fuse`): one matmul equals the separate modules, shares their memory, adds
LoRA adapters, and steps aside whenever it would not be exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TINY_LAYERS
from edgellm.engine.fuse import fuse
from edgellm.lora.config import LoraSpec
from edgellm.lora.linear import LoRALinear
from edgellm.model.stage import stage_specs
from edgellm.quant.modules import Int4Linear, Int8Linear, NF4Linear
from edgellm.quant.tensor import quantize
from edgellm.split.one_process import load_stages

WIDTHS = (128, 64, 64)  # q, k, v of a small GQA attention (multiples of the int4 kernel's 64-row blocks)


def _linears(bias: bool, seed: int = 0) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(96, n, bias=bias).requires_grad_(False) for n in WIDTHS]  # frozen, as loaded stages are


def _quantized(kind: type[nn.Module], scheme: str, widths=WIDTHS) -> list[nn.Module]:
    gen = torch.Generator().manual_seed(1)
    return [kind(quantize(torch.randn(n, 96, generator=gen) * 0.05, scheme)) for n in widths]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linears_equal_the_separate_ones_and_share_their_weights(bias):
    modules = _linears(bias)
    x = torch.randn(3, 5, 96)
    want = [m(x) for m in modules]
    fused = fuse(modules)
    assert fused is not None
    got = fused(modules, x)
    assert got is not None and len(got) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
    for m in modules:  # the fused weight is the only copy: the modules' weights are views of it
        assert _storage(m.weight) == _storage(fused.module.weight)
        torch.testing.assert_close(m(x), want[modules.index(m)], atol=0, rtol=0)


@pytest.mark.parametrize(
    "kind,scheme,rows", [(Int8Linear, "int8", 1), (Int4Linear, "int4-g32", 1), (Int4Linear, "int4-g32", 40),
                         (NF4Linear, "nf4-g32", 1)],
)  # fmt: skip
def test_fused_quantized_linears_equal_the_separate_ones_and_share_their_codes(kind, scheme, rows):
    modules = _quantized(kind, scheme)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        want = [m(x) for m in modules]
    fused = fuse(modules)
    assert fused is not None
    with torch.inference_mode():
        got = fused(modules, x)
    assert got is not None
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    weight = "packed" if kind is Int4Linear else "qweight"
    for m in modules:
        assert _storage(getattr(m, weight)) == _storage(getattr(fused.module, weight))


def test_what_cannot_be_fused_exactly_is_left_alone():
    assert fuse([*_linears(False)[:2], _quantized(Int8Linear, "int8")[0]]) is None  # mixed kinds
    assert fuse([_quantized(Int8Linear, "int8")[0], _quantized(Int8Linear, "int8-g32")[0]]) is None  # schemes
    # int4 rows that are not whole kernel blocks do not slice out of a fused buffer
    odd = _quantized(Int4Linear, "int4-g32", widths=(48, 16))
    before = [m.packed.clone() for m in odd]
    assert fuse(odd) is None
    assert all(torch.equal(m.packed, b) for m, b in zip(odd, before))


def test_lora_adapters_are_added_and_a_replaced_module_turns_the_fusion_off():
    modules = _linears(False)
    fused = fuse(modules)
    assert fused is not None
    wrapped = [LoRALinear(m) for m in modules]
    for i, w in enumerate(wrapped):
        w.add_adapter("a", LoraSpec(r=2, alpha=4, target_modules=("all-linear",)), f"layer.{i}")
        nn.init.normal_(w.adapters["a"].lora_B.weight, std=0.1)
        w.active = "a"
    x = torch.randn(2, 96)
    want = [w(x) for w in wrapped]
    assert not torch.allclose(want[0], modules[0](x))  # the adapter matters
    got = fused(wrapped, x)
    assert got is not None
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
    assert fused([nn.Linear(96, 128).requires_grad_(False), *modules[1:]], x) is None  # not the ones it fused
    modules[0].weight.requires_grad_(True)  # full fine-tuning: the fused copy would get no gradient
    assert fused(modules, x) is None
    with torch.no_grad():
        assert fused(modules, x) is not None


def test_the_fast_engine_fuses_without_changing_the_state_dict(tiny_llama_dir):
    specs = stage_specs(TINY_LAYERS, [], "server")
    (fast,) = load_stages(tiny_llama_dir, specs)
    (generic,) = load_stages(tiny_llama_dir, specs, engine="generic")
    assert all(f is not None for f in fast.blocks[0].__dict__["_edgellm_fused"])
    fast_state, generic_state = fast.state_dict(), generic.state_dict()
    assert fast_state.keys() == generic_state.keys()
    for name in fast_state:
        assert torch.equal(fast_state[name], generic_state[name]), name
