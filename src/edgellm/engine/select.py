"""Choosing the code that runs a stage's blocks: the fast engine where the architecture has one, else generic."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from edgellm.engine import gemma, llama, phi
from edgellm.errors import ConfigError
from edgellm.model.arch import ARCHS, BlockCall
from edgellm.model.stage import Stage

log = logging.getLogger(__name__)

ENGINES = ("fast", "generic")
DEFAULT_ENGINE = "fast"

# model_type -> (the fast block, the rotary tables in the form it takes, computed once per pass and layer type)
FAST_BLOCKS: dict[str, tuple[BlockCall, Callable[[Any], Any]]] = {
    **{t: (llama.llama_block, llama.prepare_rotary) for t in llama.SUPPORTED},
    **{t: (gemma.gemma_block, llama.prepare_rotary) for t in gemma.SUPPORTED},
    **{t: (phi.phi_block, llama.prepare_rotary) for t in phi.SUPPORTED},
}

# model_type -> what prepares a block for its fast call, once: q/k/v and gate/up fused (Phi-3 holds them fused)
PACK_BLOCKS: dict[str, Callable[[Any], None]] = {t: llama.pack_block for t in (*llama.SUPPORTED, *gemma.SUPPORTED)}


def check_engine(name: str) -> None:
    """Raises ConfigError for an unknown engine name."""
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; choose from {list(ENGINES)}")


def engine_for(model_type: str, name: str) -> str:
    """The engine that runs a `model_type` when `name` is asked for: `fast` falls back to `generic` where the
    architecture has no fast blocks (GPT-2)."""
    check_engine(name)
    if name == "fast" and model_type not in FAST_BLOCKS:
        return "generic"
    return name


def use_engine(stages: Sequence[Stage], model_type: str, name: str = DEFAULT_ENGINE) -> str:
    """Switch the stages' blocks to engine `name` (or its fallback); returns the engine now running them."""
    chosen = engine_for(model_type, name)
    for stage in stages:
        if chosen == "fast":
            stage.call, stage.prepare_rotary = FAST_BLOCKS[model_type]
            pack = PACK_BLOCKS.get(model_type)  # fuse projections once (edgellm.engine.fuse)
            if pack is not None:
                for block in stage.blocks:
                    if "_edgellm_fused" not in block.__dict__:
                        pack(block)
        else:
            stage.call, stage.prepare_rotary = ARCHS[model_type].call, None
        stage.engine = chosen
    if chosen != name:
        log.info("engine %s has no %s blocks; running the generic engine", name, model_type)
    return chosen
