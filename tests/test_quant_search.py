"""Scale search (`*-mse`) and GPTQ (`*-gptq`): never worse than plain rounding on the error each minimises, the
same storage format served by the same kernels, calibration statistics, and a tiny model end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgellm.errors import ConfigError
from edgellm.model.stage import stage_specs
from edgellm.quant import SCHEMES, QuantConfig, dequantize, parse_quant, quantize, quantize_module, weight_bytes
from edgellm.quant.calibration import CalibrationConfig, calibration_ids, collect_hessians
from edgellm.quant.gptq import gptq_quantize, output_error
from edgellm.quant.scheme import SEARCHED_SCHEMES, get_scheme, needs_calibration
from edgellm.quant.search import SearchConfig, search_quantize
from edgellm.quant.stage_files import cache_path, load_or_quantize
from edgellm.quant.tensor import quantize_rtn
from edgellm.quant.walker import quantized_modules
from edgellm.split.one_process import load_stages

FOUR_BIT = ["int4-g32", "int4-g64", "nf4-g32", "nf4-g64"]
GRIDS = ["int8", "int8-g64", *FOUR_BIT]
BF16_REL = 2.0**-7  # as tests/test_quant.py: bf16 activations in the kernels


def heavy_tailed(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Student-t-like weights (LLM weights are heavy-tailed), a few outliers and an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.03 / (torch.rand(n, k, generator=g) + 0.3).sqrt()
    w[torch.rand(n, k, generator=g) < 0.002] *= 20
    w[1] = 0
    return w


def group_sq_error(w: torch.Tensor, w_hat: torch.Tensor, groups: int, v: torch.Tensor | None = None) -> torch.Tensor:
    d = (w - w_hat).square() * (1 if v is None else v)
    return d.reshape(w.shape[0], groups, -1).sum(-1)  # [N, G]


@pytest.mark.parametrize("scheme", GRIDS)
@pytest.mark.parametrize("shape", [(48, 256), (576, 1536)], ids=["small", "mlp-shaped"])
def test_search_never_increases_the_error_of_any_group(scheme, shape):
    w = heavy_tailed(*shape)
    plain, found = quantize_rtn(w, scheme), search_quantize(w, scheme)
    groups = plain.scales.shape[1]
    before, after = group_sq_error(w, dequantize(plain), groups), group_sq_error(w, dequantize(found), groups)
    assert (after <= before).all()
    gain = 0.97 if get_scheme(scheme).kind != "int8" else 0.999  # int8's 255 levels leave little to win
    assert after.sum() < gain * before.sum()  # not vacuous
    assert torch.equal(dequantize(found)[1], torch.zeros(shape[1]))  # an all-zero row stays zero
    assert found.scheme == get_scheme(scheme).name and found.scales.dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", ["int4-g64", "nf4-g64"])
def test_weighted_search_minimises_the_weighted_error(scheme):
    w = heavy_tailed(64, 256, seed=1)
    v = torch.rand(256, generator=torch.Generator().manual_seed(2)) ** 4 * 10  # a few columns matter most
    plain, uniform, weighted = quantize_rtn(w, scheme), search_quantize(w, scheme), search_quantize(w, scheme, v)
    groups = plain.scales.shape[1]
    errors = [group_sq_error(w, dequantize(q), groups, v).sum() for q in (plain, uniform, weighted)]
    assert errors[2] <= errors[0] and errors[2] < errors[1]
    with pytest.raises(ConfigError, match="importance"):
        search_quantize(w, scheme, torch.ones(7))


def test_search_finds_the_grid_a_weight_was_published_in():
    """A weight already on a 4-bit grid of groups of 32 (Q4_1-like, fp16 scale and minimum): plain rounding's
    bf16 scale rounded up misses it; the search lands (nearly) on it."""
    g = torch.Generator().manual_seed(3)
    scale = (torch.rand(64, 8, 1, generator=g) * 0.01 + 0.001).half().float()
    low = (-8 * scale - torch.rand(64, 8, 1, generator=g) * 0.01).half().float()
    w = (torch.randint(0, 16, (64, 8, 32), generator=g).float() * scale + low).reshape(64, 256)
    rel = [
        float((dequantize(q) - w).norm() / w.norm()) for q in (quantize_rtn(w, "int4-g32"), quantize(w, "int4-g32-mse"))
    ]
    assert rel[1] < 0.5 * rel[0]


@pytest.mark.parametrize("scheme", ["int8", *FOUR_BIT])
@pytest.mark.parametrize("rows", [1, 23, 129])
def test_searched_weights_are_served_by_the_same_kernels(scheme, rows):
    """A searched weight is an ordinary `QuantizedWeight`: its module equals x @ dequantize(qw).T (bf16 bound)."""
    linear = nn.Linear(256, 100)
    with torch.no_grad():
        linear.weight.copy_(heavy_tailed(100, 256, seed=4))
    module = quantize_module(linear, QuantConfig(f"{scheme}-mse"))
    qw = module.quantized()
    assert qw.scheme == f"{scheme}-mse" and type(module).__name__ == type(quantize_module(
        nn.Linear(256, 100), QuantConfig(scheme))).__name__  # fmt: skip
    x = torch.randn(rows, 256)
    w_hat = dequantize(qw)
    got, want = module(x), x @ w_hat.T + linear.bias
    assert ((got - want).abs() <= BF16_REL * (x.abs() @ w_hat.abs().T) + 1e-6).all()
    assert torch.equal(w_hat, dequantize(search_quantize(linear.weight, scheme)))  # quantize == the search


def test_search_schemes_are_registered_apart_and_sized_alike():
    assert not set(SEARCHED_SCHEMES) & set(SCHEMES)  # the plain registry (what the CLI lists) is unchanged
    spec = get_scheme("int4-g64-mse")
    assert (spec.kind, spec.group_size, spec.search, spec.base) == ("int4", 64, "mse", "int4-g64")
    assert weight_bytes(576, 1536, "nf4-g64-gptq") == weight_bytes(576, 1536, "nf4-g64")
    config = parse_quant("int4-g64-gptq,head=int8-mse")
    assert config is not None and needs_calibration(config)
    assert needs_calibration(QuantConfig("int4-g64-mse", (("head", "int8-gptq"),)))
    assert not needs_calibration(QuantConfig("int4-g64-mse", (("head", "none"),)))
    with pytest.raises(ConfigError, match="-mse"):
        get_scheme("int4-g64-awq")
    with pytest.raises(ConfigError, match="grids"):
        SearchConfig(grids=0)


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Samples of one fixed correlated distribution (`seed` draws the samples only)."""
    g = torch.Generator().manual_seed(1234)
    mix = torch.randn(k, k, generator=g) * 0.3 + torch.eye(k)
    scale = torch.rand(k, generator=g) * 3 + 0.1  # some channels much larger, as in a residual stream
    samples = torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed))
    return (samples @ mix) * scale  # [T, K]


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int4-g64", "nf4-g64"])
def test_gptq_lowers_the_output_error(scheme):
    x = correlated_inputs(2048, 256)
    h = x.T @ x / len(x)
    w = heavy_tailed(96, 256, seed=5)
    errors = {name: output_error(w, dequantize(q), h) for name, q in (
        ("plain", quantize_rtn(w, scheme)), ("mse", search_quantize(w, scheme)),
        ("gptq", gptq_quantize(w, scheme, h)))}  # fmt: skip
    assert errors["gptq"] <= errors["plain"] and errors["gptq"] <= errors["mse"]
    assert errors["gptq"] < 0.8 * errors["plain"], errors
    # the output error on held-out inputs of the same distribution falls too
    x_new = correlated_inputs(512, 256, seed=9)
    y, err = x_new @ w.T, {}
    for name, q in (("plain", quantize_rtn(w, scheme)), ("gptq", gptq_quantize(w, scheme, h))):
        err[name] = float((x_new @ dequantize(q).T - y).square().mean())
    assert err["gptq"] < err["plain"]


