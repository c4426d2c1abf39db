"""The engine behind `edgellm eval ppl`: load (and quantize) the stages, read the text, report perplexity."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgellm.engine.select import DEFAULT_ENGINE, check_engine, engine_for, use_engine
from edgellm.errors import ConfigError
from edgellm.eval.ppl import PplConfig, codec_hop, evaluate_ppl
from edgellm.model.arch import arch_for
from edgellm.model.stage import HeadPlacement, Stage, stage_specs
from edgellm.net.codec import CodecSpec, parse_codec
from edgellm.progress import Phase
from edgellm.quant.memory import kv_bytes_per_token, stage_memory
from edgellm.quant.scheme import QuantConfig
from edgellm.quant.stage_files import load_or_quantize
from edgellm.serve.local_engine import DTYPES, check_placement
from edgellm.split.one_process import load_stages, stage_name
from edgellm.store import resolve_model
from edgellm.store.weights import load_config, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """One perplexity run.

    Attributes:
        model: registered name, model directory or .gguf file.
        text: the text file to score (UTF-8).
        window: context, stride and token limit.
        cuts, head: where the model is cut (as for `generate`).
        quant: the weight quantization of every stage, or None for floating point.
        act_codec: the smashed-data codec applied at every cut ("none" = exact float32).
        dtype, threads: weight precision and torch threads.
        cache: keep quantized stages on disk for the next run.
    """

    model: str
    text: Path
    window: PplConfig = field(default_factory=PplConfig)
    cuts: tuple[int, ...] = ()
    head: HeadPlacement = "server"
    quant: QuantConfig | None = None
    act_codec: str = "none"
    dtype: str = "fp32"
    threads: int | None = None
    cache: bool = True
    engine: str = DEFAULT_ENGINE

    def __post_init__(self) -> None:
        check_placement(self.head, self.dtype, self.threads)
        check_engine(self.engine)
        parse_codec(self.act_codec)  # a bad codec fails now, before the model loads

    @property
    def codec(self) -> CodecSpec:
        return parse_codec(self.act_codec)


def read_text(path: Path) -> str:
    """The file's text. Raises ConfigError if it cannot be read or is empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read text file {path}: {exc}") from exc
    if not text.strip():
        raise ConfigError(f"text file {path} is empty")
    return text


def load_eval_stages(model_dir: Path, config: EvalConfig, model_config: Any) -> list[Stage]:
    """The stages of the model cut at `config.cuts`, each quantized with `config.quant` if given."""
    specs = stage_specs(int(model_config.num_hidden_layers), config.cuts, config.head)
    dtype = DTYPES[config.dtype]
    with Phase("load model", log=log) as phase:
        if config.quant is None:
            stages = load_stages(model_dir, specs, dtype, engine=config.engine)
        else:
            stages = [load_or_quantize(model_dir, spec, config.quant, dtype, cache=config.cache) for spec in specs]
            use_engine(stages, model_config.model_type, config.engine)
        quant = config.quant.text if config.quant is not None else config.dtype
        phase.summary = f"{len(stages)} stage{'s' if len(stages) != 1 else ''} ({quant})"
    return stages


def run_ppl(config: EvalConfig) -> dict[str, Any]:
    """Score the text; returns the report of `edgellm eval ppl --json` (see docs/QUANTIZATION.md)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    text = read_text(config.text)
    model_dir = resolve_model(config.model)
    model_config = load_config(model_dir)
    arch_for(model_config)
    tokenizer = load_tokenizer(model_dir)
    token_ids = tokenizer(text)["input_ids"]
    start = time.perf_counter()
    stages = load_eval_stages(model_dir, config, model_config)
    load_s = time.perf_counter() - start
    codec = config.codec
    hop = None if codec.codec == "none" else codec_hop(codec)
    start = time.perf_counter()
    with Phase("eval ppl", unit="windows", log=log) as phase:
        result = evaluate_ppl(stages, token_ids, config.window, hop, on_window=phase.update)
        phase.summary = f"{result.windows} windows, {result.tokens} tokens"
    eval_s = time.perf_counter() - start
    memories = [stage_memory(s) for s in stages]
    return {
        "model": config.model,
        "text": str(config.text),
        "ppl": round(result.ppl, 4),
        "nll_per_token": round(result.nll_sum / result.tokens, 6),
        "tokens": result.tokens,
        "windows": result.windows,
        "ctx": config.window.ctx,
        "stride": config.window.step,
        "quant": config.quant.text if config.quant else "none",
        "engine": engine_for(model_config.model_type, config.engine),
        "act_codec": config.act_codec,
        "cuts": list(config.cuts),
        "head": config.head,
        "dtype": config.dtype,
        "threads": torch.get_num_threads(),
        "weight_bytes": sum(m.weight_bytes for m in memories),
        "stages": [
            {
                "name": stage_name(i, s.spec),
                "layers": [s.spec.start, s.spec.end],
                **m.to_json(),
                "kv_bytes_per_token": kv_bytes_per_token(model_config, s.spec.num_layers, DTYPES[config.dtype]),
            }
            for i, (s, m) in enumerate(zip(stages, memories))
        ],
        "load_s": round(load_s, 3),
        "eval_s": round(eval_s, 3),
    }
