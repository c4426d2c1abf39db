"""Pure tensor functions: quantize a weight `[N, K]` into a `QuantizedWeight`, dequantize it, pack 4-bit codes.

Every scale (and int4 zero) is stored in bfloat16, the dtype the CPU kernels read, and codes are computed against
the *stored* (rounded) values, so `dequantize` reproduces exactly what the kernels multiply by. Per group of
`group_size` weights along K (or per output row for plain int8):

=======  ====================================  ============================================  ====================
kind     grid                                  dequantized weight                            |error| <= (bound)
=======  ====================================  ============================================  ====================
int8     q in -127..127, s = absmax / 127 (*)  q * s                                         s / 2
int4     q in 0..15, s = (max - min) / 15 (*)  (q - 8) * s + z, z = bf16(min + 8 s)          s / 2 + |z - min - 8 s|
nf4      16 normal-float levels in [-1, 1]     NF4[q] * a, a = absmax (*)                    a * (largest gap) / 2
=======  ====================================  ============================================  ====================

(*) rounded *up* to bfloat16, so the grid always covers the group's range and no value is clipped. The int4 zero
sits at code 8 because that is the form torch's int4 kernel takes (`(q - 8) * scale + zero`); the NF4 levels are
QLoRA's (Dettmers et al. 2023, appendix E). 4-bit codes are packed two per byte, the even column in the low nibble.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgellm.errors import ConfigError
from edgellm.quant.scheme import Scheme, get_scheme

SCALE_DTYPE = torch.bfloat16
NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171447754, 0.44070982933044434, 0.5626170039176941, 0.7229568362236328, 1.0,
    ]
)  # fmt: skip
NF4_MAX_HALF_GAP = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()) / 2
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized weight `[N, K]` in the portable layout (what is saved; kernels may re-layout it at load).

    Attributes:
        scheme: the `SCHEMES` key it was quantized with.
        shape: (N, K) of the float weight.
        qweight: int8 `[N, K]` (int8) or uint8 `[N, K/2]` of packed 4-bit codes (int4, nf4).
        scales: bfloat16 `[N, K/group]` (`[N, 1]` for per-channel int8); the NF4 absmax.
        zeros: bfloat16 `[N, K/group]` for int4 (the value of code 8), else None.
    """

    scheme: str
    shape: tuple[int, int]
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None

    @property
    def spec(self) -> Scheme:
        return get_scheme(self.scheme)

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and zeros."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name ("qweight", "scales" and, for int4, "zeros")."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out


