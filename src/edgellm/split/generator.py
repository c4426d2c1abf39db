"""The generation loop: prefill, then one token at a time through a pipeline, streaming each step.

Between steps a hook may hand the loop a new pipeline (a live migration): the loop then opens a new session on
it by replaying every token fed so far as one prefill, and goes on with the pending token, so the tokens are
those the old pipeline would have produced.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from edgellm.errors import ConfigError, SessionError
from edgellm.model.sampling import SamplingConfig, next_tokens
from edgellm.split.pipeline import Pipeline

log = logging.getLogger(__name__)

MAX_RECOVERIES = 3  # lost sessions rebuilt by replay per generation before the error is raised


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


@dataclass(frozen=True)
class Migration:
    """A switch to a new pipeline before step `step` (tokens `[0, step)` came from the old one).

    Attributes:
        switch_ms: the hook's time to build the new pipeline (loading stages, reconfiguring nodes).
        replay_ms: the prefill that rebuilt the session's KV caches on the new pipeline.
        replayed_tokens: how many tokens that prefill carried (the prompt and the tokens fed back so far).
        replay_traces: how many of the new pipeline's `traces` the replay made (they come first).
        before, after: the old and the new pipeline's `layout` (a description, for reports).
    """

    step: int
    switch_ms: float
    replay_ms: float
    replayed_tokens: int
    replay_traces: int
    before: Any = None
    after: Any = None

    @property
    def ms(self) -> float:
        return self.switch_ms + self.replay_ms


# (step about to be fed, the real tokens fed so far per row) -> None, or the pipeline to continue on
BetweenSteps = Callable[[int, Sequence[Sequence[int]]], Pipeline | None]


@dataclass
class GenerationResult:
    """Tokens and timings of one finished generation. `new_tokens[b]` ends with the stop token if one came."""

    new_tokens: list[list[int]]
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    steps: int = 0
    migrations: list[Migration] = field(default_factory=list)
    speculative: dict[str, Any] | None = None  # drafting's account (`edgellm.spec`), when the run drafted
    recoveries: list[dict[str, Any]] = field(default_factory=list)  # sessions rebuilt by replay (`_forward`)

    @property
    def decode_tok_per_s(self) -> float:
        """Tokens per second after the first, over all rows."""
        decoded = sum(max(len(t) - 1, 0) for t in self.new_tokens)
        return decoded / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0


def close_after_failure(pipeline: Pipeline, session: str) -> None:
    """Release a failed generation's session on every stage; a failure to do so is logged, not raised (the
    original error matters more, and stages expire the session when idle)."""
    try:
        pipeline.close(session)
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("could not close session %s on every stage: %s", session, exc)


def replay_input(
    sent: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A session's inputs so far as one: ids and positions side by side, the padding mask kept (later steps
    have none: every row real). -> ids [B, T], positions [B, T], mask [B, T] | None"""
    ids = torch.cat([i for i, _, _ in sent], dim=1)
    positions = torch.cat([p for _, p, _ in sent], dim=1)
    if all(m is None for _, _, m in sent):
        return ids, positions, None
    mask = torch.cat([m if m is not None else torch.ones_like(i, dtype=torch.bool) for i, _, m in sent], dim=1)
    return ids, positions, mask


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
    """Generates from a pipeline; iterate `stream()` for tokens as they come, then read `result`.

    Args:
        pipeline: the hops to run.
        config: when to stop, how to choose tokens.
        between_steps: called before each decode step with (step index, the real tokens fed so far per row:
            prompt and tokens fed back, not the pending one); a returned pipeline, a new one whose accounting
            starts with the replay, replaces the current one (a live migration, batch 1 only). `pipelines`
            lists every pipeline used, in order.
        adapter: the LoRA adapter to generate with ("" = the base model), applied by every stage that holds
            some of its layers.
    """

    def __init__(
        self, pipeline: Pipeline, config: GenerationConfig, between_steps: BetweenSteps | None = None,
        adapter: str = "",
    ) -> None:  # fmt: skip
        self.adapter = adapter
        self.pipeline = pipeline
        self.pipelines = [pipeline]
        self.config = config
        self.between_steps = between_steps
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
        fed = [ids[row][mask[row]].tolist() for row in range(batch)] if self.between_steps else []
        # The repetition guard reads every row's real tokens, prompt and generated, so the device chooses
        seen = [ids[row][mask[row]].tolist() for row in range(batch)] if cfg.sampling.guarded else None
        session = secrets.token_hex(8)  # 64 random bits; short, since it rides every frame
        start = time.perf_counter()
        try:
            tokens = torch.empty(batch, dtype=torch.long)  # the previous step's choice, fed back
            # greedy and unguarded: the head stage replies with token ids, not the distribution
            greedy = cfg.sampling.greedy and seen is None
            sent: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # this session's inputs
            first = (ids, positions_for(mask), None if token_mask is None else mask)
            logits = self._forward(session, sent, first, greedy, result)
            for index in range(cfg.max_new_tokens):
                if index > 0 and self.between_steps is not None:
                    migrated = self._maybe_migrate(index, fed, session, result)
                    if migrated != session:  # the new pipeline's session holds everything fed so far at once
                        session, sent = migrated, [(torch.tensor(fed), torch.arange(len(fed[0])).view(1, -1), None)]
                    for row, token in enumerate(tokens.tolist()):
                        fed[row].append(token)
                if index > 0:  # feed back the previous step's tokens
                    step = (tokens.view(batch, 1), next_pos.view(batch, 1), None)
                    logits = self._forward(session, sent, step, greedy, result)
                    next_pos = next_pos + 1
                tokens = self._choose(logits, rng, seen)  # [B]
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
            close_after_failure(self.pipeline, session)
            raise
        self._finish(result, start)
        self.pipeline.close(session)

    def _forward(
        self,
        session: str,
        sent: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
        inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        greedy: bool,
        result: GenerationResult,
    ) -> torch.Tensor:
        """Send one input of the session (the prompt first, then each fed-back step) and keep it in `sent`.

        A stage that no longer holds the session (it restarted, evicted it when full, or its replica died and the
        hop moved the session: `edgellm.failover`) answers `SessionError`; the session is then rebuilt: closed
        everywhere and every input sent so far replayed as one prefill (`replay_input`: the KV caches equal the
        lost ones up to the rounding of a different chunking, as in a live migration), before this input is sent
        again. A replay that fails is one more failure. Up to `MAX_RECOVERIES` times per generation; each is
        recorded in `result.recoveries` (the failed call's and its replay's milliseconds).
        """
        replay_due = False
        while True:
            start = time.perf_counter()
            try:
                if replay_due:  # the previous failure's replay: the session's inputs so far, as one prefill
                    self._send(session, replay_input(sent), True, greedy)
                    result.recoveries[-1]["replay_ms"] = round((time.perf_counter() - start) * 1e3, 3)
                    replay_due, start = False, time.perf_counter()
                out = self._send(session, inputs, not sent, greedy)
                sent.append(inputs)
                return out
            except SessionError as exc:
                if len(result.recoveries) >= MAX_RECOVERIES:
                    raise
                failed_ms = (time.perf_counter() - start) * 1e3
                log.warning("session %s lost (%s): replaying its %d input(s)", session, exc, len(sent))
                close_after_failure(self.pipeline, session)
                replay_due = bool(sent)
                result.recoveries.append({"at_input": len(sent),
                                          "replayed_tokens": int(replay_input(sent)[0].shape[1]) if sent else 0,
                                          "failed_call_ms": round(failed_ms, 3), "replay_ms": 0.0,
                                          "error": str(exc)[:300]})  # fmt: skip

    def _send(
        self, session: str, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], new: bool, greedy: bool
    ) -> torch.Tensor:
        ids, positions, mask = inputs
        return self.pipeline.forward(session, ids, positions, mask, new, argmax=greedy,
                                     adapter=self.adapter if new else "")  # fmt: skip

    def _choose(self, logits: torch.Tensor, rng: torch.Generator, seen: list[list[int]] | None) -> torch.Tensor:
        """Each row's next token, from a step's logits (chosen here, guarded against repetition when `seen`, each
        row's tokens so far, is given; the choice is appended to it) or from the head's own choice.

        logits: [B, S, V] float, or [B, 1] int64 ids -> [B] int64
        """
        if not logits.is_floating_point():  # the head already chose
            return logits[:, -1]
        tokens = next_tokens(logits[:, -1], self.config.sampling, rng, seen)
        if seen is not None:
            for row, token in enumerate(tokens.tolist()):
                seen[row].append(token)
        return tokens

    def _maybe_migrate(self, index: int, fed: list[list[int]], session: str, result: GenerationResult) -> str:
        """Ask the hook; on a new pipeline, replay `fed` there as a new session. -> the session to go on with."""
        assert self.between_steps is not None
        switch_start = time.perf_counter()
        new = self.between_steps(index, fed)
        if new is None:
            return session
        switch_ms = (time.perf_counter() - switch_start) * 1e3
        if len(fed) != 1:
            raise ConfigError(f"a live migration replays one sequence; this generation has a batch of {len(fed)}")
        old = self.pipeline
        try:
            old.close(session)
        except Exception as exc:  # noqa: BLE001 - nodes that reloaded dropped it already; the rest expire it
            log.warning("could not close session %s on the old pipeline: %s", session, exc)
        session = secrets.token_hex(8)
        replay_start = time.perf_counter()
        replay = torch.tensor([fed[0]])  # [1, T]
        positions = torch.arange(replay.shape[1]).view(1, -1)  # [1, T]
        self.pipeline = new
        self.pipelines.append(new)
        new.forward(session, replay, positions, None, True, argmax=self.config.sampling.greedy, adapter=self.adapter)
        replay_ms = (time.perf_counter() - replay_start) * 1e3
        result.migrations.append(
            Migration(index, switch_ms, replay_ms, len(fed[0]), len(new.traces), old.layout, new.layout)
        )
        log.info("migrated before step %d: %.0f ms switch, %.0f ms replay", index, switch_ms, replay_ms)
        return session

    def _finish(self, result: GenerationResult, start: float) -> None:
        result.decode_ms = (time.perf_counter() - start) * 1e3 - result.ttft_ms
        self.result = result

    def run(self, ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> GenerationResult:
        """Generate to the end without streaming."""
        for _ in self.stream(ids, token_mask):
            pass
        assert self.result is not None
        return self.result
