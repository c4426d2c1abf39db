"""Which drafted tokens the target model keeps: exact match for greedy decoding, the rejection rule for sampling.

The sampling rule is Leviathan et al.'s (2023) and Chen et al.'s (2023): draft token `d_i`, drawn from the
drafter's distribution `q_i`, is kept with probability `min(1, p_i(d_i) / q_i(d_i))` where `p_i` is the target's;
at the first rejection the next token is drawn from `max(p_i - q_i, 0)` renormalised, and when every draft is kept
a bonus token is drawn from `p_{k+1}`. Each emitted token is then distributed exactly as the target's would be.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgellm.model.sampling import SamplingConfig, filter_logits, guard_repetition


@dataclass(frozen=True)
class Verdict:
    """The outcome of one verification: the first `accepted` drafts are kept, then `token` (the target's own
    choice at the first rejected place, or the bonus token after the last draft)."""

    accepted: int
    token: int

    def emitted(self, drafts: Sequence[int]) -> list[int]:
        """The tokens this round adds to the sequence, in order."""
        return [*drafts[: self.accepted], self.token]


def accept_greedy(drafts: Sequence[int], target: Sequence[int]) -> Verdict:
    """Keep drafts while each equals the target's most likely token at its place.

    drafts: k tokens; target: the target's choice after the context and after each draft (k + 1 tokens).
    """
    if len(target) != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} target tokens, got {len(target)}")
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == target[accepted]:
        accepted += 1
    return Verdict(accepted, int(target[accepted]))


def accept_sampled(
    drafts: Sequence[int], p: torch.Tensor, q: torch.Tensor, generator: torch.Generator | None
) -> Verdict:
    """The rejection rule over the target's and the drafter's distributions.

    drafts: k tokens; p: [k + 1, V] the target's probabilities at each place; q: [k, V] the drafter's, from which
    each draft was drawn.
    """
    k = len(drafts)
    if p.shape[0] != k + 1 or q.shape[0] != k:
        raise ValueError(f"{k} drafts need p of {k + 1} rows and q of {k}, got {p.shape[0]} and {q.shape[0]}")
    for i, token in enumerate(drafts):
        ratio = float(p[i, token]) / max(float(q[i, token]), 1e-30)
        if float(torch.rand((), generator=generator)) < ratio:
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        total = float(residual.sum())
        # p == q everywhere cannot reject; a float tie that does falls back to p itself
        weights = residual / total if total > 0 else p[i]
        return Verdict(i, int(torch.multinomial(weights, 1, generator=generator)))
    return Verdict(k, int(torch.multinomial(p[k], 1, generator=generator)))


def place_probs(
    logits: torch.Tensor, config: SamplingConfig, history: Sequence[int], drafts: Sequence[int]
) -> torch.Tensor:
    """The sampling distribution at each place of a round: after the history, and after each draft in turn (the
    repetition guard, when on, sees the drafts before each place as already generated).

    logits: [n, V] float (n <= len(drafts) + 1) -> [n, V] float32 probabilities
    """
    rows = []
    for i in range(logits.shape[0]):
        row = logits[i : i + 1].float()
        if config.guarded:
            row = guard_repetition(row, [[*history, *drafts[:i]]], config)
        rows.append(filter_logits(row, config).softmax(dim=-1))
    return torch.cat(rows)


def guarded_argmax(
    logits: torch.Tensor, config: SamplingConfig, history: Sequence[int], drafts: Sequence[int]
) -> list[int]:
    """Greedy choices at each place of a round with the repetition guard applied as `place_probs` does.

    logits: [n, V] float -> n token ids
    """
    out = []
    for i in range(logits.shape[0]):
        row = logits[i : i + 1].float()
        if config.guarded:
            row = guard_repetition(row, [[*history, *drafts[:i]]], config)
        out.append(int(row.argmax(dim=-1)))
    return out
