"""The drafters a device has loaded, by `--draft` value: each is loaded on first use and kept for later ones."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch

from edgellm.progress import Phase
from edgellm.spec.config import load_draft
from edgellm.spec.drafter import DraftModel


class DraftShelf:
    """Loads and keeps drafters for the target model in `model_dir` (`edgellm.spec.config.load_draft`).

    Args:
        model_dir: the target model's directory.
        dtype, engine: of the drafter's floating-point parts, as the device's stages.
        compute_scale: the device's emulated slowness, which drafting pays as the device's stages do.
        reserve: called with (drafter, weight bytes) once a drafter is loaded, to hold them against the device's
            memory budget; what it raises (`BusyError`: over the budget) refuses the drafter.
    """

    def __init__(
        self, model_dir: Path, dtype: torch.dtype = torch.float32, engine: str = "fast", compute_scale: float = 1.0,
        reserve: Callable[[str, int], None] | None = None,
    ) -> None:  # fmt: skip
        self.model_dir = model_dir
        self.reserve = reserve
        self.dtype = dtype
        self.engine = engine
        self.compute_scale = compute_scale
        self._loaded: dict[str, DraftModel] = {}
        self._lock = threading.Lock()

    def get(self, draft: str) -> DraftModel:
        with self._lock:
            model = self._loaded.get(draft)
            if model is None:
                with Phase(f"load drafter {draft}") as phase:
                    model = load_draft(draft, self.model_dir, self.dtype, self.engine, self.compute_scale)
                    phase.summary = f"{model.label}, {model.weight_bytes / 1e6:.0f} MB"
                if self.reserve is not None:
                    self.reserve(draft, model.weight_bytes)
                self._loaded[draft] = model
            return model
