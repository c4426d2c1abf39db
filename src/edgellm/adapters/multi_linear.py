"""`MultiLoraLinear`: a frozen base linear plus a stack of LoRA adapters, each batch row choosing its own.

    y[b] = base(x)[b] + (x[b] @ A[i_b]^T) @ B[i_b]^T          (i_b = -1: base only)

Composition, as `edgellm.lora.LoRALinear`: `base` is an `nn.Linear`, a GPT-2 `Conv1D` or an edgellm quantized
linear, untouched and never merged into. The adapters are never trained here (`edgellm.lora` trains); they live in
two non-persistent buffers (the stage's state dict only gains the `base.` prefix) that `AdapterStore` fills.
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.adapters.bgmv import RowPlan, add_delta
from edgellm.errors import ConfigError
from edgellm.lora.linear import LoRALinear, linear_dims


class MultiLoraLinear(nn.Module):
    """Wraps a linear-like `base` with stacked adapters, applied per batch row by the current `plan`.

    The stacks hold exactly the adapters this module has (one stack row each, no spare capacity), so an adapter
    costs its own A and B here; ranks below the largest held are zero-padded to it.

    Attributes:
        slots: the store slot of each stack row, in stack order.
        ranks: each stack row's own rank.
        plan: which batch rows use which stack row in the current forward pass (`AdapterStore.rows`); None: none.

    Raises:
        ConfigError: the base is not linear-like (or is already a LoRA wrapper).
    """

    a_stack: torch.Tensor | None  # [n, r_max, in]
    b_stack: torch.Tensor | None  # [n, out, r_max], scaling folded in

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        dims = linear_dims(base)
        if dims is None or isinstance(base, (LoRALinear, MultiLoraLinear)):
            raise ConfigError(f"adapters can wrap nn.Linear, Conv1D or a quantized linear, not {type(base).__name__}")
        self.in_features, self.out_features = dims
        self.base = base
        self.slots: list[int] = []
        self.ranks: list[int] = []
        self.plan: RowPlan | None = None
        self.register_buffer("a_stack", None, persistent=False)
        self.register_buffer("b_stack", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, ..., in] -> [B, ..., out]: exactly `base(x)` when no row has an adapter."""
        return self.add_delta(self.base(x), x)

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`out` (this module's base output for x, e.g. a slice of a fused projection) plus the planned deltas.

        out: [B, ..., out], x: [B, ..., in] -> [B, ..., out]; `out` itself when there is no plan
        """
        plan = self.plan
        if plan is None:
            return out
        assert self.a_stack is not None and self.b_stack is not None
        rank = self.ranks[plan.single] if plan.index is None else None
        return add_delta(out, x, self.a_stack, self.b_stack, plan, rank)

    def put(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Hold adapter `slot` (replacing what it held): a: [r, in], b: [out, r] with the scaling folded in.

        The stacks are reallocated at their new exact size; they keep the base's device and `a`'s dtype.

        Raises:
            ConfigError: shapes that do not fit this module.
        """
        rank = a.shape[0]
        if tuple(a.shape) != (rank, self.in_features) or tuple(b.shape) != (self.out_features, rank):
            raise ConfigError(
                f"adapter A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a linear of "
                f"{self.in_features} -> {self.out_features}"
            )
        self.drop(slot)
        r_max = max([rank, *self.ranks])
        a_new = torch.zeros(1, r_max, self.in_features, dtype=a.dtype, device=self.device())
        b_new = torch.zeros(1, self.out_features, r_max, dtype=a.dtype, device=self.device())
        a_new[0, :rank] = a
        b_new[0, :, :rank] = b
        if self.a_stack is None or self.b_stack is None:
            self.a_stack, self.b_stack = a_new, b_new
        else:
            self.a_stack = torch.cat([_pad(self.a_stack, 1, r_max), a_new])
            self.b_stack = torch.cat([_pad(self.b_stack, 2, r_max), b_new])
        self.slots.append(slot)
        self.ranks.append(rank)
        self.plan = None  # a plan indexes the old stack

    def drop(self, slot: int) -> None:
        """Forget adapter `slot` if held, shrinking the stacks to the adapters left (None when none is)."""
        if slot not in self.slots:
            return
        i = self.slots.index(slot)
        del self.slots[i], self.ranks[i]
        self.plan = None
        if not self.slots or self.a_stack is None or self.b_stack is None:
            self.a_stack = self.b_stack = None
            return
        keep = [j for j in range(self.a_stack.shape[0]) if j != i]
        r_max = max(self.ranks)
        self.a_stack = self.a_stack[keep, :r_max].contiguous()
        self.b_stack = self.b_stack[keep, :, :r_max].contiguous()

    def clear(self) -> None:
        """Forget every adapter."""
        self.slots, self.ranks, self.plan = [], [], None
        self.a_stack = self.b_stack = None

    def stack_nbytes(self) -> int:
        """Bytes the stacks occupy (padding included)."""
        return sum(t.numel() * t.element_size() for t in (self.a_stack, self.b_stack) if t is not None)

    def device(self) -> torch.device:
        """The base's device (cpu for a base without tensors)."""
        for tensor in (*self.base.parameters(), *self.base.buffers()):
            return tensor.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, slots={self.slots}"


def _pad(stack: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`stack` zero-padded along `dim` to `size` (itself when already that size)."""
    missing = size - stack.shape[dim]
    if missing <= 0:
        return stack
    shape = list(stack.shape)
    shape[dim] = missing
    return torch.cat([stack, stack.new_zeros(shape)], dim=dim)
