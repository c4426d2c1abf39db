"""The re-plan policy: notice links that stopped matching their profile, and judge whether a new plan is worth
a migration. Pure and clock-free: observations carry their own timestamps, and every update returns a new value.

    monitor = LinkMonitor.of(instance)
    monitor = monitor.observe(LinkObservation.from_trace(trace.link, trace.bytes_up, trace.bytes_down,
                                                         trace.wire_ms, at_s))
    for caps in monitor.changed():
        instance = update_link(instance, caps)
    monitor = monitor.rebase(monitor.changed())
    if should_migrate(current_cost, solve(instance).cost): ...
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from edgellm.errors import ConfigError
from edgellm.plan.cost import PlanCost
from edgellm.plan.fields import require_int, require_name, require_number
from edgellm.plan.instance import Instance, LinkCaps


@dataclass(frozen=True)
class LinkObservation:
    """One hop's round trip over a link, as a `HopTrace` reports it.

    Attributes:
        src, dst: the sender (the end nearer the device) and the receiver.
        bytes_up, bytes_down: the request's and the reply's sizes.
        wire_ms: the round trip's time on the wire (the sender's call time minus the receiver's handler time).
        at_s: when it was observed, on any clock the caller keeps monotonic.
    """

    src: str
    dst: str
    bytes_up: int
    bytes_down: int
    wire_ms: float
    at_s: float

    def __post_init__(self) -> None:
        require_name("observation", "src", self.src)
        require_name("observation", "dst", self.dst)
        require_int("observation", "bytes_up", self.bytes_up)
        require_int("observation", "bytes_down", self.bytes_down)
        require_number("observation", "wire_ms", self.wire_ms)
        require_number("observation", "at_s", self.at_s, -math.inf)

    @classmethod
    def from_trace(cls, link: str, bytes_up: int, bytes_down: int, wire_ms: float, at_s: float) -> LinkObservation:
        """From a `HopTrace`'s fields; `link` is "sender->node".

        Raises:
            ConfigError: `link` is not "a->b".
        """
        src, sep, dst = link.partition("->")
        if not sep:
            raise ConfigError(f"a hop's link must read 'sender->node', got {link!r}")
        return cls(src, dst, bytes_up, bytes_down, wire_ms, at_s)


@dataclass(frozen=True)
class LinkEstimate:
    """What the monitor knows of one link: its profile and how observed round trips compare to it.

    Attributes:
        profile: the fitted link the current plan assumes.
        ratios: observed / predicted time of the latest observations (newest last, at most the monitor's window).
        ewma_ratio: their exponentially weighted mean (1.0 before any).
        last_at_s: the newest observation's time.
    """

    profile: LinkCaps
    ratios: tuple[float, ...] = ()
    ewma_ratio: float = 1.0
    last_at_s: float = -math.inf

    def predicted_ms(self, observation: LinkObservation) -> float:
        """The profile's round trip: send(src, bytes_up) + send(dst, bytes_down)."""
        up = self.profile.send_ms(observation.src, observation.bytes_up)
        return up + self.profile.send_ms(observation.dst, observation.bytes_down)

    def departed(self, hysteresis: float, min_samples: int) -> bool:
        """Whether the last `min_samples` ratios all lie above 1 + hysteresis, or all below 1 - hysteresis."""
        recent = self.ratios[-min_samples:]
        if len(recent) < min_samples:
            return False
        return all(r > 1 + hysteresis for r in recent) or all(r < 1 - hysteresis for r in recent)

    def refit(self) -> LinkCaps:
        """The profile with both directions' fixed and per-byte costs scaled by the EWMA ratio."""
        k, p = self.ewma_ratio, self.profile
        return LinkCaps(p.a, p.b, p.up_fixed_ms * k, p.up_ms_per_byte * k, p.down_fixed_ms * k, p.down_ms_per_byte * k)


@dataclass(frozen=True)
class LinkMonitor:
    """Per-link estimates, fed observations from traffic.

    Attributes:
        estimates: one per link.
        alpha: the EWMA's weight of the newest ratio.
        window: how many ratios each estimate keeps.
    """

    estimates: tuple[LinkEstimate, ...]
    alpha: float = 0.3
    window: int = 16

    def __post_init__(self) -> None:
        require_number("link monitor", "alpha", self.alpha)
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"link monitor alpha must lie in (0, 1], got {self.alpha}")
        require_int("link monitor", "window", self.window, 1)

    @classmethod
    def of(cls, instance: Instance, alpha: float = 0.3, window: int = 16) -> LinkMonitor:
        """A monitor of every link of `instance`, with no observations yet."""
        return cls(tuple(LinkEstimate(link) for link in instance.links), alpha, window)

    def _index(self, x: str, y: str) -> int:
        for i, estimate in enumerate(self.estimates):
            if estimate.profile.joins(x, y):
                return i
        raise ConfigError(f"no monitored link joins {x!r} and {y!r}; links: {[e.profile.name for e in self.estimates]}")

    def estimate(self, x: str, y: str) -> LinkEstimate:
        """The estimate of the link joining x and y.

        Raises:
            ConfigError: no such link.
        """
        return self.estimates[self._index(x, y)]

    def observe(self, observation: LinkObservation) -> LinkMonitor:
        """The monitor with one more observation; one older than its link's newest is dropped (out of order).

        Raises:
            ConfigError: the observation names a link the monitor does not know.
        """
        i = self._index(observation.src, observation.dst)
        old = self.estimates[i]
        if observation.at_s < old.last_at_s:
            return self
        predicted = old.predicted_ms(observation)
        if predicted > 0:
            ratio = observation.wire_ms / predicted
        else:
            ratio = 1.0 if observation.wire_ms <= 0 else math.inf
        ewma = ratio if not old.ratios else self.alpha * ratio + (1 - self.alpha) * old.ewma_ratio
        new = LinkEstimate(old.profile, (*old.ratios, ratio)[-self.window :], ewma, observation.at_s)
        return replace(self, estimates=(*self.estimates[:i], new, *self.estimates[i + 1 :]))

    def changed(self, hysteresis: float = 0.3, min_samples: int = 3) -> list[LinkCaps]:
        """The refitted profile (`LinkEstimate.refit`) of each link whose last `min_samples` observations all
        departed from its profile by more than `hysteresis` (a fraction), the same way."""
        require_number("changed", "hysteresis", hysteresis)
        require_int("changed", "min_samples", min_samples, 1)
        return [
            e.refit() for e in self.estimates if e.departed(hysteresis, min_samples) and math.isfinite(e.ewma_ratio)
        ]

    def rebase(self, links: Iterable[LinkCaps]) -> LinkMonitor:
        """The monitor with these links' profiles replaced and their observations forgotten (after a re-plan)."""
        estimates = list(self.estimates)
        for link in links:
            estimates[self._index(link.a, link.b)] = LinkEstimate(link)
        return replace(self, estimates=tuple(estimates))