def test_gptq_checks_the_hessian():
    with pytest.raises(ConfigError, match=r"\[32, 32\]"):
        gptq_quantize(torch.randn(8, 32), "int4-g32", torch.eye(16))
    stage = nn.Sequential(nn.Linear(32, 16))
    with pytest.raises(ConfigError, match="needs calibration statistics"):
        quantize_module(stage, QuantConfig("int4-g32-gptq"))


def test_collect_hessians_equals_the_inputs_second_moment(tiny_llama_dir):
    stage = load_stages(tiny_llama_dir, stage_specs(4, []), engine="generic")[0]  # "fast" fuses q, k, v
    seen: list[torch.Tensor] = []
    stage.head.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    inputs = [torch.randint(0, 97, (1, 12)), torch.randint(0, 97, (1, 7))]
    hessians = collect_hessians(stage, iter(inputs))
    x = torch.cat(seen)
    assert set(hessians) >= {"head", "blocks.0.self_attn.q_proj", "blocks.3.mlp.down_proj"}
    torch.testing.assert_close(hessians["head"], x.T @ x / 19)
    assert hessians["blocks.0.mlp.down_proj"].shape == (64, 64)


def test_calibration_text_is_windowed(tiny_chat_dir):
    from edgellm.store.weights import load_tokenizer

    ids = calibration_ids(load_tokenizer(tiny_chat_dir), CalibrationConfig(tokens=600, window=128))
    assert ids.shape == (4, 128) and ids.dtype == torch.long


