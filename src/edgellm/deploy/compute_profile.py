"""What a node's compute costs: per decoder layer, embedding and head, for each weight scheme, measured here.

A node runs this when the control plane asks (`edgellm profile`): it builds stages of the model (one decoder layer,
every decoder layer, the embedding alone, the head alone) at each scheme, and times them on this process's threads:

- decode: one token against a KV cache holding `context_tokens` tokens (the cache is cut back after each step, so
  every repeat sees the same context); prefill: `prompt_tokens` tokens into an empty cache;
- a layer's time is the difference between the all-layer and the one-layer stage, over L - 1; what is left of the
  one-layer stage is the fixed cost of a stage call (rotary tables, masks, Python);
- every timed step comes right after reading a buffer larger than the CPU's caches (the "cold" times the
  planner optimizes with), and again as in a generation whose weights all stay in cache (`warm`: the layers back
  to back, each small stage right after a step of all the layers). Decode streams the weights
  from memory, and every node of an emulation shares this machine's caches with the others, whose weights stream
  through them between this node's steps: timed alone and repeated, a stage stays in cache and looks up to 1.6x
  faster per layer than it runs in a deployment (docs/PLANNER.md);
- bytes: `layer_weight_bytes` are exact (`quant.memory.stage_memory`); `layer_bytes`, what the planner budgets, is
  the larger of that and what loading every layer really adds to the process's RSS (after freed memory is handed
  back), per layer: loading a quantized stage keeps staging memory the weights alone do not account for.

Times are the machine's own: the node multiplies them by its emulated `compute_scale` before reporting. Results are
cached on disk per (model, scheme, threads, wait policy, torch and edgellm versions, CPU), so nodes that share a
machine measure once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from edgellm import __version__
from edgellm.model.stage import Stage, StageSpec
from edgellm.quant.memory import kv_bytes_per_token, stage_memory
from edgellm.quant.scheme import parse_quant
from edgellm.split.budget import release_freed_memory, rss_bytes
from edgellm.split.one_process import load_stages
from edgellm.store.paths import profiles_dir
from edgellm.store.weights import load_config

log = logging.getLogger(__name__)

CACHE_VERSION = 10  # 10: fused q/k/v and gate/up projections; 9: the fast engine runs the blocks; 8: warm small stages after a full step; 7: warm times too; 6: caches evicted before every timed step; 5: 21 repeats; 4: layer_bytes is the resident size; 3: the whole depth, caches evicted between steps (2: five layers; 1: three)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(model_dir: Path, scheme: str, threads: int, context_tokens: int, prompt_tokens: int) -> str:
    """What a cached measurement depends on, hashed."""
    config = (model_dir / "config.json").read_text() if (model_dir / "config.json").is_file() else str(model_dir)
    parts = {
        "v": CACHE_VERSION,
        "model": hashlib.sha256(config.encode()).hexdigest()[:16],
        "name": model_dir.name,
        "scheme": scheme,
        "threads": threads,
        "wait": os.environ.get("OMP_WAIT_POLICY", ""),
        "torch": torch.__version__,
        "edgellm": __version__,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "context": context_tokens,
        "prompt": prompt_tokens,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _median_ms(run: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _decode_step(stage: Stage, hidden: int, context: int) -> Callable[[], None]:
    """A callable running one decode step of `stage` against `context` cached tokens (token ids for an
    embedding stage, hidden states otherwise); the cache is cut back after each step, so every call sees the
    same context."""
    cache = stage.new_cache()
    embeds = stage.spec.embed

    def inputs(n: int) -> torch.Tensor:
        return torch.zeros(1, n, dtype=torch.long) if embeds else torch.randn(1, n, hidden).to(stage.dtype)

    with torch.inference_mode():
        if stage.spec.num_layers and context:
            stage(inputs(context), torch.arange(context).view(1, -1), cache)
    one, pos = inputs(1), torch.tensor([[context]])

    def step() -> None:
        with torch.inference_mode():
            stage(one, pos, cache if stage.spec.num_layers else None, last_only=True)
        if stage.spec.num_layers:
            cache.truncate(context)

    return step


EVICT_BYTES = 512 << 20  # more than this machine's last-level cache (480 MiB on the project machine)


def _evictor() -> Callable[[], None]:
    """Reads a buffer larger than the CPU's caches: a step timed after it finds no weight cached, as in a
    deployment, where the other nodes' weights stream through the caches this node shares with them."""
    buffer = torch.ones(EVICT_BYTES // 4)

    def evict() -> None:
        buffer.sum()

    return evict


def _decode_ms(
    stage: Stage, hidden: int, context: int, repeats: int, between: Callable[[], None] | None = None
) -> float:
    """Median ms of one decode step; `between` runs (untimed) before each timed step, e.g. another stage that
    evicts this one's weights from the caches, as the rest of a deployment does."""
    step = _decode_step(stage, hidden, context)
    if between is None:
        return _median_ms(step, repeats)
    times = []
    for i in range(repeats + 2):
        between()
        start = time.perf_counter()
        step()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _prefill_ms(stage: Stage, hidden: int, prompt: int, repeats: int) -> float:
    x = torch.randn(1, prompt, hidden).to(stage.dtype)
    positions = torch.arange(prompt).view(1, -1)
    with torch.inference_mode():
        return _median_ms(lambda: stage(x, positions, stage.new_cache()), max(3, repeats // 3), warmup=1)


def measure_scheme(
    model_dir: Path, scheme: str, context_tokens: int = 64, prompt_tokens: int = 64, repeats: int = 21
) -> dict[str, Any]:
    """Time and weigh one scheme (`none` = floating point) on this process's torch threads; see the module doc."""
    config = load_config(model_dir)
    layers = int(config.num_hidden_layers)
    hidden = int(config.hidden_size)
    quant = parse_quant(scheme)
    specs = [StageSpec(0, 1), StageSpec(0, 0, embed=True), StageSpec(layers, layers, head=True)]
    one, embed, head = load_stages(model_dir, specs, torch.float32, quant)
    release_freed_memory()
    before = rss_bytes()
    full = load_stages(model_dir, [StageSpec(0, layers)], torch.float32, quant)[0]
    release_freed_memory()
    resident = rss_bytes() - before  # what loading the layers really keeps, staging and allocator included
    evict = _evictor()
    t_one = _decode_ms(one, hidden, context_tokens, repeats, between=evict)
    t_full = _decode_ms(full, hidden, context_tokens, repeats, between=evict)
    # Warm, as in a generation on one node whose weights all stay in cache: the layers back to back, and each
    # small stage right after a step of all the layers (as the head comes after them).
    full_step = _decode_step(full, hidden, context_tokens)
    w_one = _decode_ms(one, hidden, context_tokens, repeats, between=full_step)
    w_full = _decode_ms(full, hidden, context_tokens, repeats)
    p_one, p_full = _prefill_ms(one, hidden, prompt_tokens, repeats), _prefill_ms(full, hidden, prompt_tokens, repeats)
    span = max(layers - 1, 1)
    layer_ms = max((t_full - t_one) / span, 0.0)
    warm_layer = max((w_full - w_one) / span, 0.0)
    bytes_one, bytes_full = stage_memory(one).weight_bytes, stage_memory(full).weight_bytes
    return {
        "name": scheme,
        "layer_decode_ms": layer_ms,
        "layer_prefill_ms_per_token": max((p_full - p_one) / span / prompt_tokens, 0.0),
        "layer_bytes": max((bytes_full - bytes_one) // span, resident // layers),  # what the planner budgets
        "layer_weight_bytes": (bytes_full - bytes_one) // span,
        "embed_bytes": stage_memory(embed).weight_bytes,
        "head_bytes": stage_memory(head).weight_bytes,
        "embed_decode_ms": _decode_ms(embed, hidden, 0, repeats, between=evict),
        "head_decode_ms": _decode_ms(head, hidden, 0, repeats, between=evict),
        "stage_overhead_ms": max(t_one - layer_ms, 0.0),
        "warm": {
            "layer_decode_ms": warm_layer,
            "stage_overhead_ms": max(w_one - warm_layer, 0.0),
            "embed_decode_ms": _decode_ms(embed, hidden, 0, repeats, between=full_step),
            "head_decode_ms": _decode_ms(head, hidden, 0, repeats, between=full_step),
        },
    }


def measure_compute(
    model_dir: Path,
    schemes: Sequence[str],
    context_tokens: int = 64,
    prompt_tokens: int = 64,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Every scheme's costs on this machine (unscaled), from the disk cache when measured before.

    Returns {"schemes": [per-scheme dict], "stage_overhead_ms": median over schemes, "threads": n,
    "kv_bytes_per_token_per_layer": bytes, "cached": [scheme names read from the cache]}.
    """
    threads = torch.get_num_threads()
    config = load_config(model_dir)
    root = profiles_dir() / "compute"
    rows, cached = [], []
    for scheme in schemes:
        path = root / f"{cache_key(model_dir, scheme, threads, context_tokens, prompt_tokens)}.json"
        row = None
        if use_cache and path.is_file():
            try:
                row = json.loads(path.read_text())
                cached.append(scheme)
            except (OSError, ValueError):
                row = None
        if row is None:
            log.info("measuring scheme %s on %d thread(s)", scheme, threads)
            row = measure_scheme(model_dir, scheme, context_tokens, prompt_tokens)
            root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(row))
            tmp.replace(path)
        rows.append(row)
    return {
        "schemes": rows,
        "stage_overhead_ms": statistics.median(r["stage_overhead_ms"] for r in rows),
        "threads": threads,
        "kv_bytes_per_token_per_layer": kv_bytes_per_token(config, 1, torch.float32),
        "cached": cached,
        "context_tokens": context_tokens,
        "prompt_tokens": prompt_tokens,
    }


def scaled(measured: dict[str, Any], compute_scale: float) -> dict[str, Any]:
    """The measurement as this node reports it: every time multiplied by its emulated `compute_scale`."""
    time_keys = ("layer_decode_ms", "layer_prefill_ms_per_token", "embed_decode_ms", "head_decode_ms",
                 "stage_overhead_ms")  # fmt: skip

    def scale(row: dict[str, Any]) -> dict[str, Any]:
        return {
            k: (v * compute_scale if k in time_keys else scale(v) if isinstance(v, dict) else v) for k, v in row.items()
        }

    rows = [scale(row) for row in measured["schemes"]]
    return {**measured, "schemes": rows, "stage_overhead_ms": measured["stage_overhead_ms"] * compute_scale,
            "compute_scale": compute_scale}  # fmt: skip