def update_link(instance: Instance, link: LinkCaps) -> Instance:
    """The instance with the link joining link.a and link.b replaced by `link`.

    Raises:
        ConfigError: the instance has no such link.
    """
    if instance.link(link.a, link.b) is None:
        raise ConfigError(f"the instance has no link between {link.a!r} and {link.b!r}")
    return replace(instance, links=tuple(link if x.joins(link.a, link.b) else x for x in instance.links))


def should_migrate(current_cost: PlanCost, new_cost: PlanCost, margin: float = 0.1, objective: str = "latency") -> bool:
    """Whether the new plan beats the current one by more than `margin` (a fraction) on the objective: decode_ms
    (latency) or ttft_ms (ttft) lower than (1 - margin) x current, or throughput higher than (1 + margin) x current.

    Raises:
        ConfigError: an unknown objective or a negative margin.
    """
    require_number("should_migrate", "margin", margin)
    if objective == "latency":
        return new_cost.decode_ms < current_cost.decode_ms * (1 - margin)
    if objective == "ttft":
        return new_cost.ttft_ms < current_cost.ttft_ms * (1 - margin)
    if objective == "throughput":
        return new_cost.throughput_tok_s > current_cost.throughput_tok_s * (1 + margin)
    raise ConfigError(f"unknown objective {objective!r}; choose from ['latency', 'throughput', 'ttft']")
