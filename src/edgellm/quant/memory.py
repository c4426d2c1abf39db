"""Exact memory of a stage: quantized codes, their scales, floating-point tensors, and the KV cache per token."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from edgellm.quant.modules import is_quantized
from edgellm.quant.scheme import QuantConfig, weight_bytes
from edgellm.quant.walker import float_weight

_SCALE_BUFFERS = ("scales", "zeros", "scales_zeros")


@dataclass(frozen=True)
class StageMemory:
    """Bytes a stage holds, by kind; a tensor shared by two modules (tied weights) counts once.

    Attributes:
        code_bytes: quantized weight codes (int8 values, packed 4-bit pairs).
        scale_bytes: their scales and zero points.
        float_bytes: every other parameter and buffer (norms, biases, layers left in floating point).
        schemes: the quantization schemes present, sorted ([] for a float stage).
    """

    code_bytes: int
    scale_bytes: int
    float_bytes: int
    schemes: tuple[str, ...]

    @property
    def weight_bytes(self) -> int:
        return self.code_bytes + self.scale_bytes + self.float_bytes

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "schemes": list(self.schemes), "weight_bytes": self.weight_bytes}


def stage_memory(stage: nn.Module) -> StageMemory:
    """Count a stage's (or any module's) tensors by kind. Totals agree with `serve.report.weight_bytes`."""
    seen: set[int] = set()
    counts = {"code": 0, "scale": 0, "float": 0}
    schemes: set[str] = set()
    for _, module in stage.named_modules():
        quantized = is_quantized(module)
        if quantized:
            schemes.add(str(module.scheme))
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            kind = "float"
            if quantized and name in _SCALE_BUFFERS:
                kind = "scale"
            elif quantized and name in ("qweight", "packed"):
                kind = "code"
            counts[kind] += t.numel() * t.element_size()
    return StageMemory(counts["code"], counts["scale"], counts["float"], tuple(sorted(schemes)))


def planned_weight_bytes(stage: nn.Module, quant: QuantConfig | None, prefix: str = "") -> int:
    """Bytes `stage` will hold once `quantize_module(stage, quant)` has run, without running it.

    Works on a meta-device stage (`model.build.meta_stages`): it follows the walker's choices (linear layers and
    embeddings get their scheme's exact size, `quant.scheme.weight_bytes`, plus a float32 bias) and counts every
    other parameter and buffer at its own dtype, a tensor shared by two modules once. On a real float stage it
    agrees with `stage_memory(quantized copy).weight_bytes`; rotary tables are counted at the skeleton's dtype
    (the builder rebuilds them in float32: a few hundred bytes apart under bf16).

    Raises:
        ConfigError: a scheme's group size does not divide some layer's input dimension.
    """
    seen: set[int] = set()
    total = 0
    for name, module in _walk(stage, prefix):
        scheme = quant.scheme_for(name) if quant is not None and _quantizable(module) else None
        if scheme is not None:
            if isinstance(module, nn.Embedding):
                rows, cols = module.weight.shape
                total += weight_bytes(rows, cols, scheme.name, embedding=True)
            else:
                found = float_weight(module)
                assert found is not None
                weight, bias = found
                total += weight_bytes(weight.shape[0], weight.shape[1], scheme.name)
                total += 0 if bias is None else 4 * bias.numel()  # quantized modules keep a float32 bias
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or float_weight(module) is not None


def _walk(module: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """(name, module) in the walker's order; a quantizable module's children are not visited (it is a leaf)."""
    out = [(name, module)]
    if _quantizable(module) or is_quantized(module):
        return out
    for child_name, child in module.named_children():
        out += _walk(child, f"{name}.{child_name}" if name else child_name)
    return out


def kv_bytes_per_token(model_config: Any, num_layers: int, dtype: torch.dtype = torch.float32) -> int:
    """KV-cache bytes one token of context costs a stage of `num_layers` decoder layers (batch 1)."""
    heads = getattr(model_config, "num_attention_heads", None) or model_config.n_head
    hidden = getattr(model_config, "hidden_size", None) or model_config.n_embd
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
