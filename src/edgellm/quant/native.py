"""A small C kernel for the schemes torch has no packed kernel for: NF4 and group-wise int8, at few rows.

Decode reads every weight once per token, so what matters is touching only the packed bytes: the kernel decodes
each 4-bit code through a 16-entry table held in one AVX-512 register (NF4) or widens int8 in registers, and
accumulates in float32, one OpenMP thread block of output rows per thread. It is compiled with the system C
compiler for `-march=native` the first time it is needed and cached under the edgellm home, keyed by what the
compiler targets on this CPU (so a home shared between machines never hands an AVX-512 build to a CPU without
AVX-512); without a compiler (or on a CPU without AVX-512, where the portable C loop is used) everything still
works, through the slower dequantize path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from edgellm.store.paths import kernels_dir

log = logging.getLogger(__name__)

MAX_ROWS = 16

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t v) { uint32_t b = (uint32_t)v << 16; float f; memcpy(&f, &b, 4); return f; }

/* y[m, n] = sum_k x[m, k] * lut[code(n, k)] * absmax[n, k / gs]; codes: [N, K/2], even k in the low nibble.
   xs: x with each 32-column block reordered as (16 even columns, 16 odd columns). gs % 32 == 0. */
void nf4_mm(const float *xs, const uint8_t *q, const uint16_t *absmax, const float *lut, float *y,
            int M, int N, int K, int gs, int threads) {
    int G = K / gs;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = q + (int64_t)n * (K / 2);
#ifdef __AVX512F__
        __m512 table = _mm512_loadu_ps(lut);
        if (M == 1) {  /* decode: two independent accumulators, kept in registers */
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            for (int g = 0; g < G; g++) {
                __m512 s = _mm512_set1_ps(bf16_to_f32(absmax[(int64_t)n * G + g]));
                __m512 e0 = _mm512_setzero_ps(), e1 = _mm512_setzero_ps();
                for (int k = g * gs; k < (g + 1) * gs; k += 32) {
                    __m128i b = _mm_loadu_si128((const __m128i *)(row + k / 2));
                    __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0f));
                    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0f));
                    e0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(lo), table), _mm512_loadu_ps(xs + k), e0);
                    e1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(hi), table), _mm512_loadu_ps(xs + k + 16), e1);
                }
                a0 = _mm512_fmadd_ps(e0, s, a0);
                a1 = _mm512_fmadd_ps(e1, s, a1);
            }
            y[n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
            continue;
        }
        for (int m0 = 0; m0 < M; m0 += 4) {  /* M is a multiple of 4 here: 4 rows share each decoded weight */
            __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps(), t2 = _mm512_setzero_ps(), t3 = _mm512_setzero_ps();
            const float *x0 = xs + (int64_t)m0 * K;
            for (int g = 0; g < G; g++) {
                __m512 s = _mm512_set1_ps(bf16_to_f32(absmax[(int64_t)n * G + g]));
                for (int k = g * gs; k < (g + 1) * gs; k += 32) {
                    __m128i b = _mm_loadu_si128((const __m128i *)(row + k / 2));
                    __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0f));
                    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0f));
                    __m512 we = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(lo), table), s);
                    __m512 wo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(hi), table), s);
                    t0 = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x0 + k + 16), _mm512_fmadd_ps(we, _mm512_loadu_ps(x0 + k), t0));
                    t1 = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x0 + K + k + 16), _mm512_fmadd_ps(we, _mm512_loadu_ps(x0 + K + k), t1));
                    t2 = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x0 + 2 * K + k + 16), _mm512_fmadd_ps(we, _mm512_loadu_ps(x0 + 2 * K + k), t2));
                    t3 = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x0 + 3 * K + k + 16), _mm512_fmadd_ps(we, _mm512_loadu_ps(x0 + 3 * K + k), t3));
                }
            }
            y[(int64_t)m0 * N + n] = _mm512_reduce_add_ps(t0);
            y[(int64_t)(m0 + 1) * N + n] = _mm512_reduce_add_ps(t1);
            y[(int64_t)(m0 + 2) * N + n] = _mm512_reduce_add_ps(t2);
            y[(int64_t)(m0 + 3) * N + n] = _mm512_reduce_add_ps(t3);
        }
#else
        for (int m = 0; m < M; m++) {
            float acc = 0;
            for (int g = 0; g < G; g++) {
                float sum = 0;
                for (int k = g * gs; k < (g + 1) * gs; k += 32)
                    for (int j = 0; j < 16; j++) {
                        uint8_t b = row[k / 2 + j];
                        sum += lut[b & 15] * xs[(int64_t)m * K + k + j] + lut[b >> 4] * xs[(int64_t)m * K + k + 16 + j];
                    }
                acc += bf16_to_f32(absmax[(int64_t)n * G + g]) * sum;
            }
            y[(int64_t)m * N + n] = acc;
        }
#endif
    }
}

/* y[m, n] = sum_k x[m, k] * q[g][n][k % gs] * scales[g, n], g = k / gs; q group-major [G, N, gs]; gs % 32 == 0. */
void int8g_mm(const float *x, const int8_t *q, const uint16_t *scales, float *y,
              int M, int N, int K, int gs, int threads) {
    int G = K / gs;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
#ifdef __AVX512F__
        if (M == 1) {  /* decode: accumulators in registers */
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            for (int g = 0; g < G; g++) {
                const int8_t *w = q + ((int64_t)g * N + n) * gs;
                const float *xg = x + g * gs;
                __m512 e0 = _mm512_setzero_ps(), e1 = _mm512_setzero_ps();
                for (int j = 0; j < gs; j += 32) {
                    e0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + j)))), _mm512_loadu_ps(xg + j), e0);
                    e1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + j + 16)))), _mm512_loadu_ps(xg + j + 16), e1);
                }
                __m512 s = _mm512_set1_ps(bf16_to_f32(scales[(int64_t)g * N + n]));
                a0 = _mm512_fmadd_ps(e0, s, a0);
                a1 = _mm512_fmadd_ps(e1, s, a1);
            }
            y[n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
            continue;
        }
        for (int m0 = 0; m0 < M; m0 += 4) {  /* M is a multiple of 4 here */
            __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps(), t2 = _mm512_setzero_ps(), t3 = _mm512_setzero_ps();
            const float *x0 = x + (int64_t)m0 * K;
            for (int g = 0; g < G; g++) {
                const int8_t *w = q + ((int64_t)g * N + n) * gs;
                __m512 s = _mm512_set1_ps(bf16_to_f32(scales[(int64_t)g * N + n]));
                for (int j = 0; j < gs; j += 16) {
                    __m512 wv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + j)))), s);
                    int k = g * gs + j;
                    t0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + k), t0);
                    t1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + K + k), t1);
                    t2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + 2 * K + k), t2);
                    t3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + 3 * K + k), t3);
                }
            }
            y[(int64_t)m0 * N + n] = _mm512_reduce_add_ps(t0);
            y[(int64_t)(m0 + 1) * N + n] = _mm512_reduce_add_ps(t1);
            y[(int64_t)(m0 + 2) * N + n] = _mm512_reduce_add_ps(t2);
            y[(int64_t)(m0 + 3) * N + n] = _mm512_reduce_add_ps(t3);
        }
#else
        for (int m = 0; m < M; m++) {
            float acc = 0;
            for (int g = 0; g < G; g++) {
                const int8_t *w = q + ((int64_t)g * N + n) * gs;
                float sum = 0;
                for (int j = 0; j < gs; j++) sum += w[j] * x[(int64_t)m * K + g * gs + j];
                acc += bf16_to_f32(scales[(int64_t)g * N + n]) * sum;
            }
            y[(int64_t)m * N + n] = acc;
        }
#endif
    }
}
"""

