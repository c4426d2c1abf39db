"""`LoRALinear`: a frozen base linear plus named low-rank adapters, by composition (QLoRA when the base is quantized).

    y = base(x) + lora_B(lora_A(dropout(x))) * alpha / r      (for the active adapter; base only when none)

The base may be an `nn.Linear`, transformers' GPT-2 `Conv1D` (a transposed linear) or one of edgellm's quantized
linears; the adapter's `A` is `[r, in]` and `B` is `[out, r]` in every case, as in peft.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from torch import nn

from edgellm.errors import ConfigError
from edgellm.lora.config import LoraSpec
from edgellm.quant.modules import is_quantized

ADAPTER_DTYPE = torch.float32  # adapters train in float32 whatever the base holds
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a module LoRA can wrap, else None.

    Linear-like: `nn.Linear`, transformers' `Conv1D` (weight `[in, out]`), edgellm's quantized linears.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0]), int(weight.shape[1])
    if is_quantized(module) and hasattr(module, "in_features"):  # Int8Linear, Int4Linear, NF4Linear
        in_features, out_features = module.in_features, module.out_features
        assert isinstance(in_features, int) and isinstance(out_features, int)
        return in_features, out_features
    return None


def check_adapter_name(name: str) -> None:
    """Raises ConfigError unless `name` can name an adapter (letters, digits, `_` and `-`)."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ConfigError(f"adapter name must be letters, digits, '_' or '-', got {name!r}")
    if hasattr(nn.ModuleDict(), name):  # e.g. "eval", "train", "keys": taken by ModuleDict's own attributes
        raise ConfigError(f"adapter name {name!r} is reserved (it names a method of torch's ModuleDict)")


def init_seed_for(init_seed: int, full_name: str) -> int:
    """The generator seed of one module's adapter: stable across processes (unlike `hash`)."""
    return zlib.crc32(f"{init_seed}/{full_name}".encode())


class LoRAAdapter(nn.Module):
    """One adapter: `lora_A` (in -> r), `lora_B` (r -> out), input dropout and scaling; float32 parameters.

    Initialised as peft does by default (A Kaiming-uniform with a = sqrt(5), B zero, so the adapter starts as a
    no-op), but A is drawn from a generator seeded by `(spec.init_seed, full_name)`, not the global RNG.
    """

    def __init__(self, in_features: int, out_features: int, spec: LoraSpec, full_name: str) -> None:
        super().__init__()
        self.full_name = full_name
        self.scaling = spec.scaling
        # Built on the meta device so that construction draws nothing from the global RNG.
        self.lora_A = nn.Linear(in_features, spec.r, bias=False, device="meta", dtype=ADAPTER_DTYPE)
        self.lora_B = nn.Linear(spec.r, out_features, bias=False, device="meta", dtype=ADAPTER_DTYPE)
        self.to_empty(device="cpu")
        generator = torch.Generator().manual_seed(init_seed_for(spec.init_seed, full_name))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_B.weight)
        self.dropout: nn.Module = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] float32 -> [..., out] float32, the scaled low-rank update."""
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"full_name={self.full_name!r}, scaling={self.scaling}"


class LoRALinear(nn.Module):
    """Wraps a frozen base linear (nn.Linear, transformers' GPT-2 Conv1D, or an edgellm quantized linear -> QLoRA)
    by composition, holding any number of named adapters; `active` selects which one applies (None = base only).

    A wrapper whose `active` names an adapter it does not hold runs the base only: after a second injection that
    targets fewer modules, the untargeted wrappers simply have nothing to add. Adding an adapter does not
    activate it.

    Raises:
        ConfigError: the base is not linear-like.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        dims = linear_dims(base)
        if dims is None or isinstance(base, LoRALinear):
            raise ConfigError(f"LoRA can wrap nn.Linear, Conv1D or a quantized linear, not {type(base).__name__}")
        self.in_features, self.out_features = dims
        for param in base.parameters():
            param.requires_grad_(False)
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.train(base.training)  # a wrapper put into an eval-mode model must not turn on dropout

    def add_adapter(self, name: str, spec: LoraSpec, full_name: str) -> None:
        """Add adapter `name`, initialised from `(spec.init_seed, full_name)`, on the base's device, in the
        wrapper's training mode (so dropout only acts in training mode).

        Args:
            full_name: the wrapped module's full-model name, e.g. "model.layers.3.self_attn.q_proj"; it seeds the
                initialisation and names the adapter's tensors in `edgellm.lora.inject.adapter_state`.

        Raises:
            ConfigError: invalid name, or an adapter of that name already exists here.
        """
        check_adapter_name(name)
        if name in self.adapters:
            raise ConfigError(f"adapter {name!r} already exists on {full_name}")
        adapter = LoRAAdapter(self.in_features, self.out_features, spec, full_name)
        self.adapters[name] = adapter.to(self._device()).train(self.training)

    def adapter(self, name: str) -> LoRAAdapter:
        """The adapter called `name`.

        Raises:
            ConfigError: no such adapter (the message lists the ones held).
        """
        if name not in self.adapters:
            raise ConfigError(f"no adapter {name!r} here; adapters: {sorted(self.adapters)}")
        adapter = self.adapters[name]
        assert isinstance(adapter, LoRAAdapter)
        return adapter

    def remove_adapter(self, name: str) -> None:
        """Drop adapter `name` (deactivating it if active).

        Raises:
            ConfigError: no such adapter (the message lists the ones held).
        """
        self.adapter(name)  # checks it exists
        del self.adapters[name]
        if self.active == name:
            self.active = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out] in the base's output dtype."""
        out = self.base(x)
        if self.active is None or self.active not in self.adapters:
            return out
        return out + self.adapters[self.active](x.to(ADAPTER_DTYPE)).to(out.dtype)

    def _device(self) -> torch.device:
        for tensor in (*self.base.parameters(), *self.base.buffers()):
            return tensor.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, active={self.active!r}"
