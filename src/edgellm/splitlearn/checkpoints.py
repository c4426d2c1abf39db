"""A server's training checkpoints: adapter, optimizer and step per slot, written atomically, the newest kept."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from edgellm.errors import ConfigError
from edgellm.lora.inject import adapter_state, load_adapter_state
from edgellm.model.stage import Stage
from edgellm.splitlearn.adapter_slot import AdapterSlot

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 3


class CheckpointStore:
    """Checkpoints of one node's adapters under `<root>/<run>/<node>/<adapter label>/step-N.pt`.

    Args:
        root: the folder; None keeps no checkpoints (saving and loading are refused).
        node: this node's name.
    """

    def __init__(self, root: Path | None, node: str) -> None:
        self.root = root
        self.node = node

    def folder(self, run: str, slot: AdapterSlot) -> Path:
        assert self.root is not None
        return self.root / safe_name(run) / safe_name(self.node) / slot.label

    def save(self, stage: Stage, slot: AdapterSlot, run: str, step: int) -> dict[str, Any]:
        """Save the slot at client step `step` (the first request for a step wins: later ones follow newer
        updates); returns the detail the client sees."""
        if self.root is None:
            raise ConfigError(f"node {self.node} keeps no checkpoints (no checkpoint directory)")
        if step not in slot.saved:
            folder = self.folder(run, slot)
            folder.mkdir(parents=True, exist_ok=True)
            state = {
                "adapter": adapter_state(stage, slot.name),
                "optimizer": slot.optimizer.state_dict(),
                "optimizer_steps": slot.steps,
                "step": step,
                "lora": slot.config.lora.to_dict(),
            }
            atomic_save(state, folder / f"step-{step:08d}.pt")
            slot.saved.add(step)
            for old in sorted(folder.glob("step-*.pt"))[:-KEEP_CHECKPOINTS]:
                old.unlink(missing_ok=True)
        return {"node": self.node, "checkpoint": step}

    def load(self, stage: Stage, slot: AdapterSlot, run: str, step: int) -> None:
        """Restore the slot's adapter, optimizer and step count from client step `step`."""
        if self.root is None:
            raise ConfigError(f"node {self.node} keeps no checkpoints, so it cannot resume from step {step}")
        path = self.folder(run, slot) / f"step-{step:08d}.pt"
        if not path.exists():
            have = sorted(p.name for p in path.parent.glob("step-*.pt")) if path.parent.exists() else []
            raise ConfigError(
                f"node {self.node} has no checkpoint of step {step} for run {run!r} (has {have or 'none'})"
            )
        state = torch.load(path, weights_only=True)
        if state["lora"] != slot.config.lora.to_dict():
            raise ConfigError(f"checkpoint {path} was trained with other LoRA settings: {state['lora']}")
        load_adapter_state(stage, slot.name, state["adapter"])
        slot.optimizer.load_state_dict(state["optimizer"])
        slot.steps = int(state["optimizer_steps"])
        slot.saved.add(step)
        log.info("node %s resumed adapter %s from %s", self.node, slot.name, path)


def atomic_save(state: Any, path: Path) -> None:
    """`torch.save` to a temporary file beside `path`, flushed to disk, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def safe_name(name: str) -> str:
    """A file-name-safe version of a run, node or adapter name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if not cleaned or cleaned in (".", ".."):
        raise ConfigError(f"{name!r} cannot name a checkpoint folder")
    return cleaned
