"""Where edgellm keeps fetched and converted models on disk."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The edgellm data directory: `$EDGELLM_HOME`, else `$XDG_CACHE_HOME/edgellm`, else `~/.cache/edgellm`."""
    explicit = os.environ.get("EDGELLM_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "edgellm"


def models_dir() -> Path:
    """Converted models, one Hugging Face-format directory each."""
    return home() / "models"


def checkpoint_root() -> Path:
    """Training checkpoints a server node keeps for its clients: `<home>/checkpoints/<run>/<node>/<adapter>/`."""
    return home() / "checkpoints"
