"""The QAT walkers: put fake quantizers into a stage, in place, for what trains; quantize what does not.

Two uses:

- A stage QAT owns (centralized training, the device's stages): `apply_qat` wraps each linear layer that trains
  (a `LoRALinear`, or any linear layer of a fully fine-tuned layer range) in a `FakeQuantLinear`, and swaps every
  frozen linear layer and embedding for the quantized module PTQ would give it: the frozen part *is* the
  deployed model, and the trained part computes with the weights its export will hold.
- A server's shared stage (`wrap_stage`): every linear layer of its blocks gets a `FakeQuantLinear` with no scheme,
  which runs the layer as it was; `fake_quant_scope` turns the run's scheme on for one QAT session's forward pass,
  so inference sessions and other runs on the same stage still compute in floating point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from edgellm.errors import ConfigError
from edgellm.lora.linear import LoRALinear
from edgellm.model.arch import Arch
from edgellm.model.stage import Stage
from edgellm.qat.modules import FakeQuantLinear
from edgellm.quant.modules import is_quantized
from edgellm.quant.scheme import QuantConfig, needs_calibration
from edgellm.quant.stage_files import full_name
from edgellm.quant.walker import float_weight, quantize_leaf

LayerRange = tuple[int, int]  # decoder layers [start, end) of the whole model


def layer_of(stage: Stage, name: str) -> int | None:
    """The model layer a stage-relative module name belongs to (`blocks.2.mlp` in a stage from layer 10: 12)."""
    part, _, rest = name.partition(".")
    if part != "blocks" or not rest:
        return None
    return stage.spec.start + int(rest.partition(".")[0])


def _in(layers: LayerRange | None, layer: int | None) -> bool:
    return layers is not None and layer is not None and layers[0] <= layer < layers[1]


def check_qat_config(config: QuantConfig) -> None:
    """Refuse a scheme QAT cannot train through: one whose quantizer is not a function of the weight alone.

    Raises:
        ConfigError: a calibrated scheme (`*-gptq` rounds each layer against calibration statistics and the error
            of the weights rounded before it, so no per-weight fake quantizer reproduces it).
    """
    if needs_calibration(config):
        raise ConfigError(
            f"--qat {config.text}: a calibrated scheme (-gptq) cannot be fake-quantized weight by weight; "
            "train with its plain grid or its -mse search (e.g. int4-g64 or int4-g64-mse)"
        )


def apply_qat(stage: Stage, config: QuantConfig, train_layers: LayerRange | None = None) -> list[str]:
    """Prepare `stage` for quantization-aware training with `config`, in place.

    Trainable linear layers (a `LoRALinear`, or any linear layer of a layer in `train_layers`) become
    `FakeQuantLinear`s; frozen linear layers and embeddings become PTQ's quantized modules; modules `config`
    keeps in floating point (`head=none`) stay as they are. Run it after injecting LoRA.

    Returns:
        the stage-relative names of the fake-quantized layers.

    Raises:
        ConfigError: a trainable layer is not in floating point (a stage loaded with --quant), or the scheme does
            not fit a layer's shape, or a calibrated scheme (`check_qat_config`).
    """
    check_qat_config(config)
    wrapped: list[str] = []

    def trainable(name: str, module: nn.Module) -> bool:
        return isinstance(module, LoRALinear) or (
            float_weight(module) is not None and _in(train_layers, layer_of(stage, name))
        )

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in list(module.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, FakeQuantLinear) or is_quantized(child):
                continue
            leaf = isinstance(child, (LoRALinear, nn.Embedding)) or float_weight(child) is not None
            if not leaf:
                walk(child, name)
                continue
            scheme = config.scheme_for(name)
            if scheme is None:
                continue
            if trainable(name, child):
                new: nn.Module | None = FakeQuantLinear(child, scheme)
                wrapped.append(name)
            else:
                new = quantize_leaf(child, scheme, name)
            if new is not None:
                setattr(module, child_name, new)

    walk(stage, "")
    return wrapped


def train_parameters(stage: Stage, arch: Arch, layers: LayerRange) -> dict[str, nn.Parameter]:
    """The base-model parameters of the stage's layers in `layers` (not LoRA's), by full-model name
    (`model.layers.3.mlp.up_proj.weight`): what full fine-tuning of a layer range trains."""
    out: dict[str, nn.Parameter] = {}
    for name, param in stage.named_parameters():
        if not _in(layers, layer_of(stage, name)):
            continue
        clean = _unwrapped_name(stage, name)
        if clean is not None:
            out[full_name(clean, arch, stage.spec)] = param
    return out


def _unwrapped_name(stage: nn.Module, name: str) -> str | None:
    """A parameter's name without the wrappers' slots (`q_proj.inner.base.weight` -> `q_proj.weight`); None for a
    LoRA adapter's own parameters."""
    kept: list[str] = []
    module: nn.Module = stage
    for part in name.split("."):
        if isinstance(module, LoRALinear) and part == "adapters":
            return None
        wrapper_slot = (isinstance(module, FakeQuantLinear) and part == "inner") or (
            isinstance(module, LoRALinear) and part == "base"
        )
        if not wrapper_slot:
            kept.append(part)
        child = getattr(module, part)
        if not isinstance(child, nn.Module):
            break
        module = child
    return ".".join(kept)


