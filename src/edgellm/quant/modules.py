"""Drop-in quantized modules: `Int8Linear`, `Int4Linear`, `NF4Linear` for `nn.Linear`, `QuantEmbedding` for
`nn.Embedding`. Each is built from a `QuantizedWeight` and can give it back (`quantized()`), for saving.

They take and return the caller's dtype (float32 in our stages). Few rows (decode) go through a packed kernel:
torch's int8 and int4 kernels (bfloat16 activations), or for group-wise int8 and NF4, which torch has none for,
our own C kernel (`edgellm.quant.native`, float32 activations). Many rows (prefill) go through a bfloat16 GEMM on
the weight dequantized for that call (see `edgellm.quant.kernels`). Without a C compiler, group-wise int8 and NF4
dequantize per call at few rows too, which is slower than fp32 (docs/QUANTIZATION.md has the numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.quant import kernels, native
from edgellm.quant.kernels import COMPUTE_DTYPE, KERNEL_MAX_ROWS
from edgellm.quant.tensor import NF4_LEVELS, QuantizedWeight, dequantize, pack_int4, unpack_int4


class _QuantLinear(nn.Module):
    """What the three linear modules share: shape, optional float bias, and the caller-dtype contract."""

    few_rows_max = KERNEL_MAX_ROWS  # up to this many rows take `_few_rows`

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.scheme = qw.scheme
        self.out_features, self.in_features = qw.shape
        self.transposed = False  # True when it replaced a Conv1D, whose float weight is [K, N] (for saving)
        self.bias: torch.Tensor | None
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N] in x's dtype."""
        flat = x.reshape(-1, self.in_features)  # [M, K]
        # The packed kernels have no backward (or silently detach): a call that must give gradients w.r.t. x
        # (QLoRA training) takes the dequantize + GEMM path at any number of rows.
        differentiable = torch.is_grad_enabled() and x.requires_grad
        few = flat.shape[0] <= self.few_rows_max and not differentiable
        out = self._few_rows(flat) if few else self._many_rows(flat)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, K] -> [M, N], float32 or bf16
        return self._many_rows(x)

    def _many_rows(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, K] -> [M, N] bf16
        return F.linear(x.to(COMPUTE_DTYPE), self._weight_bf16())

    def _weight_bf16(self) -> torch.Tensor:  # -> [N, K] bf16
        return dequantize(self.quantized(), COMPUTE_DTYPE)

    def quantized(self) -> QuantizedWeight:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


