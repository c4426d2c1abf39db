"""Read a Hugging Face model directory: its config, tokenizer, and weights by name (lazily, per tensor)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from edgellm.errors import ModelError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# Multimodal wrappers whose language model runs alone (the image encoder is never loaded): the wrapper's
# model_type -> its text model's. Their checkpoints keep the text weights under another prefix (`_aliases`).
TEXT_MODELS = {"gemma3": "gemma3_text"}  # Gemma 3 4B, 12B and 27B on the Hub: Gemma3ForConditionalGeneration


class SafetensorsSource:
    """Named tensors of a model directory's safetensors file(s), read one at a time on demand.

    Use as a context manager, or call `close()`; calling the object with a name returns that tensor.

    Raises:
        ModelError: the directory holds no safetensors weights.
    """

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (model_dir / "model.safetensors").is_file():
            files, weight_map = ["model.safetensors"], {}
        else:
            raise ModelError(f"{model_dir} has no safetensors weights (model.safetensors or its index)")
        self._stack = ExitStack()
        self._handles = {f: self._stack.enter_context(safe_open(model_dir / f, framework="pt")) for f in files}
        self._where = weight_map or {k: files[0] for k in self._handles[files[0]].keys()}  # noqa: SIM118 - safe_open is not a dict

    def __call__(self, name: str) -> torch.Tensor:
        for candidate in (name, *_aliases(name)):
            if candidate in self._where:
                return self._handles[self._where[candidate]].get_tensor(candidate)
        raise KeyError(name)

    def names(self) -> list[str]:
        """Every tensor name in the file(s), as stored."""
        return sorted(self._where)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_config(model_dir: Path) -> Any:
    """The transformers config of a model directory; of a multimodal wrapper in `TEXT_MODELS`, its language
    model's (with the wrapper's `tie_word_embeddings`, which is the one transformers follows).

    Raises:
        ModelError: config.json is missing or unreadable.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read the config of {model_dir}: {exc}") from exc
    if config.model_type in TEXT_MODELS:  # the language model of a multimodal wrapper
        text = config.get_text_config()
        if text.model_type != TEXT_MODELS[config.model_type]:
            raise ModelError(f"{model_dir}: a {config.model_type} config with a {text.model_type!r} text model")
        text.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", text.tie_word_embeddings))
        return text
    return config


def _aliases(name: str) -> tuple[str, ...]:
    """Where a multimodal checkpoint keeps text-model weight `name`: transformers' old layout
    (`language_model.model.layers.0...`, as the Hub has Gemma 3) and its new one (`model.language_model.layers.0...`).
    """
    if name.startswith("model."):
        return f"language_model.{name}", f"model.language_model.{name.removeprefix('model.')}"
    if name.startswith("lm_head."):
        return (f"language_model.{name}",)
    return ()


def load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer saved in a model directory.

    Raises:
        ModelError: no tokenizer files, or they cannot be read.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
            raise ModelError(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})") from exc
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise ModelError(f"cannot read the tokenizer of {model_dir}: {detail}") from exc
