"""The shared adapter's turn: one client at a time from its forward to its backward.

Otherwise a client's optimizer step would change weights that another client's pending backward still needs. A
client silent for the round timeout loses its turn (it is taken to be gone, as for a FedAvg round).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edgellm.errors import BusyError
from edgellm.splitlearn.adapter_slot import AdapterSlot

log = logging.getLogger(__name__)


class Turns:
    """Hands out turns on shared adapters; waits on `lock` (the stage host's), so waiting frees the stage.

    Args:
        lock: the lock every caller holds.
        clock: for the turn timeout.
        node: this node's name, for errors.
    """

    def __init__(self, lock: threading.RLock, clock: Callable[[], float], node: str) -> None:
        self._cond = threading.Condition(lock)
        self._clock = clock
        self._node = node

    def take(self, slot: AdapterSlot, session: str, on_stale: Callable[[str], None]) -> None:
        """Wait (holding the lock between waits) until `session` may use `slot`; `on_stale(owner)` is called when a
        silent owner loses its turn.

        Raises:
            BusyError: the adapter stayed busy for twice the round timeout.
        """
        if slot.config.share != "shared":
            return
        limit = slot.config.round_timeout_s
        deadline = self._clock() + 2 * limit
        while slot.owner not in (None, session):
            if self._clock() - slot.owner_since > limit:
                log.warning(
                    "session %s held adapter %s without a backward pass; taking its turn", slot.owner, slot.name
                )
                on_stale(slot.owner)
                break
            if self._clock() > deadline:
                raise BusyError(f"adapter {slot.name} on node {self._node} stayed busy for {2 * limit:.0f} s")
            self._cond.wait(timeout=0.5)
        slot.owner, slot.owner_since = session, self._clock()

    def release(self, slot: AdapterSlot, session: str) -> None:
        """End `session`'s turn on `slot` (nothing if it holds none)."""
        if slot.owner == session:
            slot.owner = None
            self._cond.notify_all()
