"""The walker: swap the linear layers (and token embeddings) of a module tree for quantized drop-ins, in place.

Handled: `nn.Linear`, transformers' `Conv1D` (GPT-2's transposed linear) and `nn.Embedding`. Everything else
(norms, rotary tables, learned position embeddings) stays as it is. A tied LM head and token embedding are
quantized separately, each into its own module (the head is read as a matmul, the embedding by rows).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from edgellm.errors import ConfigError
from edgellm.quant.modules import QuantEmbedding, is_quantized, quant_linear
from edgellm.quant.scheme import QuantConfig, Scheme
from edgellm.quant.tensor import quantize

log = logging.getLogger(__name__)


def float_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [N, K], bias [N] | None) of a module the walker can quantize as a linear layer, else None."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        weight, bias = module.weight, module.bias
        assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
        return weight.t(), bias
    return None


def quantize_leaf(module: nn.Module, scheme: Scheme, name: str = "") -> nn.Module | None:
    """The quantized replacement of one module, or None if it is not a kind the walker quantizes.

    Raises:
        ConfigError: the scheme does not fit the module's shape (naming the module).
    """
    try:
        if isinstance(module, nn.Embedding):
            return QuantEmbedding(quantize(module.weight, scheme), module.weight.dtype)
        found = float_weight(module)
        if found is None:
            return None
        weight, bias = found
        linear = quant_linear(quantize(weight, scheme), bias)
        linear.transposed = not isinstance(module, nn.Linear)
        return linear
    except ConfigError as exc:
        raise ConfigError(f"cannot quantize {name or type(module).__name__}: {exc}") from None


def quantize_module(module: nn.Module, config: QuantConfig, prefix: str = "") -> nn.Module:
    """Quantize every linear layer and embedding under `module` that `config` gives a scheme, in place.

    Args:
        module: any module tree (a `Stage`, a decoder block, a single `nn.Linear`).
        config: the scheme and its per-module rules, matched against names relative to `module`.
        prefix: the name of `module` itself, for matching and messages.

    Returns:
        `module`, or its replacement when `module` itself is a quantizable leaf.

    Raises:
        ConfigError: the scheme does not fit some module's shape.
    """
    if is_quantized(module):
        return module
    if isinstance(module, nn.Embedding) or float_weight(module) is not None:
        scheme = config.scheme_for(prefix)
        if scheme is None:
            return module
        log.debug("quantizing %s with %s", prefix or type(module).__name__, scheme.name)
        return quantize_leaf(module, scheme, prefix) or module
    for child_name, child in list(module.named_children()):
        name = f"{prefix}.{child_name}" if prefix else child_name
        new = quantize_module(child, config, name)
        if new is not child:
            setattr(module, child_name, new)
    return module


def quantized_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Name -> quantized module, for every quantized module under `module`."""
    return {name: m for name, m in module.named_modules() if is_quantized(m)}
