"""Everything in one process: load a model's stages and chain them through in-process hops."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from edgellm.engine.select import DEFAULT_ENGINE, check_engine, use_engine
from edgellm.errors import ConfigError
from edgellm.model.build import build_stages
from edgellm.model.stage import Stage, StageSpec
from edgellm.net.direct_hop import LocalHop
from edgellm.quant.scheme import QuantConfig
from edgellm.quant.stage_files import load_or_quantize
from edgellm.split.host import SessionLimits, StageHost
from edgellm.split.pipeline import Pipeline
from edgellm.store.weights import SafetensorsSource, load_config


def load_stages(
    model_dir: Path,
    specs: Sequence[StageSpec],
    dtype: torch.dtype = torch.float32,
    quant: QuantConfig | Sequence[QuantConfig | None] | None = None,
    engine: str = DEFAULT_ENGINE,
) -> list[Stage]:
    """Build the stages `specs` of the model in `model_dir`, reading only their weights.

    `quant` quantizes every stage (one `QuantConfig`) or each its own (one per spec, None = floating point);
    quantized stages are cached on disk on first use and loaded from there afterwards. `engine` runs their
    blocks (`edgellm.engine.select`: `fast` where the architecture has it, else `generic`).
    """
    check_engine(engine)
    quants = list(quant) if isinstance(quant, Sequence) else [quant] * len(specs)
    if len(quants) != len(specs):
        raise ConfigError(f"{len(quants)} quantization configs for {len(specs)} stages")
    config = load_config(model_dir)
    if all(q is None for q in quants):
        with SafetensorsSource(model_dir) as tensors:
            stages = build_stages(config, specs, tensors, dtype)
    else:
        stages = [
            load_stages(model_dir, [spec], dtype)[0] if q is None else load_or_quantize(model_dir, spec, q, dtype)
            for spec, q in zip(specs, quants)
        ]
    use_engine(stages, config.model_type, engine)
    return stages


def stage_label(spec: StageSpec) -> str:
    """`[0:10)+embed`, `[30:30)+head`: what a stage holds, for tables and logs."""
    extras = "".join(f"+{part}" for part, on in (("embed", spec.embed), ("head", spec.head)) if on)
    return f"[{spec.start}:{spec.end}){extras}"


def stage_name(index: int, spec: StageSpec) -> str:
    """`stage0[0:10)+embed`: a stage's label with its position in the pipeline."""
    return f"stage{index}{stage_label(spec)}"


def local_pipeline(stages: Sequence[Stage], limits: SessionLimits = SessionLimits()) -> Pipeline:
    """A pipeline whose hops call stage hosts in this process."""
    return Pipeline([LocalHop(stage_name(i, s.spec), StageHost(s, limits)) for i, s in enumerate(stages)])
