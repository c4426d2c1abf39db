"""Convert a GGUF file into a Hugging Face model directory (fp32 safetensors + tokenizer + config).

transformers reads GGUF slowly (it dequantizes every tensor in Python), so this runs once per file and the
result is cached; later loads read safetensors directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgellm.errors import ModelError
from edgellm.progress import Phase
from edgellm.store.gguf_config import FIXED_TYPES, FIXES_VERSION, gguf_config_fixes

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
MARKER = "edgellm.json"  # written last: a directory holding it is a complete conversion


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(path: Path) -> None:
    """Fail early, with the file's name, on something that is not a GGUF file."""
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")


def convert_gguf(gguf_path: Path, dest: Path, provenance: dict[str, str]) -> Path:
    """Convert `gguf_path` into a Hugging Face directory at `dest`, atomically.

    The directory is assembled next to `dest` and renamed into place, so an interrupted conversion never leaves
    a half-written model behind. The GGUF itself is copied in as `source.gguf` (llama.cpp benchmarks use it).

    Raises:
        ModelError: the file is missing, not a GGUF, or transformers cannot read it.
    """
    check_gguf(gguf_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".convert-") as tmp:
        alone = _alone(gguf_path, Path(tmp) / "source")
        # The tokenizer is read first and checks every tensor's extent in the file, so a corrupt or truncated
        # file fails here, within seconds, before the long conversion is announced.
        tokenizer = _read_gguf(gguf_path, alone, "tokenizer")
        announce = f"converting {gguf_path} (one-off; later loads read the cached copy)"
        with Phase(f"convert {gguf_path.name}", log=log, announce=announce) as phase:
            model = _read_gguf(gguf_path, alone, "model")
            for key, value in gguf_config_fixes(gguf_path, model.config).items():  # what transformers drops
                log.info("%s: setting %s = %r from the GGUF metadata", gguf_path.name, key, value)
                setattr(model.config, key, value)
            work = Path(tmp) / "model"
            # The weights are dequantized to fp32 on load; drop the GGUF quantization marker so they can be saved.
            if getattr(model.config, "quantization_config", None) is not None:
                del model.config.quantization_config
            model.hf_quantizer = None
            model.save_pretrained(work)
            tokenizer.save_pretrained(work)
            shutil.copyfile(gguf_path, work / "source.gguf")
            marker = {**provenance, "gguf_config_fixes": FIXES_VERSION}
            (work / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(work, dest)
            weights = sum(f.stat().st_size for f in dest.glob("*.safetensors"))
            phase.summary = f"{weights / 1e6:.0f} MB of fp32 safetensors"
    return dest


def is_current(dest: Path) -> bool:
    """A complete conversion at `dest` that this edgellm would make the same: one of an architecture whose config
    `store.gguf_config` completes, made before it did, is not (it would run with the wrong config)."""
    marker = dest / MARKER
    if not marker.is_file():
        return False
    if json.loads(marker.read_text()).get("gguf_config_fixes") == FIXES_VERSION:
        return True
    config = dest / "config.json"
    return not config.is_file() or json.loads(config.read_text()).get("model_type") not in FIXED_TYPES


def _alone(gguf_path: Path, staging: Path) -> Path:
    """A link to `gguf_path` in `staging`, a new directory holding nothing else.

    transformers also reads tokenizer files lying next to the GGUF, and those silently replace the GGUF's own
    tokenizer settings (end-of-sequence token, chat template); so the file is read from a directory of its own.
    """
    staging.mkdir()
    alone = staging / gguf_path.name
    try:
        alone.symlink_to(gguf_path.resolve())
    except OSError:  # a filesystem without symlinks
        shutil.copyfile(gguf_path, alone)
    return alone


def _read_gguf(gguf_path: Path, alone: Path, part: str) -> Any:
    """transformers' tokenizer (`part` "tokenizer") or fp32 model ("model") from the GGUF file linked at `alone`;
    ModelError, in one line, naming `gguf_path`, if it cannot read it."""
    # Imported here: transformers takes seconds to import and most commands never convert.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if part == "tokenizer":
            return AutoTokenizer.from_pretrained(alone.parent, gguf_file=alone.name)
        return AutoModelForCausalLM.from_pretrained(alone.parent, gguf_file=alone.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a bad file; all mean the same to a user
        detail = (str(exc).strip().splitlines() or [""])[0]  # one line: some of them span many
        raise ModelError(f"cannot read GGUF file {gguf_path}: {type(exc).__name__}: {detail}") from exc
