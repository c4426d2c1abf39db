"""LoRA on stages: equal to peft (logits and gradients, whole and split), split-independent init, merged ==
unmerged, adapter switching, QLoRA gradients through quantized bases, peft files both ways, and FedAvg.

Reference: peft 0.21 on the transformers model, fp32 throughout. Tolerances are stated per test.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import TINY_LAYERS, reference_model
from edgellm.errors import ConfigError
from edgellm.lora import (
    LoRALinear,
    LoraSpec,
    adapter_grads,
    adapter_parameters,
    adapter_state,
    fedavg,
    inject_lora,
    load_adapter_state,
    set_active,
    stage_keys,
    use_adapter,
)
from edgellm.model.arch import arch_for
from edgellm.model.stage import stage_specs
from edgellm.quant.modules import Int4Linear, quant_linear
from edgellm.quant.scheme import QuantConfig
from edgellm.quant.tensor import dequantize, quantize
from edgellm.quant.walker import quantize_module
from edgellm.split.one_process import load_stages
from edgellm.store.weights import load_config

LOGITS_ATOL = 1e-5  # fp32, same blocks in the same order: only summation order may differ
GRAD_RTOL = 1e-5  # ||ours - peft|| <= GRAD_RTOL * ||peft|| per tensor
TARGETS = {"llama": ("q_proj", "v_proj", "o_proj", "down_proj"), "gpt2": ("c_attn", "c_proj", "c_fc")}
B, S = 2, 7


def spec_for(arch: str, seed: int = 0) -> LoraSpec:
    return LoraSpec(r=4, alpha=8.0, target_modules=TARGETS[arch], init_seed=seed)


def lora_stages(model_dir, cuts, spec, name="a"):
    config = load_config(model_dir)
    stages = load_stages(model_dir, stage_specs(TINY_LAYERS, cuts))
    for stage in stages:
        inject_lora(stage, arch_for(config).layers, spec, name)
    return stages


def run(stages, ids):
    """ids: [B, S] -> float32 logits [B, S, V] through the chained stages."""
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    h = ids
    for stage in stages:
        h = stage(h, positions)
    return h


def merged_state(stages, name="a"):
    return {k: v for stage in stages for k, v in adapter_state(stage, name).items()}


def random_state(keys_shapes, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.3 for k, shape in sorted(keys_shapes.items())}


def randomize(stages, name="a", seed=5):
    """Give adapter `name` of `stages` non-zero random tensors (B too); -> the whole state."""
    state = random_state({k: v.shape for k, v in merged_state(stages, name).items()}, seed)
    for stage in stages:
        load_adapter_state(stage, name, state, strict=False)
    return state


def activate(stages, name):
    for stage in stages:
        set_active(stage, name)


def peft_model(model_dir, arch):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS[arch]), lora_dropout=0.0)
    return get_peft_model(reference_model(model_dir), config).eval()


def peft_params(model) -> dict[str, nn.Parameter]:
    """peft's LoRA parameters under our names ("model.layers.0.self_attn.q_proj.lora_A.weight")."""
    named = model.named_parameters()
    return {n.removeprefix("base_model.model.").replace(".default.", "."): p for n, p in named if ".lora_" in n}


def masked_ce(logits, ids):
    """Next-token CE over [B, S-1] targets, with the last two targets of row 0 masked out."""
    mask = torch.ones(ids.shape[0], ids.shape[1] - 1)
    mask[0, -2:] = 0
    ce = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return (ce * mask).sum() / mask.sum()


