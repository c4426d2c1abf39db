"""Perplexity of a chain of stages over a token sequence, with a sliding window: the accuracy yardstick for
quantized weights and compressed smashed data alike.

Each window feeds `ctx` tokens and scores the next `stride` targets (the first window all `ctx`), so every token
after the first is scored exactly once, with at least `ctx + 1 - stride` tokens of context (fewer only in the
first window). `stride == ctx` is the fastest (each window's inputs end where its targets do, as in
lm-evaluation-harness' rolling log-likelihood); a smaller stride gives each scored token more context.
The smashed-data codec, if any, is applied to every tensor that crosses a cut, exactly as on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.errors import ConfigError
from edgellm.net.codec import CodecSpec, decode_tensor, encode_tensor


@dataclass(frozen=True)
class PplConfig:
    """The sliding window.

    Attributes:
        ctx: tokens per window (>= 2).
        stride: tokens between window starts, 1..ctx; None means `ctx` (disjoint windows).
        max_tokens: evaluate only the first this many tokens of the text (None: all); at least ctx + 1.

    Raises:
        ConfigError: a value out of range.
    """

    ctx: int = 512
    stride: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.ctx < 2:
            raise ConfigError(f"--ctx must be >= 2, got {self.ctx}")
        if self.stride is not None and not 1 <= self.stride <= self.ctx:
            raise ConfigError(f"--stride must be in 1..ctx ({self.ctx}), got {self.stride}")
        if self.max_tokens is not None and self.max_tokens <= self.ctx:
            raise ConfigError(f"--max-tokens ({self.max_tokens}) must exceed --ctx ({self.ctx})")

    @property
    def step(self) -> int:
        return self.ctx if self.stride is None else self.stride


@dataclass(frozen=True)
class Window:
    """Tokens `[begin, end)` go in; the targets `[score_from, end + 1)` are scored (position p predicts p + 1)."""

    begin: int
    end: int
    score_from: int

    @property
    def scored(self) -> int:
        return self.end + 1 - self.score_from


def windows(num_tokens: int, config: PplConfig) -> list[Window]:
    """The windows over a sequence of `num_tokens` tokens; together they score tokens 1..num_tokens-1 once each.

    The first window scores `ctx` targets, each later one `stride` (the last possibly fewer); every window feeds
    the `ctx` tokens before its last target, so a target has at least `ctx + 1 - stride` tokens of context.

    Raises:
        ConfigError: fewer than `ctx + 1` tokens (one full window and the token after it).
    """
    if num_tokens < config.ctx + 1:
        raise ConfigError(
            f"the text has {num_tokens} tokens; one window of --ctx {config.ctx} needs {config.ctx + 1}: "
            "use a longer text or a smaller --ctx"
        )
    out: list[Window] = []
    first = 1  # token 0 has nothing before it
    while first < num_tokens:
        stop = min(first + (config.step if out else config.ctx), num_tokens)  # targets [first, stop)
        out.append(Window(max(0, stop - 1 - config.ctx), stop - 1, first))
        first = stop
    return out


@dataclass(frozen=True)
class PplResult:
    """Summed negative log-likelihood (nats) over `tokens` scored tokens, in `windows` windows."""

    nll_sum: float
    tokens: int
    windows: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens)


Hop = Callable[[torch.Tensor], torch.Tensor]


def codec_hop(spec: CodecSpec) -> Hop:
    """What a cut does to a tensor: encode it for the wire and decode it, back in its own dtype."""

    def hop(x: torch.Tensor) -> torch.Tensor:
        return decode_tensor(encode_tensor(x, spec)).to(x.dtype)

    return hop


def chain_logits(stages: Sequence[nn.Module], ids: torch.Tensor, hop: Hop | None = None) -> torch.Tensor:
    """Run token ids through the stages in order, applying `hop` at every cut.

    ids: [B, S] int64 -> float32 logits [B, S, V]
    """
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)  # [B, S]
    data = ids
    for i, stage in enumerate(stages):
        if i and hop is not None:
            data = hop(data)
        data = stage(data, positions)
    return data


OnWindow = Callable[[int, int], None]  # (windows done, windows in all); first called with 0 before any window


def evaluate_ppl(
    stages: Sequence[nn.Module],
    token_ids: Sequence[int] | torch.Tensor,
    config: PplConfig,
    hop: Hop | None = None,
    on_window: OnWindow | None = None,
) -> PplResult:
    """Perplexity of the chained stages over `token_ids` (one long sequence), window by window; `on_window`, if
    given, hears how many windows are done (for a progress bar).

    Raises:
        ConfigError: the sequence is shorter than one window.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if config.max_tokens is not None:
        ids = ids[: config.max_tokens]
    spans = windows(ids.numel(), config)
    nll = 0.0
    if on_window is not None:
        on_window(0, len(spans))
    with torch.inference_mode():
        for index, w in enumerate(spans):
            logits = chain_logits(stages, ids[w.begin : w.end].unsqueeze(0), hop)[0]  # [S, V]
            predicted = logits[w.score_from - 1 - w.begin :]  # [scored, V]
            nll += float(F.cross_entropy(predicted.float(), ids[w.score_from : w.end + 1], reduction="sum"))
            if on_window is not None:
                on_window(index + 1, len(spans))
    return PplResult(nll, ids.numel() - 1, len(spans))
