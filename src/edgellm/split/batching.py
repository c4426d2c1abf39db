"""Continuous batching on a stage host: which waiting requests run together in the next forward pass.

Requests of different sessions wait in one first-come queue. Each iteration runs (a) one forward pass over the
next-token steps of up to `max_batch` sessions, oldest first, each row continuing its own KV cache
(`edgellm.model.session_rows`), and (b) the next chunk of the oldest other request (a prompt, or a padded batch
of one session). A session joins or leaves between iterations; a long prompt advances one chunk per iteration, so
decode steps never wait for a whole prompt, and a prompt never waits for decoding to drain. Pure: no threads, no
torch calls beyond reading shapes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from edgellm.net.messages import ForwardRequest


@dataclass
class Work:
    """One request waiting for, or part-way through, the stage; its thread waits on `done`.

    Attributes:
        request: what the peer asked for.
        session: the host's record of the request's session (its cache and adapter slot).
        offset: tokens of the request already run (a prompt in chunks).
        start_length: the session's cache length before the request, to undo a failure.
        outputs: the chunks' outputs kept so far.
        compute_s: the stage time of the iterations that ran this request.
    """

    request: ForwardRequest
    session: Any
    offset: int = 0
    start_length: int = 0
    outputs: list[torch.Tensor] = field(default_factory=list)
    compute_s: float = 0.0
    output: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False

    @property
    def batchable(self) -> bool:
        """One new token of one unpadded sequence: a row of the next decode pass."""
        data, mask = self.request.data, self.request.token_mask
        return (
            int(data.shape[0]) == 1 and int(data.shape[1]) == 1 and (mask is None or bool(mask.all()))
            and not self.session.cache.has_padding()
        )  # fmt: skip

    def finish(self, output: torch.Tensor | None = None, error: BaseException | None = None) -> None:
        self.output, self.error, self.done = output, error, True


def next_iteration(queue: Sequence[Work], max_batch: int) -> tuple[list[Work], Work | None]:
    """The decode rows (oldest first, at most `max_batch`) and the one other request to advance a chunk.

    A session appears at most once among the rows (a peer sending a step before its last reply is refused
    earlier, at admission); everything not chosen stays queued, in order, for the next iteration.
    """
    rows: list[Work] = []
    other: Work | None = None
    for work in queue:
        if work.batchable:
            if len(rows) < max_batch:
                rows.append(work)
        elif other is None:
            other = work
        if len(rows) >= max_batch and other is not None:
            break
    return rows, other


class Leadership:
    """Which waiting thread runs the next iteration: the first to find nobody running becomes the leader and
    runs iterations until its own request is done, then hands over. No scheduler thread to start or stop."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.queue: list[Work] = []
        self.running = False
