"""Batched gather matrix-vector LoRA (BGMV, as Punica and S-LoRA): each batch row gets its own adapter's delta.

A module's adapters are stacked, A `[n, r_max, in]` and B `[n, out, r_max]` with the scaling folded into B and
smaller ranks padded with zeros (a zero row of A meets a zero column of B, so the padding adds exactly nothing).
For rows `b` with stack index `i_b`:

    delta[b] = (x[b] @ A[i_b]^T) @ B[i_b]^T          rows whose index is -1 get no delta

A `RowPlan`, made once per forward pass from host-side integers, says which rows take part and how: none (no plan:
the base output is returned as it is), all rows one adapter (two plain matmuls), or a mix (a gather of each row's
A and B, then two batched matmuls). Planning on the host keeps the per-module work free of device syncs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RowPlan:
    """Which batch rows of one forward pass get which stacked adapter.

    Attributes:
        rows: [b] int64, the batch rows that get a delta, ascending; None: every row.
        index: [b] int64, each such row's index in the stack; None: they all use `single`.
        single: the one stack index of every such row when `index` is None (else -1).
    """

    rows: torch.Tensor | None
    index: torch.Tensor | None
    single: int


def plan_rows(index: Sequence[int], device: torch.device | str = "cpu") -> RowPlan | None:
    """The plan for batch rows whose stack indices are `index` (-1: no adapter); None when no row has one.

    index: B host-side ints -> RowPlan with tensors on `device`, or None
    """
    active = [b for b, i in enumerate(index) if i >= 0]
    if not active:
        return None
    rows = None if len(active) == len(index) else torch.tensor(active, dtype=torch.int64, device=device)
    distinct = {index[b] for b in active}
    if len(distinct) == 1:
        return RowPlan(rows, None, distinct.pop())
    return RowPlan(rows, torch.tensor([index[b] for b in active], dtype=torch.int64, device=device), -1)


def add_delta(
    out: torch.Tensor,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    plan: RowPlan,
    rank: int | None = None,
) -> torch.Tensor:
    """`out` plus each planned row's adapter delta, computed in x's dtype; unplanned rows are `out`'s own values.

    out: [B, ..., out], x: [B, ..., in], a_stack: [n, r_max, in], b_stack: [n, out, r_max] (scaling folded in)
    -> [B, ..., out] in out's dtype (a new tensor: `out` may be a view another caller still reads)

    Args:
        rank: the adapter's own rank when the plan has a single one (its zero padding is then skipped).
    """
    batch = x.shape[0]
    xs = x.reshape(batch, -1, x.shape[-1])  # [B, S, in]
    if plan.rows is not None:
        xs = xs.index_select(0, plan.rows)  # [b, S, in]
    if plan.index is None:
        r = a_stack.shape[1] if rank is None else rank
        a = a_stack[plan.single, :r].to(x.dtype)  # [r, in]
        b = b_stack[plan.single, :, :r].to(x.dtype)  # [out, r]
        delta = F.linear(F.linear(xs, a), b)  # [b, S, out]
    else:
        a = a_stack.index_select(0, plan.index).to(x.dtype)  # [b, r_max, in]
        b = b_stack.index_select(0, plan.index).to(x.dtype)  # [b, out, r_max]
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))  # [b, S, out]
    delta = delta.to(out.dtype)
    if plan.rows is None:
        return out + delta.reshape(out.shape)
    return out.index_add(0, plan.rows, delta.reshape(delta.shape[0], *out.shape[1:]))


def bgmv_delta(
    x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, slots: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """The per-row LoRA delta alone (for tests and benchmarks): row b gets adapter `slots[b]`, -1 none (zeros).

    x: [B, ..., in], a_stack: [n, r_max, in], b_stack: [n, out, r_max], slots: B ints -> [B, ..., out] in x's dtype
    """
    index = slots.tolist() if isinstance(slots, torch.Tensor) else list(slots)
    zeros = x.new_zeros(*x.shape[:-1], b_stack.shape[1])
    plan = plan_rows(index, x.device)
    return zeros if plan is None else add_delta(zeros, x, a_stack, b_stack, plan)