class Int8Linear(_QuantLinear):
    """int8 weights with one bfloat16 scale per output channel (`int8`) or per group along K (`int8-gG`).

    Held group-major (`qweight` [G, N, K/G], `scales` [G, N]) so each group is one contiguous kernel operand.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__(qw, bias)
        n, k = qw.shape
        groups = qw.scales.shape[1]
        self.qweight: torch.Tensor
        self.scales: torch.Tensor
        self.register_buffer("qweight", qw.qweight.reshape(n, groups, -1).transpose(0, 1).contiguous())
        self.register_buffer("scales", qw.scales.t().contiguous())

    def _many_rows(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales.shape[0] > 1:
            return super()._many_rows(x)
        # Per-channel: the scale commutes with the GEMM, and int8 -> bf16 is exact.
        out = F.linear(x.to(COMPUTE_DTYPE), self.qweight[0].to(COMPUTE_DTYPE))
        return out.float() * self.scales[0].float()

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:
        groups, _, size = self.qweight.shape
        if groups == 1:
            return kernels.int8_mm(x.to(COMPUTE_DTYPE), self.qweight[0], self.scales[0])
        lib = native.library() if size % 32 == 0 else None
        if lib is not None:
            return native.int8g_mm(lib, x, self.qweight, self.scales)
        # No group-wise kernel in torch: one per-channel kernel call per group, summed in float32.
        xb = x.to(COMPUTE_DTYPE)
        out = torch.zeros(x.shape[0], self.out_features, dtype=torch.float32)
        for g in range(groups):
            out += kernels.int8_mm(xb[:, g * size : (g + 1) * size].contiguous(), self.qweight[g], self.scales[g])
        return out

    def quantized(self) -> QuantizedWeight:
        n, k = self.out_features, self.in_features
        qweight = self.qweight.transpose(0, 1).reshape(n, k).contiguous()
        return QuantizedWeight(self.scheme, (n, k), qweight, self.scales.t().contiguous())


class Int4Linear(_QuantLinear):
    """Asymmetric 4-bit weights, group-wise, held in the int4 kernel's layout (N padded to a multiple of 16)."""

    few_rows_max = 8 * KERNEL_MAX_ROWS  # unpacking the kernel layout costs more than the kernel up to ~128 rows

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__(qw, bias)
        assert qw.zeros is not None
        n, k = qw.shape
        padded = -(-n // kernels.INT4_N_MULTIPLE) * kernels.INT4_N_MULTIPLE
        codes = torch.zeros(padded, k, dtype=torch.uint8)
        codes[:n] = unpack_int4(qw.qweight)
        scales_zeros = torch.zeros(padded, qw.scales.shape[1], 2, dtype=COMPUTE_DTYPE)
        scales_zeros[:n, :, 0] = qw.scales
        scales_zeros[:n, :, 1] = qw.zeros
        self.group_size = k // qw.scales.shape[1]
        self.packed: torch.Tensor
        self.scales_zeros: torch.Tensor
        self.register_buffer("packed", kernels.int4_to_kernel(codes))  # uint8 [N_pad, K/2], kernel layout
        self.register_buffer("scales_zeros", scales_zeros.transpose(0, 1).contiguous())  # bf16 [G, N_pad, 2]

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:
        out = kernels.int4_mm(x.to(COMPUTE_DTYPE), self.packed, self.group_size, self.scales_zeros)
        return out[:, : self.out_features]

    def _weight_bf16(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        codes = kernels.int4_from_kernel(self.packed, k)[:n].reshape(n, -1, self.group_size)  # [N, G, S]
        sz = self.scales_zeros[:, :n].transpose(0, 1)  # [N, G, 2]
        w = (codes.float() - 8) * sz[..., :1].float() + sz[..., 1:].float()  # float32, rounded once below
        return w.reshape(n, k).to(COMPUTE_DTYPE)

    def quantized(self) -> QuantizedWeight:
        n, k = self.out_features, self.in_features
        sz = self.scales_zeros[:, :n].transpose(0, 1)  # [N, G, 2]
        qweight = pack_int4(kernels.int4_from_kernel(self.packed, k)[:n])
        return QuantizedWeight(self.scheme, (n, k), qweight, sz[..., 0].contiguous(), sz[..., 1].contiguous())


class NF4Linear(_QuantLinear):
    """4-bit normal-float weights with a bfloat16 absmax per block (QLoRA's NF4, without double quantization)."""

    few_rows_max = 4 * KERNEL_MAX_ROWS  # the C kernel beats dequantizing the NF4 table up to ~64 rows

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__(qw, bias)
        self.qweight: torch.Tensor
        self.scales: torch.Tensor
        self.register_buffer("qweight", qw.qweight.contiguous())  # uint8 [N, K/2]
        self.register_buffer("scales", qw.scales.contiguous())  # bf16 [N, G]

    def _few_rows(self, x: torch.Tensor) -> torch.Tensor:
        size = self.in_features // self.scales.shape[1]
        lib = native.library() if size % 32 == 0 else None
        if lib is None:
            return super()._few_rows(x)
        return native.nf4_mm(lib, x, self.qweight, self.scales, NF4_LEVELS)

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.scheme, (self.out_features, self.in_features), self.qweight, self.scales)


class QuantEmbedding(nn.Module):
    """A token embedding whose table `[V, D]` is quantized along D; a lookup dequantizes only the rows it reads."""

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.scheme = qw.scheme
        self.num_embeddings, self.embedding_dim = qw.shape
        self.dtype = dtype
        self.qweight: torch.Tensor
        self.scales: torch.Tensor
        self.zeros: torch.Tensor | None
        self.register_buffer("qweight", qw.qweight.contiguous())
        self.register_buffer("scales", qw.scales.contiguous())
        self.register_buffer("zeros", None if qw.zeros is None else qw.zeros.contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [...] int64 -> [..., D] in the embedding's original dtype."""
        flat = ids.reshape(-1)
        rows = QuantizedWeight(
            self.scheme,
            (flat.numel(), self.embedding_dim),
            self.qweight[flat],
            self.scales[flat],
            None if self.zeros is None else self.zeros[flat],
        )
        return dequantize(rows, self.dtype).reshape(*ids.shape, self.embedding_dim)

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.scheme, (self.num_embeddings, self.embedding_dim), self.qweight, self.scales, self.zeros
        )

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme}"


LINEAR_MODULES: dict[str, type[_QuantLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}


def quant_linear(qw: QuantizedWeight, bias: torch.Tensor | None = None) -> _QuantLinear:
    """The drop-in linear module for a quantized weight."""
    return LINEAR_MODULES[qw.spec.kind](qw, bias)


def is_quantized(module: nn.Module) -> bool:
    """True for the modules of this file."""
    return isinstance(module, (_QuantLinear, QuantEmbedding))
