"""FedAvg rounds at an aggregating node: clients hand in their adapters for a step, all get the average back.

A round closes when every client of the run has sent, or `timeout_s` after its first client arrived (a client
that dropped out of the round is left out, and the average is over those that came). The averaging itself is
the pure `edgellm.lora.fedavg.fedavg`; this module only does the waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from edgellm.lora.fedavg import fedavg

log = logging.getLogger(__name__)

RoundKey = tuple[str, str, int]  # (run, attempt, step)


@dataclass
class _Round:
    clients: int
    opened: float
    states: dict[int, tuple[Mapping[str, torch.Tensor], float]] = field(default_factory=dict)
    result: dict[str, torch.Tensor] | None = None
    included: tuple[int, ...] = ()


class Aggregator:
    """Collects client adapters per round and answers each client with the round's FedAvg."""

    def __init__(self, timeout_s: float = 120.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._rounds: dict[RoundKey, _Round] = {}
        self._cond = threading.Condition()

    def submit(
        self,
        key: RoundKey,
        client: int,
        clients: int,
        state: Mapping[str, torch.Tensor],
        weight: float,
        timeout_s: float | None = None,
    ) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
        """Hand in `client`'s adapters for round `key`; block until the round closes.

        Returns the averaged adapters and the clients they came from. A client arriving after its round closed
        gets that round's result (its own adapters are not in it).
        """
        limit = self.timeout_s if timeout_s is None else timeout_s
        with self._cond:
            rnd = self._rounds.setdefault(key, _Round(clients, self._clock()))
            if rnd.result is None:
                rnd.states[client] = (state, weight)
            else:
                log.warning("client %d reached round %s after it closed; it gets the average without its part", client, key)
            while rnd.result is None:
                if len(rnd.states) >= rnd.clients:
                    self._close(key, rnd)
                    break
                left = rnd.opened + limit - self._clock()
                if left <= 0:
                    missing = sorted(set(range(rnd.clients)) - set(rnd.states))
                    log.warning("round %s closes without client(s) %s after %.0f s", key, missing, limit)
                    self._close(key, rnd)
                    break
                self._cond.wait(timeout=min(left, 1.0))
            self._forget_old(key)
            assert rnd.result is not None
            return rnd.result, rnd.included

    def _close(self, key: RoundKey, rnd: _Round) -> None:
        included = tuple(sorted(rnd.states))
        rnd.result = fedavg([rnd.states[c][0] for c in included], [rnd.states[c][1] for c in included])
        rnd.included = included
        rnd.states.clear()
        self._cond.notify_all()

    def _forget_old(self, key: RoundKey) -> None:
        # Keep the last few closed rounds of a run for late clients; drop older ones.
        run, attempt, step = key
        for other in [k for k in self._rounds if k[:2] == (run, attempt) and k[2] < step - 8]:
            del self._rounds[other]
