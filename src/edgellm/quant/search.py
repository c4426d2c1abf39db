"""Error-minimising scales: choose each group's scale (and int4 zero) to minimise the weight's reconstruction
error, instead of covering the group's full range (`edgellm.quant.tensor.quantize_rtn`).

Plain rounding stretches the grid over the group's min..max, so one outlier widens every step; a slightly
narrower grid clips the outlier and rounds the other values more finely. Per group, for each of a few candidate
grids the search rounds the weights, refits the scale (and for int4 the zero) to those codes by weighted least
squares (`SearchConfig.iterations` round-and-refit passes), rounds both to bfloat16 (the stored dtype) and scores
the result from sums over the group; the best grid is then re-rounded to nearest on its stored values and compared
exactly with plain rounding, group by group: the result is never worse than plain rounding on the measured error,
and is a plain `QuantizedWeight` of the same scheme (the same codes, scales and zeros, served by the same kernels).

The error is `sum_k v_k (w_k - w_hat_k)^2` per group: with `v = 1` the weight's squared error; with `v_k = E[x_k^2]`
of the layer's input over calibration text (`importance`), the diagonal of the output error `E[(x . (w - w_hat))^2]`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from edgellm.errors import ConfigError
from edgellm.quant.scheme import Scheme, get_scheme
from edgellm.quant.tensor import (
    _NF4_MIDPOINTS,
    NF4_LEVELS,
    SCALE_DTYPE,
    QuantizedWeight,
    _groups,
    _inverse,
    codes,
    pack_int4,
    quantize_rtn,
)

_NF4_STEPS = 1024  # the candidates' NF4 rounding: levels on a grid of 1/1024 over [-1, 1] (the final one is exact)
_NF4_TABLE = NF4_LEVELS[torch.bucketize(torch.linspace(-1, 1, 2 * _NF4_STEPS + 1), _NF4_MIDPOINTS)]
CHUNK_ELEMENTS = 1 << 18  # weights searched at once: each temporary of a chunk (1 MB) stays in the CPU's caches


@dataclass(frozen=True)
class SearchConfig:
    """How hard to search.

    Attributes:
        grids: candidate grids per group: the step is `range / (levels - 1 + d)` (int4) or the absmax times `1 / (1 +
            d)` (int8, nf4), for `grids` values of `d` evenly spaced over [-`spread`, `spread`] (int4) or [0,
            `spread`] (int8, nf4).
        spread: how far the candidates reach (in grid steps for int4, as a fraction of the absmax otherwise).
        iterations: round-and-refit passes per candidate (>= 1).

    Raises:
        ConfigError: a value out of range.
    """

    grids: int = 11
    spread: float = 1.0
    iterations: int = 1

    def __post_init__(self) -> None:
        if self.grids < 1 or self.iterations < 1 or not 0 <= self.spread < 8:
            raise ConfigError(f"bad search config {self}: grids >= 1, iterations >= 1, 0 <= spread < 8")


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, then restore the caller's setting.

    The search is many element-wise passes over cache-sized chunks: on one thread each costs ~0.1-0.3 ns per
    weight; at two OpenMP threads the hand-off per call costs more than the work, and 100x more when another
    process holds the second core (measured on the project's 2-vCPU machine, 2026-12-04).
    """
    threads = torch.get_num_threads()
    if threads == 1:  # already (e.g. nested): setting it again would cost a thread-pool change
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def search_quantize(
    w: torch.Tensor,
    scheme: str | Scheme,
    importance: torch.Tensor | None = None,
    config: SearchConfig = SearchConfig(),
) -> QuantizedWeight:
    """Quantize `w` [N, K] with the scales (and zeros) that minimise its (importance-weighted) squared error.

    Args:
        w: the float weight [N, K].
        scheme: a scheme name or `Scheme`; its search setting is ignored (this *is* the search).
        importance: optional [K] non-negative weight of each input column (e.g. E[x_k^2] over calibration text);
            None weighs every column alike.
        config: the candidate grids.

    Returns:
        A `QuantizedWeight` of `scheme`'s name, whose per-group error never exceeds plain rounding's.

    Raises:
        ConfigError: as `quantize`, or an importance of the wrong shape or with negative or non-finite values.
    """
    spec = get_scheme(scheme) if isinstance(scheme, str) else scheme
    g = _groups(w, spec)  # [N, G, S]
    n, k = w.shape
    v = None if importance is None else _importance(importance, k).reshape(1, g.shape[1], g.shape[2])  # [1, G, S]
    plain = quantize_rtn(w, spec)
    q_all = codes(plain).reshape(g.shape).clone()  # [N, G, S]
    s_all, z_all = plain.scales.clone(), None if plain.zeros is None else plain.zeros.clone()
    chunk = max(1, CHUNK_ELEMENTS // k)
    with one_thread():
        for lo in range(0, n, chunk):
            rows = slice(lo, min(n, lo + chunk))
            z_rows = None if z_all is None else z_all[rows]
            q, s, z = _search_rows(spec, g[rows], v, q_all[rows], s_all[rows], z_rows, config)
            q_all[rows], s_all[rows] = q, s
            if z_all is not None and z is not None:
                z_all[rows] = z
    flat = q_all.reshape(n, k)
    qweight = flat.to(torch.int8) if spec.kind == "int8" else pack_int4(flat)
    return QuantizedWeight(spec.name, (n, k), qweight, s_all, z_all)


def round_codes(
    spec: Scheme, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round the columns w [N, C] of one group to its stored grid: scale, zero [N, 1] bf16 (zero: int4 only)
    -> (codes [N, C] int8 or uint8, the dequantized values [N, C] float32, as `dequantize` computes them)."""
    g = w.float()[:, None, :]  # [N, 1, C]
    s = scale.float()
    z = None if zero is None else zero.float()
    q = _round(spec, g, s, z)
    return q[:, 0], _dequant(spec, q, scale, zero)[:, 0]


def _importance(importance: torch.Tensor, k: int) -> torch.Tensor:
    v = importance.detach().float().reshape(-1)
    if v.numel() != k:
        raise ConfigError(f"importance has {v.numel()} values for a weight with {k} input columns")
    if not torch.isfinite(v).all() or (v < 0).any():
        raise ConfigError("importance must be finite and non-negative")
    # A column no calibration token ever used still counts a little: its weights are not free to be anything.
    floor = v.mean() * 1e-3 if v.sum() > 0 else torch.tensor(1.0)
    return v.clamp_min(float(floor))


def _search_rows(
    spec: Scheme,
    g: torch.Tensor,
    v: torch.Tensor | None,
    q0: torch.Tensor,
    s0: torch.Tensor,
    z0: torch.Tensor | None,
    config: SearchConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """g: [n, G, S] float, v: [1, G, S] or None (all ones), q0/s0/z0: plain rounding's codes [n, G, S] and bf16
    scales/zeros [n, G] -> the best codes, scales and zeros per group (plain rounding's where nothing beats it).

    Each candidate is scored from sums over the group (no dequantized copy): for codes fixed, the error of any
    (scale, zero) is a quadratic in them. The winner is re-rounded to nearest on its stored grid (which can only
    lower the error) and compared exactly with plain rounding.
    """
    sw, sww = _wsum(g, v).double(), _wsum(g * g, v).double()  # [n, G]
    sv = torch.full_like(sw, g.shape[-1]) if v is None else v.sum(-1).double().expand_as(sw)
    best_est = torch.full_like(sw, float("inf"))
    best_s, best_z = s0.float(), None if z0 is None else z0.float()
    for scale, zero in _initial_grids(spec, g, config):
        for _ in range(config.iterations):
            x = _round_levels(spec, g, scale, zero)  # [n, G, S] float32
            sx, sxx, sxw = _wsum(x, v).double(), _wsum(x * x, v).double(), _wsum(x * g, v).double()
            scale, zero = _fit(spec, sv, sw, sx, sxx, sxw)
        a = scale.to(SCALE_DTYPE).double()
        if zero is None:
            est = sww - 2 * a * sxw + a * a * sxx
        else:
            b = zero.to(SCALE_DTYPE).double() - 8 * a  # the value of code 0
            est = sww - 2 * a * sxw - 2 * b * sw + a * a * sxx + 2 * a * b * sx + b * b * sv
        better = est < best_est
        best_est = torch.where(better, est, best_est)
        best_s = torch.where(better, scale.to(SCALE_DTYPE).float(), best_s)
        if best_z is not None and zero is not None:
            best_z = torch.where(better, zero.to(SCALE_DTYPE).float(), best_z)
    s_b, z_b = best_s.to(SCALE_DTYPE), None if best_z is None else best_z.to(SCALE_DTYPE)
    q = _round(spec, g, s_b.float(), None if z_b is None else z_b.float())
    better = _error(g, v, _dequant(spec, q, s_b, z_b)) < _error(g, v, _dequant(spec, q0, s0, z0))  # [n, G]
    q = torch.where(better[..., None], q, q0)
    z = None if z0 is None or z_b is None else torch.where(better, z_b, z0)
    return q, torch.where(better, s_b, s0), z


def _wsum(t: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """[n, G, S] -> [n, G]: the sum over each group, weighted by v [1, G, S] (None: unweighted)."""
    return t.sum(-1) if v is None else (t * v).sum(-1)


def _round_levels(spec: Scheme, g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """`_round`, as float grid values before scaling (the code for int8 and int4, the NF4 level): the hot loop."""
    x = g * _inverse(scale)[..., None]
    if spec.kind == "nf4":  # a table over a fine uniform grid: 7x faster than bucketize; exact but near midpoints
        return _NF4_TABLE[x.mul_(_NF4_STEPS).add_(_NF4_STEPS).round_().clamp_(0, 2 * _NF4_STEPS).long()]
    if spec.kind == "int8":
        return x.round_().clamp_(-127, 127)
    assert zero is not None
    return x.sub_((zero * _inverse(scale))[..., None]).add_(8).round_().clamp_(0, 15)


def _fit(
    spec: Scheme, sv: torch.Tensor, sw: torch.Tensor, sx: torch.Tensor, sxx: torch.Tensor, sxw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weighted least-squares (scale, zero) [n, G] float32 for fixed codes, from the group sums (float64).

    int8 and nf4 fit `w ~ s * level(q)`; int4 fits `w ~ a * q + b` (then scale = a, zero = b + 8 a). A group whose
    codes are all equal gets its weighted mean as the value of every code (int4) or a zero scale.
    """
    if spec.kind != "int4":
        a = torch.where(sxx > 0, sxw / sxx.clamp_min(1e-300), torch.zeros_like(sxx)).clamp_min(0)
        return a.float(), None
    det = sv * sxx - sx * sx
    flat = det <= 1e-9 * sv * sxx
    safe = torch.where(flat, torch.ones_like(det), det)
    a = torch.where(flat, torch.zeros_like(det), (sv * sxw - sx * sw) / safe).clamp_min(0)
    b = (sw - a * sx) / sv  # the best value of code 0 given the slope (the joint optimum where a >= 0)
    return a.float(), (b + 8 * a).float()


def _initial_grids(
    spec: Scheme, g: torch.Tensor, config: SearchConfig
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (scale [n, G], zero [n, G] | None) float32 candidates, in the stored form (int4: zero = value of 8)."""
    if spec.kind == "int4":
        lo, hi = g.amin(-1), g.amax(-1)
        offsets = torch.linspace(-config.spread, config.spread, config.grids) if config.grids > 1 else torch.zeros(1)
        for d in offsets.tolist():
            scale = (hi - lo) / (15 + d)
            yield scale, lo + 8 * scale
        return
    top = 127.0 if spec.kind == "int8" else 1.0
    absmax = g.abs().amax(-1)
    offsets = torch.linspace(0, config.spread, config.grids) if config.grids > 1 else torch.zeros(1)
    for d in offsets.tolist():
        yield absmax / (top * (1 + d)), None


def _round(spec: Scheme, g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Nearest codes of g [n, G, S] on the grid (scale, zero) [n, G] -> [n, G, S] (int8 or uint8 0..15)."""
    inv = _inverse(scale)[..., None]
    if spec.kind == "int8":
        return torch.round(g * inv).clamp(-127, 127).to(torch.int8)
    if spec.kind == "int4":
        assert zero is not None
        return (torch.round((g - zero[..., None]) * inv) + 8).clamp(0, 15).to(torch.uint8)
    return torch.bucketize(g * inv, _NF4_MIDPOINTS).to(torch.uint8)


def _dequant(spec: Scheme, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """What `tensor.dequantize` computes, per group: q [n, G, S], scale/zero [n, G] -> [n, G, S] float32."""
    s = scale.float()[..., None]
    if spec.kind == "int8":
        return q.float() * s
    if spec.kind == "int4":
        assert zero is not None
        return (q.float() - 8) * s + zero.float()[..., None]
    return NF4_LEVELS[q.long()] * s


def _error(g: torch.Tensor, v: torch.Tensor | None, w_hat: torch.Tensor) -> torch.Tensor:
    """[n, G, S] x2 -> [n, G] weighted squared error."""
    return _wsum((g - w_hat).square(), v)
