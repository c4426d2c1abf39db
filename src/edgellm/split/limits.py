"""A stage host's limits: sessions, idle expiry, context, prefill chunk and batch size."""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.errors import ConfigError

MAX_BATCH = 32  # sessions' decode steps in one forward pass (docs/SERVING.md: throughput against batch size)
# A full host makes room by evicting a session idle this long, least recently used first. A generation's steps
# come tens to hundreds of milliseconds apart, so a session idle for seconds was abandoned (its device crashed or
# walked away) or is between answers; one evicted while its device still wants it is rebuilt by the device's
# replay (`edgellm.split.generator`), so abandoned sessions lock new users out for at most this long.
EVICT_IDLE_S = 2.0
PREFILL_CHUNK = 512  # tokens per forward pass of a long prompt (docs/BENCHMARKS.md: the TTFT it costs)


@dataclass(frozen=True)
class SessionLimits:
    """How many sessions a host keeps, for how long an idle one survives, and how long one may grow.

    `max_context` (tokens; None = the model's own limit) is what each session's KV cache is reserved for in the
    node's memory budget, so no request may reach a position past it. `prefill_chunk` (tokens; None = whole)
    bounds one forward pass: a longer prompt runs as consecutive passes over the session's cache, so its
    activations never exceed those of `prefill_chunk` tokens. A full host makes room for a new session by
    evicting one idle for `evict_idle_s` or more, least recently used first. `max_batch` bounds how many
    sessions' decode steps run in one forward pass (continuous batching).
    """

    max_sessions: int = 64
    idle_timeout_s: float = 600.0
    max_context: int | None = None
    prefill_chunk: int | None = PREFILL_CHUNK
    evict_idle_s: float = EVICT_IDLE_S
    max_batch: int = MAX_BATCH

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_sessions < 1:
            raise ConfigError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if not self.idle_timeout_s > 0:
            raise ConfigError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s}")
        if not self.evict_idle_s >= 0:
            raise ConfigError(f"evict_idle_s must be >= 0, got {self.evict_idle_s}")
        if self.max_context is not None and self.max_context < 1:
            raise ConfigError(f"max_context must be >= 1, got {self.max_context}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
