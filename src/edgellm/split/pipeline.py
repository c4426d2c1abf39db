"""The device's view of a split model: a chain of hops, each output feeding the next hop's input."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from edgellm.net.messages import CloseSession, ForwardReply, ForwardRequest, HopTrace


class Hop(Protocol):
    """One stage as seen from the device: in this process, or behind a network transport."""

    name: str

    def forward(self, request: ForwardRequest) -> ForwardReply: ...

    def close(self, request: CloseSession) -> None: ...


class TrainHop(Hop, Protocol):
    """A hop that also carries split-learning messages (`TrainOpen`, `TrainForward`, `TrainBackward`,
    `AdapterSync`); forward and backward are answered with a `ForwardReply`, the others with a `SyncReply`.
    `wait_s` is how much longer than usual the receiver may rightly take (a FedAvg round, a shared adapter)."""

    def train(self, message: Any, wait_s: float = 0.0) -> Any: ...


@dataclass
class HopStats:
    """What one hop cost over a run: the stage's own compute, and the whole call as the device saw it."""

    name: str
    calls: int = 0
    compute_ms: float = 0.0
    call_ms: float = 0.0
    first_compute_ms: float = 0.0  # the first call of a session is the prompt (prefill)

    @property
    def decode_compute_ms_per_call(self) -> float | None:
        """Mean compute of the calls after the first (one decode step each), or None if there were none."""
        if self.calls < 2:
            return None
        return (self.compute_ms - self.first_compute_ms) / (self.calls - 1)


class Pipeline:
    """Runs a session through its hops in order and accounts their time.

    `layout` describes what the hops run (for reports, e.g. of a live migration); the pipeline does not read it.
    """

    def __init__(self, hops: Sequence[Hop], layout: Any = None) -> None:
        if not hops:
            raise ValueError("a pipeline needs at least one hop")
        self.hops = list(hops)
        self.layout = layout
        self.stats = [HopStats(h.name) for h in self.hops]
        self.traces: list[HopTrace] = []  # network hops, in call order (empty in one process)

    def forward(
        self,
        session: str,
        ids: torch.Tensor,
        positions: torch.Tensor,
        token_mask: torch.Tensor | None,
        new_session: bool,
        last_only: bool = True,
        argmax: bool = False,
        adapter: str = "",
    ) -> torch.Tensor:
        """Token ids in, logits (or, with `argmax`, the most likely next tokens) out.

        ids: [B, S] int64, positions: [B, S] int64, token_mask: [B, S] bool | None
        -> [B, 1, V] float32 logits (each row's last real token) with `last_only`, else [B, S, V];
           with `argmax` (and `last_only`): [B, 1] int64 token ids
        `adapter` (on a session's first request): the LoRA adapter every stage runs the session with.
        """
        data = ids
        for hop, stats in zip(self.hops, self.stats):
            request = ForwardRequest(
                session, data, positions, token_mask, new_session, last_only, argmax=argmax, adapter=adapter
            )
            start = time.perf_counter()
            reply = hop.forward(request)
            stats.call_ms += (time.perf_counter() - start) * 1e3
            stats.compute_ms += reply.compute_ms
            if stats.calls == 0:
                stats.first_compute_ms = reply.compute_ms
            stats.calls += 1
            self.traces.extend(reply.trace)
            data = reply.output
        return data

    def close(self, session: str) -> None:
        """Release the session on every hop, even if some fail; then raise the first failure."""
        first: Exception | None = None
        for hop in self.hops:
            try:
                hop.close(CloseSession(session))
            except Exception as exc:  # noqa: BLE001 - an unreachable hop must not keep the others' caches alive
                first = first or exc
        if first is not None:
            raise first
