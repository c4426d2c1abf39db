"""One peft LoRA adapter, checked against one stage and cut down to the stage's own layers (`StageAdapter`).

Tensor keys name full-model modules as peft's files do (`"base_model.model.model.layers.3.self_attn.q_proj.
lora_A.weight"`) or as `edgellm.lora` does in memory (`"model.layers.3.self_attn.q_proj.lora_A.weight"`). Every
check runs before a store changes anything, so a refused adapter leaves the store as it was.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgellm.adapters.multi_linear import MultiLoraLinear
from edgellm.errors import ConfigError
from edgellm.lora.config import ALL_LINEAR, LoraSpec
from edgellm.lora.linear import linear_dims

# peft_io's own reading of peft's config and key forms, so a store refuses exactly what `load_peft_adapter` does.
from edgellm.lora.peft_io import _KEY, FILE_PREFIX, _check_ranks, _spec_from_peft, _split_keys
from edgellm.model.arch import ARCHS
from edgellm.model.stage import Stage

LAYER_PATHS = frozenset(arch.layers for arch in ARCHS.values())  # "model.layers", "transformer.h"
_MODULE = re.compile(r"(?P<layers>.+?)\.(?P<layer>\d+)\.(?P<sub>.+)")  # "model.layers" . 3 . "self_attn.q_proj"


@dataclass(frozen=True)
class ModuleDelta:
    """One adapted module of a stage: where it is and its update, ready for `MultiLoraLinear.put`.

    Attributes:
        full_name: the full-model module name, e.g. "model.layers.3.self_attn.q_proj".
        block: the index of its block in `stage.blocks`.
        sub: its name inside the block, e.g. "self_attn.q_proj".
        a: [r, in] in the stage's float dtype, on the module's device.
        b: [out, r], times the adapter's scaling, likewise.
    """

    full_name: str
    block: int
    sub: str
    a: torch.Tensor
    b: torch.Tensor


@dataclass(frozen=True)
class StageAdapter:
    """An adapter's part in one stage: its spec and the deltas of the modules in the stage's layers.

    Attributes:
        spec: rank, alpha and targets from the peft config.
        modules: the stage's adapted modules (empty when the adapter has none in the stage's layers).
        layers: the global indices of the decoder layers those modules are in, ascending.
    """

    spec: LoraSpec
    modules: tuple[ModuleDelta, ...]
    layers: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the A and B tensors held (their own ranks, without the stacks' padding)."""
        return sum(t.numel() * t.element_size() for m in self.modules for t in (m.a, m.b))


def stage_adapter(stage: Stage, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> StageAdapter:
    """Check a peft adapter (its `adapter_config.json` as a dict, and its tensors) and take the stage's part.

    Raises:
        ConfigError: the message names the field or the key: an option plain LoRA does not have (DoRA, rsLoRA,
            biases, per-module ranks, ...), a key that is not a LoRA weight of a decoder layer's module, a module
            outside `target_modules` or not in the stage's block, shapes that do not fit the rank or the module,
            non-finite values.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"adapter config must be a mapping (adapter_config.json), got {type(config).__name__}")
    spec = _spec_from_peft(dict(config), "adapter config")
    if not isinstance(tensors, Mapping):
        raise ConfigError(f"adapter tensors must be a mapping of names to tensors, got {type(tensors).__name__}")
    modules = _split_keys(_normalised(tensors), "adapter tensors")
    if not modules:
        raise ConfigError("adapter tensors: holds no LoRA tensors")
    _check_ranks(modules, spec.r, "adapter tensors")
    dtype, found, layers = _float_dtype(stage), [], set()
    for module in sorted(modules):
        pair = modules[module]
        at = _locate(stage, module, spec)
        if at is None:
            continue
        block, sub, target = at
        a, b = pair["lora_A"], pair["lora_B"]
        in_features, out_features = _dims(target, module)
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise ConfigError(
                f"adapter tensors: {module}.lora_A.weight {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                f"{module} ({in_features} -> {out_features}): expected [{spec.r}, {in_features}] and "
                f"[{out_features}, {spec.r}]"
            )
        device = _device(target)
        scaled = b.to(torch.float32) * spec.scaling
        found.append(ModuleDelta(module, block, sub, a.to(device, dtype), scaled.to(device, dtype)))
        layers.add(stage.spec.start + block)
    return StageAdapter(spec, tuple(found), tuple(sorted(layers)))


def _normalised(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys in the in-memory form "<module>.lora_A.weight"; values checked to be finite float tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"adapter tensors: {key!r} is not a name with a tensor")
        match = _KEY.fullmatch(key.removeprefix(FILE_PREFIX))
        if match is None:
            raise ConfigError(f"adapter tensors: tensor {key!r} is not a LoRA A or B weight")
        if not tensor.is_floating_point():
            raise ConfigError(f"adapter tensors: tensor {key!r} has dtype {tensor.dtype}, not a float type")
        if not bool(torch.isfinite(tensor).all()):
            raise ConfigError(f"adapter tensors: tensor {key!r} holds non-finite values (NaN or inf)")
        name = f"{match['module']}.{match['which']}.weight"
        if name in out:
            raise ConfigError(f"adapter tensors: {name} is given twice (as {key!r} and another key)")
        out[name] = tensor.detach()
    return out


def _locate(stage: Stage, module: str, spec: LoraSpec) -> tuple[int, str, nn.Module] | None:
    """(block index, name in block, the module) for a module in the stage's layers; None for other layers."""
    match = _MODULE.fullmatch(module)
    if match is None or match["layers"] not in LAYER_PATHS:
        raise ConfigError(
            f"adapter tensors: module {module} is not inside a decoder layer "
            f"(expected '<layers>.<index>.<module>' with <layers> one of {sorted(LAYER_PATHS)})"
        )
    if spec.target_modules != (ALL_LINEAR,) and not any(
        module == t or module.endswith(f".{t}") for t in spec.target_modules
    ):
        raise ConfigError(
            f"adapter tensors: module {module} is not among the config's target_modules {list(spec.target_modules)}"
        )
    layer = int(match["layer"])
    if not stage.spec.start <= layer < stage.spec.end:
        return None
    block = layer - stage.spec.start
    sub = match["sub"]
    try:
        target = stage.blocks[block].get_submodule(sub)
    except AttributeError:
        raise ConfigError(
            f"adapter tensors: unknown module {module}: layer {layer} has no {sub!r}; its linear modules: "
            f"{_linear_names(stage.blocks[block])}"
        ) from None
    return block, sub, target


def _dims(module: nn.Module, name: str) -> tuple[int, int]:
    if isinstance(module, MultiLoraLinear):
        return module.in_features, module.out_features
    dims = linear_dims(module)
    if dims is None:
        raise ConfigError(f"adapter tensors: module {name} is a {type(module).__name__}, not a linear layer")
    return dims


def _linear_names(block: nn.Module) -> list[str]:
    return sorted(
        name.removesuffix(".base")
        for name, m in block.named_modules()
        if name and (isinstance(m, MultiLoraLinear) or (linear_dims(m) is not None and not name.endswith(".base")))
    )


def _float_dtype(stage: Stage) -> torch.dtype:
    """The dtype of the stage's hidden states: its first floating-point parameter's (float32 when it has none)."""
    for param in stage.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")
