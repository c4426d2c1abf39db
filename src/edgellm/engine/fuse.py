"""Fused projections: q/k/v as one matmul and gate/up as one, over the same memory as the separate modules.

At batch 1 a small model's matmuls are latency-bound (each packed-kernel call costs about as much to start as to
run), so three calls over `[576|192|192, 576]` take about 1.7x as long as one over `[960, 576]` (measured:
docs/BENCHMARKS.md). `fuse(modules)` builds one module of the same kind over the rows of all of them and then
points each original module's weight at its slice of the fused one, so the fusion costs no memory and the
originals keep working (the generic engine, saving, LoRA wrapping). Where that cannot be done exactly (a kernel
layout whose rows do not slice, differing schemes or shapes), nothing is fused and the block calls the modules
one by one.

`Fused.__call__` checks on every call that the block still holds the modules it was built from (a LoRA wrapper
around one of them counts: its adapters are added to the fused base's output; so does an `AdapterStore`'s
`MultiLoraLinear`: its per-row deltas are added, so a mixed-adapter batch keeps the one fused matmul), and returns
None otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edgellm.adapters.multi_linear import MultiLoraLinear
from edgellm.lora.linear import LoRALinear
from edgellm.quant.modules import Int4Linear, Int8Linear, NF4Linear
from edgellm.quant.tensor import QuantizedWeight

_QUANT_LINEARS = (Int8Linear, Int4Linear, NF4Linear)
_WRAPPERS = (LoRALinear, MultiLoraLinear)  # wrappers whose `base` the fused module stands in for


class Fused:
    """One module over the rows of `bases` (not an nn.Module attribute: a stage's state dict does not change).

    splits: each base's output width, in order.
    """

    def __init__(self, module: nn.Module, bases: Sequence[nn.Module]) -> None:
        self.module = module
        self.bases = tuple(bases)
        self.splits = [_out_features(b) for b in bases]
        self.frozen = [p for b in bases for p in b.parameters()]  # trainable base weights disable the fusion

    def __call__(self, projections: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Each projection's output of x, through one matmul; None if the projections are not the fused ones.

        x: [..., K] -> one [..., N_i] per projection
        """
        bases = [p.base if isinstance(p, _WRAPPERS) else p for p in projections]
        if any(a is not b for a, b in zip(bases, self.bases, strict=True)):
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.frozen):
            return None
        outs = list(self.module(x).split(self.splits, dim=-1))
        for i, proj in enumerate(projections):
            if isinstance(proj, MultiLoraLinear):
                outs[i] = proj.add_delta(outs[i], x)
            elif isinstance(proj, LoRALinear) and proj.active is not None and proj.active in proj.adapters:
                adapter = proj.adapters[proj.active]
                outs[i] = outs[i] + adapter(x.to(next(adapter.parameters()).dtype)).to(outs[i].dtype)
        return tuple(outs)


def fuse(modules: Sequence[nn.Module]) -> Fused | None:
    """A `Fused` over `modules` (all `nn.Linear`, or all one quantized kind and scheme, with one input width;
    LoRA wrappers count as their base), sharing their memory; None where that cannot be done exactly."""
    bases = [m.base if isinstance(m, _WRAPPERS) else m for m in modules]
    kinds = {type(m) for m in bases}
    if len(kinds) != 1 or len({_in_features(m) for m in bases}) != 1:
        return None
    kind = kinds.pop()
    if kind is nn.Linear:
        return _fuse_linear(bases)  # type: ignore[arg-type]
    if issubclass(kind, _QUANT_LINEARS) and len({m.scheme for m in bases}) == 1:  # type: ignore[union-attr]
        return _fuse_quantized(bases)  # type: ignore[arg-type]
    return None


def _fuse_linear(bases: list[nn.Linear]) -> Fused | None:
    has_bias = {m.bias is not None for m in bases}
    if len(has_bias) != 1 or len({m.weight.dtype for m in bases}) != 1:
        return None
    weight = torch.cat([m.weight.detach() for m in bases])  # [sum N, K]
    bias = torch.cat([m.bias.detach() for m in bases]) if has_bias.pop() else None  # type: ignore[union-attr]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    offset = 0
    for m in bases:
        rows = m.out_features
        m.weight.data = weight[offset : offset + rows]  # a view: the fused weight is the only copy
        if m.bias is not None:
            m.bias.data = bias[offset : offset + rows]  # type: ignore[index]
        offset += rows
    return Fused(fused, bases)


def _fuse_quantized(bases: list[Int8Linear | Int4Linear | NF4Linear]) -> Fused | None:
    parts = [m.quantized() for m in bases]
    first = parts[0]
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])  # type: ignore[misc]
    qw = QuantizedWeight(
        first.scheme, (sum(p.shape[0] for p in parts), first.shape[1]),
        torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), zeros,
    )  # fmt: skip
    biases = [m.bias for m in bases]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat(biases)  # type: ignore[arg-type]
    fused = type(bases[0])(qw, bias)
    views = _slices(fused, bases)
    if views is None:
        return None
    for m, buffers in zip(bases, views):
        for name, view in buffers.items():
            setattr(m, name, view)  # the fused buffer's rows: the only copy
    return Fused(fused, bases)


def _slices(fused: nn.Module, bases: Sequence[nn.Module]) -> list[dict[str, torch.Tensor]] | None:
    """For each base, views of `fused`'s buffers equal to its own, where they are contiguous slices along the
    output rows; None unless the largest buffer (the weight) slices so for every base. A small buffer that does
    not slice (the int4 kernel's [G, N, 2] scales) stays the base's own."""
    names = [n for n, t in fused.named_buffers(recurse=False) if t is not None]
    largest = max(names, key=lambda n: getattr(fused, n).numel())
    out: list[dict[str, torch.Tensor]] = [{} for _ in bases]
    for name in names:
        whole: torch.Tensor = getattr(fused, name)
        own = [getattr(b, name) for b in bases]
        dims = [d for d in range(whole.dim()) if whole.shape[d] == sum(t.shape[d] for t in own)]
        views = _split_along(whole, own, dims[0]) if len(dims) == 1 else None
        if views is None:
            if name == largest:
                return None
            continue
        for i, view in enumerate(views):
            out[i][name] = view
    return out


def _split_along(whole: torch.Tensor, own: Sequence[torch.Tensor], dim: int) -> list[torch.Tensor] | None:
    views, offset = [], 0
    for t in own:
        view = whole.narrow(dim, offset, t.shape[dim])
        if not view.is_contiguous() or view.shape != t.shape or not torch.equal(view, t):
            return None
        views.append(view)
        offset += t.shape[dim]
    return views


def _out_features(m: nn.Module) -> int:
    return int(m.out_features)  # type: ignore[arg-type]


def _in_features(m: nn.Module) -> int:
    return int(m.in_features)  # type: ignore[arg-type]
