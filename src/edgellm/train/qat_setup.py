"""The device's side of quantization-aware training and full fine-tuning (`--qat`, `--train-layers`): fake
quantizers into its stages, the layer range's weights to train, and the export of the trained model."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgellm.model.arch import Arch
from edgellm.model.stage import Stage
from edgellm.qat.export import ORIGIN, merged_tensors, write_model, write_quantized_stage
from edgellm.qat.walker import apply_qat, check_layer_range, train_parameters
from edgellm.quant.scheme import parse_quant
from edgellm.train.config import TrainConfig

log = logging.getLogger(__name__)


def prepare_stages(stages: Sequence[Stage], cfg: TrainConfig, arch: Arch, where: str) -> dict[str, nn.Parameter]:
    """Make the device's stages train as `cfg` says, after LoRA went in: fake quantizers on what trains and PTQ's
    modules on what does not (`--qat`), and the weights of `cfg.train_layers` trainable.

    Args:
        where: who holds `stages`, for errors ("the device", "this model").

    Returns:
        the fully trained parameters by full-model name (empty without `train_layers`).

    Raises:
        ConfigError: `train_layers` outside the stages' layers, a quantized stage, a scheme that does not fit.
    """
    if cfg.train_layers is not None:
        check_layer_range(cfg.train_layers, [(s.spec.start, s.spec.end) for s in stages], where)
    quant = parse_quant(cfg.qat)
    if quant is not None:
        for stage in stages:
            wrapped = apply_qat(stage, quant, cfg.train_layers)
            log.info("stage [%d:%d): %d layers train through %s", stage.spec.start, stage.spec.end, len(wrapped),
                     quant.text)  # fmt: skip
    trained: dict[str, nn.Parameter] = {}
    if cfg.train_layers is not None:
        for stage in stages:
            trained.update(train_parameters(stage, arch, cfg.train_layers))
        for param in trained.values():
            param.requires_grad_(True)
    return trained


def exports_model(cfg: TrainConfig) -> bool:
    """Whether the run's result is a model (QAT, full fine-tuning) rather than an adapter alone."""
    return cfg.qat is not None or cfg.train_layers is not None


def export_model(
    model_dir: Path,
    target: Path,
    cfg: TrainConfig,
    trained: Mapping[str, torch.Tensor],
    adapters: Mapping[str, torch.Tensor],
    transposed: bool,
    about: Mapping[str, Any],
) -> dict[str, Any]:
    """Write the trained model to `target` (and, with `--qat`, its quantized stage where every command finds it).

    Args:
        model_dir: the source model's directory.
        trained: the fully trained weights by full-model name; adapters: every side's LoRA tensors (merged).
        about: what the record says of the run (name, data, steps).

    Returns:
        {"model": target, "quant": the scheme or None, "stage_files": [paths]}
    """
    record = {
        "origin": ORIGIN if cfg.qat is not None else "finetune",
        "source_model": str(model_dir),
        "qat": cfg.qat,
        "train_layers": list(cfg.train_layers) if cfg.train_layers is not None else None,
        "lora": cfg.lora.to_dict() if cfg.adapters else None,
        **about,
    }
    tensors = merged_tensors(model_dir, trained, adapters if cfg.adapters else {}, cfg.lora.scaling, transposed)
    write_model(model_dir, target, tensors, record)
    files: list[str] = []
    quant = parse_quant(cfg.qat)
    if quant is not None:
        files.append(str(write_quantized_stage(target, quant, record)))
    return {"model": str(target), "quant": cfg.qat, "stage_files": files}
