"""A Generate request as a device node takes it: a prompt, chat messages or token ids, and how to decode them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edgellm.errors import ConfigError
from edgellm.model.prompt import encode_messages, encode_prompt
from edgellm.model.sampling import SamplingConfig
from edgellm.privacy.config import DPConfig
from edgellm.serve.conversation import Message, check_text, parse_messages
from edgellm.spec.config import DEFAULT_DRAFT, SpeculativeConfig

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_PROMPT_IDS = 1 << 20

# Field -> (type, default) of a Generate request.
GENERATE_FIELDS: dict[str, tuple[type, Any]] = {
    "prompt": (str, None),
    "messages": (list, None),  # [{role, content}, ...] in the chat template, instead of a prompt
    "chat": (bool, True),
    "max_new_tokens": (int, 64),
    "greedy": (bool, True),
    "temperature": (float, 1.0),
    "top_k": (int, 0),
    "top_p": (float, 1.0),
    "seed": (int, 0),
    "repetition_penalty": (float, 1.0),
    "no_repeat_ngram": (int, 0),
    "prompt_ids": (list, None),  # token ids of a prompt already built (no template applied again)
    "adapter": (str, None),  # the LoRA adapter to generate with; none: the base model
    "speculative": (str, None),  # "auto" or drafts per round (`edgellm.spec`); none: plain decoding
    "draft": (str, None),  # the drafter (`edgellm.spec.config.parse_draft`); none: the default one
    "dp": (dict, None),  # DP on the smashed data this generation sends (`DPConfig.from_json`); none: the topology's
}
PROMPT_FIELDS = ("prompt", "messages", "prompt_ids")
OPTIONAL_FIELDS = (*PROMPT_FIELDS, "adapter", "speculative", "draft", "dp")
SAMPLING_FIELDS = ("greedy", "temperature", "top_k", "top_p", "seed", "repetition_penalty", "no_repeat_ngram")


@dataclass(frozen=True)
class GenerateRequest:
    """A prompt (or chat messages, or token ids) and how to decode it, as sent to a device node."""

    prompt: str | None
    chat: bool = True
    max_new_tokens: int = 64
    sampling: SamplingConfig = SamplingConfig()
    messages: tuple[Message, ...] | None = None  # the conversation to answer, when no `prompt`
    ids: tuple[int, ...] | None = None  # the prompt's token ids, when neither `prompt` nor `messages`
    adapter: str | None = None  # the LoRA adapter; None: the base model
    speculative: SpeculativeConfig | None = None  # drafts and verification; None: plain decoding
    dp: DPConfig | None = None  # differential privacy on this generation's smashed data; None: the topology's

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerateRequest:
        """Validate a request object; unknown fields and wrong types are errors.

        Raises:
            ConfigError: naming the field.
        """
        unknown = set(data) - set(GENERATE_FIELDS)
        if unknown:
            raise ConfigError(f"unknown generate fields {sorted(unknown)}; valid: {sorted(GENERATE_FIELDS)}")
        values: dict[str, Any] = {}
        for name, (kind, default) in GENERATE_FIELDS.items():
            value = data.get(name, default)
            if value is None and name in OPTIONAL_FIELDS:  # exactly one prompt field, checked below
                values[name] = None
                continue
            if value is None:
                raise ConfigError(f"generate request needs {name!r}")
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"generate field {name!r} must be {kind.__name__}, got {type(value).__name__}")
            values[name] = value
        sampling = SamplingConfig(**{name: values[name] for name in SAMPLING_FIELDS})
        if sum(values[name] is not None for name in PROMPT_FIELDS) != 1:
            raise ConfigError("generate request needs exactly one of 'prompt', 'messages' and 'prompt_ids'")
        messages = None if values["messages"] is None else parse_messages(values["messages"])
        if messages is not None and not values["chat"]:
            raise ConfigError("generate field 'chat' must be true with 'messages' (they always use the chat template)")
        if values["prompt"] is not None:
            check_text("generate field 'prompt'", values["prompt"])
        ids = None if values["prompt_ids"] is None else _token_ids(values["prompt_ids"])
        adapter = values["adapter"]
        if adapter is not None and not ADAPTER_NAME.fullmatch(adapter):
            raise ConfigError(f"generate field 'adapter' is not an adapter name: {adapter[:80]!r}")
        if values["draft"] is not None and values["speculative"] is None:
            raise ConfigError("generate field 'draft' needs 'speculative' ('auto' or drafts per round)")
        speculative = None
        if values["speculative"] is not None:
            speculative = SpeculativeConfig.parse(values["speculative"], values["draft"] or DEFAULT_DRAFT)
        dp = None if values["dp"] is None else DPConfig.from_json(values["dp"], "generate field 'dp'")
        return cls(values["prompt"], values["chat"], values["max_new_tokens"], sampling, messages, ids, adapter,
                   speculative, dp)  # fmt: skip

    def prompt_ids(self, tokenizer: Any) -> list[int]:
        """The prompt's token ids: the messages in the chat template, or the prompt (wrapped in it if `chat`)."""
        if self.ids is not None:
            return list(self.ids)
        if self.messages is not None:
            return encode_messages(tokenizer, [m.to_json() for m in self.messages])
        assert self.prompt is not None  # from_json allows exactly one of them
        return encode_prompt(tokenizer, self.prompt, self.chat)


def _token_ids(value: list[Any]) -> tuple[int, ...]:
    if not value:
        raise ConfigError("generate field 'prompt_ids' needs at least one token id")
    if len(value) > MAX_PROMPT_IDS:
        raise ConfigError(f"generate field 'prompt_ids' has {len(value)} ids, more than {MAX_PROMPT_IDS}")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 31 for i in value):
        raise ConfigError("generate field 'prompt_ids' must be a list of non-negative integer token ids")
    return tuple(value)
