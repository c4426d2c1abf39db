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

from edgellm.errors import ModelError

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
    # Imported here: transformers takes seconds to import and most commands never convert.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s (one-off; later loads read the cached copy)", gguf_path)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".convert-") as tmp:
        work = Path(tmp) / "model"
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
        except Exception as exc:  # transformers raises many types for a bad file; all mean the same to a user
            raise ModelError(f"cannot read GGUF file {gguf_path}: {type(exc).__name__}: {exc}") from exc
        # The weights are dequantized to fp32 on load; drop the GGUF quantization marker so they can be saved.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        shutil.copyfile(gguf_path, work / "source.gguf")
        (work / MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(work, dest)
    return dest
