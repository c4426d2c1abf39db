"""llama.cpp's side of bench/decode.py, in a process of its own.

A separate process keeps llama.cpp's OpenMP runtime (the system libgomp) apart from torch's (its bundled
libgomp), and lets the benchmark survive a llama-cpp-python build that dies on this CPU: a build compiled with
`GGML_NATIVE` on a machine with AMX runs AMX tile instructions, which raise SIGILL on a (virtual) machine that
advertises AMX in CPUID but does not enable its tile state (no "AMX Tile data" XSAVE feature in `dmesg`).
`--no-extra-bufts` avoids those kernels by loading the model without llama.cpp's extra buffer types (AMX and
weight repacking), at some cost in speed.

Usage: llamacpp_worker.py GGUF THREADS N_CTX [--no-extra-bufts]. Prints {"ready": ...} once loaded, then for
every stdin line {"prompt_ids": [...], "tokens": N} one stdout line {"tokens", "ttft_ms", "decode_ms",
"peak_rss_mb"} (the worker's peak resident set size so far, VmHWM, in 10^6 bytes: llama.cpp's memory); it
generates greedily with `Llama.eval` and `Llama.sample(temp=0)` and does not stop at end-of-sequence.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def load(gguf: str, threads: int, n_ctx: int, extra_bufts: bool) -> Any:
    import llama_cpp
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    if not extra_bufts:  # Llama() takes no such option: change the defaults it starts from
        default_params = lib.llama_model_default_params

        def no_extra_bufts() -> Any:
            params = default_params()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = no_extra_bufts
    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False)
    return llm, llama_cpp.__version__


def peak_rss_mb() -> float | None:
    """This worker's peak RSS so far in MB (10^6 bytes): VmHWM, not ru_maxrss, which Linux carries over from the
    benchmark process across fork and exec (bench/bandwidth.py's `peak_rss_mb`, without its torch import)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e6, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def generate(llm: Any, prompt_ids: list[int], new_tokens: int) -> dict[str, Any]:
    llm.reset()  # forget the previous run's tokens; eval() then drops their KV entries
    start = time.perf_counter()
    llm.eval(prompt_ids)
    token = llm.sample(temp=0.0, repeat_penalty=1.0)
    first = time.perf_counter()
    tokens = [int(token)]
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = llm.sample(temp=0.0, repeat_penalty=1.0)
        tokens.append(int(token))
    end = time.perf_counter()
    return {
        "tokens": tokens,
        "ttft_ms": (first - start) * 1e3,
        "decode_ms": (end - first) * 1e3,
        "peak_rss_mb": peak_rss_mb(),
    }


def main(argv: list[str]) -> int:
    gguf, threads, n_ctx = argv[0], int(argv[1]), int(argv[2])
    extra_bufts = "--no-extra-bufts" not in argv[3:]
    llm, version = load(gguf, threads, n_ctx, extra_bufts)
    print(json.dumps({"ready": True, "llama_cpp": version, "extra_bufts": extra_bufts}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(generate(llm, request["prompt_ids"], request["tokens"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
