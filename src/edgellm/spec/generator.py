"""The speculative generation loop: draft on the device, verify through the split, keep the accepted prefix.

Each round the drafter proposes `k` tokens after the pending one (the token chosen last, not yet fed); the
pipeline runs the pending token and the drafts as one chunk through every stage, whose head scores all `k + 1`
places; the longest accepted prefix and the target's own next token are kept (`edgellm.spec.accept`). The next
round's request starts at the first place not kept, and every stage host drops the keys past it on arrival
(`edgellm.split.host`), so no rollback message crosses the network. With greedy decoding the tokens are the
target's greedy tokens; with sampling they follow the target's distribution.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from edgellm.errors import ConfigError, SessionError
from edgellm.spec.accept import Verdict, accept_greedy, accept_sampled, guarded_argmax, place_probs
from edgellm.spec.config import SpeculativeConfig
from edgellm.spec.cost import AdaptiveK
from edgellm.spec.drafter import DraftModel
from edgellm.split.generator import MAX_RECOVERIES, GenerationConfig, GenerationResult, Step, close_after_failure
from edgellm.split.pipeline import Pipeline


@dataclass
class SpecStats:
    """What the rounds of one generation did (`rounds`: verification passes after the prompt)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens the rounds produced (the first token, from the prompt, is not a round's)
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    k_counts: dict[int, int] = field(default_factory=dict)

    def to_json(self, drafter: DraftModel, config: SpeculativeConfig, costs: Any) -> dict[str, Any]:
        rounds = max(self.rounds, 1)
        return {
            **drafter.describe(),
            "k": "auto" if config.k is None else config.k,
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else None,
            "tokens_per_round": round(self.emitted / rounds, 3) if self.rounds else None,
            "draft_ms": round(self.draft_ms, 3),
            "verify_ms": round(self.verify_ms, 3),
            "verify_ms_per_round": round(self.verify_ms / rounds, 3) if self.rounds else None,
            "k_counts": {str(k): n for k, n in sorted(self.k_counts.items())},
            "cost_model": None if costs is None else {key: round(value, 4) for key, value in vars(costs).items()},
        }


class SpeculativeGenerator:
    """Generates one sequence with drafts; `stream()` and `result` as `edgellm.split.generator.Generator`.

    Args:
        pipeline: the target model's hops.
        config: when to stop, how to choose tokens.
        drafter: the drafter's weights (each generation opens its own `DraftSession`).
        speculative: drafts per round (fixed, or auto).
        adapter: the LoRA adapter every stage runs the session with ("" = the base model; the drafter is not
            adapted, so an adapter lowers acceptance, never correctness).
    """

    def __init__(
        self, pipeline: Pipeline, config: GenerationConfig, drafter: DraftModel, speculative: SpeculativeConfig,
        adapter: str = "",
    ) -> None:  # fmt: skip
        self.pipeline = pipeline
        self.pipelines = [pipeline]
        self.config = config
        self.drafter = drafter
        self.speculative = speculative
        self.adapter = adapter
        self.result: GenerationResult | None = None
        self.stats = SpecStats()
        self.chooser = AdaptiveK(speculative.k_max, speculative.k)

    def stream(self, ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> Iterator[Step]:
        """Generate after one prompt, yielding after every token (several per round as they are accepted).

        ids: [1, S] int64, token_mask: None or all True
        """
        if ids.shape[0] != 1 or (token_mask is not None and not bool(token_mask.all())):
            raise ConfigError(f"speculative decoding generates one unpadded sequence; got a batch of {ids.shape[0]}")
        cfg, sampling = self.config, self.config.sampling
        rng = torch.Generator().manual_seed(sampling.seed)
        context = ids[0].tolist()  # the tokens every stage's cache holds (once the pending one is fed)
        result = GenerationResult(new_tokens=[[]])
        self.result = None
        session = secrets.token_hex(8)
        drafting = self.drafter.session()
        head_ids = sampling.greedy and not sampling.guarded  # the head replies with token ids, not distributions
        start = time.perf_counter()
        try:
            positions = torch.arange(len(context)).view(1, -1)
            out = self._forward(session, ids, positions, [], result, argmax=head_ids)
            pending = self._verdict(out, [], None, context, rng).token
            result.ttft_ms = (time.perf_counter() - start) * 1e3
            yield from self._emit(result, [pending])
            while not self._done(result):
                room = cfg.max_new_tokens - len(result.new_tokens[0]) - 1
                k = self.chooser.next_k(room)
                t0 = time.perf_counter()
                draft = drafting.propose([*context, pending], k, sampling, rng)
                t1 = time.perf_counter()
                feed = torch.tensor([[pending, *draft.tokens]])
                positions = torch.arange(len(context), len(context) + k + 1).view(1, -1)
                out = self._forward(session, feed, positions, context, result, last_only=k == 0, argmax=head_ids)
                t2 = time.perf_counter()
                context.append(pending)
                verdict = self._verdict(out, draft.tokens, draft.q, context, rng)
                self._account(k, verdict, (t1 - t0) * 1e3, (t2 - t1) * 1e3, draft.catch_up_ms)
                context.extend(draft.tokens[: verdict.accepted])
                emitted = verdict.emitted(draft.tokens)
                pending = emitted[-1]
                yield from self._emit(result, emitted)
        except BaseException:  # a failed hop, or the consumer stopped early (GeneratorExit)
            self._finish(result, start)
            close_after_failure(self.pipeline, session)
            raise
        self._finish(result, start)
        self.pipeline.close(session)

    def _forward(
        self, session: str, feed: torch.Tensor, positions: torch.Tensor, context: list[int],
        result: GenerationResult, **kwargs: Any,
    ) -> torch.Tensor:  # fmt: skip
        """One call of the session (`context` empty: its first, the prompt). A stage that lost the session
        (restart, eviction, a dead replica: `SessionError`) gets it rebuilt, as `split.generator` does: closed
        everywhere, `context` (every token the caches hold before `feed`) replayed as one prefill, then `feed`
        sent again; at most `MAX_RECOVERIES` times per generation, each in `result.recoveries`.

        feed: [1, n] int64, positions: [1, n] int64
        """
        replay_due = False
        while True:
            start = time.perf_counter()
            try:
                if replay_due:
                    replay = torch.tensor([context])  # [1, T]
                    self.pipeline.forward(session, replay, torch.arange(len(context)).view(1, -1), None, True,
                                          argmax=True, adapter=self.adapter)  # fmt: skip
                    result.recoveries[-1]["replay_ms"] = round((time.perf_counter() - start) * 1e3, 3)
                    replay_due, start = False, time.perf_counter()
                return self.pipeline.forward(session, feed, positions, None, not context,
                                             adapter=self.adapter if not context else "", **kwargs)  # fmt: skip
            except SessionError as exc:
                if len(result.recoveries) >= MAX_RECOVERIES:
                    raise
                failed_ms = (time.perf_counter() - start) * 1e3
                close_after_failure(self.pipeline, session)
                replay_due = bool(context)
                result.recoveries.append({"at_input": len(context), "replayed_tokens": len(context),
                                          "failed_call_ms": round(failed_ms, 3), "replay_ms": 0.0,
                                          "error": str(exc)[:300]})  # fmt: skip

    def _verdict(
        self, out: torch.Tensor, drafts: list[int], q: torch.Tensor | None, history: list[int], rng: torch.Generator
    ) -> Verdict:
        """Accept drafts from the head's reply: token ids [1, k + 1], or logits [1, k + 1, V]."""
        sampling = self.config.sampling
        if not out.is_floating_point():
            return accept_greedy(drafts, out[0].tolist())
        logits = out[0]
        if sampling.greedy:
            return accept_greedy(drafts, guarded_argmax(logits, sampling, history, drafts))
        p = place_probs(logits, sampling, history, drafts)
        if not drafts:
            return Verdict(0, int(torch.multinomial(p[0], 1, generator=rng)))
        assert q is not None
        return accept_sampled(drafts, p, q, rng)

    def _account(self, k: int, verdict: Verdict, draft_ms: float, verify_ms: float, catch_up_ms: float) -> None:
        stats = self.stats
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += verdict.accepted
        stats.emitted += verdict.accepted + 1
        stats.draft_ms += draft_ms
        stats.verify_ms += verify_ms
        stats.k_counts[k] = stats.k_counts.get(k, 0) + 1
        self.chooser.record(k, verdict.accepted, draft_ms - catch_up_ms, verify_ms)

    def _emit(self, result: GenerationResult, tokens: list[int]) -> Iterator[Step]:
        out = result.new_tokens[0]
        for token in tokens:
            if self._done(result):
                return
            out.append(token)
            result.steps = len(out)
            yield Step(len(out) - 1, (token,), (token in self.config.stop_ids,))

    def _done(self, result: GenerationResult) -> bool:
        out = result.new_tokens[0]
        return len(out) >= self.config.max_new_tokens or (bool(out) and out[-1] in self.config.stop_ids)

    def _finish(self, result: GenerationResult, start: float) -> None:
        result.decode_ms = (time.perf_counter() - start) * 1e3 - result.ttft_ms
        result.speculative = self.stats.to_json(self.drafter, self.speculative, self.chooser.costs())
        self.result = result