def _ceil_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= x, for x >= 0 finite float32."""
    y = x.to(SCALE_DTYPE)
    below = y.float() < x
    return torch.where(below, (y.view(torch.int16) + 1).view(SCALE_DTYPE), y)


def _groups(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """w: [N, K] -> [N, G, K/G] float32 (G = 1 for per-channel)."""
    if w.dim() != 2:
        raise ConfigError(f"can only quantize a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ConfigError("cannot quantize a weight holding inf or nan")
    n, k = w.shape
    if scheme.kind != "int8" and k % 2:
        raise ConfigError(f"scheme {scheme.name}: 4-bit packing needs an even input dimension, got {k}")
    return w.detach().float().contiguous().reshape(n, scheme.groups(k), -1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes: [N, K] integers in 0..15 -> uint8 [N, K/2], column 2j in the low nibble of byte j."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] codes in 0..15 (inverse of `pack_int4`)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def quantize(w: torch.Tensor, scheme: str | Scheme) -> QuantizedWeight:
    """Quantize a float weight `[N, K]` with `scheme` (a name or a `Scheme`), as the scheme says: plain rounding
    (`quantize_rtn`), or for a scheme with a search (`int4-g64-mse`, ...) the error-minimising scales of
    `edgellm.quant.search` on the weight's own squared error. That is all of `-mse`, and the part of `-gptq` that
    needs no calibration (what its embeddings get); its linear layers need their inputs' statistics and go through
    `edgellm.quant.walker.quantize_linear_weight` (`quantize_module(..., hessians=...)`, `load_or_quantize`).

    Raises:
        ConfigError: unknown scheme, a group size that does not divide K, a non-2-D or non-finite weight.
    """
    spec = get_scheme(scheme) if isinstance(scheme, str) else scheme
    if spec.search is not None:
        from edgellm.quant.search import search_quantize  # search builds on this module's functions

        return search_quantize(w, spec)
    return quantize_rtn(w, spec)


def quantize_rtn(w: torch.Tensor, scheme: str | Scheme) -> QuantizedWeight:
    """Plain rounding to nearest: each group's grid spans its full range (the table of this module's docstring),
    whatever search `scheme` names. What fake quantization reproduces cheaply at every step.

    Raises:
        ConfigError: as `quantize`.
    """
    spec = get_scheme(scheme) if isinstance(scheme, str) else scheme
    g = _groups(w, spec)  # [N, G, S]
    n, k = w.shape
    if spec.kind == "int8":
        scales = _ceil_bf16(g.abs().amax(-1) / 127)  # [N, G]
        q = torch.round(g * _inverse(scales)[..., None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(spec.name, (n, k), q.reshape(n, k), scales)
    if spec.kind == "int4":
        lo, hi = g.amin(-1), g.amax(-1)  # [N, G]
        scales = _ceil_bf16((hi - lo) / 15)
        zeros = (lo + 8 * scales.float()).to(SCALE_DTYPE)
        q = torch.round((g - zeros.float()[..., None]) * _inverse(scales)[..., None]) + 8
        return QuantizedWeight(spec.name, (n, k), pack_int4(q.clamp(0, 15).reshape(n, k)), scales, zeros)
    absmax = _ceil_bf16(g.abs().amax(-1))  # [N, G]
    codes = torch.bucketize(g * _inverse(absmax)[..., None], _NF4_MIDPOINTS)
    return QuantizedWeight(spec.name, (n, k), pack_int4(codes.reshape(n, k)), absmax)


def _inverse(scales: torch.Tensor) -> torch.Tensor:
    """1 / scale in float32, 0 where the scale is 0 (an all-zero group quantizes to zeros)."""
    s = scales.float()
    return torch.where(s > 0, 1 / s.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(s))


def codes(qw: QuantizedWeight) -> torch.Tensor:
    """The integer codes `[N, K]`: int8 values for int8, 0..15 (uint8) for int4 and nf4."""
    return qw.qweight if qw.spec.kind == "int8" else unpack_int4(qw.qweight)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight `[N, K]` the quantized form stands for, computed in float32 and returned as `dtype`."""
    n, k = qw.shape
    groups = qw.scales.shape[1]
    q = codes(qw).reshape(n, groups, -1)  # [N, G, S]
    s = qw.scales.float()[..., None]
    if qw.spec.kind == "int8":
        w = q.float() * s
    elif qw.spec.kind == "int4":
        assert qw.zeros is not None
        w = (q.float() - 8) * s + qw.zeros.float()[..., None]
    else:
        w = NF4_LEVELS[q.long()] * s
    return w.reshape(n, k).to(dtype)


def error_bound(qw: QuantizedWeight, w: torch.Tensor) -> torch.Tensor:
    """Per-group bound on |w - dequantize(qw)|, from the table in this module's docstring.

    w: the float weight [N, K] that was quantized -> [N, G] float32
    """
    s = qw.scales.float()
    if qw.spec.kind == "int8":
        return s / 2
    if qw.spec.kind == "nf4":
        return s * NF4_MAX_HALF_GAP
    assert qw.zeros is not None
    lo = w.detach().float().reshape(*s.shape, -1).amin(-1)
    return s / 2 + (qw.zeros.float() - (lo + 8 * s)).abs()
