"""A multi-turn conversation kept within a token budget: pure data, no model.

A `Conversation` is an optional system prompt and the finished (user, assistant) turns; `messages(user)` lays them
out as chat messages with the next user message last. `fit` drops the oldest turns, never the system prompt, until
the templated conversation fits a budget; the caller counts tokens (with the model's tokenizer and template), so
this module stays free of models. `parse_messages` validates messages a peer sends (`edgellm.serve.device`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from edgellm.errors import ConfigError

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content")

# messages in order -> tokens they take in the model's chat template (with the assistant's prompt)
CountTokens = Callable[[list[dict[str, str]]], int]


@dataclass(frozen=True)
class Message:
    """One chat message: who says it (`system`, `user` or `assistant`) and the text."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"unknown message role {self.role!r}; choose from {list(ROLES)}")

    def to_json(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def check_text(what: str, text: str) -> str:
    """`text` if it is valid Unicode (encodable as UTF-8); JSON can carry a lone surrogate (`"\\ud800"`) that no
    tokenizer takes.

    Raises:
        ConfigError: naming `what` and where the bad character is.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{what} is not valid Unicode: a lone surrogate at character {exc.start}") from None
    return text


def parse_messages(data: Any) -> tuple[Message, ...]:
    """Validate a list of `{"role", "content"}` objects as one conversation to answer.

    The list is non-empty, a `system` message may only come first, and the last message is the user's.

    Raises:
        ConfigError: naming the message (by index) and what is wrong with it.
    """
    if not isinstance(data, list) or not data:
        raise ConfigError("messages must be a non-empty list of {role, content} objects")
    out = []
    for index, item in enumerate(data):
        if not isinstance(item, dict) or sorted(item) != sorted(MESSAGE_KEYS):
            keys = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise ConfigError(f"message {index} must be an object with exactly {list(MESSAGE_KEYS)}, got {keys}")
        if not isinstance(item["role"], str) or not isinstance(item["content"], str):
            raise ConfigError(f"message {index}: role and content must be strings")
        if item["role"] not in ROLES:
            raise ConfigError(f"message {index}: unknown role {item['role']!r}; choose from {list(ROLES)}")
        if item["role"] == "system" and index > 0:
            raise ConfigError(f"message {index}: a system message may only come first")
        out.append(Message(item["role"], check_text(f"message {index} content", item["content"])))
    if out[-1].role != "user":
        raise ConfigError(f"the last message must be the user's (the one to answer), got {out[-1].role!r}")
    return tuple(out)


@dataclass(frozen=True)
class Turn:
    """One exchange: what the user said and what the assistant answered."""

    user: str
    assistant: str


@dataclass(frozen=True)
class Conversation:
    """A system prompt (None: the model's template default, if any) and the turns so far, oldest first."""

    system: str | None = None
    turns: tuple[Turn, ...] = ()

    def messages(self, user: str | None = None) -> list[dict[str, str]]:
        """The conversation as chat messages; `user`, if given, is appended as the message to answer."""
        out = [] if self.system is None else [Message("system", self.system)]
        for turn in self.turns:
            out += [Message("user", turn.user), Message("assistant", turn.assistant)]
        if user is not None:
            out.append(Message("user", user))
        return [m.to_json() for m in out]

    def add(self, user: str, assistant: str) -> Conversation:
        """This conversation with one more finished turn."""
        return replace(self, turns=(*self.turns, Turn(user, assistant)))

    def reset(self) -> Conversation:
        """No turns; the same system prompt."""
        return replace(self, turns=())

    def fit(self, user: str, count_tokens: CountTokens, budget: int) -> tuple[Conversation, int]:
        """Drop the oldest turns until the messages with `user` last take at most `budget` tokens.

        Returns the fitted conversation and how many turns it dropped.

        Raises:
            ConfigError: even with no turns the system prompt and `user` take more than `budget` tokens.
        """
        for dropped in range(len(self.turns) + 1):
            kept = replace(self, turns=self.turns[dropped:])
            tokens = count_tokens(kept.messages(user))
            if tokens <= budget:
                return kept, dropped
        what = "the system prompt and this message take" if self.system is not None else "this message takes"
        raise ConfigError(
            f"{what} {tokens} tokens in the chat template, over the {budget} the context leaves beside the answer"
        )
