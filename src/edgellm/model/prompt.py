"""Prompts to token ids and token ids back to text, around a Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgellm.errors import ConfigError


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """Token ids of `prompt`; with `chat`, wrapped as one user turn by the model's chat template.

    Raises:
        ConfigError: `chat` is asked for a model without a chat template, or the prompt encodes to nothing.
    """
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("this model has no chat template; run with --no-chat")
        ids = encode_messages(tokenizer, [{"role": "user", "content": prompt}])
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ConfigError("the prompt is empty")
    return list(ids)


def encode_messages(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a conversation (`{"role", "content"}` dicts, in order) in the model's chat template, ending
    with the prompt for the assistant's next turn. A template may add its own system turn when the messages start
    without one (SmolLM2's does); a leading system message replaces it.

    Raises:
        ConfigError: the model has no chat template, or the conversation encodes to nothing.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this model has no chat template, so it cannot take chat messages")
    text = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError("the conversation is empty")
    return list(ids)


def stop_ids(tokenizer: Any, config: Any) -> tuple[int, ...]:
    """Token ids that end a generation: the tokenizer's and the model config's end-of-sequence ids."""
    found: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return tuple(sorted(found))


class TextStream:
    """Turns a growing list of token ids into text deltas, holding back incomplete multi-byte characters."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token: int) -> str:
        """Add one token; return the new text it completes (possibly empty)."""
        self._ids.append(token)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta = text[self._emitted :]
        self._emitted = len(text)
        return delta
