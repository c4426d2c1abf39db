"""The generation loop: prefill, then one token at a time through a pipeline, streaming each step."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from edgellm.errors import ConfigError
from edgellm.model.sampling import SamplingConfig, next_tokens
from edgellm.split.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationConfig:
    """When to stop and how to choose tokens."""

    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max new tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Step:
    """One generated token per row. `finished[b]` is True from the step that produced row b's stop token on."""

    index: int
    tokens: tuple[int, ...]
    finished: tuple[bool, ...]


@dataclass
class GenerationResult:
    """Tokens and timings of one finished generation. `new_tokens[b]` ends with the stop token if one came."""

    new_tokens: list[list[int]]
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    steps: int = 0

    @property
    def decode_tok_per_s(self) -> float:
        """Tokens per second after the first, over all rows."""
        decoded = sum(max(len(t) - 1, 0) for t in self.new_tokens)
        return decoded / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into a batch.

    -> ids [B, S] int64, token_mask [B, S] bool
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = True
    return ids, mask


def positions_for(token_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (padding anywhere gets a harmless position).

    token_mask: [B, S] bool -> [B, S] int64
    """
    return (token_mask.long().cumsum(-1) - 1).clamp(min=0)


class Generator:
    """Generates from a pipeline; iterate `stream()` for tokens as they come, then read `result`."""

    def __init__(self, pipeline: Pipeline, config: GenerationConfig) -> None:
        self.pipeline = pipeline
        self.config = config
        self.result: GenerationResult | None = None

    def stream(self, ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> Iterator[Step]:
        """Generate for a batch of prompts, yielding after every token.

        ids: [B, S] int64, token_mask: [B, S] bool | None (None = no padding)
        """
        cfg = self.config
        rng = torch.Generator().manual_seed(cfg.sampling.seed)
        batch = ids.shape[0]
        mask = token_mask if token_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        next_pos = mask.long().sum(-1)  # [B]
        result = GenerationResult(new_tokens=[[] for _ in range(batch)])
        finished = [False] * batch
        session = secrets.token_hex(8)  # 64 random bits; short, since it rides every frame
        start = time.perf_counter()
        try:
            tokens = torch.empty(batch, dtype=torch.long)  # the previous step's choice, fed back
            greedy = cfg.sampling.greedy  # then the head stage replies with token ids, not the distribution
            logits = self.pipeline.forward(
                session, ids, positions_for(mask), None if token_mask is None else mask, True, argmax=greedy
            )
            for index in range(cfg.max_new_tokens):
                if index > 0:  # feed back the previous step's tokens
                    logits = self.pipeline.forward(
                        session, tokens.view(batch, 1), next_pos.view(batch, 1), None, False, argmax=greedy
                    )
                    next_pos = next_pos + 1
                if logits.is_floating_point():
                    tokens = next_tokens(logits[:, -1], cfg.sampling, rng)  # [B]
                else:  # the head already chose: [B, 1] ids
                    tokens = logits[:, -1]
                if index == 0:
                    result.ttft_ms = (time.perf_counter() - start) * 1e3
                for row, token in enumerate(tokens.tolist()):
                    if not finished[row]:
                        result.new_tokens[row].append(token)
                        finished[row] = token in cfg.stop_ids
                result.steps = index + 1
                yield Step(index, tuple(tokens.tolist()), tuple(finished))
                if all(finished):
                    break
        except BaseException:  # a failed hop, or the consumer stopped early (GeneratorExit)
            self._finish(result, start)
            try:
                self.pipeline.close(session)
            except Exception as exc:  # noqa: BLE001 - keep the original error; stages expire the session when idle
                log.warning("could not close session %s on every stage: %s", session, exc)
            raise
        self._finish(result, start)
        self.pipeline.close(session)

    def _finish(self, result: GenerationResult, start: float) -> None:
        result.decode_ms = (time.perf_counter() - start) * 1e3 - result.ttft_ms
        self.result = result

    def run(self, ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> GenerationResult:
        """Generate to the end without streaming."""
        for _ in self.stream(ids, token_mask):
            pass
        assert self.result is not None
        return self.result