_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def target_macros(compiler: str, march: str = "native") -> str:
    """What `compiler -march=march` targets on this machine: its predefined macros, one per line.

    They name exactly the instruction sets the build may use (`__AVX2__`, `__AVX512F__`, `__AVX512BW__`,
    `__AVX512VNNI__`, `__AMX_TILE__`, ...) and the compiler's version (`__VERSION__`).

    Raises:
        OSError, subprocess.SubprocessError: the compiler cannot be run.
    """
    cmd = [compiler, *_FLAGS, f"-march={march}", "-dM", "-E", "-"]
    return subprocess.run(cmd, check=True, capture_output=True, input=b"", timeout=60).stdout.decode()


def cache_key(compiler: str, machine: str, target: str) -> str:
    """The name of a kernel build: the source and flags, the compiler, the machine, and `target` (the output
    of `target_macros`, in any order), so that builds for different CPU features never share a file."""
    features = sorted({line.strip() for line in target.splitlines() if line.strip()})
    parts = [SOURCE, compiler, *_FLAGS, machine, *features]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build(path: Path, march: str = "native") -> Path:
    """Compile the kernel into `path` for `-march=march` (atomically: concurrent builders do not collide).

    Raises:
        OSError, subprocess.SubprocessError: no compiler, or the compilation failed.
    """
    compiler = _compiler()
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc, gcc or $CC)")
    path.parent.mkdir(parents=True, exist_ok=True)
    source = path.with_suffix(f".{os.getpid()}.c")
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    source.write_text(SOURCE)
    try:
        cmd = [compiler, *_FLAGS, f"-march={march}", str(source), "-o", str(tmp)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(tmp, path)
    finally:
        source.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return path


def load(path: Path) -> ctypes.CDLL:
    """The compiled kernel at `path`, with its argument types declared."""
    lib = ctypes.CDLL(str(path))
    lib.nf4_mm.restype = lib.int8g_mm.restype = None
    lib.nf4_mm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5
    lib.int8g_mm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel for this CPU (built on first use, then cached on disk), or None if it cannot be built."""
    compiler = _compiler()
    if compiler is None or not sys.platform.startswith("linux"):
        log.info("no C compiler: NF4 and group-wise int8 use the (slower) dequantize path")
        return None
    try:
        # Per CPU, not per compiler alone: a home shared between machines must not load an AVX-512 (or AMX)
        # build on a CPU without it, which would die of SIGILL at the first call.
        key = cache_key(compiler, os.uname().machine, target_macros(compiler))
        path = kernels_dir() / f"quant-{key}.so"
        if not path.is_file():
            build(path)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = (getattr(exc, "stderr", None) or b"")[:300]
        log.warning("cannot build the quantized-matmul kernel (%s %s); using the dequantize path", exc, detail)
        return None
    return load(path)


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [M, K] -> [M', K], zero rows added so that M' is 1 or a multiple of 4 (the kernel's row blocks)."""
    m = x.shape[0]
    if m == 1 or m % 4 == 0:
        return x
    return torch.cat([x, x.new_zeros(4 - m % 4, x.shape[1])])


def _even_odd(x: torch.Tensor) -> torch.Tensor:
    """x: [M, K] -> [M, K] with each block of 32 columns reordered as its 16 even then its 16 odd columns."""
    m, k = x.shape
    return x.reshape(m, k // 32, 16, 2).transpose(2, 3).reshape(m, k).contiguous()


def nf4_mm(
    lib: ctypes.CDLL, x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor
) -> torch.Tensor:
    """x: [M, K] float32 (M <= 16, K % 32 == 0), qweight: uint8 [N, K/2], absmax: bf16 [N, G] -> [M, N] float32"""
    rows, k = x.shape
    n, groups = absmax.shape
    xs = _even_odd(_pad_rows(x.float()))
    m = xs.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.nf4_mm(xs.data_ptr(), qweight.data_ptr(), absmax.data_ptr(), lut.data_ptr(), y.data_ptr(),
               m, n, k, k // groups, torch.get_num_threads())  # fmt: skip
    return y[:rows]


def int8g_mm(lib: ctypes.CDLL, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x: [M, K] float32 (M <= 16), qweight: int8 [G, N, K/G] (K/G % 16 == 0), scales: bf16 [G, N] -> [M, N]"""
    rows, k = x.shape
    groups, n, size = qweight.shape
    x = _pad_rows(x.float()).contiguous()
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.int8g_mm(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), y.data_ptr(), m, n, k, size,
                 torch.get_num_threads())  # fmt: skip
    return y[:rows]
