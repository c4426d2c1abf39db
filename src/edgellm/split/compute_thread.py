"""Every stage computation of a process on one thread: the thread that loaded the weights.

Servers answer requests on many threads (gRPC's pool, the HTTP server's generation threads). Measured on the
2-core project machine (SmolLM2-135M, fp32, 32 greedy tokens, torch 2.13 with libgomp): decode ran at 36 tok/s on
the thread that had loaded the model and at 22 tok/s on any other thread of the same process, whatever
OMP_WAIT_POLICY or GOMP_SPINCOUNT said; a process whose only torch thread was a side thread ran at 34. So a
process that serves installs a `ComputeThread` on its main thread, which then runs every stage host's passes
(`edgellm.split.host`); request threads hand their iteration over and wait. Without one installed (a library
user, the tests), a pass runs on the thread that asks for it, as before.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")

_installed: ComputeThread | None = None


class ComputeThread:
    """Runs submitted work on the thread that created it, once that thread calls `serve`."""

    def __init__(self) -> None:
        self.thread = threading.current_thread()
        self._work: queue.SimpleQueue[tuple[Callable[[], object], Future[object]]] = queue.SimpleQueue()

    def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on the compute thread (inline when called from it); re-raises what it raised."""
        if threading.current_thread() is self.thread:
            return fn()
        future: Future[object] = Future()
        self._work.put((fn, future))
        return future.result()  # type: ignore[return-value]

    def serve(self, stop: threading.Event, poll_s: float = 0.2) -> None:
        """Run submitted work until `stop` is set; call on the thread that created this object."""
        while not stop.is_set():
            try:
                fn, future = self._work.get(timeout=poll_s)
            except queue.Empty:
                continue
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                    future.set_exception(exc)


def install() -> ComputeThread:
    """Make the calling thread this process's compute thread (it must then call `serve`)."""
    global _installed
    _installed = ComputeThread()
    return _installed


def run(fn: Callable[[], T]) -> T:
    """`fn()` on the process's compute thread if one is installed, else here."""
    return fn() if _installed is None else _installed.run(fn)
