"""Where edgellm keeps its files on disk: one home folder, one subfolder per cache.

`edgellm cache info` lists these folders and `edgellm cache clean` empties them (`edgellm.store.inventory`), so
every cache a module writes under `home()` is named here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
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


def quant_dir() -> Path:
    """Quantized stages: `<quant_dir>/<quant_model_key(model)>/<scheme>-L<start>-<end>[+embed][+head].safetensors`."""
    return home() / "quant"


def profiles_dir() -> Path:
    """Measured profiles: deployment profiles, per-scheme compute costs (`compute/`), perplexities (`ppl/`)."""
    return home() / "profiles"


def kernels_dir() -> Path:
    """Native kernels compiled for this CPU on first use."""
    return home() / "kernels"


def checkpoint_root() -> Path:
    """Where a server node started on its own keeps its clients' training checkpoints:
    `<home>/checkpoints/<run>/<node>/<adapter>/` (`edgellm node --checkpoint-dir` puts them elsewhere)."""
    return home() / "checkpoints"


def quant_model_key(model_dir: Path) -> str:
    """The folder name of a model's quantized stages: its directory's name and a hash of where it is and of its
    weights file's size and time, so stages of a model converted again are never mistaken for the new one's."""
    weights = model_dir / "model.safetensors"
    if not weights.exists():
        weights = model_dir / "model.safetensors.index.json"
    stat = weights.stat() if weights.exists() else None
    ident = f"{model_dir.resolve()}|{stat.st_size if stat else 0}|{stat.st_mtime_ns if stat else 0}"
    return f"{model_dir.name}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished folder `tmp` to `target`, replacing an older `target` only once `tmp` is complete (the
    old one is moved aside, the new one renamed in, then the old one removed)."""
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