def check_layer_range(layers: LayerRange, held: list[LayerRange], where: str) -> None:
    """Refuse a layer range this process does not hold every layer of.

    Raises:
        ConfigError: naming the range and what is held.
    """
    missing = [i for i in range(*layers) if not any(a <= i < b for a, b in held)]
    if missing:
        have = ", ".join(f"{a}:{b}" for a, b in held if b > a) or "no layers"
        raise ConfigError(
            f"--train-layers {layers[0]}:{layers[1]} needs layer(s) {missing[:3]}... that {where} does not hold "
            f"(it holds {have}); choose layers inside it"
        )


# -- a server's shared stage -------------------------------------------------------------------------------------


def wrappers(stage: nn.Module) -> dict[str, FakeQuantLinear]:
    """Name -> every `FakeQuantLinear` under `stage`."""
    return {name: m for name, m in stage.named_modules() if isinstance(m, FakeQuantLinear)}


def check_float_stage(stage: Stage) -> None:
    """Refuse QAT on a stage whose blocks hold quantized layers (QAT trains through the float weights).

    Raises:
        ConfigError: naming the first quantized layer.
    """
    for name, module in stage.blocks.named_modules():
        if is_quantized(module):
            raise ConfigError(
                f"QAT trains through the floating-point weights, but stage [{stage.spec.start}:{stage.spec.end}) holds "
                f"quantized blocks.{name} ({getattr(module, 'scheme', '?')}): start the node without quant"
            )


def wrap_stage(stage: Stage) -> None:
    """Give every linear layer of `stage.blocks` a `FakeQuantLinear` with no scheme (idempotent).

    Raises:
        ConfigError: the stage's linear layers are already quantized (QAT trains through the float weights).
    """
    check_float_stage(stage)

    def walk(module: nn.Module) -> None:
        for child_name, child in list(module.named_children()):
            if isinstance(child, FakeQuantLinear):
                continue
            if isinstance(child, LoRALinear) or float_weight(child) is not None:
                setattr(module, child_name, FakeQuantLinear(child, None))
            else:
                walk(child)

    walk(stage.blocks)


def unwrap_stage(stage: nn.Module) -> bool:
    """Put every `FakeQuantLinear`'s inner module back in its place; returns whether there were any."""
    found = wrappers(stage)
    for name, wrapper in found.items():
        parent, _, leaf = name.rpartition(".")
        setattr(stage.get_submodule(parent) if parent else stage, leaf, wrapper.inner)
    return bool(found)


@contextlib.contextmanager
def fake_quant_scope(stage: nn.Module, config: QuantConfig | None) -> Iterator[None]:
    """Within the block, the stage's wrappers fake-quantize with `config` (each by its name's scheme; None: none)."""
    found = wrappers(stage)
    saved = [(w, w.scheme) for w in found.values()]
    try:
        for name, wrapper in found.items():
            wrapper.scheme = None if config is None else config.scheme_for(name)
        yield
    finally:
        for wrapper, scheme in saved:
            wrapper.scheme = scheme
