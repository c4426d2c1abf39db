"""torch's packed-weight CPU matmuls, and the layout they want.

Measured on this project's CPU (docs/QUANTIZATION.md): at batch 1 `aten._weight_int8pack_mm` and
`aten._weight_int4pack_mm_for_cpu` beat an fp32 `F.linear` by about 2x **with bfloat16 activations**; given
float32 or float16 activations they take a scalar path 5-20x slower than fp32. So decode runs them in bfloat16.
For many rows (prefill), they are 2-3x slower than fp32, and a bfloat16 GEMM on the dequantized weight (oneDNN,
AMX where the CPU has it) is fastest: `KERNEL_MAX_ROWS` picks between the two.

The int4 kernel reads its weight in a CPU-specific blocked layout (`_convert_weight_to_int4pack_for_cpu`). Files
keep the portable layout of `edgellm.quant.tensor`; `int4_from_kernel` inverts the conversion for the layouts of
torch's AVX512, AVX2 and scalar builds, and `kernel_layout()` checks which one this process has (or None).
"""

from __future__ import annotations

import functools

import torch

COMPUTE_DTYPE = torch.bfloat16
KERNEL_MAX_ROWS = 16  # at most this many rows go through the packed kernels; more take the dequantize + GEMM path
INT4_N_MULTIPLE = 16  # the int4 kernel needs N divisible by 16: weights are padded with zero rows


def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x: [M, K] bf16, qweight: int8 [N, K], scales: bf16 [N] -> [M, N] bf16 = x @ (qweight * scales).T"""
    return torch.ops.aten._weight_int8pack_mm(x, qweight, scales)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x: [M, K] bf16, packed: kernel layout of [N, K] codes, scales_zeros: bf16 [K/G, N, 2] -> [M, N] bf16"""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_zeros)


def int4_to_kernel(codes: torch.Tensor) -> torch.Tensor:
    """codes: [N, K] in 0..15, N a multiple of 16 -> uint8 [N, K/2] in the kernel's layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def _unblock(packed: torch.Tensor, block_n: int, k: int) -> torch.Tensor:
    """Invert the kernel's packing for blocks of `block_n` rows: full blocks hold rows d and d + block_n/2 in the
    low and high nibble of byte d of each k; a partial last block (or every block when block_n == 0) holds rows
    2j and 2j + 1 in byte j.  packed: uint8 [N, K/2] -> uint8 [N, K]
    """
    n = packed.shape[0]
    flat = packed.reshape(-1)
    full = (n // block_n) * block_n if block_n else 0
    parts = []
    if full:
        blocks = flat[: full * k // 2].reshape(full // block_n, k, block_n // 2)
        rows = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # [NB, K, block_n]
        parts.append(rows.transpose(1, 2).reshape(full, k))
    if n > full:
        rest = flat[full * k // 2 :].reshape(k, (n - full) // 2)
        rows = torch.stack([rest & 15, rest >> 4], dim=-1).reshape(k, n - full)  # [K, rows]
        parts.append(rows.t())
    return torch.cat(parts).contiguous()


_BLOCK_CANDIDATES = (64, 32, 0)  # torch's AVX512, AVX2 and scalar layouts


@functools.cache
def kernel_layout() -> int | None:
    """The block size of this process's int4 kernel layout (64, 32, or 0 for plain pairs); None if unknown."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (64 + 48, 64), generator=generator, dtype=torch.int32)  # a full + a partial block
    try:
        packed = int4_to_kernel(probe)
    except (RuntimeError, NotImplementedError):
        return None
    for block_n in _BLOCK_CANDIDATES:
        if torch.equal(_unblock(packed, block_n, 64).to(torch.int32), probe):
            return block_n
    return None


def int4_from_kernel(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, K/2] in the kernel layout -> uint8 [N, K] codes.

    Raises:
        RuntimeError: this torch build packs in a layout we do not know.
    """
    block_n = kernel_layout()
    if block_n is None:
        raise RuntimeError("unknown int4 kernel layout in this torch build; cannot unpack int4 weights")
    return _unblock(packed, block_n, k)
