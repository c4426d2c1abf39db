"""The device's drafter: a small model with its own KV cache that proposes the next tokens of a sequence.

A `DraftModel` holds weights (the target model quantized to 4 bits, a smaller model with the same tokenizer, or
the device's first layers with a trained exit head: `edgellm.spec.exit_head`); each generation drafts through
its own `DraftSession`, which keeps the drafter's KV cache in step with the tokens the target has accepted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from edgellm.model.kv import KVCache
from edgellm.model.sampling import SamplingConfig
from edgellm.spec.accept import guarded_argmax, place_probs
from edgellm.split import compute_thread


class DraftNet(Protocol):
    """What drafts: a model with its embedding and a head (`edgellm.model.stage.Stage` holding every layer, or an
    exit head over the first layers)."""

    max_length: int

    def new_cache(self) -> KVCache: ...

    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
        token_mask: torch.Tensor | None = None, last_only: bool = False,
    ) -> torch.Tensor: ...  # fmt: skip  # ids [1, S], positions [1, S] -> logits [1, 1, V] with last_only


@dataclass(frozen=True)
class Draft:
    """A round's proposals: `tokens`, and with sampling `q` [k, V], the distribution each was drawn from."""

    tokens: list[int]
    q: torch.Tensor | None = None
    catch_up_ms: float = 0.0  # of the drafting time, feeding the drafter more than a round's usual two tokens


class DraftModel:
    """A drafter's weights, shared by every generation on the device.

    Args:
        net: the model that drafts.
        label: what it is, for reports ("int4-g32", "exit@15 (rank 64)", a model name).
        compute_scale: the device's emulated slowness (`edgellm.split.budget.NodeEmulation`): drafting waits
            `compute_scale - 1` times its computation, as the device's stages do.
        weight_bytes: the drafter's weights in memory, for reports.
    """

    def __init__(self, net: DraftNet, label: str, compute_scale: float = 1.0, weight_bytes: int = 0) -> None:
        self.net = net
        self.label = label
        self.compute_scale = compute_scale
        self.weight_bytes = weight_bytes

    def session(self) -> DraftSession:
        return DraftSession(self)

    def describe(self) -> dict[str, Any]:
        return {"drafter": self.label, "draft_weight_mb": round(self.weight_bytes / 1e6, 1),
                "draft_compute_scale": self.compute_scale}  # fmt: skip


class DraftSession:
    """One generation's drafting: the drafter's KV cache holds a prefix of the sequence the target accepted."""

    def __init__(self, model: DraftModel) -> None:
        self.model = model
        self.cache = model.net.new_cache()
        self.cached: list[int] = []  # the tokens whose keys the cache holds

    def propose(
        self, context: Sequence[int], k: int, sampling: SamplingConfig, generator: torch.Generator | None
    ) -> Draft:
        """Draft `k` tokens to follow `context` (every token of the sequence so far, prompt included), greedily or
        by `sampling` (then `Draft.q` holds the distributions they were drawn from)."""
        if k < 1:
            return Draft([])

        def work() -> Draft:
            with torch.inference_mode():
                return self._draft(list(context), k, sampling, generator)

        start = time.perf_counter()
        draft = compute_thread.run(work)  # the thread that computes fastest (`edgellm.split.compute_thread`)
        scale = self.model.compute_scale
        if scale > 1.0:  # an emulated slower device
            time.sleep((scale - 1.0) * (time.perf_counter() - start))
        return replace(draft, catch_up_ms=draft.catch_up_ms * scale)

    def _draft(self, context: list[int], k: int, sampling: SamplingConfig, generator: torch.Generator | None) -> Draft:
        keep = 0
        limit = min(len(self.cached), len(context) - 1)  # the last token is always fed: its logits are needed
        while keep < limit and self.cached[keep] == context[keep]:
            keep += 1
        self.cache.truncate(keep)
        self.cached = self.cached[:keep]
        start = time.perf_counter()
        logits = self._feed(context[keep:])
        # the first round feeds the whole prompt: a one-off, not what each round costs (`edgellm.spec.cost`)
        catch_up_ms = (time.perf_counter() - start) * 1e3 if len(context) - keep > 2 else 0.0
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        for i in range(k):
            if sampling.greedy:
                token = (
                    guarded_argmax(logits, sampling, context, tokens)[0] if sampling.guarded else int(logits.argmax())
                )
            else:
                q = place_probs(logits, sampling, [*context, *tokens], [])
                token = int(torch.multinomial(q[0], 1, generator=generator))
                dists.append(q)
            tokens.append(token)
            if i + 1 < k:
                logits = self._feed([token])
        return Draft(tokens, torch.cat(dists) if dists else None, catch_up_ms)

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Run the drafter over `tokens` after what it holds. -> logits [1, V] after the last one"""
        start = len(self.cached)
        ids = torch.tensor([tokens], dtype=torch.long)
        positions = torch.arange(start, start + len(tokens)).view(1, -1)
        logits = self.model.net(ids, positions, self.cache, None, True)  # [1, 1, V]
        self.cached.extend(tokens)
        return logits[0]
