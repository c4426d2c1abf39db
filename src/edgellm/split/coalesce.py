"""A hop that carries the decode steps of concurrent sessions as one message: continuous batching across a link.

Sessions batched on one stage (`edgellm.split.host`) leave it together, each thread with its own row; sent as they
are, each would cost the next link a message. This hop gathers them: the first step to arrive waits briefly (at
most `window_s`, and not at all once every session open on the hop has a step waiting) for the others, then one
`ForwardRequest` with `rows` carries them all, and each caller gets its own row of the reply. Prompts, padded
batches and session starts go through alone, at once. Steps that arrive while a message is in flight start the
next one; the receiving host batches whatever arrives together anyway.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from edgellm.net.messages import CloseSession, ForwardReply, ForwardRequest, HopTrace
from edgellm.split.pipeline import Hop

WINDOW_S = 0.002  # the longest a step waits for other sessions' steps to share its message
MAX_ROWS = 64  # rows of one message (the wire's and the stage checks' limit)
_OWN = frozenset({"hop", "name", "window_s", "_cond", "_pending", "_gathering", "_open", "messages", "rows"})


@dataclass
class _Step:
    request: ForwardRequest
    reply: ForwardReply | None = None
    error: BaseException | None = None
    done: bool = False


def batchable(request: ForwardRequest) -> bool:
    """One new token of one session with no padding: a row a message of several sessions may carry."""
    return (
        not request.rows and not request.new_session and request.token_mask is None
        and tuple(request.data.shape[:2]) == (1, 1)
    )  # fmt: skip


class CoalescingHop:
    """Wraps a hop (usually to another node); anything but `forward` and `close` is the wrapped hop's."""

    def __init__(self, hop: Hop, window_s: float = WINDOW_S) -> None:
        self.hop = hop
        self.name = hop.name
        self.window_s = window_s
        self._cond = threading.Condition()
        self._pending: list[_Step] = []
        self._gathering = False
        self._open: set[str] = set()  # sessions started through this hop and not closed
        self.messages = 0  # messages sent with several rows
        self.rows = 0  # rows they carried

    def __getattr__(self, name: str) -> Any:  # the wrapped hop's `link`, `codec`, `probe`, `control`, ...
        return getattr(self.hop, name)

    def __setattr__(self, name: str, value: Any) -> None:  # so is setting them (`set_link`, a new codec)
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.hop, name, value)

    def forward(self, request: ForwardRequest) -> ForwardReply:
        if request.new_session:
            with self._cond:
                self._open.add(request.session)
        if not batchable(request):
            return self.hop.forward(request)
        step = _Step(request)
        with self._cond:
            self._pending.append(step)
            if self._gathering:  # another step gathers: ride with it
                self._cond.notify_all()
                while not step.done:
                    self._cond.wait()
                return self._result(step)
            self._gathering = True
            deadline = time.monotonic() + self.window_s
            while len(self._pending) < min(len(self._open), MAX_ROWS):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, self._pending = self._pending[:MAX_ROWS], self._pending[MAX_ROWS:]
            self._gathering = False
        try:
            self._send(batch)
        finally:
            with self._cond:
                for s in batch:  # only if sending itself was interrupted
                    if not s.done:
                        s.error, s.done = RuntimeError("the message carrying this step was interrupted"), True
                self._cond.notify_all()
        return self._result(step)

    def close(self, request: CloseSession) -> None:
        with self._cond:
            self._open.discard(request.session)
        self.hop.close(request)

    @staticmethod
    def _result(step: _Step) -> ForwardReply:
        if step.error is not None:
            raise step.error
        assert step.reply is not None
        return step.reply

    def _send(self, batch: list[_Step]) -> None:
        """Each group of steps that agree on what to reply with as one message; a failed message is retried row by
        row, so a failure reaches only the sessions it is about."""
        groups: dict[tuple[bool, bool, str, tuple[str, ...] | None], list[_Step]] = {}
        for step in batch:  # the route too: sessions may go on through different replicas (`edgellm.failover`)
            r = step.request
            groups.setdefault((r.argmax, r.last_only, r.reply_codec, r.route), []).append(step)
        for steps in groups.values():
            if len(steps) == 1:
                self._alone(steps[0])
                continue
            first = steps[0].request
            merged = dataclasses.replace(
                first, session="", data=torch.cat([s.request.data for s in steps]),
                positions=torch.cat([s.request.positions for s in steps]), rows=tuple(s.request.session for s in steps),
            )  # fmt: skip
            try:
                reply = self.hop.forward(merged)
            except Exception:  # noqa: BLE001 - retried one by one below, each with its own outcome
                for step in steps:
                    self._alone(step)
                continue
            self.messages, self.rows = self.messages + 1, self.rows + len(steps)
            trace = tuple(_share(t, len(steps)) for t in reply.trace)
            for b, step in enumerate(steps):
                step.reply = dataclasses.replace(reply, output=reply.output[b : b + 1], trace=trace)
                step.done = True

    def _alone(self, step: _Step) -> None:
        try:
            step.reply = self.hop.forward(step.request)
        except Exception as exc:  # noqa: BLE001 - handed to the step's caller
            step.error = exc
        step.done = True


def _share(trace: HopTrace, rows: int) -> HopTrace:
    """A row's share of a shared message's bytes (its times are every row's)."""
    return dataclasses.replace(trace, bytes_up=trace.bytes_up // rows, bytes_down=trace.bytes_down // rows)
