"""The privacy ledger: what a device has released through Gaussian mechanisms, and the epsilon it adds up to.

The analysis is Opacus' RDP accountant (`opacus.accountants.analysis.rdp`: the Renyi DP of the sampled Gaussian
mechanism, converted to (epsilon, delta) by Balle et al. 2020), over Opacus' default orders, so the epsilon
reported here is the library's for the same schedule (tested against `RDPAccountant`).

What is protected, and how honestly:

- **Smashed data.** The protected unit is one *row*: one token position's hidden state as it leaves the device.
  Each row is clipped to L2 norm `clip_norm` and gets Gaussian noise of std `noise_multiplier * clip_norm`, so
  each row's release is one Gaussian mechanism of sensitivity `clip_norm` under add/remove adjacency (Opacus'
  convention; under replace-one adjacency a row can move by twice the bound, and the guarantee is that of
  `noise_multiplier / 2`). Every row sent counts as one composition with sample rate 1: a session's epsilon
  grows with the rows it sends (the prompt's rows, each decoded token's, speculative drafts and the replays of
  a migration included). That is deliberately conservative: the rows of a session are not independent records.
  At a cut after the first layer one input token influences its own row *and every later row* (attention mixes
  them), so the guarantee is per row of smashed data, **not per input token**; only at a cut of 0 (the device
  sends embeddings) is a row a function of one token alone.
- **Gradients sent back** (split learning, U-shaped): the same, per row of d loss / d hidden, with its own bound.
- **DP-FedAvg.** The unit is one client's whole adapter update in a round (clipped to `clip_norm`); the noise is
  added once per round at aggregation, so each round is one release with sample rate = clients per round /
  clients in total. The aggregator sees the clipped updates before the noise (central DP: it is trusted).

A ledger with a budget (`max_epsilon`) refuses a release that would take epsilon past it *before* the data
leaves: `charge` raises `PrivacyBudgetSpent` and records nothing.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

from edgellm.errors import InputError


class PrivacyBudgetSpent(InputError):
    """A release would spend past the configured privacy budget; nothing was sent. Raise the budget
    (`--dp-max-epsilon`, a link's `dp.max_epsilon`), add noise, or send less: retrying never helps."""


def _analysis() -> Any:
    # Imported on first use: Opacus pulls in its training modules, ~0.4 s that `edgellm --help` must not pay.
    from opacus.accountants.analysis import rdp

    return rdp


def default_orders() -> list[float]:
    """The RDP orders epsilon is optimized over: Opacus' `RDPAccountant.DEFAULT_ALPHAS`."""
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of the composition of `history`'s (noise_multiplier, sample_rate, steps) releases at `delta`.

    Sums Opacus' `compute_rdp` over the history and converts with its `get_privacy_spent`, as
    `RDPAccountant.get_epsilon` does. 0 for an empty history; inf when a release had no noise.
    """
    if not history:
        return 0.0
    rdp, orders = _analysis(), default_orders()
    total = sum(rdp.compute_rdp(q=q, noise_multiplier=z, steps=n, orders=orders) for z, q, n in history)
    with warnings.catch_warnings():  # "optimal order is the largest/smallest alpha": expected far off the range
        warnings.simplefilter("ignore")
        eps, _ = rdp.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    eps = float(eps)
    return math.inf if math.isnan(eps) else eps


def epsilon_for(noise_multiplier: float, rows: int, delta: float, sample_rate: float = 1.0) -> float:
    """Epsilon of `rows` releases of one Gaussian mechanism (one per row of smashed data) at `delta`.

    What a setting costs: e.g. `epsilon_for(1.0, 200, 1e-5)` for a 200-token session at noise multiplier 1.
    """
    if rows < 0:
        raise InputError(f"rows must be >= 0, got {rows}")
    return epsilon_of([(float(noise_multiplier), float(sample_rate), int(rows))] if rows else [], delta)


class PrivacyLedger:
    """One device's releases through one mechanism, with an optional budget. Thread-safe.

    Args:
        mechanism: what is released, for the report: "smashed_data", "gradients", "dp_fedavg".
        clip_norm, noise_multiplier: the mechanism (the noise std is their product).
        delta: the delta epsilon is reported at.
        max_epsilon: refuse a release past it (None: no budget).
        unit: what one release protects, for the report ("row", "client update").
    """

    def __init__(self, mechanism: str, clip_norm: float, noise_multiplier: float, delta: float,
                 max_epsilon: float | None = None, unit: str = "row") -> None:  # fmt: skip
        self.mechanism = mechanism
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.unit = unit
        self.history: list[tuple[float, float, int]] = []  # (noise_multiplier, sample_rate, steps), as Opacus'
        self.refused = 0  # releases refused for the budget
        self._epsilon = 0.0
        self._lock = threading.Lock()

    @property
    def releases(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at `delta` (default: the ledger's)."""
        with self._lock:
            if delta is None or delta == self.delta:
                return self._epsilon
            return epsilon_of(list(self.history), delta)

    def charge(self, steps: int, sample_rate: float = 1.0) -> float:
        """Record `steps` releases at `sample_rate` (each row sent: 1) and return the new epsilon.

        Raises:
            PrivacyBudgetSpent: they would take epsilon past `max_epsilon`; nothing is recorded.
        """
        if steps < 0:
            raise InputError(f"a release counts >= 0 steps, got {steps}")
        with self._lock:
            if steps == 0:
                return self._epsilon
            history = _appended(self.history, self.noise_multiplier, sample_rate, steps)
            eps = epsilon_of(history, self.delta)
            if self.max_epsilon is not None and not eps <= self.max_epsilon:
                self.refused += 1
                raise PrivacyBudgetSpent(
                    f"privacy budget spent: {steps} more {self.mechanism} release(s) would take epsilon from "
                    f"{self._epsilon:.4g} to {eps:.4g} > max_epsilon {self.max_epsilon:g} (delta {self.delta:g}, "
                    f"noise multiplier {self.noise_multiplier:g}); nothing was sent"
                )
            self.history, self._epsilon = history, eps
            return eps

    def to_json(self) -> dict[str, Any]:
        """`{"mechanism", "clip_norm", "noise_multiplier", "delta", "epsilon", "releases", "budget", ...}`;
        an infinite epsilon (no noise) is null."""
        with self._lock:
            eps = self._epsilon
            return {
                "mechanism": self.mechanism,
                "unit": self.unit,
                "clip_norm": self.clip_norm,
                "noise_multiplier": self.noise_multiplier,
                "noise_std": self.noise_multiplier * self.clip_norm,
                "delta": self.delta,
                "epsilon": eps if math.isfinite(eps) else None,
                "releases": self.releases,
                "budget": {"max_epsilon": self.max_epsilon, "refused": self.refused},
                "accountant": "opacus.rdp",
            }


def _appended(history: list[tuple[float, float, int]], z: float, q: float, n: int) -> list[tuple[float, float, int]]:
    """`history` with n more releases at (z, q), merged into the last entry when it is the same, as Opacus'."""
    if history and history[-1][:2] == (z, q):
        return [*history[:-1], (z, q, history[-1][2] + n)]
    return [*history, (z, q, n)]
