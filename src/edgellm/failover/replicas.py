"""Which replica of each stage serves a new session, and which replicas are down: pure bookkeeping, no I/O.

A stage position (one layer range) has one or more replicas (`Topology.replicas`). A new session gets, per
position, the replica with the best score: measured latency (an exponential moving average of its calls) times
one plus the sessions it serves now, so a fast replica takes more sessions until it is no longer the faster one;
replicas never measured score by their load alone and come first (so each gets measured). A replica that fails is
down; after `retry_s` it is due for a probe, and one that answers rejoins `settle_s` later: by then every peer's
channel to it has left gRPC's reconnect backoff (at most 250 ms: `edgellm.net.channel.RECONNECT`), so a session
routed to it does not fail on a stale channel of the node before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgellm.errors import ConfigError

EWMA = 0.2  # weight of the newest latency sample
RETRY_S = 2.0  # how long a replica stays down before it is probed again
SETTLE_S = 0.5  # from a probe that answers to taking sessions again (> the 250 ms reconnect backoff cap)


@dataclass
class Replica:
    """One node serving a stage position, as the device sees it."""

    name: str
    position: int
    sessions: int = 0  # sessions routed to it and not yet closed
    latency_ms: float | None = None  # moving average of its calls (compute and wire)
    down_since: float | None = None
    eligible_at: float = 0.0  # a rejoined replica takes new sessions from then on
    failures: int = 0
    rejoins: int = 0
    last_error: str = ""

    @property
    def up(self) -> bool:
        return self.down_since is None

    def score(self) -> tuple[int, float]:
        """Lower is better: unmeasured first, then latency x (1 + load)."""
        if self.latency_ms is None:
            return (0, float(self.sessions))
        return (1, self.latency_ms * (1 + self.sessions))


@dataclass
class ReplicaTable:
    """The replicas of every stage position. `groups[i]`: the node names that serve position i (primary first).

    Raises:
        ConfigError: a position without replicas, or a node named twice.
    """

    groups: Sequence[Sequence[str]]
    retry_s: float = RETRY_S
    settle_s: float = SETTLE_S
    clock: Callable[[], float] = time.monotonic
    replicas: dict[str, Replica] = field(init=False)

    def __post_init__(self) -> None:
        self.replicas = {}
        for position, names in enumerate(self.groups):
            if not names:
                raise ConfigError(f"stage position {position} has no node")
            for name in names:
                if name in self.replicas:
                    raise ConfigError(f"node {name!r} serves two stage positions")
                self.replicas[name] = Replica(name, position)

    def choose(self, position: int, avoid: Sequence[str] = ()) -> str:
        """The replica for a new session at `position`: the best-scoring one that is up and not in `avoid`; when
        every one is down, the one down longest (it may be back; if not, the caller's failure says so)."""
        group = [self.replicas[n] for n in self.groups[position] if n not in avoid] or [
            self.replicas[n] for n in self.groups[position]
        ]
        now = self.clock()
        up = [r for r in group if r.up and r.eligible_at <= now] or [r for r in group if r.up]
        if up:
            return min(up, key=lambda r: (*r.score(), self.groups[position].index(r.name))).name
        return min(group, key=lambda r: r.down_since or 0.0).name

    def route(self, avoid: Sequence[str] = ()) -> tuple[str, ...]:
        """One replica per position, for a new session."""
        return tuple(self.choose(position, avoid) for position in range(len(self.groups)))

    def opened(self, names: Sequence[str]) -> None:
        for name in names:
            self.replicas[name].sessions += 1

    def closed(self, names: Sequence[str]) -> None:
        for name in names:
            replica = self.replicas[name]
            replica.sessions = max(replica.sessions - 1, 0)

    def observe(self, name: str, ms: float) -> None:
        """A call to `name` took `ms` (it answered: a down replica that answers is up again)."""
        replica = self.replicas[name]
        replica.latency_ms = ms if replica.latency_ms is None else (1 - EWMA) * replica.latency_ms + EWMA * ms
        if not replica.up:
            self.rejoined(name)

    def failed(self, name: str, error: str) -> None:
        replica = self.replicas[name]
        replica.failures += 1
        replica.last_error = error[:200]
        if replica.up:
            replica.down_since = self.clock()

    def rejoined(self, name: str) -> None:
        replica = self.replicas[name]
        if not replica.up:
            replica.down_since, replica.rejoins, replica.latency_ms = None, replica.rejoins + 1, None
            replica.eligible_at = self.clock() + self.settle_s

    def due_for_probe(self) -> list[str]:
        """The down replicas whose `retry_s` has passed (probe them; `rejoined` the ones that answer)."""
        now = self.clock()
        due = [r for r in self.replicas.values() if r.down_since is not None and now - r.down_since >= self.retry_s]
        for replica in due:
            replica.down_since = now  # one probe per retry_s, answered or not
        return [r.name for r in due]

    def report(self) -> dict[str, Any]:
        """Per replica: position, up, sessions, latency, failures, rejoins, last error (for Info and reports)."""
        return {
            r.name: {
                "position": r.position,
                "up": r.up,
                "sessions": r.sessions,
                "failures": r.failures,
                "rejoins": r.rejoins,
                "latency_ms": None if r.latency_ms is None else round(r.latency_ms, 3),
                "last_error": r.last_error,
            }  # fmt: skip
            for r in self.replicas.values()
        }
