"""Turn a `--model` argument into a Hugging Face model directory."""

from __future__ import annotations

import logging
from pathlib import Path

from edgellm.errors import ModelError
from edgellm.store.convert import check_gguf, convert_gguf, is_current, sha256_file
from edgellm.store.fetch import pull
from edgellm.store.paths import models_dir
from edgellm.store.registry import REGISTRY

log = logging.getLogger(__name__)


def resolve_model(spec: str) -> Path:
    """Resolve `spec` to a directory holding `config.json`, fetching or converting it on first use.

    `spec` is a registered name (e.g. `smollm2-135m`), a Hugging Face model directory, or a `.gguf` file.

    Raises:
        ModelError: the name is unknown or the path is missing or not a model.
    """
    if spec in REGISTRY:
        return pull(spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        return _converted_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if path.exists():
        raise ModelError(f"{path} is neither a model directory nor a .gguf file")
    raise ModelError(
        f"model {spec!r} not found: not a registered name ({sorted(REGISTRY)}), a directory or a .gguf file"
    )


def _converted_gguf(path: Path) -> Path:
    check_gguf(path)
    digest = sha256_file(path)
    dest = models_dir() / f"gguf-{path.stem.lower()}-{digest[:12]}"
    if is_current(dest):
        return dest
    return convert_gguf(path, dest, {"gguf": str(path.resolve()), "sha256": digest})
