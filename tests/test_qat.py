"""Quantization-aware training (`edgellm.qat`): the fake quantizer is PTQ's quantizer, bit for bit; its gradient
passes straight through inside the clipping range and is zero outside it; `FakeQuantLinear` (with and without
LoRA) and a whole QAT stage compute what the quantized modules of their export compute; a QAT step through the
split equals the same step centralized."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_LAYERS
from edgellm.errors import ConfigError
from edgellm.lora.config import LoraSpec
from edgellm.lora.inject import adapter_state, inject_lora, load_adapter_state
from edgellm.lora.linear import LoRALinear
from edgellm.model.arch import arch_for
from edgellm.model.stage import StageSpec
from edgellm.qat import FakeQuantLinear, apply_qat, fake_quantize, inside_clip_range, merge_lora, train_parameters
from edgellm.qat.export import merged_tensors, write_model, write_quantized_stage
from edgellm.quant.modules import Int4Linear, QuantEmbedding, quant_linear
from edgellm.quant.scheme import QuantConfig
from edgellm.quant.stage_files import load_stage
from edgellm.quant.tensor import dequantize, quantize
from edgellm.split.one_process import load_stages
from edgellm.store.weights import load_config

SCHEMES = ["int8", "int8-g32", "int4-g32", "int4-g64", "nf4-g32", "nf4-g64"]
LAYERS = "model.layers"


def weight_with_outliers(n: int = 48, k: int = 64) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    w[3, 5], w[9, 40] = 9.0, -7.0  # outliers set their groups' scales
    w[7] = 0  # an all-zero row: scale 0
    return w


def bf16_bound(x: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """What bf16 activations and weights may move `x @ w_hat.T` by (as tests/test_quant.py bounds the modules)."""
    return 2**-7 * (x.abs() @ w_hat.abs().T) + 1e-6


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fake_quantize_is_ptq_bit_for_bit_and_its_gradient_passes_straight_through(scheme):
    w = weight_with_outliers().requires_grad_(True)
    w_hat = fake_quantize(w, scheme)
    assert torch.equal(w_hat.detach(), dequantize(quantize(w.detach(), scheme)))
    assert not torch.equal(w_hat.detach(), w.detach())  # it does quantize
    # PTQ's scales are rounded up, so no weight is ever clipped: the gradient is the identity everywhere.
    assert bool(inside_clip_range(quantize(w.detach(), scheme), w).all())
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    upstream = torch.randn(5, 48, generator=torch.Generator().manual_seed(5))
    (F.linear(x, w_hat) * upstream).sum().backward()
    leaf = w_hat.detach().clone().requires_grad_(True)  # the same loss as a function of the dequantized weight
    (F.linear(x, leaf) * upstream).sum().backward()
    assert leaf.grad is not None and float(leaf.grad.abs().max()) > 0
    assert torch.equal(w.grad, leaf.grad)


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "nf4-g64"])
def test_gradient_is_zero_outside_the_clipping_range(scheme):
    """A quantizer that clips (scales from the weights clamped to +-3, as an MSE search might choose) saturates the
    weights beyond its grid: their gradient is 0, every other weight's passes straight through."""
    w = weight_with_outliers().requires_grad_(True)

    def clipping(weight, spec):
        return quantize(weight.clamp(-3.0, 3.0), spec)

    w_hat = fake_quantize(w, scheme, clipping)
    assert torch.equal(w_hat.detach(), dequantize(clipping(w.detach(), scheme)))
    upstream = torch.randn(48, 64, generator=torch.Generator().manual_seed(6))
    (w_hat * upstream).sum().backward()
    inside = inside_clip_range(clipping(w.detach(), scheme), w.detach())
    assert not inside[3, 5] and not inside[9, 40]  # the outliers (9, -7) lie far outside
    assert 0.9 * w.numel() < int(inside.sum()) < w.numel()
    assert torch.equal(w.grad[~inside], torch.zeros(int((~inside).sum())))
    assert torch.equal(w.grad[inside], upstream[inside])