def ids_for(seed=0):
    return torch.randint(4, 97, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("cuts", [[], [1, 3]])
def test_matches_peft_logits_and_grads(model_dirs, arch, cuts):
    stages = lora_stages(model_dirs[arch], cuts, spec_for(arch))
    ref = peft_model(model_dirs[arch], arch)
    theirs = peft_params(ref)
    state = randomize(stages)
    assert set(state) == set(theirs)
    with torch.no_grad():
        for key, p in theirs.items():
            p.copy_(state[key])
        ids = ids_for()
        activate(stages, None)
        base = run(stages, ids)
    activate(stages, "a")
    ours = run(stages, ids)
    expected = ref(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the output: the comparison below is not vacuous
    torch.testing.assert_close(ours, expected, atol=LOGITS_ATOL, rtol=0)

    masked_ce(ours, ids).backward()
    masked_ce(expected, ids).backward()
    grads = {k: v for stage in stages for k, v in adapter_grads(stage, "a").items()}
    assert set(grads) == set(theirs)
    for key, p in theirs.items():
        assert p.grad is not None and p.grad.norm() > 0, key
        err = (grads[key] - p.grad).norm() / p.grad.norm()
        assert err <= GRAD_RTOL, f"{key}: relative gradient error {err:.2e}"


def test_init_is_independent_of_the_split(tiny_llama_dir):
    spec = spec_for("llama", seed=7)
    whole = merged_state(lora_stages(tiny_llama_dir, [], spec))
    split = merged_state(lora_stages(tiny_llama_dir, [2], spec))
    assert set(whole) == set(split) and len(whole) == 4 * len(TARGETS["llama"]) * 2
    for key, tensor in whole.items():
        assert torch.equal(tensor, split[key]), key
        assert tensor.dtype == torch.float32
        assert (tensor.abs().sum() == 0) == key.endswith("lora_B.weight")  # peft's init: B zero, A not
    other = merged_state(lora_stages(tiny_llama_dir, [], spec_for("llama", seed=8)))
    key = "model.layers.1.self_attn.q_proj.lora_A.weight"
    assert not torch.equal(whole[key], other[key])  # the seed matters
    bound = 1 / 32**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 32: U(-1/sqrt(32), 1/sqrt(32))
    assert whole[key].abs().max() <= bound


def with_adapter(base: nn.Module, name="a", seed=3, full_name="m") -> LoRALinear:
    wrapper = LoRALinear(base)
    wrapper.add_adapter(name, LoraSpec(r=3, alpha=6.0, init_seed=seed), full_name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        wrapper.adapters[name].lora_B.weight.normal_(0, 0.5, generator=g)
    wrapper.active = name
    return wrapper


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merged_equals_unmerged(kind):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    x = torch.randn(5, 16)
    base, merged = (nn.Linear(16, 12), nn.Linear(16, 12)) if kind == "linear" else (Conv1D(12, 16), Conv1D(12, 16))
    nn.init.normal_(base.weight, 0, 0.3)
    wrapper = with_adapter(base)
    assert (wrapper.in_features, wrapper.out_features) == (16, 12)
    adapter = wrapper.adapters["a"]
    delta = adapter.scaling * adapter.lora_B.weight @ adapter.lora_A.weight  # [12, 16]
    with torch.no_grad():
        merged.weight.copy_(base.weight + (delta if kind == "linear" else delta.T))  # Conv1D holds [in, out]
        merged.bias.copy_(base.bias)
        assert (wrapper(x) - base(x)).abs().max() > 1e-2
        torch.testing.assert_close(wrapper(x), merged(x), atol=1e-5, rtol=0)


def test_base_only_and_independent_adapters():
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    linear = nn.Linear(16, 8)
    wrapper = with_adapter(linear, "a", seed=1)
    assert not any(p.requires_grad for p in linear.parameters())
    with torch.no_grad():
        base = linear(x)
        out_a = wrapper(x)
        wrapper.add_adapter("b", LoraSpec(r=2, alpha=2.0), "m")
        wrapper.adapters["b"].lora_B.weight.normal_()
        assert wrapper.active == "a"  # adding does not activate
        assert torch.equal(wrapper(x), out_a)
        wrapper.active = "b"
        out_b = wrapper(x)
        b = wrapper.adapters["b"]
        torch.testing.assert_close(out_b, base + b.lora_B(b.lora_A(x)), atol=1e-6, rtol=0)  # scaling 1
        assert (out_b - out_a).abs().max() > 1e-2
        wrapper.adapters["b"].lora_A.weight.mul_(2)  # touching b leaves a alone
        wrapper.active = "a"
        assert torch.equal(wrapper(x), out_a)
        wrapper.remove_adapter("b")
        assert torch.equal(wrapper(x), out_a)
        wrapper.active = None
        assert torch.equal(wrapper(x), base)
    with pytest.raises(ConfigError, match="already exists"):
        wrapper.add_adapter("a", LoraSpec(), "m")
    with pytest.raises(ConfigError, match="adapters: \\['a'\\]"):
        wrapper.remove_adapter("b")


def test_stage_switching_and_second_adapter(tiny_llama_dir):
    (stage,) = lora_stages(tiny_llama_dir, [], spec_for("llama"))
    second = inject_lora(stage, "model.layers", LoraSpec(r=2, target_modules=("q_proj",)), "b")
    assert sorted(second) == [f"model.layers.{i}.self_attn.q_proj" for i in range(TINY_LAYERS)]
    randomize([stage], "a", 1), randomize([stage], "b", 2)
    ids = ids_for(1)
    with torch.no_grad():
        with use_adapter(stage, None):
            base = run([stage], ids)
        with use_adapter(stage, "b"):
            out_b = run([stage], ids)
        out_a = run([stage], ids)  # the first injected adapter stays active
        assert (out_a - base).abs().max() > 1e-2 and (out_b - base).abs().max() > 1e-2
        for wrapper in (m for m in stage.modules() if isinstance(m, LoRALinear)):
            wrapper.active = None
        assert torch.equal(run([stage], ids), base)  # no adapter: exactly the base model
        set_active(stage, "a")
        with pytest.raises(RuntimeError), use_adapter(stage, "b"):
            raise RuntimeError
        assert torch.equal(run([stage], ids), out_a)  # restored after an exception
    with pytest.raises(ConfigError, match="adapters: \\['a', 'b'\\]"):
        set_active(stage, "c")
    assert len(adapter_parameters(stage, "b")) == 2 * TINY_LAYERS
    assert all(p.requires_grad and p.dtype == torch.float32 for p in adapter_parameters(stage, "a"))


def test_inject_errors_and_head_only_stage(tiny_llama_dir):
    head_only = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [2], head="device"))[-1]
    assert inject_lora(head_only, "model.layers", LoraSpec(), "a") == {}
    with use_adapter(head_only, "a"):
        pass
    (stage,) = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, []))
    with pytest.raises(ConfigError, match="self_attn.q_proj"):
        inject_lora(stage, "model.layers", LoraSpec(target_modules=("qkv",)), "a")
    wrapped = inject_lora(stage, "model.layers", LoraSpec(target_modules=("all-linear",)), "a")
    assert len(wrapped) == 7 * TINY_LAYERS
    with pytest.raises(ConfigError, match="already exists"):
        inject_lora(stage, "model.layers", LoraSpec(target_modules=("v_proj",)), "a")
    with pytest.raises(ConfigError, match="adapter name"):
        inject_lora(stage, "model.layers", LoraSpec(), "x.y")


