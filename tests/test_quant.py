"""Quantization: tensor functions within their error bounds, drop-in modules equal to their dequantized reference,
4-bit storage size, the walker and its rules, and clear errors. Tiny seeded models; the real model is marked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgellm.errors import ConfigError
from edgellm.model.stage import stage_specs
from edgellm.quant import (
    SCHEMES,
    Int4Linear,
    Int8Linear,
    NF4Linear,
    QuantConfig,
    QuantEmbedding,
    dequantize,
    kernels,
    native,
    parse_quant,
    quantize,
    quantize_module,
    weight_bytes,
)
from edgellm.quant.memory import stage_memory
from edgellm.quant.tensor import NF4_LEVELS, error_bound, pack_int4, unpack_int4
from edgellm.quant.walker import quantized_modules
from edgellm.split.one_process import load_stages

ALL = sorted(SCHEMES)
# bf16 activations: |x - bf16(x)| <= 2^-9 |x| per element, and the output is rounded once more, so a quantized
# layer is within 2^-8 * (|x| @ |W_hat|.T) of x @ W_hat.T; we assert 2^-7 to leave room for accumulation order.
BF16_REL = 2.0**-7


def random_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with a few large outliers and one all-zero row (the edge cases of absmax/min-max)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[torch.rand(n, k, generator=g) < 0.002] *= 40
    w[3] = 0
    return w


def group_max_error(w: torch.Tensor, w_hat: torch.Tensor, groups: int) -> torch.Tensor:
    return (w - w_hat).abs().reshape(w.shape[0], groups, -1).amax(-1)  # [N, G]


@pytest.mark.parametrize("scheme", ALL)
def test_dequantize_error_within_bound_random(scheme):
    w = random_weight(48, 256)
    qw = quantize(w, scheme)
    err = group_max_error(w, dequantize(qw), qw.scales.shape[1])
    bound = error_bound(qw, w)
    assert (err <= bound * (1 + 1e-6) + 1e-12).all()
    assert err.max() > 0  # not vacuous
    assert torch.equal(dequantize(qw)[3], torch.zeros(256))  # an all-zero row stays exactly zero


def test_pack_unpack_roundtrip():
    codes = torch.randint(0, 16, (7, 34), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 17) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # even column in the low nibble


@pytest.mark.parametrize("n", [16, 48, 64, 112, 192])
def test_kernel_layout_roundtrip(n):
    assert kernels.kernel_layout() is not None
    codes = torch.randint(0, 16, (n, 96), dtype=torch.int32)
    assert torch.equal(kernels.int4_from_kernel(kernels.int4_to_kernel(codes), 96).to(torch.int32), codes)


@pytest.mark.parametrize("scheme", ["int4-g64", "int4-g128", "nf4-g32", "nf4-g64"])
def test_packed_4bit_takes_at_most_0_6_bytes_per_weight(scheme):
    n, k = 1536, 1024
    qw = quantize(torch.randn(n, k), scheme)
    assert qw.nbytes / (n * k) <= 0.6
    module = quantize_module(nn.Linear(k, n, bias=False), QuantConfig(scheme))
    held = stage_memory(module)
    assert held.weight_bytes == weight_bytes(n, k, scheme)  # the planner's arithmetic is exact
    assert held.weight_bytes / (n * k) <= 0.6


def test_int4_g32_size_is_q4_1s():
    # Two 16-bit numbers per 32 weights, as GGUF's Q4_1: 0.625 bytes per weight, above the 0.6 of larger groups.
    assert weight_bytes(1536, 576, "int4-g32") / (1536 * 576) == 0.625


@pytest.mark.parametrize("scheme", ALL)
@pytest.mark.parametrize("rows", [1, 5, kernels.KERNEL_MAX_ROWS + 7, 8 * kernels.KERNEL_MAX_ROWS + 1])
@pytest.mark.parametrize("compiled", [True, False], ids=["native", "no-compiler"])
def test_module_matches_dequantized_reference(scheme, rows, compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.library() is None and SCHEMES[scheme].kind == "nf4":
        pytest.skip("no C compiler here")
    torch.manual_seed(0)
    linear = nn.Linear(256, 100)  # N = 100: int4 pads to 112
    with torch.no_grad():
        linear.weight.copy_(random_weight(100, 256, seed=2))
    module = quantize_module(linear, QuantConfig(scheme))
    assert isinstance(module, (Int8Linear, Int4Linear, NF4Linear))
    x = torch.randn(2, rows, 256)
    w_hat = dequantize(module.quantized())
    want = x @ w_hat.T + linear.bias
    got = module(x)
    assert got.shape == (2, rows, 100) and got.dtype == torch.float32
    bound = BF16_REL * (x.abs() @ w_hat.abs().T) + 1e-6
    assert ((got - want).abs() <= bound).all()
    assert not torch.allclose(got, linear(x), atol=1e-6)  # it really is quantized


@pytest.mark.parametrize("scheme", ALL)
def test_quantized_roundtrip_of_modules(scheme):
    w = random_weight(64, 128, seed=3)
    qw = quantize(w, scheme)
    module = quantize_module(nn.Linear(128, 64, bias=False), QuantConfig(scheme))
    module = type(module)(qw)
    back = module.quantized()
    for name, tensor in qw.tensors().items():
        assert torch.equal(back.tensors()[name], tensor), name


def test_embedding_lookup_equals_dequantized_table():
    embedding = nn.Embedding(97, 64)
    module = quantize_module(embedding, QuantConfig("int4-g32"))
    assert isinstance(module, QuantEmbedding)
    ids = torch.tensor([[0, 5, 96], [3, 3, 1]])
    assert torch.equal(module(ids), dequantize(module.quantized())[ids])


def test_walker_applies_rules_to_a_stage(tiny_llama_dir):
    stage = load_stages(tiny_llama_dir, stage_specs(4, []))[0]
    quantize_module(stage, parse_quant("int4-g32,head=int8,blocks.1.*=none,*.down_proj=int8-g32"))
    assert isinstance(stage.embed, QuantEmbedding)
    assert isinstance(stage.head, Int8Linear)
    assert isinstance(stage.blocks[0].self_attn.q_proj, Int4Linear)
    assert isinstance(stage.blocks[0].mlp.down_proj, Int8Linear)
    assert type(stage.blocks[1].mlp.up_proj) is nn.Linear
    assert stage_memory(stage).schemes == ("int4-g32", "int8", "int8-g32")


def test_walker_handles_gpt2_conv1d_and_keeps_position_embeddings(tmp_path):
    from conftest import make_tiny_model

    stage = load_stages(make_tiny_model("gpt2", tmp_path), stage_specs(4, []))[0]
    quantize_module(stage, QuantConfig("int8"))
    assert isinstance(stage.blocks[0].attn.c_attn, Int8Linear)
    assert isinstance(stage.blocks[0].mlp.c_proj, Int8Linear)
    assert type(stage.pos_embed) is nn.Embedding


def dequantized_twin(stage: nn.Module, quantized: nn.Module) -> nn.Module:
    """`stage` (float) with each weight that `quantized` quantized replaced by its dequantized value."""
    for name, module in quantized_modules(quantized).items():
        target = stage.get_submodule(name)
        w_hat = dequantize(module.quantized())
        with torch.no_grad():
            target.weight.copy_(w_hat.T if getattr(module, "transposed", False) else w_hat)
    return stage


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "nf4-g32"])
def test_quantized_stages_equal_their_dequantized_float_twin(tmp_path, arch, scheme):
    """Chained quantized stages (a cut, the head on the device) compute what float stages holding the dequantized
    weights compute, up to bf16 activations: logits within 5% relative RMS, and the same greedy next token."""
    from conftest import make_tiny_model

    model_dir = make_tiny_model(arch, tmp_path)
    specs = stage_specs(4, [2], "device")
    ids = torch.tensor([[1, 5, 17, 42, 8, 66, 23]])
    positions = torch.arange(7).unsqueeze(0)

    def logits(stages):
        data = ids
        for stage in stages:
            data = stage(data, positions)
        return data

    stages = [quantize_module(s, QuantConfig(scheme)) for s in load_stages(model_dir, specs)]
    twins = [dequantized_twin(t, s) for t, s in zip(load_stages(model_dir, specs), stages)]
    with torch.inference_mode():
        got, want, float_logits = logits(stages), logits(twins), logits(load_stages(model_dir, specs))
    assert not torch.allclose(want, float_logits, atol=1e-3)  # the twin really differs from the float model
    rel_rms = float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())
    assert rel_rms < 0.05
    assert torch.equal(got[:, -1].argmax(-1), want[:, -1].argmax(-1))


def test_unknown_scheme_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown quantization scheme 'int3'.*int4-g64"):
        QuantConfig("int3")
    with pytest.raises(ConfigError, match="unknown quantization scheme"):
        parse_quant("int4-g32,head=fp8")


def test_group_size_must_divide_the_input_dimension():
    with pytest.raises(ConfigError, match="group size 128 does not divide the input dimension 576"):
        quantize(torch.randn(8, 576), "int4-g128")
    stage = nn.Sequential(nn.Linear(32, 16))
    with pytest.raises(ConfigError, match=r"cannot quantize 0: .*group size 64 does not divide .* 32"):
        quantize_module(stage, QuantConfig("int4-g64"))


@pytest.mark.parametrize("text", ["int4-g32,head", "int4-g32,=int8", "int4-g32,head="])
def test_malformed_rules_show_the_syntax(text):
    with pytest.raises(ConfigError, match="SCHEME"):
        parse_quant(text)


def test_none_means_float():
    assert parse_quant("none") is None and parse_quant("") is None and parse_quant(None) is None


@pytest.mark.real_model
@pytest.mark.parametrize(
    ("scheme", "max_rel_rms"),
    # The default model's layers came from Q4_1 (int4, groups of 32): int4-g32 lands on the same grid.
    [("int8", 0.015), ("int8-g64", 0.01), ("int4-g32", 0.012), ("int4-g64", 0.12), ("nf4-g64", 0.12)],
)
def test_real_weights_error(real_model_dir, scheme, max_rel_rms):
    from edgellm.store.weights import SafetensorsSource

    with SafetensorsSource(real_model_dir) as tensors:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.15.mlp.down_proj.weight"):
            w = tensors(name)
            qw = quantize(w, scheme)
            w_hat = dequantize(qw)
            assert (group_max_error(w, w_hat, qw.scales.shape[1]) <= error_bound(qw, w) * (1 + 1e-6) + 1e-12).all()
            rel_rms = float((w_hat - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
            assert rel_rms < max_rel_rms, name


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize(("scheme", "max_rel_rms"), [("int8", 0.015), ("int4-g32", 0.015), ("int4-g64", 0.1)])
def test_real_quantized_stage_close_to_float(real_model_dir, scheme, max_rel_rms):
    """A middle stage (layers 10..20) of the real model, fed real hidden states: output within `max_rel_rms`."""
    from pathlib import Path

    from edgellm.store.weights import load_tokenizer

    text = (Path(__file__).parent / "data" / "eb1911_shakespeare.txt").read_text()
    ids = torch.tensor([load_tokenizer(real_model_dir)(text)["input_ids"][:96]])
    positions = torch.arange(96).unsqueeze(0)
    first, middle = load_stages(real_model_dir, stage_specs(30, [10, 20])[:2])
    stage = quantize_module(load_stages(real_model_dir, [middle.spec])[0], QuantConfig(scheme))
    with torch.inference_mode():
        hidden = first(ids, positions)
        want, got = middle(hidden, positions), stage(hidden, positions)
    rel_rms = float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())
    print(f"{scheme}: relative RMS {rel_rms:.4f}")
    assert 0 < rel_rms < max_rel_rms


@pytest.mark.parametrize("march", ["native", "x86-64-v2"], ids=["this-cpu", "portable-c"])
@pytest.mark.parametrize("rows", [1, 3, 16, 48])
def test_native_kernels_equal_the_dequantized_matmul(tmp_path, march, rows):
    """The C kernel (AVX-512 here, the portable loop for other CPUs) computes x @ W_hat.T in float32."""
    import platform

    if native._compiler() is None or (march != "native" and platform.machine() != "x86_64"):
        pytest.skip("needs a C compiler (and x86-64 for the portable build)")
    lib = native.load(native.build(tmp_path / "kernel.so", march=march))
    w = random_weight(200, 576, seed=4)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(5))
    nf4 = quantize(w, "nf4-g64")
    got = native.nf4_mm(lib, x, nf4.qweight, nf4.scales, NF4_LEVELS)
    torch.testing.assert_close(got, x @ dequantize(nf4).T, rtol=1e-5, atol=1e-5)
    int8 = Int8Linear(quantize(w, "int8-g64"))
    got = native.int8g_mm(lib, x, int8.qweight, int8.scales)
    torch.testing.assert_close(got, x @ dequantize(int8.quantized()).T, rtol=1e-5, atol=1e-5)
