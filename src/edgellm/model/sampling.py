"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a seed; a repetition
guard (CTRL's repetition penalty, a ban on repeated n-grams) before either; and spotting a generation stuck in a loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from edgellm.errors import ConfigError

MIN_TEMPERATURE = 1e-4
# A penalty outside this range would push float32 logits to +-inf (and sampling to NaN); CTRL suggests 1.2.
PENALTY_RANGE = (1e-3, 1e3)


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. `greedy=True` ignores temperature, top-k, top-p and seed; the repetition guard
    (`repetition_penalty`, `no_repeat_ngram`) applies to greedy and sampled decoding alike, before either.

    Attributes:
        greedy: take the most likely token.
        temperature: divide logits by this (>= `MIN_TEMPERATURE`) before top-k/top-p.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set of tokens whose probability reaches p (1.0 = all).
        seed: seed of the sampling generator, for reproducible runs.
        repetition_penalty: CTRL's penalty on every token already seen (prompt and generated): a positive logit is
            divided by it, a negative one multiplied (1.0 = off; > 1 discourages repeats; in `PENALTY_RANGE`).
        no_repeat_ngram: never complete an n-gram of this size that already occurs in the prompt and generated
            tokens (0 = off).
    """

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0

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
        low, high = PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise ConfigError(
                f"repetition penalty must be in [{low:g}, {high:g}] (1.0 = off), got {self.repetition_penalty}"
            )
        if self.no_repeat_ngram < 0:
            raise ConfigError(f"no-repeat n-gram size must be >= 0 (0 = off), got {self.no_repeat_ngram}")

    @property
    def guarded(self) -> bool:
        """Whether the repetition guard is on (then choosing a token needs the logits and the token history)."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram > 0

    def to_json(self) -> dict[str, Any]:
        """The fields by name, as a device node's generate request carries them."""
        return asdict(self)


def penalize_repetition(logits: torch.Tensor, history: Sequence[Sequence[int]], penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (transformers' `RepetitionPenaltyLogitsProcessor`): the logit of each token in a
    row's history is divided by `penalty` if positive, else multiplied, once however often the token occurred.

    logits: [B, V] float, history: B token lists (ids >= V are ignored) -> [B, V] float
    """
    out = logits.clone()
    vocab = logits.shape[-1]
    for row, seen in enumerate(history):
        ids = torch.tensor(sorted({t for t in seen if 0 <= t < vocab}), dtype=torch.long)
        score = out[row, ids]
        out[row, ids] = torch.where(score < 0, score * penalty, score / penalty)
    return out


def ban_repeated_ngrams(logits: torch.Tensor, history: Sequence[Sequence[int]], size: int) -> torch.Tensor:
    """Forbid (-inf) every token that would complete an n-gram of `size` already in the row's history
    (transformers' `NoRepeatNGramLogitsProcessor`).

    logits: [B, V] float, history: B token lists -> [B, V] float
    """
    out = logits.clone()
    vocab = logits.shape[-1]
    for row, seen in enumerate(history):
        if len(seen) < size:
            continue
        tokens = torch.tensor(list(seen), dtype=torch.long)  # [T]
        windows = tokens.unfold(0, size, 1)  # [T - size + 1, size]
        prefix = tokens[len(seen) + 1 - size :]  # [size - 1]: the n-gram the next token would complete
        banned = windows[(windows[:, :-1] == prefix).all(dim=-1), -1]
        out[row, banned[banned < vocab]] = float("-inf")
    return out


def guard_repetition(logits: torch.Tensor, history: Sequence[Sequence[int]], config: SamplingConfig) -> torch.Tensor:
    """The repetition guard of `config` (penalty, then the n-gram ban, as transformers orders them); a no-op when off.

    logits: [B, V] float, history: B token lists (prompt and generated so far) -> [B, V] float
    """
    if config.repetition_penalty != 1.0:
        logits = penalize_repetition(logits, history, config.repetition_penalty)
    if config.no_repeat_ngram > 0:
        logits = ban_repeated_ngrams(logits, history, config.no_repeat_ngram)
    return logits


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


def next_tokens(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None,
    history: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Pick one token per row; with the repetition guard on, `history` (each row's prompt and generated tokens)
    is required.

    logits: [B, V] float -> [B] int64

    Raises:
        ValueError: the guard is on and no history was given (a bug in the caller).
    """
    if config.guarded:
        if history is None:
            raise ValueError("the repetition guard needs each row's token history")
        logits = guard_repetition(logits.float(), history, config)
    if config.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float(), config).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def detect_loop(tokens: Sequence[int], max_period: int = 64, min_repeats: int = 3, min_tokens: int = 12) -> bool:
    """Whether a generation ended stuck in a loop: its last tokens repeat a block of `p <= max_period` tokens at
    least `min_repeats` times in a row, over at least `min_tokens` tokens (so "!!!" or a short echo does not count).
    A block may be a phrase ("la femme, la femme, la femme, ...") or a whole sentence.

    tokens: the generated tokens, in order.
    """
    for period in range(1, max_period + 1):
        span = max(period * min_repeats, min_tokens)
        if span > len(tokens):
            break
        tail = list(tokens[-span:])
        if tail[period:] == tail[:-period]:
            return True
    return False
