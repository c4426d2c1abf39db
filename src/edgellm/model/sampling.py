"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgellm.errors import ConfigError

MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. `greedy=True` ignores the other fields.

    Attributes:
        greedy: take the most likely token.
        temperature: divide logits by this (>= `MIN_TEMPERATURE`) before top-k/top-p.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set of tokens whose probability reaches p (1.0 = all).
        seed: seed of the sampling generator, for reproducible runs.
    """

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        # Below MIN_TEMPERATURE, logits / temperature overflows float32 and sampling would see NaN: use greedy.
        if not MIN_TEMPERATURE <= self.temperature < float("inf"):
            raise ConfigError(
                f"temperature must be in [{MIN_TEMPERATURE}, inf) (use greedy decoding for 0), got {self.temperature}"
            )
        if not -(2**63) <= self.seed < 2**64:
            raise ConfigError(f"seed must be an integer in [-2**63, 2**64), got {self.seed}")
        if self.top_k < 0:
            raise ConfigError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top-p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order transformers applies them); removed tokens get -inf.

    logits: [B, V] float -> [B, V] float
    """
    logits = logits / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - config.top_p)
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row.

    logits: [B, V] float -> [B] int64
    """
    if config.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float(), config).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
