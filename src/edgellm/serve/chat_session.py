"""A multi-turn chat over a loaded model: the conversation, kept within the context, and the engine that answers.

`ChatSession` keeps the `Conversation`, fits it to the context before each turn (dropping the oldest turns), asks
its backend for the answer and records the turn. A backend answers a list of chat messages and counts the tokens
they take: `edgellm.serve.local_engine.LocalChat` holds the model's stages in this process (loaded once, for every
turn); `DeploymentChat` sends the messages to a running deployment's device node. Each turn re-prefills the whole
conversation: simple, and correct whatever the backend does between turns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from edgellm.errors import ConfigError, PeerError
from edgellm.model.prompt import encode_messages
from edgellm.serve.conversation import Conversation

OnText = Callable[[str], None]


class ChatBackend(Protocol):
    """What answers a chat: a context size, a token count, and a generation from messages."""

    @property
    def context_tokens(self) -> int:
        """The most tokens one turn may take: the templated conversation plus the answer."""
        ...

    @property
    def max_new_tokens(self) -> int:
        """The most tokens one answer may take."""
        ...

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        """Tokens `messages` take in the model's chat template, with the assistant's prompt."""
        ...

    def generate(self, messages: list[dict[str, str]], on_text: OnText | None) -> dict[str, Any]:
        """Answer the last (user) message; returns a report with at least `text`, `new_tokens`, `ttft_ms` and
        `decode_tok_per_s`."""
        ...


@dataclass(frozen=True)
class ChatConfig:
    """The chat's own settings: the system prompt (None: the template's default) and an optional context limit
    below the backend's (`--max-context`)."""

    system: str | None = None
    max_context: int | None = None

    def __post_init__(self) -> None:
        if self.max_context is not None and self.max_context < 1:
            raise ConfigError(f"--max-context must be >= 1, got {self.max_context}")


@dataclass(frozen=True)
class ChatTurn:
    """One answered turn: the backend's report and how many old turns were dropped to fit it."""

    report: dict[str, Any]
    dropped_turns: int


class ChatSession:
    """A conversation with a backend; `ask` answers one user message in the context of the turns before it.

    Raises:
        ConfigError: (constructing) the model has no chat template, or the system prompt and `max_new_tokens`
            leave no room for a message in the context.
    """

    def __init__(self, backend: ChatBackend, config: ChatConfig = ChatConfig()) -> None:
        self.backend = backend
        self.config = config
        self.conversation = Conversation(config.system)
        limits = [backend.context_tokens, *([config.max_context] if config.max_context is not None else [])]
        self.context_tokens = min(limits)
        self.budget = self.context_tokens - backend.max_new_tokens  # tokens left for the templated conversation
        room = f"beside --max-new-tokens {backend.max_new_tokens} in a context of {self.context_tokens} tokens"
        if self.budget < 1:
            raise ConfigError(f"no room for the conversation {room}")
        system_tokens = backend.count_tokens(self.conversation.messages(""))  # also: the model has a template
        if system_tokens > self.budget:
            what = "the system prompt" if config.system is not None else "the chat template's default system prompt"
            raise ConfigError(f"{what} takes {system_tokens} tokens; only {self.budget} fit {room}")

    def ask(self, user: str, on_text: OnText | None = None) -> ChatTurn:
        """Answer `user`, dropping the oldest turns first if the conversation would not fit the context.

        Raises:
            ConfigError: the system prompt and `user` alone do not fit (the conversation is unchanged).
        """
        fitted, dropped = self.conversation.fit(user, self.backend.count_tokens, self.budget)
        report = self.backend.generate(fitted.messages(user), on_text)
        self.conversation = fitted.add(user, report["text"])
        return ChatTurn(report, dropped)

    def reset(self) -> None:
        """Forget every turn; keep the system prompt."""
        self.conversation = self.conversation.reset()


class GenerateHop(Protocol):
    """A device node's Generate call (`edgellm.net.rpc.RemoteHop`): events, then `{"report": ...}`."""

    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]: ...


class DeploymentChat:
    """A chat backend on a running deployment: the device node answers the messages (`messages` of its Generate
    request), and this side counts their tokens with the model's tokenizer to keep them within the context.

    Args:
        hop: the device node.
        tokenizer: the deployed model's tokenizer (its chat template counts the tokens).
        context_tokens: the deployment's `max_context` (the device node's `info`).
        max_new_tokens: the most tokens one answer may take.
        sampling: the decoding fields of the Generate request (greedy, temperature, top_k, top_p, seed).
    """

    def __init__(
        self, hop: GenerateHop, tokenizer: Any, context_tokens: int, max_new_tokens: int, sampling: Mapping[str, Any]
    ) -> None:
        if max_new_tokens < 1:
            raise ConfigError(f"max new tokens must be >= 1, got {max_new_tokens}")
        self.hop = hop
        self.tokenizer = tokenizer
        self._context_tokens = context_tokens
        self._max_new_tokens = max_new_tokens
        self.sampling = dict(sampling)

    @property
    def context_tokens(self) -> int:
        return self._context_tokens

    @property
    def max_new_tokens(self) -> int:
        return self._max_new_tokens

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(encode_messages(self.tokenizer, messages))

    def generate(self, messages: list[dict[str, str]], on_text: OnText | None) -> dict[str, Any]:
        request = {"messages": messages, "max_new_tokens": self._max_new_tokens, **self.sampling}
        report: dict[str, Any] = {}
        for event in self.hop.generate(request):
            if "report" in event:
                report = event["report"]
            elif on_text is not None and event.get("text"):
                on_text(event["text"])
        if "text" not in report:
            raise PeerError("the device node ended the generation without its report")
        return report
