"""The config fields transformers' GGUF reader drops for Phi-3 and Gemma 3, read back from the GGUF file.

transformers (5.x) maps a fixed list of GGUF metadata keys per architecture into the model config; what it does
not map takes the config class's default, and a model converted that way runs, and runs wrong. Missing:

- **Phi-3 / Phi-4-mini** (`phi3`): the rotary dimension count (Phi-4-mini turns 96 of each head's 128 dims), the
  longrope factors (stored as tensors `rope_factors_long` / `rope_factors_short`, with the original context
  length and the attention factor as metadata) and the sliding window (0 in the file means none, Phi-4's way).
- **Gemma 3** (`gemma3`): the linear rope scaling of the global layers (4B and larger), and the query scale,
  which llama.cpp does not store but derives: `hidden_size / heads` for the 27B model (62 layers), else the head
  dim (transformers' default of 256 is right for all sizes but the 27B).

`convert_gguf` sets these on the config before it saves the converted model. The names of the metadata keys are
llama.cpp's (`convert_hf_to_gguf.py`, `gguf.constants.Keys`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

GEMMA3_27B_LAYERS = 62  # llama.cpp tells the 27B model by its layer count (LLM_TYPE_27B)
FIXES_VERSION = "1"  # recorded in a conversion's marker; conversions of `FIXED_TYPES` without it are redone
FIXED_TYPES = ("phi3", "gemma3_text")  # the converted model types these fixes concern


def gguf_config_fixes(gguf_path: Path, config: Any) -> dict[str, Any]:
    """{config attribute: value} that `config`, as transformers read it from `gguf_path`, lacks; {} if none.

    Raises:
        ValueError: the file cannot be read as GGUF (the caller has already read it once through transformers).
    """
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    fixes = _FIXES.get(str(arch))
    return fixes(_Metadata(reader, str(arch)), config) if fixes is not None else {}


class _Metadata:
    """An architecture's metadata keys and extra tensors of one GGUF file."""

    def __init__(self, reader: Any, arch: str) -> None:
        self.reader, self.arch = reader, arch

    def get(self, key: str) -> Any:
        """`{arch}.<key>`'s value, or None."""
        return _field(self.reader, f"{self.arch}.{key}")

    def tensor(self, name: str) -> list[float] | None:
        found = [t for t in self.reader.tensors if t.name == name]
        return [float(x) for x in found[0].data.reshape(-1)] if found else None


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _phi3(meta: _Metadata, config: Any) -> dict[str, Any]:
    fixes: dict[str, Any] = {}
    rope = copy.deepcopy(dict(config.rope_parameters or {}))
    head_dim = int(config.hidden_size) // int(config.num_attention_heads)
    dims = meta.get("rope.dimension_count")
    if dims and int(dims) != head_dim:
        rope["partial_rotary_factor"] = int(dims) / head_dim
    long, short = meta.tensor("rope_factors_long.weight"), meta.tensor("rope_factors_short.weight")
    if long is not None and short is not None:
        rope.update(rope_type="longrope", long_factor=long, short_factor=short)
        original = meta.get("rope.scaling.original_context_length")
        if original:
            rope["original_max_position_embeddings"] = fixes["original_max_position_embeddings"] = int(original)
        attention = meta.get("rope.scaling.attn_factor")
        if attention:
            rope["attention_factor"] = float(attention)
    if rope != config.rope_parameters:
        fixes["rope_parameters"] = rope
    window = meta.get("attention.sliding_window")
    if window is not None and (int(window) or None) != config.sliding_window:
        fixes["sliding_window"] = int(window) or None
    return fixes


def _gemma3(meta: _Metadata, config: Any) -> dict[str, Any]:
    fixes: dict[str, Any] = {}
    heads, layers = int(config.num_attention_heads), int(config.num_hidden_layers)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    scalar = int(config.hidden_size) // heads if layers == GEMMA3_27B_LAYERS else head_dim
    if scalar != config.query_pre_attn_scalar:
        fixes["query_pre_attn_scalar"] = scalar
    factor = meta.get("rope.scaling.factor")
    if meta.get("rope.scaling.type") == "linear" and factor and float(factor) != 1.0:
        rope = copy.deepcopy(dict(config.rope_parameters))
        rope["full_attention"] = {**rope["full_attention"], "rope_type": "linear", "factor": float(factor)}
        fixes["rope_parameters"] = rope
    return fixes


# GGUF `general.architecture` -> its fixes
_FIXES: dict[str, Callable[[_Metadata, Any], dict[str, Any]]] = {"phi3": _phi3, "gemma3": _gemma3}
