"""One generation behind the HTTP API: the engine's blocking iterator driven by a thread of its own, its tokens
cut at stop strings and handed to the event loop as `Piece`s, then one `Finish`; and the SSE framing.

The engine's `generate` blocks and may be consumed from one thread only, so each generation gets a thread that
owns its iterator from start to `close()`. The event loop reads the thread's output from an `asyncio.Queue` and
never blocks; `cancel()` (a client that went away) makes the thread close the iterator after the token it is
waiting for, which ends the generation and frees its sessions in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class StopText:
    """Cuts a stream of text deltas before the first of some stop strings, even one spread over several deltas.

    Text that might be the start of a stop string is held back until the next delta decides it, so no part of a
    stop string is ever emitted.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._text = ""
        self._emitted = 0  # chars of _text handed out
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add a delta; return the text now safe to emit (possibly empty). Sets `stopped` at a stop string."""
        if self.stopped:
            return ""
        self._text += delta
        found = [i for i in (self._text.find(s, self._emitted) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return self._take(min(found))
        return self._take(len(self._text) - self._held_back())

    def flush(self) -> str:
        """The text held back, at the end of the generation (no stop string came)."""
        return "" if self.stopped else self._take(len(self._text))

    def _held_back(self) -> int:
        """Length of the longest end of the text not yet emitted that begins some stop string."""
        tail = self._text[self._emitted :]
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(tail)), best, -1):
                if tail.endswith(stop[:k]):
                    best = k
                    break
        return best

    def _take(self, end: int) -> str:
        out = self._text[self._emitted : end]
        self._emitted = end
        return out


@dataclass(frozen=True)
class Piece:
    """One generated token: the text it makes visible (may be empty), the engine's timing of it if it gave one,
    and the wall time since the previous token (since the request, for the first)."""

    text: str
    token: int | None
    timing: dict[str, Any] | None
    gap_ms: float


@dataclass(frozen=True)
class Finish:
    """The end of a generation: why it ended (`stop` or `length`), tokens generated, and the engine's report
    (empty when the generation was cut short at a stop string)."""

    finish_reason: str
    completion_tokens: int
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    """What one generation needs besides the engine: its stop strings, its token budget and the stop token ids."""

    stops: tuple[str, ...]
    max_tokens: int
    stop_token_ids: tuple[int, ...]


class GenerationRun:
    """An engine generation in its own thread, read from the event loop.

    Args:
        events: starts the engine's generation (called in the thread) and returns its event iterator.
        spec: stop strings, token budget, stop ids.
        on_done: called on the event loop once the thread has closed the engine's iterator.
    """

    def __init__(
        self, events: Callable[[], Iterator[dict[str, Any]]], spec: RunSpec, on_done: Callable[[], None]
    ) -> None:
        self._events = events
        self._spec = spec
        self._on_done = on_done
        self._cancelled = threading.Event()
        self._queue: asyncio.Queue[Piece | Finish | BaseException] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the thread; call from the event loop that will read the results."""
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._work, name="edgellm-generation", daemon=True).start()

    async def next(self) -> Piece | Finish:
        """The next piece, or the finish; raises what the engine raised."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        """Stop after the token being generated now; idempotent."""
        self._cancelled.set()

    def _put(self, item: Piece | Finish | BaseException) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self._cancelled.set()

    def _work(self) -> None:
        iterator: Iterator[dict[str, Any]] | None = None
        try:
            iterator = self._events()
            self._put(self._drive(iterator))
        except Exception as exc:  # noqa: BLE001 - handed to the request, which maps it to a status
            self._put(exc)
        finally:
            if iterator is not None:
                close = getattr(iterator, "close", None)
                try:
                    if close is not None:
                        close()
                except Exception:  # noqa: BLE001 - the generation is over either way; the server goes on
                    log.exception("closing a generation failed")
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is left to release
                self._loop.call_soon_threadsafe(self._on_done)

    def _drive(self, iterator: Iterator[dict[str, Any]]) -> Finish:
        """Read the engine's events into pieces until the report, a stop string or a cancel."""
        spec = self._spec
        cutter = StopText(spec.stops)
        tokens, last_token, report = 0, None, {}
        last = time.perf_counter()
        for event in iterator:
            if "report" in event:
                report = event["report"] if isinstance(event["report"], dict) else {}
                continue
            now = time.perf_counter()
            tokens += 1
            last_token = event.get("token")
            timing = event.get("timing")
            text = cutter.push(str(event.get("text") or ""))
            self._put(Piece(text, last_token, timing if isinstance(timing, dict) else None, (now - last) * 1e3))
            last = now
            if cutter.stopped or self._cancelled.is_set():
                break
        tail = cutter.flush()
        if tail:
            self._put(Piece(tail, None, None, 0.0))
        ended = cutter.stopped or tokens < spec.max_tokens or last_token in spec.stop_token_ids
        return Finish("stop" if ended else "length", tokens, report)


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event carrying `data` (a JSON object, or a literal such as `[DONE]`)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
