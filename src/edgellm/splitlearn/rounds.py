"""FedAvg rounds at an aggregating node: clients hand in their adapters for a step, all get the average back.

A round closes when every client of the run has sent, or `timeout_s` after its first client arrived (a client
that dropped out of the round is left out, and the average is over those that came). A client that missed a
round is not waited for in the next ones, until it sends again: one dead client costs one timeout, not one per
round. The averaging itself is
the pure `edgellm.lora.fedavg.fedavg`; this module only does the waiting.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from edgellm.errors import ConfigError, SessionError
from edgellm.lora.fedavg import dp_fedavg, fedavg
from edgellm.net.messages import AdapterSync, CloseSession, SyncReply, TrainOpen, WireError, decode, encode
from edgellm.privacy.config import DPConfig
from edgellm.split.control import node_ops
from edgellm.splitlearn.settings import ServerTrainConfig

log = logging.getLogger(__name__)

RoundKey = tuple[str, str, int]  # (run, attempt, step)


@dataclass
class _Round:
    clients: int
    opened: float
    states: dict[int, tuple[Mapping[str, torch.Tensor], float]] = field(default_factory=dict)
    result: dict[str, torch.Tensor] | None = None
    included: tuple[int, ...] = ()
    dp: DPConfig | None = None  # DP-FedAvg: the noise added to the mean of the (clipped) states


class Aggregator:
    """Collects client adapters per round and answers each client with the round's FedAvg."""

    def __init__(self, timeout_s: float = 120.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._rounds: dict[RoundKey, _Round] = {}
        self._absent: dict[tuple[str, str], set[int]] = {}  # (run, attempt) -> clients that missed a round
        self._cond = threading.Condition()

    def submit(
        self,
        key: RoundKey,
        client: int,
        clients: int,
        state: Mapping[str, torch.Tensor],
        weight: float,
        timeout_s: float | None = None,
        dp: DPConfig | None = None,
    ) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
        """Hand in `client`'s adapters for round `key`; block until the round closes.

        With `dp` (DP-FedAvg) the round's result is `dp_fedavg` of the states (clipped by the clients), with
        equal weights, and noise drawn from `dp.generator(salt=step)`.

        Returns the averaged adapters and the clients they came from. A client arriving after its round closed
        gets that round's result (its own adapters are not in it).
        """
        limit = self.timeout_s if timeout_s is None else timeout_s
        with self._cond:
            absent = self._absent.setdefault(key[:2], set())
            absent.discard(client)
            rnd = self._rounds.setdefault(key, _Round(clients, self._clock(), dp=dp))
            if rnd.result is None:
                rnd.states[client] = (state, weight)
            else:
                log.warning(
                    "client %d reached round %s after it closed; it gets the average without its part", client, key
                )
            while rnd.result is None:
                expected = set(range(rnd.clients)) - absent
                if expected <= set(rnd.states):
                    self._close(key, rnd)
                    break
                left = rnd.opened + limit - self._clock()
                if left <= 0:
                    missing = sorted(expected - set(rnd.states))
                    log.warning("round %s closes without client(s) %s after %.0f s", key, missing, limit)
                    absent.update(missing)
                    self._close(key, rnd)
                    break
                self._cond.wait(timeout=min(left, 1.0))
            self._forget_old(key)
            assert rnd.result is not None
            return rnd.result, rnd.included

    def _close(self, key: RoundKey, rnd: _Round) -> None:
        included = tuple(sorted(rnd.states))
        states = [rnd.states[c][0] for c in included]
        if rnd.dp is None:
            rnd.result = fedavg(states, [rnd.states[c][1] for c in included])
        else:
            dp = rnd.dp
            rnd.result = dp_fedavg(states, dp.clip_norm, dp.noise_multiplier, dp.generator(salt=key[2]))
        rnd.included = included
        rnd.states.clear()
        self._cond.notify_all()

    def _forget_old(self, key: RoundKey) -> None:
        # Keep the last few closed rounds of a run for late clients; drop older ones.
        run, attempt, step = key
        for other in [k for k in self._rounds if k[:2] == (run, attempt) and k[2] < step - 8]:
            del self._rounds[other]


class AggregatorServer:
    """A node that only aggregates: FedAvg rounds for clients that have no server to meet at (federated
    learning without a split). Implements `edgellm.net.rpc.NodeHandler`; takes `TrainOpen` (to learn each
    session's run and client) and `AdapterSync(op="aggregate")`, and refuses everything else."""

    def __init__(self, name: str = "aggregator", timeout_s: float = 120.0) -> None:
        self.name = name
        self.aggregator = Aggregator(timeout_s)
        # session -> run, attempt, client, clients, timeout, DP-FedAvg
        self._sessions: dict[str, tuple[str, str, int, int, float, DPConfig | None]] = {}
        self._lock = threading.Lock()

    def train(self, frame: bytes) -> bytes:
        message = decode(frame)
        if isinstance(message, TrainOpen):
            config = ServerTrainConfig.from_json(message.config)
            if not 0 <= message.client < message.clients:
                raise ConfigError(f"client {message.client} is out of range for {message.clients} client(s)")
            with self._lock:
                self._sessions[message.session] = (
                    message.run,
                    message.attempt,
                    message.client,
                    message.clients,
                    config.round_timeout_s,
                    config.dp_fedavg,
                )
            return encode(SyncReply(detail=json.dumps([{"node": self.name, "trainable_params": 0}])))
        if not isinstance(message, AdapterSync) or message.op != "aggregate":
            raise WireError(f"node {self.name} only aggregates; got {type(message).__name__}")
        with self._lock:
            found = self._sessions.get(message.session)
        if found is None:
            raise SessionError(f"unknown training session {message.session!r} on node {self.name}")
        run, attempt, client, clients, timeout, dp = found
        result, included = self.aggregator.submit(
            (run, attempt, message.step), client, clients, dict(message.tensors), message.weight, timeout, dp
        )
        detail = json.dumps([{"node": self.name, "round": message.step, "clients": list(included)}])
        return encode(SyncReply(tuple(result.items()), detail))

    def forward(self, frame: bytes) -> bytes:
        raise _refuse(self.name)

    def close(self, frame: bytes) -> None:
        message = decode(frame)
        if isinstance(message, CloseSession):
            with self._lock:
                self._sessions.pop(message.session, None)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "role": "aggregator", "sessions": len(self._sessions)}

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Only the ops every node answers (echo, info); it has no links to probe or set."""
        return node_ops(self.name, self.info, lambda: {}).dispatch(request)

    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        raise _refuse(self.name)


def _refuse(name: str) -> Exception:
    return ConfigError(f"node {name} only aggregates adapters; it runs no model")
