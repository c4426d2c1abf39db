"""Split generation in one process: the engine behind `edgellm generate`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from edgellm.engine.select import DEFAULT_ENGINE, check_engine
from edgellm.errors import ConfigError
from edgellm.model.arch import arch_for
from edgellm.model.prompt import TextStream, encode_messages, encode_prompt, stop_ids
from edgellm.model.sampling import SamplingConfig
from edgellm.model.stage import HEAD_PLACEMENTS, HeadPlacement, Stage, stage_specs
from edgellm.privacy.config import DPConfig
from edgellm.privacy.mods import RowGuard, private_hops
from edgellm.progress import Phase
from edgellm.quant.memory import kv_bytes_per_token, stage_memory
from edgellm.quant.scheme import parse_quant
from edgellm.serve.drafts import DraftShelf
from edgellm.serve.report import stage_report, timing_report
from edgellm.spec.config import SpeculativeConfig
from edgellm.spec.generator import SpeculativeGenerator
from edgellm.split.generator import GenerationConfig, Generator
from edgellm.split.one_process import load_stages, local_pipeline
from edgellm.split.pipeline import Pipeline
from edgellm.store import resolve_model
from edgellm.store.weights import load_config, load_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_placement(head: str, dtype: str, threads: int | None) -> None:
    """Validate the fields every in-process engine config shares.

    Raises:
        ConfigError: unknown head placement or dtype, or fewer than one thread.
    """
    if head not in HEAD_PLACEMENTS:
        raise ConfigError(f"unknown head placement {head!r}; choose from {list(HEAD_PLACEMENTS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")


@dataclass(frozen=True)
class LocalSplitConfig:
    """Which model, cut where, in what precision, on how many threads."""

    model: str
    cuts: tuple[int, ...] = ()
    head: HeadPlacement = "device"  # the commands' convention: head and labels stay on the device
    dtype: str = "fp32"
    threads: int | None = None
    quant: str = "none"  # SCHEME[,PATTERN=SCHEME...] for every stage, see edgellm.quant.scheme.parse_quant
    engine: str = DEFAULT_ENGINE  # what runs the blocks (edgellm.engine.select): fast, or generic

    def __post_init__(self) -> None:
        check_placement(self.head, self.dtype, self.threads)
        parse_quant(self.quant)  # an unknown scheme fails before the model loads
        check_engine(self.engine)


@dataclass
class LoadedSplit:
    """A model's stages in this process, with its tokenizer and config."""

    config: LocalSplitConfig
    model_config: Any
    tokenizer: Any
    stages: list[Stage]
    load_s: float
    drafts: DraftShelf | None = None  # the drafters loaded so far (speculative decoding)


def load_split(config: LocalSplitConfig) -> LoadedSplit:
    """Resolve the model and build its stages (validating the cuts against its depth)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    model_dir = resolve_model(config.model)
    model_config = load_config(model_dir)
    arch_for(model_config)  # refuse an unsupported architecture before anything else
    specs = stage_specs(int(model_config.num_hidden_layers), config.cuts, config.head)
    tokenizer = load_tokenizer(model_dir)  # before the weights: a missing tokenizer should fail in seconds
    with Phase("load model", log=log) as phase:
        stages = load_stages(model_dir, specs, DTYPES[config.dtype], parse_quant(config.quant), config.engine)
        phase.summary = f"{config.model}, {len(stages)} stage(s), {config.dtype}, quant {config.quant}"
    drafts = DraftShelf(model_dir, DTYPES[config.dtype], config.engine)
    return LoadedSplit(config, model_config, tokenizer, stages, time.perf_counter() - start, drafts)


@dataclass(frozen=True)
class PromptConfig:
    """What to generate from the prompt."""

    chat: bool = True  # the model's chat template, as every command applies it by default
    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    speculative: SpeculativeConfig | None = None  # draft on the device and verify (None: plain decoding)
    dp: DPConfig | None = None  # clip and noise the smashed data the first stage sends on (None: off)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:  # checked here too, so the CLI refuses it before loading the model
            raise ConfigError(f"max new tokens must be >= 1, got {self.max_new_tokens}")


def generate_text(
    loaded: LoadedSplit, prompt: str, options: PromptConfig, on_text: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Generate from one prompt; calls `on_text` with each new piece of text; returns the run's report.

    The report has the fields of `edgellm generate --json` (see docs/CLI.md).
    """
    return generate_ids(loaded, encode_prompt(loaded.tokenizer, prompt, options.chat), options, on_text)


