"""The engines bench/engine.py and bench/batch.py measure, and the workloads they share.

- `load_scheme` / `SchemeEngine`: the whole model as one stage at a weight scheme (`none`, `bf16`, or a
  quantization of docs/QUANTIZATION.md), with the RSS its load added to this process.
- `BandwidthLimit`: the fp32 roofline as a row: the machine's read bandwidth (bench/bandwidth.py, in a worker
  process) over the bytes of fp32 weights one decode token reads, measured in turn with the other rows.
- `Borrowed`: a loaded engine measured again in a later phase (a new prompt) without loading it twice.
- `long_prompt`: exactly N token ids of real text, for the long-prompt TTFT rows.

Imported by the scripts next to it; not part of the package.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from decode import Engine, EngineCrashed, Run, StagedEngine

from edgellm.model.stage import Stage, stage_specs
from edgellm.quant.scheme import parse_quant
from edgellm.split.budget import release_freed_memory, rss_bytes, to_mb
from edgellm.split.one_process import load_stages
from edgellm.store.weights import load_config

HERE = Path(__file__).resolve().parent
BF16 = "bf16"  # a scheme name of these benchmarks: every weight in bfloat16, nothing quantized
TEXT = HERE / "texts" / "britannica.txt"
FETCH_TEXTS = "python bench/quant.py --fetch-texts bench/texts"


def scheme_setup(scheme: str) -> tuple[torch.dtype, Any]:
    """(stage dtype, QuantConfig | None) of a scheme: `bf16` is bfloat16 weights; anything else is a
    `--quant` string (`none`: fp32) applied to fp32 stages, whose quantized layers keep their own formats.

    Raises:
        ConfigError: an unknown quantization scheme (from `parse_quant`).
    """
    if scheme == BF16:
        return torch.bfloat16, None
    return torch.float32, parse_quant(scheme)


def load_scheme(model_dir: Path, scheme: str, engine: str) -> tuple[Stage, dict[str, Any]]:
    """The whole model as one stage (embedding, every layer, head) at `scheme`, run by `engine`; and its info,
    with `rss_added_mb`: what loading it added to this process's RSS (freed memory handed back first)."""
    dtype, quant = scheme_setup(scheme)
    specs = stage_specs(int(load_config(model_dir).num_hidden_layers), (), "server")
    release_freed_memory()
    before = rss_bytes()
    (stage,) = load_stages(model_dir, specs, dtype, quant, engine)
    release_freed_memory()
    info = {"engine": stage.engine, "scheme": scheme, "dtype": str(dtype).removeprefix("torch."),
            "rss_added_mb": to_mb(rss_bytes() - before)}  # fmt: skip
    return stage, info


class SchemeEngine(StagedEngine):
    """The whole model as one stage at a weight scheme, run by one engine and the library's Generator."""

    def __init__(self, model_dir: Path, scheme: str, engine: str) -> None:
        stage, self.info = load_scheme(model_dir, scheme, engine)
        self.stages = [stage]


def fp32_weight_bytes(model_dir: Path) -> int:
    """Bytes of the model's parameters in float32, each tensor of the safetensors file(s) once.

    This is what an fp32 decode step reads: every block weight and norm once, and the embedding matrix once, as
    the LM head (a tied embedding is one tensor in the file and one in memory; looking up the new token's row
    reads one row of it, left out). The KV cache a step reads (tens of kB at these lengths) is left out too.
    """
    from safetensors import safe_open

    config = load_config(model_dir)
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 - safe_open is not a dict
                if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
                    continue
                total += 4 * math.prod(tensors.get_slice(name).get_shape())
    return total


@dataclass
class LimitRun(Run):
    """A "run" of the fp32 roofline: one bandwidth measurement, as tokens per second."""

    gbps: list[float] = field(default_factory=list)
    bytes_per_token: int = 1

    @property
    def bandwidth_gbps(self) -> float:
        return sorted(self.gbps)[len(self.gbps) // 2] if self.gbps else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        return self.bandwidth_gbps * 1e9 / self.bytes_per_token

    def as_json(self) -> dict[str, Any]:
        return {"bandwidth_gbps": round(self.bandwidth_gbps, 3), "passes_gbps": [round(g, 3) for g in self.gbps],
                "decode_tok_per_s": round(self.decode_tok_per_s, 3), "repeat": self.repeat, "stamp": self.stamp}  # fmt: skip


class BandwidthLimit:
    """The fp32 decode limit: read bandwidth (a bench/bandwidth.py worker, `passes` passes per run, median) over
    `bytes_per_token`. Its `run` ignores the prompt; its TTFT is not a measurement (0)."""

    def __init__(self, bytes_per_token: int, threads: int, size_mb: int, passes: int) -> None:
        self.bytes_per_token, self.passes = bytes_per_token, passes
        cmd = [sys.executable, str(HERE / "bandwidth.py"), "--worker", "--threads", str(threads), "--size-mb",
               str(size_mb)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = {**self._read(), "method": "torch.dot(buf, buf), median of the passes", "passes": passes,
                     "bytes_per_token": bytes_per_token}  # fmt: skip

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise EngineCrashed(f"bandwidth worker exited with code {self.proc.wait()}")
        return json.loads(line)  # type: ignore[no-any-return]

    def run(self, prompt_ids: list[int], new_tokens: int) -> Run:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"passes": self.passes}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        self.info["peak_rss_mb"] = reply["peak_rss_mb"]
        return LimitRun([], 0.0, 0.0, gbps=reply["gbps"], bytes_per_token=self.bytes_per_token)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


class Borrowed:
    """An engine loaded by an earlier phase, measured again; `decode.measure` closes what it loaded, and a
    borrowed engine has no `close`, so the lender's phase or the caller closes it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.info = getattr(engine, "info", None)

    def run(self, prompt_ids: list[int], new_tokens: int) -> Run:
        return self.engine.run(prompt_ids, new_tokens)


def long_prompt(tokenizer: Any, tokens: int, text: Path = TEXT) -> list[int]:
    """The first `tokens` token ids of `text` (plain text, no chat template): a prompt of exactly that length.

    Raises:
        SystemExit: the text is missing (it says how to fetch it) or too short.
    """
    if not text.is_file():
        raise SystemExit(f"{text} is missing; fetch the benchmark texts with `{FETCH_TEXTS}`")
    ids = list(tokenizer(text.read_text())["input_ids"])
    if len(ids) < tokens:
        raise SystemExit(f"{text} has {len(ids)} tokens, fewer than the {tokens} asked for")
    return ids[:tokens]
