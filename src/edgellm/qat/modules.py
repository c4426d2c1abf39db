"""`FakeQuantLinear`: a float linear layer (or a LoRA-wrapped one) that computes with its weight fake-quantized.

    FakeQuantLinear(nn.Linear)                  full fine-tuning: W trains through the quantizer
    FakeQuantLinear(LoRALinear(nn.Linear))      LoRA: y = x @ Q(W + (alpha/r) B A)^T + b, A and B train through it

With LoRA the quantizer sees the *merged* weight, so the adapter learns an update whose quantized merge is good,
and the export (merge, then quantize with the same function) computes exactly what training did. The other way
round, `LoRALinear(base=FakeQuantLinear(...))`, would train float adapters over a frozen quantized base: that is
QLoRA (`--quant`), and merging its adapter afterwards re-quantizes a weight the training never saw. So here the
fake quantizer is the outer wrapper; both are still composed, neither subclasses the other.

`scheme` None makes the module run its inner module as it is (a server stage whose wrappers serve float sessions
between the steps of a QAT run: `edgellm.qat.walker.fake_quant_scope`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.errors import ConfigError
from edgellm.lora.linear import LoRALinear
from edgellm.qat.fake_quant import Quantizer, fake_quantize, merge_lora
from edgellm.quant.scheme import Scheme
from edgellm.quant.tensor import quantize
from edgellm.quant.walker import float_weight


def _float_base(inner: nn.Module) -> nn.Module:
    base = inner.base if isinstance(inner, LoRALinear) else inner
    if float_weight(base) is None:
        raise ConfigError(
            f"QAT needs a floating-point linear layer (nn.Linear or Conv1D) to fake-quantize, not "
            f"{type(base).__name__}: load the model without --quant"
        )
    return base


class FakeQuantLinear(nn.Module):
    """A drop-in for a float linear layer that computes with the weight PTQ would give it.

    Args:
        inner: an `nn.Linear`, transformers' `Conv1D`, or a `LoRALinear` over one of them.
        scheme: the quantization scheme; None runs `inner` unchanged.
        quantizer: the scheme's quantizer (PTQ's `edgellm.quant.quantize`).

    Raises:
        ConfigError: `inner` is not a float linear layer (a quantized one cannot be trained through).
    """

    def __init__(self, inner: nn.Module, scheme: Scheme | None, quantizer: Quantizer = quantize) -> None:
        super().__init__()
        base = _float_base(inner)
        found = float_weight(base)
        assert found is not None
        self.out_features, self.in_features = found[0].shape
        self.inner = inner
        self.scheme = scheme
        self.quantizer = quantizer
        self._cache: tuple[tuple[object, ...], torch.Tensor] | None = None
        self.train(inner.training)

    def effective_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the float weight [N, K] the layer stands for, its bias [N] | None): with LoRA, the active adapter's
        merge (float32); without, the base's own weight (transposed back for a Conv1D)."""
        found = float_weight(_float_base(self.inner))
        assert found is not None
        weight, bias = found
        inner = self.inner
        if isinstance(inner, LoRALinear) and inner.active is not None and inner.active in inner.adapters:
            adapter = inner.adapter(inner.active)
            if not isinstance(adapter.dropout, nn.Identity):
                raise ConfigError("QAT merges LoRA into the weight it quantizes: LoRA dropout must be 0")
            weight = merge_lora(weight, adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling)
        return weight, bias

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight [N, K] the forward multiplies by (cached while nothing in it can train)."""
        assert self.scheme is not None
        weight, _ = self.effective_weight()
        if torch.is_grad_enabled() and weight.requires_grad:
            self._cache = None
            return fake_quantize(weight, self.scheme, self.quantizer)
        key = (self.scheme.name, getattr(self.inner, "active", None), *self._versions())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, fake_quantize(weight, self.scheme, self.quantizer))
        return self._cache[1]

    def _versions(self) -> list[object]:
        # Any in-place update (an optimizer step, a checkpoint load) bumps a tensor's version.
        return [(id(p), p._version) for p in self.inner.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N] in x's dtype."""
        if self.scheme is None:
            out: torch.Tensor = self.inner(x)
            return out
        found = float_weight(_float_base(self.inner))
        assert found is not None
        bias = found[1]
        weight = self.quantized_weight()
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def extra_repr(self) -> str:
        scheme = None if self.scheme is None else self.scheme.name
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={scheme}"
