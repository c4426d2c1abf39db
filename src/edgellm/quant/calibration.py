"""Calibration for the schemes whose search needs activations (`*-gptq`): the text, and each linear layer's
input second moment `H = E[x x^T]` over it.

The calibration text ships with the package: the 1911 Encyclopaedia Britannica article "Shakespeare" without its
first 9 kB (public domain; `privacy/texts/eb1911_shakespeare_rest.txt`, also the privacy attacker's text).
Encyclopaedia prose only: perplexity measured on another kind of text (the Python tutorial of
docs/QUANTIZATION.md) is held out from the calibration by kind, not just by passage.

A stage's statistics come from the float model: the layers before the stage (and the embedding) turn the text
into the stage's inputs, then the stage runs with a hook on each linear layer. Every layer sees float inputs
(GPTQ's non-sequential form), so one pass over the text serves every layer of the stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgellm.errors import ConfigError
from edgellm.model.build import build_stage
from edgellm.model.stage import Stage, StageSpec
from edgellm.progress import Phase
from edgellm.quant.walker import float_weight
from edgellm.store.weights import SafetensorsSource, load_config, load_tokenizer

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]  # package data: works from an installed wheel too
CALIBRATION_TEXT = PACKAGE / "privacy/texts/eb1911_shakespeare_rest.txt"


@dataclass(frozen=True)
class CalibrationConfig:
    """How much calibration text to run.

    Attributes:
        tokens: tokens of the calibration text to use (from its start).
        window: tokens per forward pass (each window starts at position 0).

    Raises:
        ConfigError: a value out of range.
    """

    tokens: int = 4096
    window: int = 512

    def __post_init__(self) -> None:
        if self.window < 2 or self.tokens < self.window:
            raise ConfigError(f"calibration needs window >= 2 and tokens >= window, got {self}")


def calibration_ids(tokenizer: Any, config: CalibrationConfig = CalibrationConfig()) -> torch.Tensor:
    """The calibration text's first `config.tokens` token ids, as windows -> int64 [W, window].

    Raises:
        ConfigError: the text is shorter than one window.
    """
    ids = tokenizer(CALIBRATION_TEXT.read_text(encoding="utf-8"))["input_ids"][: config.tokens]
    count = len(ids) // config.window
    if not count:
        raise ConfigError(f"the calibration text has {len(ids)} tokens, fewer than one window of {config.window}")
    return torch.tensor(ids[: count * config.window], dtype=torch.long).reshape(count, config.window)


def collect_hessians(
    stage: Stage, inputs: Iterator[torch.Tensor], on_window: Callable[[int], None] | None = None
) -> dict[str, torch.Tensor]:
    """Run `stage` on each input and return `E[x x^T]` of every linear layer's input, by module name.

    inputs: each [1, S] int64 ids (a stage with the embedding) or [1, S, D] hidden states
    -> {name: [K, K] float32}, averaged over every token seen

    Raises:
        ConfigError: the stage runs an engine that bypasses its linear modules (`fast` fuses q, k and v).
    """
    if stage.engine != "generic":
        raise ConfigError(
            f"calibration needs the generic engine (its linear layers called one by one), not {stage.engine!r}"
        )
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def accumulate(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # [T, K]
            sums[name] = sums.get(name, 0) + x.t() @ x  # type: ignore[assignment,operator]
            counts[name] = counts.get(name, 0) + x.shape[0]

        return accumulate

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in stage.named_modules() if float_weight(m) is not None]
    try:
        with torch.inference_mode():
            for i, x in enumerate(inputs):
                positions = torch.arange(x.shape[1]).unsqueeze(0)
                stage(x, positions)
                if on_window is not None:
                    on_window(i + 1)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / counts[name] for name, total in sums.items()}


def stage_hessians(
    model_dir: Path, stage: Stage, config: CalibrationConfig = CalibrationConfig()
) -> dict[str, torch.Tensor]:
    """`collect_hessians` for a float `stage` of the model in `model_dir`, fed the calibration text through the
    float layers before it (built here, then dropped).

    Raises:
        ModelError: as `build_stage`; ConfigError: as `calibration_ids`.
    """
    model_config = load_config(model_dir)
    if config.window > stage.max_length:  # a model with a short context: shorter windows, as many tokens
        config = replace(config, window=stage.max_length)
    windows = calibration_ids(load_tokenizer(model_dir), config)
    spec = stage.spec
    with Phase("calibrate", total=len(windows), unit="windows", log=log) as phase:
        if spec.embed:
            inputs = [w.unsqueeze(0) for w in windows]
        else:
            with SafetensorsSource(model_dir) as tensors:
                prefix = build_stage(model_config, StageSpec(0, spec.start, embed=True), tensors, stage.dtype)
            with torch.inference_mode():
                inputs = [prefix(w.unsqueeze(0), torch.arange(w.numel()).unsqueeze(0)) for w in windows]
            del prefix
        hessians = collect_hessians(stage, iter(inputs), phase.update)
        phase.summary = f"{len(windows) * config.window} tokens of {CALIBRATION_TEXT.name}, {len(hessians)} layers"
    return hessians