def test_tiny_model_end_to_end(tiny_chat_dir, tmp_path, monkeypatch):
    """A cut model quantized with each search through `load_or_quantize` (calibration for the stage after the cut
    runs the layers before it), cached, reloaded bit-exact, and close to the float model."""
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    specs = stage_specs(4, [2], "device")
    ids = torch.randint(3, 700, (1, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(40).unsqueeze(0)

    def logits(stages):
        data = ids
        for stage in stages:
            data = stage(data, positions)
        return data

    with torch.inference_mode():
        want = logits(load_stages(tiny_chat_dir, specs))
    for quant in ("int4-g32", "int4-g32-mse", "int4-g32-gptq"):
        config = parse_quant(quant)
        assert config is not None
        stages = [load_or_quantize(tiny_chat_dir, spec, config) for spec in specs]
        assert all(cache_path(tiny_chat_dir, spec, config).is_file() for spec in specs)
        again = [load_or_quantize(tiny_chat_dir, spec, config) for spec in specs]  # from the cache
        for a, b in zip(stages, again):
            assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        assert {m.scheme for s in stages for m in quantized_modules(s).values()} == {quant}
        with torch.inference_mode():
            got = logits(stages)
        rel_rms = float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())
        assert 0 < rel_rms < 0.2, (quant, rel_rms)


@pytest.mark.real_model
@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g64", "nf4-g64"])
def test_real_layers_search_never_worse(real_model_dir, scheme):
    """Real layers (the default model's came from Q4_1: groups of 32 with a 16-bit scale and minimum)."""
    from edgellm.store.weights import SafetensorsSource

    with SafetensorsSource(real_model_dir) as tensors:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.15.mlp.down_proj.weight"):
            w = tensors(name).float()
            plain, found = quantize_rtn(w, scheme), quantize(w, f"{scheme}-mse")
            groups = plain.scales.shape[1]
            before = group_sq_error(w, dequantize(plain), groups)
            after = group_sq_error(w, dequantize(found), groups)
            assert (after <= before).all(), name
            if scheme == "int4-g32":  # the published grid, which the bf16 scale rounded up misses, is found
                assert after.sum() < 0.25 * before.sum(), name


@pytest.mark.real_model
def test_real_stage_gptq_lowers_the_output_error(real_model_dir):
    """Layers 0-1 of the real model with the shipped calibration text: GPTQ's output error is below plain
    rounding's on every linear layer, for inputs from another passage (the test text)."""
    from pathlib import Path

    from edgellm.quant.calibration import stage_hessians
    from edgellm.store.weights import load_tokenizer

    stage = load_stages(real_model_dir, [stage_specs(30, [2])[0]], engine="generic")[0]
    hessians = stage_hessians(real_model_dir, stage, CalibrationConfig(tokens=1024))
    text = (Path(__file__).parent / "data" / "eb1911_shakespeare.txt").read_text()
    ids = torch.tensor(load_tokenizer(real_model_dir)(text)["input_ids"][:512]).unsqueeze(0)
    held_out = collect_hessians(stage, iter([ids]))
    for name, h in hessians.items():
        w = stage.get_submodule(name).weight.detach()
        plain = output_error(w, dequantize(quantize_rtn(w, "int4-g64")), held_out[name])
        gptq = output_error(w, dequantize(gptq_quantize(w, "int4-g64", h)), held_out[name])
        assert gptq < 0.8 * plain, name