def linear(k: int = 64, n: int = 48) -> nn.Linear:
    torch.manual_seed(8)
    layer = nn.Linear(k, n)
    with torch.no_grad():
        layer.weight.copy_(weight_with_outliers(n, k))
    return layer


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows", [1, 5, 23])
def test_fake_quant_linear_equals_the_quantized_module(scheme, rows):
    """Against the float reference on the dequantized weight: equal (fp32 both); against PTQ's module (bf16
    activations): within its bf16 bound."""
    layer = linear()
    fq = FakeQuantLinear(layer, QuantConfig(scheme).spec)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    qw = quantize(layer.weight, scheme)
    w_hat = dequantize(qw)
    with torch.no_grad():
        got, deployed = fq(x), quant_linear(qw, layer.bias)(x)
        assert torch.equal(got, F.linear(x, w_hat, layer.bias))
        assert bool(((got - deployed).abs() <= bf16_bound(x, w_hat)).all())
        assert not torch.allclose(got, layer(x), atol=1e-4)  # quantized, not float


def test_fake_quant_linear_over_lora_quantizes_the_merged_weight_and_trains_the_adapter():
    layer = linear()
    wrapper = LoRALinear(layer)
    wrapper.add_adapter("a", LoraSpec(r=4, alpha=8.0), "m")
    wrapper.active = "a"
    adapter = wrapper.adapter("a")
    with torch.no_grad():
        adapter.lora_B.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))
    fq = FakeQuantLinear(wrapper, QuantConfig("int4-g32").spec)
    merged = merge_lora(layer.weight, adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling)
    qw = quantize(merged.detach(), "int4-g32")
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(10))
    out = fq(x)
    assert torch.equal(out.detach(), F.linear(x, dequantize(qw), layer.bias))
    deployed = quant_linear(qw, layer.bias)(x)
    assert bool(((out.detach() - deployed).abs() <= bf16_bound(x, dequantize(qw))).all())
    assert not torch.allclose(merged, layer.weight)  # the adapter is part of it
    out.pow(2).sum().backward()
    a, b = adapter.lora_A.weight.grad, adapter.lora_B.weight.grad
    assert a is not None and b is not None and float(a.abs().max()) > 0 and float(b.abs().max()) > 0
    assert layer.weight.grad is None  # the base stays frozen


def test_lora_dropout_cannot_be_merged():
    wrapper = LoRALinear(linear())
    wrapper.add_adapter("a", LoraSpec(r=4, dropout=0.1), "m")
    wrapper.active = "a"
    with pytest.raises(ConfigError, match="dropout"):
        FakeQuantLinear(wrapper, QuantConfig("int8").spec)(torch.randn(2, 64))


def test_a_quantized_base_cannot_be_trained_through():
    with pytest.raises(ConfigError, match="without --quant"):
        FakeQuantLinear(quant_linear(quantize(linear().weight, "int8")), QuantConfig("int8").spec)


def nonzero_lora(stage, spec: LoraSpec, layers: str = LAYERS) -> dict[str, torch.Tensor]:
    """Inject adapter "device" with B != 0 (so it changes the model); returns its tensors."""
    inject_lora(stage, layers, spec, "device")
    gen = torch.Generator().manual_seed(12)
    state = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in sorted(adapter_state(stage, "device").items())}
    load_adapter_state(stage, "device", state)
    return state


# per architecture: the LoRA targets, linear layers per block, and a frozen (untargeted) one
ARCHS = {
    "llama": (("q_proj", "v_proj", "up_proj"), 7, "blocks.0.self_attn.k_proj"),
    "gpt2": (("c_attn", "c_fc"), 4, "blocks.0.attn.c_proj"),  # Conv1D: transposed weights
}


