"""Choosing the code that runs a stage's blocks: the fast engine where the architecture has one, else generic."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from edgellm.engine.llama import SUPPORTED, llama_block, prepare_rotary
from edgellm.errors import ConfigError
from edgellm.model.arch import ARCHS
from edgellm.model.stage import Stage

log = logging.getLogger(__name__)

ENGINES = ("fast", "generic")
DEFAULT_ENGINE = "fast"


def check_engine(name: str) -> None:
    """Raises ConfigError for an unknown engine name."""
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; choose from {list(ENGINES)}")


def engine_for(model_type: str, name: str) -> str:
    """The engine that runs a `model_type` when `name` is asked for: `fast` falls back to `generic` where the
    architecture has no fast blocks (GPT-2)."""
    check_engine(name)
    if name == "fast" and model_type not in SUPPORTED:
        return "generic"
    return name


def use_engine(stages: Sequence[Stage], model_type: str, name: str = DEFAULT_ENGINE) -> str:
    """Switch the stages' blocks to engine `name` (or its fallback); returns the engine now running them."""
    chosen = engine_for(model_type, name)
    for stage in stages:
        if chosen == "fast":
            stage.call, stage.prepare_rotary = llama_block, prepare_rotary
        else:
            stage.call, stage.prepare_rotary = ARCHS[model_type].call, None
        stage.engine = chosen
    if chosen != name:
        log.info("engine %s has no %s blocks; running the generic engine", name, model_type)
    return chosen
