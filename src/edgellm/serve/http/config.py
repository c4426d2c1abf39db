"""The HTTP server's settings: one frozen config, validated where it is built."""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.errors import ConfigError

DEFAULT_PORT = 8000
DEFAULT_MAX_CONCURRENT = 32
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class ServeConfig:
    """How `create_app` serves an engine.

    Attributes:
        api_key: the bearer token every /v1, /admin and /metrics request must carry; None serves them openly.
        max_concurrent: generations in flight at once; one more is refused with 429 and `Retry-After`.
        max_tokens_default: new tokens when a request gives no `max_tokens` (lowered to what the context leaves).
        retry_after_s: the `Retry-After` seconds of a 429 or 503.
        model_id: the base model's id in /v1/models; None takes the engine's model name.
        speculative: the generate fields (`speculative`, `draft`) every generation runs with (`edgellm.spec`);
            None: plain decoding.
    """

    api_key: str | None = None
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    max_tokens_default: int = DEFAULT_MAX_TOKENS
    retry_after_s: int = 1
    model_id: str | None = None
    speculative: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty; give a non-empty key or none")
        if self.max_concurrent < 1:
            raise ConfigError(f"max concurrent generations must be >= 1, got {self.max_concurrent}")
        if self.max_tokens_default < 1:
            raise ConfigError(f"default max tokens must be >= 1, got {self.max_tokens_default}")
        if self.retry_after_s < 0:
            raise ConfigError(f"retry-after must be >= 0 seconds, got {self.retry_after_s}")