@pytest.mark.parametrize("arch_name", sorted(ARCHS))
@pytest.mark.parametrize("lora", [True, False])
def test_a_qat_stage_equals_its_exported_quantized_stage(model_dirs, tmp_path, monkeypatch, arch_name, lora):
    """The whole model: a QAT stage (LoRA through the quantizer, or full fine-tuning of layers 1-2 with changed
    weights) and the quantized stage its export writes give the same logits up to bf16 activations (5% relative
    RMS, as PTQ's twin test) and the same greedy tokens (where no bf16 rounding can swap them), and every
    quantized weight is bit for bit the QAT one."""
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    model_dir = model_dirs[arch_name]
    targets, per_block, frozen = ARCHS[arch_name]
    config = QuantConfig("int4-g32", (("head", "int8"),))
    spec = StageSpec(0, TINY_LAYERS, embed=True, head=True)
    stage = load_stages(model_dir, [spec])[0]
    arch = arch_for(load_config(model_dir))
    float_stage = load_stages(model_dir, [spec])[0]
    spec_lora = LoraSpec(r=4, alpha=8.0, target_modules=targets)
    adapters = nonzero_lora(stage, spec_lora, arch.layers) if lora else {}
    wrapped = apply_qat(stage, config, None if lora else (1, 3))
    trained = {} if lora else train_parameters(stage, arch, (1, 3))
    with torch.no_grad():
        for p in trained.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(13)) * 0.05)
    assert len(wrapped) == (len(targets) * TINY_LAYERS if lora else 2 * per_block)
    assert isinstance(stage.embed, QuantEmbedding) and type(stage.head).__name__ == "Int8Linear"
    assert isinstance(stage.get_submodule(frozen), Int4Linear)  # frozen: PTQ's own module

    tensors = merged_tensors(model_dir, trained, adapters, spec_lora.scaling, transposed=arch_name == "gpt2")
    target = tmp_path / "model"
    write_model(model_dir, target, tensors, {"origin": "qat"})
    path = write_quantized_stage(target, config, {"origin": "qat"})
    exported = load_stage(path, load_config(target), spec)

    for name, module in stage.named_modules():
        if isinstance(module, FakeQuantLinear):
            theirs = exported.get_submodule(name.replace(".inner", ""))
            assert torch.equal(module.quantized_weight(), dequantize(theirs.quantized())), name
    ids = torch.tensor([[1, 5, 17, 42, 8, 66, 23, 9]])
    positions = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        got, want, base = stage(ids, positions), exported(ids, positions), float_stage(ids, positions)
    assert not torch.allclose(got, base, atol=1e-2)  # QAT computes quantized, not float
    rel_rms = float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())
    assert rel_rms < 0.05
    # The same greedy token wherever the export's top token leads by more than bf16 activations can move logits.
    top2 = want.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * (got - want).abs().max()
    assert int(clear.sum()) >= 4 and torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_train_layers_outside_the_stages_are_refused(tiny_llama_dir):
    from edgellm.qat.walker import check_layer_range

    with pytest.raises(ConfigError, match="--train-layers 2:6 needs layer"):
        check_layer_range((2, 6), [(0, TINY_LAYERS)], "this model")


def test_split_qat_step_equals_centralized(tiny_llama_dir):
    """LoRA-QAT through the split (the device's stages and an in-process server stage, cut at 2) gives the loss
    and every adapter gradient of the same step on the whole model (fp32 both, 1e-5)."""
    from test_split_train import batch, in_process_servers, nonzero_adapter

    from edgellm.net.messages import TrainOpen
    from edgellm.splitlearn.device_model import SplitModel
    from edgellm.train.config import DataSpec, TrainConfig
    from edgellm.train.qat_setup import prepare_stages

    spec = LoraSpec(r=4, alpha=8.0, target_modules=("all-linear",))
    cfg = TrainConfig(steps=1, data=DataSpec(task="dates"), lora=spec, qat="int4-g32,head=int8")
    arch = arch_for(load_config(tiny_llama_dir))
    device, hop = in_process_servers(tiny_llama_dir, [2])
    split = SplitModel(device, [hop], LAYERS, spec, "s")
    prepare_stages(split.stages, cfg, arch, "the device")
    split.open(TrainOpen("s", "run1", "attempt1", 0, 1, cfg.server_config().to_json()))
    specs = [StageSpec(0, TINY_LAYERS, embed=True), StageSpec(TINY_LAYERS, TINY_LAYERS, head=True)]
    whole_stages = load_stages(tiny_llama_dir, specs)
    whole = SplitModel(whole_stages, [], LAYERS, spec, "w")
    prepare_stages(whole.stages, cfg, arch, "this model")

    shapes = {k: v.shape for k, v in whole.device_state().items()}
    adapter = nonzero_adapter(set(shapes), shapes)
    whole.load_device_state(adapter)
    split.load_device_state({k: adapter[k] for k in split.device_keys()})
    split.put_server_adapters(adapter)
    results = []
    for model in (split, whole):
        loss, _ = model.loss(batch(), 0, 0)
        loss.backward()
        grads = model.device_grads()
        if model.hops:
            server, _ = model.sync("get", grads=True)
            grads.update({k.removeprefix("grad:"): v for k, v in server.items() if k.startswith("grad:")})
        results.append((float(loss.detach()), grads))
    (split_loss, split_grads), (whole_loss, whole_grads) = results
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    assert set(split_grads) == set(whole_grads) == set(adapter)
    for key, ref in whole_grads.items():
        assert float(ref.abs().max()) > 0, key
        torch.testing.assert_close(split_grads[key], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=key)
