"""Progress of long work: a live bar on a terminal, whole log lines everywhere else.

A `Phase` is a step that may take seconds to minutes: loading a model, quantizing a stage, scoring windows,
waiting for nodes. Every phase logs one line when it ends, saying what it did and how long it took
(`eval ppl: 12 windows, 6143 tokens in 34.1 s`); it may also log one as it starts (`announce`), and a counted
phase still running after `HEARTBEAT_S` logs its count every `HEARTBEAT_S`, so a log never goes silent for
minutes. Where the phase's stream (stderr) is a terminal it also draws a one-line bar, from `BAR_DELAY_S` on (a
shorter phase draws nothing, nor logs its end line there), redrawn in place and erased before any log line is
written.

Lines go through `logging` (the CLI sends the "edgellm" logger to stderr at INFO); nothing here writes to
stdout, and nothing but whole lines is written where stderr is not a terminal (no carriage returns).
`set_quiet(True)` (the CLI's --quiet) turns the bars and progress lines off; warnings are unaffected.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from types import TracebackType
from typing import TextIO

BAR_DELAY_S = 2.0  # a phase shorter than this draws no bar
HEARTBEAT_S = 30.0  # a counted phase logs its count this often where there is no bar
REDRAW_S = 0.25  # the bar is redrawn at most this often
BAR_CELLS = 20

_log = logging.getLogger("edgellm.progress")
_lock = threading.RLock()  # guards _active and _drawn; drawing and erasing happen under it
_active: list[Phase] = []  # phases entered and not yet exited, innermost last: only the innermost draws
_drawn: TextIO | None = None  # the stream a bar is drawn on right now (None: no bar on screen)
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn progress bars and progress lines off (True) or on; warnings and errors are not affected."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    """True when `set_quiet(True)` turned progress off."""
    return _quiet


def note(log: logging.Logger, message: str, *args: object) -> None:
    """Log one progress line at INFO (`message % args`), unless quiet; a bar on screen is erased first."""
    if _quiet:
        return
    _erase()
    log.info(message, *args)


def is_terminal(stream: TextIO) -> bool:
    """True when `stream` is an interactive terminal that can redraw a line in place."""
    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def count_text(done: int, total: int | None, unit: str) -> str:
    """`3/7 batches`, `12 windows`, or `` (nothing counted)."""
    if total is not None:
        return f"{done}/{total} {unit}".rstrip()
    return f"{done} {unit}" if unit else ""


def render_bar(
    label: str, done: int, total: int | None, unit: str, elapsed_s: float, width: int, detail: str = ""
) -> str:
    """One line of bar, at most `width` characters: `eval ppl [#####-----] 6/12 windows 17 s, ~17 s left`,
    then `detail` if any (`loss 2.31`)."""
    if total:
        filled = min(BAR_CELLS, BAR_CELLS * done // total)
        left = f", ~{elapsed_s * (total - done) / done:.0f} s left" if 0 < done < total else ""
        text = f"{label} [{'#' * filled}{'-' * (BAR_CELLS - filled)}] {count_text(done, total, unit)} "
        text += f"{elapsed_s:.0f} s{left}"
    else:
        counted = count_text(done, None, unit) if done else ""
        text = f"{label}: {counted + ', ' if counted else ''}{elapsed_s:.0f} s"
    if detail:
        text += f" | {detail}"
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class Phase:
    """A step of long work, used as a context manager: a bar while it runs (on a terminal), a line when it ends.

    The end line is `<label>: <summary> in <elapsed> s`; `summary` defaults to the count (`12 windows`) or
    `done`. Nothing is logged when the block raises: the error says what happened.

    Args:
        label: what the phase does, short (`eval ppl`, `quantize [0:10)+embed`).
        total: how many steps it takes, if known (`update` may say later).
        unit: what a step is, plural (`windows`).
        log: the logger of the module doing the work (default `edgellm.progress`).
        announce: a line to log when the phase starts, for a long one (`converting x.gguf (one-off)`).
        stream: where the bar goes; None means sys.stderr at entry. Never stdout: it carries answers.
        delay_s: draw no bar before this many seconds.
    """

    def __init__(
        self,
        label: str,
        *,
        total: int | None = None,
        unit: str = "",
        log: logging.Logger | None = None,
        announce: str | None = None,
        stream: TextIO | None = None,
        delay_s: float = BAR_DELAY_S,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.log = log if log is not None else _log
        self.announce = announce
        self.stream = stream
        self.delay_s = delay_s
        self.done = 0
        self.summary: str | None = None  # set it before the block ends to replace the count in the end line
        self.detail = ""  # the latest news (`client 0 loss 2.31`): shown after the count in the bar and heartbeat
        self._start = self._last_line = self._last_draw = 0.0
        self._on = self._bar = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def elapsed_s(self) -> float:
        """Seconds since the phase started."""
        return time.perf_counter() - self._start

    def __enter__(self) -> Phase:
        self._start = self._last_line = time.perf_counter()
        self._on = not _quiet
        if not self._on:
            return self
        if self.stream is None:
            self.stream = sys.stderr
        self._bar = is_terminal(self.stream)
        with _lock:
            _erase()  # an outer phase's bar: this one's lines and bar replace it
            _active.append(self)
        if self.announce:
            note(self.log, "%s", self.announce)
        if self._bar:  # a thread redraws the bar, so a phase that never counts still shows it is alive
            self._thread = threading.Thread(target=self._tick, name=f"progress: {self.label}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        with _lock:
            if self in _active:
                _active.remove(self)
            _erase()
            if not _active:
                _watch_log_lines(False)
        brief = self._bar and self.elapsed_s < self.delay_s  # on a terminal, a quick step leaves no trace
        if self._on and kind is None and not _quiet and not brief:
            self.log.info("%s: %s in %.1f s", self.label, self.summary or self._summary(), self.elapsed_s)

    def update(self, done: int, total: int | None = None) -> None:
        """`done` steps of `total` (None: unchanged) are finished; the shape of a `(done, total)` callback."""
        self.done = done
        if total is not None:
            self.total = total
        if not self._on:
            return
        now = time.perf_counter()
        if self._bar:
            if now - self._last_draw >= REDRAW_S:
                self._draw(now)
        elif now - self._last_line >= HEARTBEAT_S:
            self._last_line = now
            count = count_text(self.done, self.total, self.unit)
            detail = f" ({self.detail})" if self.detail else ""
            self.log.info("%s: %s after %.0f s%s", self.label, count, now - self._start, detail)

    def advance(self, steps: int = 1) -> None:
        """`steps` more steps are finished."""
        self.update(self.done + steps)

    def _summary(self) -> str:
        if not self.unit:
            return "done"
        return count_text(self.done, None if self.total in (None, self.done) else self.total, self.unit)

    def _tick(self) -> None:
        while not self._stop.wait(REDRAW_S):
            self._draw(time.perf_counter())

    def _draw(self, now: float) -> None:
        global _drawn
        if now - self._start < self.delay_s or self.stream is None:
            return
        width = shutil.get_terminal_size((80, 24)).columns - 1
        line = render_bar(self.label, self.done, self.total, self.unit, now - self._start, width, self.detail)
        with _lock:
            if not _active or _active[-1] is not self:
                return
            try:
                self.stream.write(f"\r{line}\x1b[K")
                self.stream.flush()
            except (OSError, ValueError):  # a closed terminal: progress is not worth failing for
                return
            _drawn = self.stream
            self._last_draw = now
            _watch_log_lines(True)


def _erase() -> None:
    """Erase the bar on screen, if any, so that what is written next starts on a clean line."""
    global _drawn
    with _lock:
        if _drawn is None:
            return
        try:
            _drawn.write("\r\x1b[K")
            _drawn.flush()
        except (OSError, ValueError):
            pass
        _drawn = None


class _EraseBar(logging.Filter):
    """On the root logger's handlers while bars are drawn: any record (a warning, another module's line) first
    erases the bar, so it is never written after the bar's text on the same line."""

    def filter(self, record: logging.LogRecord) -> bool:
        _erase()
        return True


_ERASE_BAR = _EraseBar()


def _watch_log_lines(on: bool) -> None:
    for handler in logging.getLogger().handlers:
        if on:
            handler.addFilter(_ERASE_BAR)  # a no-op when it is there already
        else:
            handler.removeFilter(_ERASE_BAR)
