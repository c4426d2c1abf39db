"""Quantized stages on disk: save -> load is bit-exact, a wrong file is refused, the cache is used; memory
accounting agrees with `serve.report.weight_bytes` and with the planner's arithmetic."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from edgellm.errors import ModelError
from edgellm.model.stage import stage_specs
from edgellm.quant import QuantConfig, QuantEmbedding, parse_quant, quantize_module, weight_bytes
from edgellm.quant.memory import kv_bytes_per_token, stage_memory
from edgellm.quant.stage_files import cache_path, load_or_quantize, load_stage, save_stage
from edgellm.quant.walker import quantized_modules
from edgellm.serve.report import weight_bytes as report_weight_bytes
from edgellm.split.one_process import load_stages
from edgellm.store.weights import load_config

IDS = torch.tensor([[1, 5, 17, 42, 8, 66, 23]])
POSITIONS = torch.arange(7).unsqueeze(0)


def chain(stages, data=IDS):
    for stage in stages:
        data = stage(data, POSITIONS)
    return data


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("quant", ["int8", "int4-g32,head=none", "nf4-g32,embed=int8-g32", "int8-g32,head=int4-g32"])
def test_save_load_roundtrip_is_bit_exact(tmp_path, arch, quant):
    model_dir = make_tiny_model(arch, tmp_path / "model")
    config = parse_quant(quant)
    model_config = load_config(model_dir)
    for specs in (stage_specs(4, []), stage_specs(4, [1, 3], "device")):
        stages = [quantize_module(s, config) for s in load_stages(model_dir, specs)]
        loaded = []
        for i, stage in enumerate(stages):
            path = tmp_path / f"stage{i}.safetensors"
            save_stage(stage, path, model_config, config)
            loaded.append(load_stage(path, model_config, stage.spec))
        for stage, back in zip(stages, loaded):
            want, got = stage.state_dict(), back.state_dict()
            assert want.keys() == got.keys()
            for key in want:
                assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
            assert [type(m) for m in stage.modules()] == [type(m) for m in back.modules()]
        with torch.inference_mode():
            assert torch.equal(chain(stages), chain(loaded))


def test_load_refuses_another_stage_or_model(tmp_path):
    model_dir = make_tiny_model("llama", tmp_path / "llama")
    model_config = load_config(model_dir)
    specs = stage_specs(4, [2])
    stage = quantize_module(load_stages(model_dir, specs[:1])[0], QuantConfig("int8"))
    path = tmp_path / "s.safetensors"
    save_stage(stage, path, model_config, QuantConfig("int8"))
    with pytest.raises(ModelError, match="holds stage"):
        load_stage(path, model_config, specs[1])
    other = load_config(make_tiny_model("qwen2", tmp_path / "qwen2"))
    with pytest.raises(ModelError, match="another model"):
        load_stage(path, other, specs[0])
    with pytest.raises(ModelError, match="not a quantized edgellm stage"):
        load_stage(model_dir / "model.safetensors", model_config, specs[0])


def test_load_or_quantize_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    model_dir = make_tiny_model("llama", tmp_path / "model")
    spec = stage_specs(4, [2])[1]
    config = parse_quant("int4-g32,head=int8")
    first = load_or_quantize(model_dir, spec, config)
    path = cache_path(model_dir, spec, config)
    assert path.is_file() and path.is_relative_to(tmp_path / "home")
    second = load_or_quantize(model_dir, spec, config)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert cache_path(model_dir, spec, QuantConfig("int4-g32")) != path  # rules are part of the key


@pytest.mark.parametrize("quant", [None, "int8", "int4-g32", "nf4-g32,head=none", "int8-g32,embed=int4-g32"])
def test_memory_accounting_is_exact(tmp_path, quant):
    model_dir = make_tiny_model("llama", tmp_path)
    config = parse_quant(quant)
    for stage in load_stages(model_dir, stage_specs(4, [2], "device")):
        if config is not None:
            quantize_module(stage, config)
        memory = stage_memory(stage)
        assert memory.weight_bytes == report_weight_bytes(stage)
        quantized = quantized_modules(stage).values()
        want = sum(
            weight_bytes(*m.quantized().shape, m.scheme, embedding=isinstance(m, QuantEmbedding)) for m in quantized
        )
        assert memory.code_bytes + memory.scale_bytes == want
        tensors = list(stage.named_parameters()) + list(stage.named_buffers())  # rotary tables included
        floats = {t.data_ptr(): t.numel() * t.element_size() for n, t in tensors
                  if not any(n.startswith(f"{q}.") for q in quantized_modules(stage))}  # fmt: skip
        assert memory.float_bytes == sum(floats.values())
        assert memory.schemes == tuple(sorted({m.scheme for m in quantized}))


def test_kv_bytes_per_token(tmp_path):
    model_config = load_config(make_tiny_model("llama", tmp_path))
    # 2 (K and V) x layers x 2 KV heads x head dim 8 x 4 bytes
    assert kv_bytes_per_token(model_config, 3) == 2 * 3 * 2 * 8 * 4
