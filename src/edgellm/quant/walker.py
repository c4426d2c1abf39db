"""The walker: swap the linear layers (and token embeddings) of a module tree for quantized drop-ins, in place.

Handled: `nn.Linear`, transformers' `Conv1D` (GPT-2's transposed linear) and `nn.Embedding`. Everything else
(norms, rotary tables, learned position embeddings) stays as it is. A tied LM head and token embedding are
quantized separately, each into its own module (the head is read as a matmul, the embedding by rows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn

from edgellm.errors import ConfigError
from edgellm.quant.modules import QuantEmbedding, is_quantized, quant_linear
from edgellm.quant.scheme import CALIBRATED, QuantConfig, Scheme
from edgellm.quant.tensor import QuantizedWeight, quantize

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


def quantize_linear_weight(weight: torch.Tensor, scheme: Scheme, hessian: torch.Tensor | None) -> QuantizedWeight:
    """A linear layer's weight [N, K] quantized as `scheme` says: with its input statistics `hessian` [K, K]
    (`E[x x^T]`) for a calibrated search (`*-gptq`), else `quantize`.

    Raises:
        ConfigError: a calibrated scheme without `hessian`, or as `quantize`.
    """
    if scheme.search not in CALIBRATED:
        return quantize(weight, scheme)
    if hessian is None:
        raise ConfigError(
            f"scheme {scheme.name} needs calibration statistics: quantize the stage with "
            "edgellm.quant.stage_files.load_or_quantize (or pass hessians= to quantize_module)"
        )
    from edgellm.quant.gptq import gptq_quantize

    return gptq_quantize(weight, scheme, hessian)


def quantize_leaf(
    module: nn.Module, scheme: Scheme, name: str = "", hessian: torch.Tensor | None = None
) -> nn.Module | None:
    """The quantized replacement of one module, or None if it is not a kind the walker quantizes.

    `hessian` [K, K]: the input statistics of a linear layer, for a calibrated scheme (an embedding needs none:
    its output error is its weight error, which `quantize`'s search minimises).

    Raises:
        ConfigError: the scheme does not fit the module's shape, or needs a missing `hessian` (naming the module).
    """
    try:
        if isinstance(module, nn.Embedding):
            return QuantEmbedding(quantize(module.weight, scheme), module.weight.dtype)
        found = float_weight(module)
        if found is None:
            return None
        weight, bias = found
        linear = quant_linear(quantize_linear_weight(weight, scheme, hessian), bias)
        linear.transposed = not isinstance(module, nn.Linear)
        return linear
    except ConfigError as exc:
        raise ConfigError(f"cannot quantize {name or type(module).__name__}: {exc}") from None


def quantize_module(
    module: nn.Module,
    config: QuantConfig,
    prefix: str = "",
    hessians: Mapping[str, torch.Tensor] | None = None,
    on_module: Callable[[str], None] | None = None,
) -> nn.Module:
    """Quantize every linear layer and embedding under `module` that `config` gives a scheme, in place.

    Args:
        module: any module tree (a `Stage`, a decoder block, a single `nn.Linear`).
        config: the scheme and its per-module rules, matched against names relative to `module`.
        prefix: the name of `module` itself, for matching and messages.
        hessians: name -> `E[x x^T]` of each linear layer's input (`edgellm.quant.calibration`); needed by the
            layers a calibrated scheme (`*-gptq`) applies to.
        on_module: called with each module's name after it is quantized (progress).

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
        new = quantize_leaf(module, scheme, prefix, None if hessians is None else hessians.get(prefix))
        if on_module is not None:
            on_module(prefix)
        return new or module
    for child_name, child in list(module.named_children()):
        name = f"{prefix}.{child_name}" if prefix else child_name
        new = quantize_module(child, config, name, hessians, on_module)
        if new is not child:
            setattr(module, child_name, new)
    return module


def quantized_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Name -> quantized module, for every quantized module under `module`."""
    return {name: m for name, m in module.named_modules() if is_quantized(m)}