def test_load_adapter_state_checks(tiny_llama_dir):
    first, second = lora_stages(tiny_llama_dir, [2], spec_for("llama"))
    full = merged_state([first, second])
    assert stage_keys(first, "a") | stage_keys(second, "a") == set(full)
    load_adapter_state(first, "a", full, strict=False)  # other layers' tensors are skipped
    with pytest.raises(ConfigError, match="unexpected tensors \\['model.layers.2"):
        load_adapter_state(first, "a", full)
    key = "model.layers.0.self_attn.q_proj.lora_A.weight"
    own = adapter_state(first, "a")
    with pytest.raises(ConfigError, match=f"missing tensors \\['{key}'"):
        load_adapter_state(first, "a", {k: v for k, v in own.items() if k != key})
    with pytest.raises(ConfigError, match=f"tensor {key} has shape \\(4, 31\\)"):
        load_adapter_state(first, "a", {**own, key: torch.zeros(4, 31)})
    with pytest.raises(ConfigError, match="unexpected tensors \\['model.layers.0.self_attn.k_proj"):
        load_adapter_state(first, "a", {"model.layers.0.self_attn.k_proj.lora_A.weight": own[key]}, strict=False)


@pytest.mark.parametrize("scheme", ["int4-g32", "int8-g32", "nf4-g32"])
@pytest.mark.parametrize("few", [True, False])
def test_qlora_gradients_match_dequantized_reference(scheme, few):
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 64) * 0.2, torch.randn(24)
    qw = quantize(weight, scheme)
    base = quant_linear(qw, bias)
    rows = 3 if few else base.few_rows_max + 5
    assert (rows <= 16) == few
    reference = nn.Linear(64, 24)
    with torch.no_grad():
        reference.weight.copy_(dequantize(qw, torch.float32))
        reference.bias.copy_(bias)
    ours, theirs = with_adapter(base), with_adapter(reference)
    x = torch.randn(2, rows, 64)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, rows, 24)
    y_ours, y_ref = ours(x_ours), theirs(x_ref)
    # The quantized base computes in bfloat16 (8-bit mantissa): relative error ~1e-2 on outputs and input grads.
    assert (y_ours - y_ref).norm() <= 1e-2 * y_ref.norm()
    (y_ours * g).sum().backward()
    (y_ref * g).sum().backward()
    assert x_ours.grad is not None and x_ref.grad is not None
    assert (x_ours.grad - x_ref.grad).norm() <= 1e-2 * x_ref.grad.norm()
    # The adapter path is float32 and sees the same input and output gradient: its grads match tightly.
    for which in ("lora_A", "lora_B"):
        mine = getattr(ours.adapters["a"], which).weight.grad
        ref = getattr(theirs.adapters["a"], which).weight.grad
        assert mine is not None and ref is not None and ref.norm() > 0
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    if few:  # no gradient wanted: the packed kernel still runs, as before QLoRA
        assert torch.equal(base(x[0]), (base._few_rows(x[0]) + bias).to(x.dtype))