def generate_ids(
    loaded: LoadedSplit, prompt_ids: list[int], options: PromptConfig, on_text: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Generate from prompt token ids already built (`options.chat` is not applied again); as `generate_text`.

    Each call opens new sessions on the loaded stages, so one `LoadedSplit` serves any number of calls.
    """
    gen_config = GenerationConfig(
        options.max_new_tokens, options.sampling, stop_ids(loaded.tokenizer, loaded.model_config)
    )
    pipeline = local_pipeline(loaded.stages)
    guard = None if options.dp is None else RowGuard.for_rows(options.dp)
    if guard is not None:  # hop 0 is the device's first stage, hop 1 the first server's (none without cuts)
        pipeline = Pipeline(private_hops(pipeline.hops, guard))
    generator: Generator | SpeculativeGenerator = Generator(pipeline, gen_config)
    if options.speculative is not None:
        if loaded.drafts is None:
            raise ConfigError("this loaded model has no drafters to draft with")
        drafter = loaded.drafts.get(options.speculative.draft)
        generator = SpeculativeGenerator(pipeline, gen_config, drafter, options.speculative)
    stream = TextStream(loaded.tokenizer)
    for step in generator.stream(torch.tensor([prompt_ids])):
        delta = stream.push(step.tokens[0])
        if on_text is not None and delta:
            on_text(delta)
    result = generator.result
    assert result is not None
    new_tokens = result.new_tokens[0]
    return {
        "model": loaded.config.model,
        "cuts": list(loaded.config.cuts),
        "head": loaded.config.head,
        "dtype": loaded.config.dtype,
        "quant": loaded.config.quant,
        "engine": loaded.stages[0].engine,  # the one running: fast falls back to generic where it has no blocks
        "threads": torch.get_num_threads(),
        "prompt_tokens": prompt_ids,
        "new_tokens": new_tokens,
        "text": loaded.tokenizer.decode(new_tokens, skip_special_tokens=True),
        "stages": [
            {
                **row,
                "memory": stage_memory(stage).to_json(),
                "kv_bytes_per_token": kv_bytes_per_token(
                    loaded.model_config, stage.spec.num_layers, DTYPES[loaded.config.dtype]
                ),
            }
            for row, stage in zip(stage_report(loaded.stages, pipeline.stats), loaded.stages)
        ],
        **timing_report(result),
        "load_s": round(loaded.load_s, 3),
        "privacy": None if guard is None else guard.ledger.to_json(),
    }


def context_tokens(loaded: LoadedSplit) -> int:
    """The longest sequence the loaded model can attend over: its position limit (sliding windows are masked)."""
    return min(stage.max_length for stage in loaded.stages)


class LocalChat:
    """A chat backend (`edgellm.serve.chat_session.ChatBackend`) on stages loaded once in this process: every
    turn runs on the same `LoadedSplit`.

    Args:
        loaded: the model's stages, tokenizer and config.
        options: decoding of each answer (`chat` is implied: messages always go through the chat template).
    """

    def __init__(self, loaded: LoadedSplit, options: PromptConfig) -> None:
        self.loaded = loaded
        self.options = options

    @property
    def context_tokens(self) -> int:
        return context_tokens(self.loaded)

    @property
    def max_new_tokens(self) -> int:
        return self.options.max_new_tokens

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(encode_messages(self.loaded.tokenizer, messages))

    def generate(self, messages: list[dict[str, str]], on_text: Callable[[str], None] | None) -> dict[str, Any]:
        return generate_ids(self.loaded, encode_messages(self.loaded.tokenizer, messages), self.options, on_text)
