"""Fake quantization with a straight-through estimator: the weight PTQ would deploy, with a gradient.

    w_hat = fake_quantize(w, scheme)      # == dequantize(quantize(w, scheme)), bit for bit
    w_hat.backward(g)                     # w.grad == g where w lies in its group's clipping range, else 0

The forward calls the scheme's own quantizer (`edgellm.quant.quantize`, the function PTQ and the stage files use)
and dequantizes its result, so a model trained through it computes with exactly the weights its export will
hold. Rounding has no useful derivative; the backward treats it as the identity (Bengio et al. 2013) inside the
range the grid covers and as a constant outside it (the clipped STE of Jacob et al. 2018, as in PyTorch's
`FakeQuantize`):

    clipping range of a group = [lowest level - half the lowest step, highest level + half the highest step]

Inside it every weight rounds to its nearest level; outside it the code saturates at the end level, so a small
change of the weight changes nothing and its gradient is 0. Scales and zero points are treated as constants
(they are recomputed from the weights at every forward, not learned). The schemes' min/max scales are rounded
*up*, so today's quantizers never clip: the gradient passes straight through everywhere. A quantizer that clips
(an MSE-optimal scale search) gets zero gradients on the clipped weights without any change here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from edgellm.quant.scheme import Scheme, get_scheme
from edgellm.quant.tensor import NF4_LEVELS, QuantizedWeight, dequantize, quantize

Quantizer = Callable[[torch.Tensor, Scheme], QuantizedWeight]
_NF4_LOW_HALF_GAP = float(NF4_LEVELS[1] - NF4_LEVELS[0]) / 2
_NF4_HIGH_HALF_GAP = float(NF4_LEVELS[-1] - NF4_LEVELS[-2]) / 2


def clip_range(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range of each group of a quantized weight (see the module docstring).

    -> (low, high): float32 [N, G] each
    """
    s = qw.scales.float()
    if qw.spec.kind == "int8":  # levels q * s, q in -127..127
        return -127.5 * s, 127.5 * s
    if qw.spec.kind == "int4":  # levels (q - 8) * s + z, q in 0..15
        assert qw.zeros is not None
        z = qw.zeros.float()
        return z - 8.5 * s, z + 7.5 * s
    return (-1 - _NF4_LOW_HALF_GAP) * s, (1 + _NF4_HIGH_HALF_GAP) * s  # nf4: levels NF4[q] * absmax


def inside_clip_range(qw: QuantizedWeight, w: torch.Tensor) -> torch.Tensor:
    """Which weights lie in their group's clipping range.

    w: [N, K] the weight `qw` was quantized from -> bool [N, K]
    """
    n, k = qw.shape
    low, high = clip_range(qw)  # [N, G]
    grouped = w.detach().float().reshape(n, low.shape[1], -1)  # [N, G, K/G]
    inside = (grouped >= low[..., None]) & (grouped <= high[..., None])
    return inside.reshape(n, k)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, scheme: Scheme, quantizer: Quantizer) -> torch.Tensor:  # type: ignore[override]
        qw = quantizer(w.detach(), scheme)
        ctx.save_for_backward(inside_clip_range(qw, w))
        return dequantize(qw, w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad.masked_fill(~inside, 0), None, None


def fake_quantize(w: torch.Tensor, scheme: str | Scheme, quantizer: Quantizer = quantize) -> torch.Tensor:
    """The weight `w` quantized with `scheme` and dequantized, differentiable by the clipped straight-through rule.

    Args:
        w: a float weight [N, K] (a linear layer's `[out, in]`).
        scheme: a `SCHEMES` name or a `Scheme`.
        quantizer: the function that quantizes (default: PTQ's `edgellm.quant.quantize`); a parameter so a test
            can give one that clips.

    Returns:
        [N, K] in w's dtype: equal to `dequantize(quantizer(w, scheme), w.dtype)`.

    Raises:
        ConfigError: unknown scheme, a group size that does not divide K, a non-2-D or non-finite weight.
    """
    spec = get_scheme(scheme) if isinstance(scheme, str) else scheme
    out: torch.Tensor = _FakeQuantize.apply(w, spec, quantizer)
    return out


def merge_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight a LoRA adapter stands for once merged, in float32: what QAT quantizes and the export writes.

    weight: [N, K], lora_a: [r, K], lora_b: [N, r] -> [N, K] float32 (differentiable in all three)
    """
    return weight.float() + (lora_b.float() @ lora_a.float()) * scaling