def test_qlora_stage_trains_through_quantized_blocks(tiny_llama_dir):
    (stage,) = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, []))
    quantize_module(stage, QuantConfig("int4-g32"))  # in memory: load_stages(quant=...) would write a cache file
    wrapped = inject_lora(stage, "model.layers", LoraSpec(r=2, dropout=0.5, target_modules=("all-linear",)), "a")
    assert all(isinstance(w.base, Int4Linear) for w in wrapped.values())
    randomize([stage], "a", 4)
    ids = ids_for(4)  # B * S = 14 rows: the few-row kernels' range, which must give way to a differentiable path
    logits = run([stage], ids)
    assert torch.equal(logits, run([stage], ids))  # eval mode: no dropout although the spec has some
    masked_ce(logits, ids).backward()
    for key, grad in adapter_grads(stage, "a").items():
        assert grad.norm() > 0, key  # gradients reach every adapter, layer 0 included


def test_lora_spec_validation_and_round_trip():
    spec = LoraSpec(r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj"), init_seed=3)
    assert spec.scaling == 2.0 and isinstance(spec.alpha, float)
    assert LoraSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ConfigError, match="unknown LoRA spec keys \\['rank'\\]"):
        LoraSpec.from_dict({"rank": 4})
    for bad, message in [
        ({"r": 0}, "r must be"),
        ({"alpha": 0.0}, "alpha must be"),
        ({"dropout": 1.0}, "dropout must"),
        ({"target_modules": ()}, "target_modules"),
        ({"target_modules": "q_proj"}, "tuple of module names"),
        ({"target_modules": ("all-linear", "q_proj")}, "only LoRA target"),
    ]:
        with pytest.raises(ConfigError, match=message):
            LoraSpec(**bad)  # type: ignore[arg-type]


def test_fedavg_by_hand():
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "v": torch.tensor([0.5])}
    b = {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "v": torch.tensor([-1.5])}
    out = fedavg([a, b], [1.0, 3.0])
    # (1 * a + 3 * b) / 4, spelled out
    assert torch.equal(out["w"], torch.tensor([[(1 + 15) / 4, (2 + 18) / 4], [(3 + 21) / 4, (4 + 24) / 4]]))
    assert torch.equal(out["v"], torch.tensor([(0.5 - 4.5) / 4]))
    assert torch.equal(fedavg([a, b], [0.0, 2.0])["w"], b["w"])
    for states, weights, message in [
        ([], [], "at least one state"),
        ([a, b], [1.0], "2 states"),
        ([a, b], [1.0, -1.0], "weight 1 is -1.0"),
        ([a, b], [0.0, 0.0], "sum to 0.0"),
        ([a, {"w": b["w"]}], [1.0, 1.0], "different keys.*'v'"),
        ([a, {**b, "v": torch.zeros(2)}], [1.0, 1.0], "tensor v has shape \\(2,\\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            fedavg(states, weights)
