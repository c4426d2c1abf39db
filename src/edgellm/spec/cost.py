"""How many tokens to draft per round: a cost model fed by what the rounds so far measured.

A round drafts `k` tokens (`k` draft steps on the device) and verifies them in one pass through the split (one
round trip over every link, the stages' compute over `k + 1` tokens). With each draft accepted with probability
`alpha`, independently, a round yields `(1 - alpha^(k+1)) / (1 - alpha)` tokens on average (Leviathan et al.,
2023). `best_k` picks the `k` with the most tokens per millisecond; `k = 0` is plain decoding (no draft, one
token per round trip), so a drafter that costs more than it saves is switched off.
"""

from __future__ import annotations

from dataclasses import dataclass

ALPHA_PRIOR = 0.6  # acceptance assumed before any round has measured it
PRIOR_WEIGHT = 4.0  # ... worth this many drafted tokens
EMA = 0.3  # weight of the newest measurement of a time
PROBE_EVERY = 16  # rounds without drafts before one probe round re-measures the drafter


def expected_tokens(alpha: float, k: int) -> float:
    """Mean tokens one round yields: the accepted drafts plus the target's own token."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass(frozen=True)
class RoundCosts:
    """What a round costs, in milliseconds.

    Attributes:
        draft_ms: one draft step on the device.
        verify_ms: a verification pass of one token (plain decoding's step: round trips, transfer, compute).
        verify_ms_per_draft: what each drafted token adds to the verification pass.
        alpha: the probability that a draft is accepted.
    """

    draft_ms: float
    verify_ms: float
    verify_ms_per_draft: float
    alpha: float

    def round_ms(self, k: int) -> float:
        return k * (self.draft_ms + self.verify_ms_per_draft) + self.verify_ms

    def tokens_per_ms(self, k: int) -> float:
        return expected_tokens(self.alpha, k) / self.round_ms(k)


def best_k(costs: RoundCosts, k_max: int) -> int:
    """The number of drafts in `0..k_max` with the most expected tokens per millisecond (ties: fewer drafts)."""
    best, best_rate = 0, costs.tokens_per_ms(0)
    for k in range(1, k_max + 1):
        rate = costs.tokens_per_ms(k)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = k, rate
    return best


class AdaptiveK:
    """Chooses each round's `k` from the rounds measured so far (`fixed` pins it instead).

    Times are moving averages of wall-clock measurements, so link emulation, compute emulation and contention all
    count. The first round after the prompt is plain, measuring `verify_ms`; the second drafts `probe_k` tokens,
    measuring the drafter; after that `best_k` decides, and while it says 0 a probe round every `PROBE_EVERY`
    rounds keeps the acceptance estimate current.
    """

    def __init__(self, k_max: int = 8, fixed: int | None = None, probe_k: int = 2) -> None:
        if fixed is not None and not 0 <= fixed <= k_max:
            raise ValueError(f"fixed k {fixed} outside 0..{k_max}")
        self.k_max = k_max
        self.fixed = fixed
        self.probe_k = min(probe_k, k_max)
        self.draft_ms: float | None = None
        self.verify_ms: float | None = None
        self.verify_ms_per_draft = 0.0
        self.drafted = 0
        self.accepted = 0
        self.judged = 0  # drafts the target ruled on: those kept, plus the first rejected of each round
        self._plain_streak = 0

    @property
    def alpha(self) -> float:
        """Estimated chance that a draft is kept, given the drafts before it were (a round stops at its first
        rejection: the drafts after it were never judged)."""
        return (self.accepted + ALPHA_PRIOR * PRIOR_WEIGHT) / (self.judged + PRIOR_WEIGHT)

    def costs(self) -> RoundCosts | None:
        if self.draft_ms is None or self.verify_ms is None:
            return None
        return RoundCosts(self.draft_ms, self.verify_ms, self.verify_ms_per_draft, self.alpha)

    def next_k(self, room: int) -> int:
        """Drafts for the next round, at most `room` (the tokens still to generate, less the target's own)."""
        if self.fixed is not None:
            return min(self.fixed, room)
        costs = self.costs()
        if self.verify_ms is None:
            k = 0
        elif costs is None or self._plain_streak >= PROBE_EVERY:
            k = self.probe_k
        else:
            k = best_k(costs, self.k_max)
        return min(k, room)

    def record(self, k: int, accepted: int, draft_ms: float, verify_ms: float) -> None:
        """A round's measurements: `k` drafts made in `draft_ms` in all, `accepted` kept, verified in `verify_ms`."""
        self._plain_streak = self._plain_streak + 1 if k == 0 else 0
        if k == 0:
            self.verify_ms = _average(self.verify_ms, verify_ms)
            return
        self.drafted += k
        self.accepted += accepted
        self.judged += accepted + (accepted < k)
        self.draft_ms = _average(self.draft_ms, draft_ms / k)
        if self.verify_ms is None:
            self.verify_ms = verify_ms
        else:
            extra = max(verify_ms - self.verify_ms, 0.0) / k
            self.verify_ms_per_draft = extra if self.drafted == k else _average(self.verify_ms_per_draft, extra)


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new
