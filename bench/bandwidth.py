"""Memory read bandwidth of this machine, the way a decode step reads its weights: for the fp32 roofline.

Method: a float32 buffer of `--size-mb` MB (10^6 bytes; default 2048, over 4x the 480 MiB L3 of the 2-vCPU VM
the benchmarks ran on, so nearly every pass reads DRAM), filled once (its pages resident), then `--passes`
timed passes of `torch.dot(buf, buf)` on `--threads` torch threads: one read of every element, through the same
vectorized BLAS loop family a matrix-vector product uses (`buf.sum()` came out ~10% slower on the VM, which
would make the limit easier to reach). One pass's bandwidth is buffer bytes / its seconds, in GB/s (10^9 B/s);
callers take the median of the passes (the best is reported too).

Run alone: `python bench/bandwidth.py --threads 2`. As a worker of bench/engine.py (`--worker`), it keeps the
buffer and answers every stdin line {"passes": N} with one stdout line {"gbps": [...], "peak_rss_mb": ...}: a
process of its own, so the buffer adds nothing to the benchmark process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULT_SIZE_MB = 2048
DEFAULT_PASSES = 5


class ReadBuffer:
    """A resident float32 buffer of `size_mb` MB whose passes are timed (torch threads: the caller's)."""

    def __init__(self, size_mb: int = DEFAULT_SIZE_MB) -> None:
        if size_mb < 1:
            raise ValueError(f"size_mb must be >= 1, got {size_mb}")
        self.buf = torch.ones(size_mb * 10**6 // 4, dtype=torch.float32)  # ones: every page touched now

    def passes_gbps(self, passes: int) -> list[float]:
        """GB/s of each of `passes` timed reads of the whole buffer."""
        out = []
        for _ in range(passes):
            start = time.perf_counter()
            torch.dot(self.buf, self.buf)
            out.append(self.buf.nbytes / (time.perf_counter() - start) / 1e9)
        return out


def read_bandwidth_gbps(threads: int, size_mb: int = DEFAULT_SIZE_MB, passes: int = DEFAULT_PASSES) -> list[float]:
    """GB/s of each of `passes` reads of a fresh `size_mb` MB buffer on `threads` torch threads (one untimed
    pass first). Restores the caller's thread count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = ReadBuffer(size_mb)
        buffer.passes_gbps(1)
        return buffer.passes_gbps(passes)
    finally:
        torch.set_num_threads(saved)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (10^6 bytes).

    `VmHWM` of /proc/self/status (Linux): the high-water mark of this program's own memory. Not ru_maxrss: Linux
    keeps that across fork and exec, so a worker started by a 3 GB process would report 3 GB. ru_maxrss (kB on
    Linux, bytes on macOS) only where /proc is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e6, 1)  # "VmHWM:   773660 kB"
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round((peak if sys.platform == "darwin" else peak * 1024) / 1e6, 1)


def worker(threads: int, size_mb: int) -> int:
    torch.set_num_threads(threads)
    buffer = ReadBuffer(size_mb)
    print(json.dumps({"ready": True, "threads": threads, "size_mb": size_mb}), flush=True)
    for line in sys.stdin:
        gbps = buffer.passes_gbps(int(json.loads(line)["passes"]))
        print(json.dumps({"gbps": gbps, "peak_rss_mb": peak_rss_mb()}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--size-mb", type=int, default=DEFAULT_SIZE_MB, help="buffer MB (default: %(default)s)")
    parser.add_argument("--passes", type=int, default=DEFAULT_PASSES, help="timed passes (default: %(default)s)")
    parser.add_argument("--worker", action="store_true", help="serve stdin requests (bench/engine.py's worker)")
    args = parser.parse_args(argv)
    if min(args.threads, args.size_mb, args.passes) < 1:
        parser.error("--threads, --size-mb and --passes must be >= 1")
    if args.worker:
        return worker(args.threads, args.size_mb)
    gbps = read_bandwidth_gbps(args.threads, args.size_mb, args.passes)
    print(f"read bandwidth, {args.threads} threads, {args.size_mb} MB buffer, torch.dot: median "
          f"{statistics.median(gbps):.2f} GB/s, best {max(gbps):.2f} GB/s, passes {[round(g, 2) for g in gbps]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
