"""GPTQ (Frantar et al. 2022): quantize a linear layer column by column, pushing each column's rounding error onto
the columns not yet quantized, weighted by the layer's input statistics, so the *output* error stays small.

With `H = E[x x^T]` over calibration text (the layer's inputs x [K]), the output error of a weight `W_hat` is
`tr((W - W_hat) H (W - W_hat)^T)`. GPTQ rounds column k, then moves the columns not yet rounded along the
direction that cancels its error best (the row k of the Cholesky factor of `H^-1`), in blocks of `block` columns.
By default ("act-order" with static groups) every group's bfloat16 scale (and int4 zero) is first chosen by the
error-minimising search of `edgellm.quant.search` weighted by `diag(H)`, and the columns are walked from the
largest `diag(H)` down; `GptqConfig(act_order=False)` walks in order and searches each group's grid when the walk
reaches it.

The result is a plain `QuantizedWeight` (same codes, scales and zeros, served by the same kernels). As a guard,
`gptq_quantize` also computes plain rounding and the weighted search, and returns whichever of the three has the
smallest output error on `H`: never worse than plain rounding on the calibration statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgellm.errors import ConfigError
from edgellm.quant.scheme import Scheme, get_scheme
from edgellm.quant.search import SearchConfig, one_thread, round_codes, search_quantize
from edgellm.quant.tensor import QuantizedWeight, dequantize, pack_int4, quantize_rtn


@dataclass(frozen=True)
class GptqConfig:
    """GPTQ's settings.

    Attributes:
        damp: added to H's diagonal, as a fraction of its mean: keeps the factor well conditioned and the result
            from fitting the calibration text too closely (0.1: chosen by layer output error on a validation text
            of another kind: docs/QUANTIZATION.md; GPTQ's paper uses 0.01).
        block: columns updated together before the error is pushed to the rest (in order: a multiple of the group
            size, at least one group).
        act_order: search every group's grid first, then walk the columns by decreasing `diag(H)` (else in order,
            each group's grid searched on its updated weights).
        search: the candidate grids of the diag(H)-weighted scale search.

    Raises:
        ConfigError: a value out of range.
    """

    damp: float = 0.1
    block: int = 32
    act_order: bool = True
    search: SearchConfig = SearchConfig()

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1 or self.block < 1:
            raise ConfigError(f"bad GPTQ config {self}: 0 < damp < 1, block >= 1")


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((w - w_hat) H (w - w_hat)^T): the mean squared output error over the inputs H was measured on.

    w, w_hat: [N, K], hessian: [K, K] -> a number
    """
    d = w.detach().float() - w_hat.detach().float()
    return float(((d @ hessian.float()) * d).sum(dtype=torch.float64))


def gptq_quantize(
    w: torch.Tensor, scheme: str | Scheme, hessian: torch.Tensor, config: GptqConfig = GptqConfig()
) -> QuantizedWeight:
    """Quantize `w` [N, K] to `scheme`'s grid minimising the output error over inputs with second moment `hessian`.

    Args:
        w: the float weight [N, K].
        scheme: a scheme name or `Scheme` (its search setting is ignored).
        hessian: [K, K] `E[x x^T]` of the layer's inputs (symmetric, positive semi-definite).
        config: damping, block size and the group scale search.

    Returns:
        The best of GPTQ, the diag(H)-weighted scale search and plain rounding, by `output_error` on `hessian`.

    Raises:
        ConfigError: as `quantize`, or a Hessian of the wrong shape or not finite.
    """
    spec = get_scheme(scheme) if isinstance(scheme, str) else scheme
    n, k = w.shape if w.dim() == 2 else (0, 0)
    if hessian.shape != (k, k) or not torch.isfinite(hessian).all():
        raise ConfigError(f"the Hessian must be a finite [{k}, {k}] matrix for a weight [N, {k}]")
    h = hessian.detach().float()
    with one_thread():  # a walk of small steps: see `one_thread`
        static = search_quantize(w, spec, h.diagonal().clamp_min(0), config.search)
        candidates = [quantize_rtn(w, spec), static, _gptq(w, spec, h, static, config)]
        errors = [output_error(w, dequantize(c), h) for c in candidates]
    return candidates[min(range(len(candidates)), key=errors.__getitem__)]


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """h: [K, K] -> the upper Cholesky factor of (h + damping)^-1 [K, K] (float64 for stability)."""
    h = h.double().clone()
    dead = h.diagonal() <= 0  # inputs never seen: nothing to trade against
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    for extra in (0.0, 0.1, 1.0):  # more damping if the factorisation fails
        try:
            lower = torch.linalg.cholesky(h + extra * float(h.diagonal().mean()) * torch.eye(len(h), dtype=h.dtype))
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError
            continue
    raise ConfigError("the Hessian is not positive definite even with damping; is the calibration text empty?")


def _gptq(
    w: torch.Tensor, spec: Scheme, h: torch.Tensor, static: QuantizedWeight, config: GptqConfig
) -> QuantizedWeight:
    """GPTQ proper: w [N, K], h [K, K] -> QuantizedWeight of `spec`.

    With `act_order` (default), every group keeps the grid of `static` (the diag(H)-weighted search on the
    original weights) and the columns are walked from the largest input energy `diag(H)` down, so the columns
    that matter most are rounded first; in order, each group's grid is searched when the walk reaches it, on its
    weights as updated so far.
    """
    n, k = w.shape
    size = spec.group_size or k  # per-channel int8: one group over the whole row
    spec.groups(k)  # raises if the group size does not divide K
    diag = h.diagonal().clamp_min(0)
    weight = w.detach().float().clone()  # [N, K], updated as columns are quantized
    order = torch.arange(k)
    if config.act_order:
        scales, zeros = static.scales.clone(), None if static.zeros is None else static.zeros.clone()
        order = torch.argsort(diag, descending=True, stable=True)
        weight, h = weight[:, order], h[order][:, order]
        block = config.block
    else:
        scales = torch.zeros(n, k // size, dtype=torch.bfloat16)
        zeros = torch.zeros(n, k // size, dtype=torch.bfloat16) if spec.kind == "int4" else None
        block = max(size, config.block // size * size)  # whole groups per block
    factor = _inverse_factor(h, config.damp).float()  # [K, K] upper, in walk order
    q_all = torch.zeros(n, k, dtype=torch.int8 if spec.kind == "int8" else torch.uint8)
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        w1 = weight[:, b0:b1].clone()  # [N, B]
        err1 = torch.zeros_like(w1)
        f1 = factor[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = int(order[b0 + i])  # the column of w
            g = col // size
            if not config.act_order and col % size == 0:  # the group's grid, from its weights updated so far
                found = search_quantize(w1[:, i : i + size], spec, diag[col : col + size], config.search)
                scales[:, g] = found.scales[:, 0]
                if zeros is not None and found.zeros is not None:
                    zeros[:, g] = found.zeros[:, 0]
            z = None if zeros is None else zeros[:, g : g + 1]
            q, w_hat = round_codes(spec, w1[:, i : i + 1], scales[:, g : g + 1], z)  # [N, 1] each
            q_all[:, col] = q[:, 0]
            err = (w1[:, i] - w_hat[:, 0]) / f1[i, i]  # [N]
            w1[:, i:] -= err[:, None] * f1[i, i:][None, :]
            err1[:, i] = err
        weight[:, b1:] -= err1 @ factor[b0:b1, b1:]
    qweight = q_all if spec.kind == "int8" else pack_int4(q_all)
    return QuantizedWeight(spec.name, (n, k), qweight, scales, zeros)
