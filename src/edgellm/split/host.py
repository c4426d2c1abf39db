"""A stage host: one stage serving many sessions, each with its own KV cache."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from edgellm.errors import BusyError, ConfigError, SessionError
from edgellm.model.kv import KVCache, capacity_for
from edgellm.model.session_rows import SessionRows
from edgellm.model.stage import Stage
from edgellm.net.messages import PROTOCOL_VERSION, CloseSession, ForwardReply, ForwardRequest
from edgellm.split import compute_thread
from edgellm.split.batching import Leadership, Work, next_iteration
from edgellm.split.budget import NodeEmulation, StageMemory
from edgellm.split.limits import EVICT_IDLE_S, MAX_BATCH, PREFILL_CHUNK, SessionLimits

__all__ = ["EVICT_IDLE_S", "MAX_BATCH", "PREFILL_CHUNK", "Adapters", "SessionLimits", "StageHost"]

log = logging.getLogger(__name__)


class Adapters(Protocol):
    """The LoRA adapters a stage holds (`edgellm.adapters.AdapterStore`), as the host uses them."""

    def acquire(self, name: str | None) -> int: ...  # pin an adapter for a session -> its slot (-1: base)

    def release(self, slot: int) -> None: ...

    def rows(self, slots: Sequence[int]) -> AbstractContextManager[None]: ...  # row b of the passes inside: slots[b]


@dataclass
class _Session:
    cache: KVCache
    last_used: float
    adapter: int = -1  # the session's adapter slot in the host's store; -1: the base model
    busy: bool = False  # a request of the session is queued or running
    dropped: bool = False  # closed while busy: its adapter is released when the request ends


class StageHost:
    """Runs requests for one stage; keeps a KV cache per session id; batches concurrent sessions.

    A session starts with a request flagged `new_session` (which also resets an existing session of that id)
    and ends with `close`, after `idle_timeout_s` without requests, when a full host (`max_sessions`, or the
    memory budget) evicts it to make room for a new one (only after `evict_idle_s` without requests, least
    recently used first), or when the host stops.

    Requests of different sessions that wait at the same time run together (`edgellm.split.batching`): each
    iteration is one forward pass over the next-token steps of up to `max_batch` sessions, plus one chunk of the
    oldest prompt. One iteration runs at a time: the stage's matrix kernels already use every core.

    Args:
        stage: the stage to serve.
        limits: sessions, idle expiry, `max_context`, prefill chunk and batch size.
        clock: monotonic seconds, for idle expiry.
        emulation: a node slower than this machine waits `compute_scale - 1` times each computation (holding the
            lock, so the emulated node is busy meanwhile) and reports the scaled time as `compute_ms`.
        memory: where each new session reserves its KV cache for `max_context` tokens; None reserves nothing.
        adapters: the LoRA adapters sessions may run with (`ForwardRequest.adapter`); None: the base model only.
    """

    def __init__(
        self,
        stage: Stage,
        limits: SessionLimits = SessionLimits(),
        clock: Callable[[], float] = time.monotonic,
        emulation: NodeEmulation = NodeEmulation(),
        memory: StageMemory | None = None,
        adapters: Adapters | None = None,
    ) -> None:
        self.stage = stage
        self.limits = limits
        self.emulation = emulation
        self.memory = memory
        self.adapters = adapters
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._table = threading.RLock()  # the session table; never held while computing
        self._leader = Leadership()
        self.lock = threading.RLock()  # the stage's computation; also held by the training host
        self.batch_sizes: Counter[int] = Counter()  # decode passes by number of rows
        self.prefill_chunks = 0
        self.row_messages = 0  # requests that carried several sessions' steps (`ForwardRequest.rows`)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def expire_idle(self) -> int:
        """Drop the sessions idle past `idle_timeout_s` now (requests do it too); -> sessions left."""
        with self._table:
            self._expire(self._clock())
            return len(self._sessions)

    def stats(self) -> dict[str, Any]:
        """Sessions, requests waiting, and how many decode passes ran with how many rows (for Info)."""
        return {
            "sessions": self.session_count,
            "queued": len(self._leader.queue),
            "max_batch": self.limits.max_batch,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "prefill_chunks": self.prefill_chunks,
            "row_messages": self.row_messages,
        }

    def forward(self, request: ForwardRequest) -> ForwardReply:
        """Run the stage on a request's tokens (batched with other sessions' requests waiting at the same time).

        Raises:
            SessionError: the session is unknown (and the request is not a session start).
            BusyError: the host already serves its maximum of sessions, or a new session's KV cache would pass
                the node's memory budget.
            ConfigError: protocol mismatch, a position past `max_context` or the model's limits, a session with
                a request already in progress, or an adapter this node does not hold.
        """
        if request.version != PROTOCOL_VERSION:
            raise ConfigError(
                f"protocol version {request.version} is not supported (this host speaks {PROTOCOL_VERSION})"
            )
        max_context = self.limits.max_context
        if max_context is not None and request.positions.numel() and int(request.positions.max()) >= max_context:
            raise ConfigError(
                f"position {int(request.positions.max())} is past this deployment's max_context of {max_context} "
                "tokens; start a new session or raise deployment.max_context"
            )
        works = self._admit_rows(request) if request.rows else [Work(request, self._admit(request))]
        self.row_messages += bool(request.rows)
        lead = self._leader
        with lead.cond:
            lead.queue.extend(works)
            while not all(w.done for w in works) and lead.running:
                lead.cond.wait()
            leading = not all(w.done for w in works)
            lead.running = lead.running or leading
        if leading:
            self._lead(works)
        for w in works:
            if w.error is not None:
                raise w.error
        output = works[0].output if len(works) == 1 else torch.cat([w.output for w in works])  # type: ignore[misc]
        assert output is not None
        compute_s = max(w.compute_s for w in works)
        return ForwardReply(output=output, compute_ms=self.emulation.compute_scale * compute_s * 1e3)

    def _admit_rows(self, request: ForwardRequest) -> list[Work]:
        """One `Work` per row of a request carrying several sessions' steps; all are admitted, or none."""
        works: list[Work] = []
        try:
            for b, session in enumerate(request.rows):
                row = dataclasses.replace(request, session=session, data=request.data[b : b + 1],
                                          positions=request.positions[b : b + 1], rows=())  # fmt: skip
                works.append(Work(row, self._admit(row)))
        except BaseException:
            for w in works:
                self._finish(w, error=ConfigError("another row of its request was refused"))
            raise
        return works

    def _admit(self, request: ForwardRequest) -> _Session:
        with self._table:
            now = self._clock()
            self._expire(now)
            old = self._sessions.get(request.session)
            if old is not None and old.busy:
                raise ConfigError(f"session {request.session!r} already has a request in progress")
            session = self._session_for(request, now)
            if self.stage.spec.num_layers:  # a stage without layers keeps no keys
                _rewind(session.cache, request)
            session.busy, session.last_used = True, now
            return session

    def _lead(self, works: list[Work]) -> None:
        """Run iterations until `works` are done, then let a waiting thread lead."""
        lead = self._leader
        try:
            while True:
                with lead.cond:
                    if all(w.done for w in works):
                        return
                    rows, other = next_iteration(lead.queue, self.limits.max_batch)
                self._iterate(rows, other)
                with lead.cond:
                    lead.queue = [w for w in lead.queue if not w.done]
                    lead.cond.notify_all()
        finally:
            with lead.cond:
                lead.running = False
                lead.cond.notify_all()

    def _iterate(self, rows: list[Work], other: Work | None) -> None:
        def passes() -> float:
            with torch.inference_mode():  # thread-local: entered on the thread that computes
                return (self._run_rows(rows) if rows else 0.0) + (self._run_chunk(other) if other is not None else 0.0)

        with self.lock:
            spent = compute_thread.run(passes)  # on the process's compute thread, if it has one
            scale = self.emulation.compute_scale
            if scale > 1.0:  # an emulated slower node: busy for the rest of its time, still holding the lock
                time.sleep((scale - 1.0) * spent)

    def _run_rows(self, rows: list[Work]) -> float:
        """One pass over one new token of each row's session; a failed pass is retried row by row, so one bad
        request fails alone. -> the seconds it computed"""
        dtype = self.stage.dtype
        data = torch.cat([w.request.data.to(dtype) if w.request.data.is_floating_point() else w.request.data
                          for w in rows])  # fmt: skip
        positions = torch.cat([w.request.positions for w in rows])
        start = time.perf_counter()
        try:
            with self._adapter_rows([w.session.adapter for w in rows]):
                caches = [w.session.cache for w in rows]
                out = self.stage(data, positions, caches[0] if len(rows) == 1 else SessionRows(caches), None, False)
        except Exception as exc:  # noqa: BLE001 - handed to the requests' threads
            if len(rows) == 1:
                self._finish(rows[0], error=exc)
                return time.perf_counter() - start
            return sum(self._run_rows([w]) for w in rows)
        spent = time.perf_counter() - start
        self.batch_sizes[len(rows)] += 1
        for b, w in enumerate(rows):
            w.compute_s += spent
            self._finish(w, self._reply_output(w.request, out[b : b + 1]))
        return spent

    def _run_chunk(self, work: Work) -> float:
        """The next pass of a request that is not one token of one sequence: a prompt of at most
        `prefill_chunk` tokens per pass; a failure undoes the request's earlier passes too. -> seconds computed"""
        request, cache = work.request, work.session.cache
        data, positions, mask = request.data, request.positions, request.token_mask
        new, chunk = int(data.shape[1]), self.limits.prefill_chunk
        if work.offset == 0:
            work.start_length = cache.length
        part = slice(work.offset, new if chunk is None else min(new, work.offset + chunk))
        last = part.stop >= new
        start = time.perf_counter()
        try:
            with self._adapter_rows([work.session.adapter] * int(data.shape[0])):
                out = self.stage(data[:, part], positions[:, part], cache, None if mask is None else mask[:, part],
                                 request.last_only)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - handed to the request's thread
            cache.truncate(work.start_length)
            if work.start_length == 0:
                cache.rollback()  # an empty cache forgets the batch size too
            self._finish(work, error=exc)
            return time.perf_counter() - start
        spent = time.perf_counter() - start
        work.compute_s += spent
        self.prefill_chunks += 1
        if last or not (self.stage.spec.head and request.last_only):  # else: a row of logits not asked for
            work.outputs.append(out)
        work.offset = part.stop
        if last:
            outputs = work.outputs
            self._finish(
                work, self._reply_output(request, outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1))
            )
        return spent

    def _reply_output(self, request: ForwardRequest, output: torch.Tensor) -> torch.Tensor:
        if request.argmax and self.stage.spec.head:  # [B, S, V] -> [B, S] token ids ([B, 1]: the last token's)
            return (output[:, -1:] if request.last_only else output).argmax(dim=-1)
        return output

    def _adapter_rows(self, slots: list[int]) -> AbstractContextManager[None]:
        if self.adapters is None or all(s < 0 for s in slots):
            return contextlib.nullcontext()
        return self.adapters.rows(slots)

    def _finish(self, work: Work, output: torch.Tensor | None = None, error: BaseException | None = None) -> None:
        """End a request: its session is free for its next request before its thread can see the reply."""
        with self._table:
            session = work.session
            session.busy, session.last_used = False, self._clock()
            if session.dropped:
                self._free_adapter(session)
        work.finish(output, error)

    def close(self, request: CloseSession) -> None:
        """Drop a session; closing an unknown session is not an error (it may have expired)."""
        with self._table:
            self._drop(request.session)

    def close_all(self) -> None:
        """Drop every session: the stage is being replaced, and their KV caches belong to its layers."""
        with self.lock, self._table:
            for session in list(self._sessions):
                self._drop(session)

    def _session_for(self, request: ForwardRequest, now: float) -> _Session:
        if request.new_session:
            self._drop(request.session)  # a session start resets a session of that id
            if request.adapter and self.adapters is None:
                raise ConfigError(f"this node holds no LoRA adapters; the session asked for {request.adapter!r}")
            adapter = self.adapters.acquire(request.adapter) if self.adapters is not None and request.adapter else -1
            try:
                self._make_room(request, now)
            except BaseException:
                if self.adapters is not None and adapter >= 0:
                    self.adapters.release(adapter)
                raise
            self._sessions[request.session] = _Session(self.stage.new_cache(), now, adapter)
        session = self._sessions.get(request.session)
        if session is None:
            raise SessionError(f"unknown session {request.session!r} (expired, closed, or the node restarted)")
        return session

    def _make_room(self, request: ForwardRequest, now: float) -> None:
        """A place in the session table and the new session's KV reservation, evicting idle sessions if needed."""
        while len(self._sessions) >= self.limits.max_sessions:
            if not self._evict_one(now, request.session):
                raise BusyError(
                    f"stage is serving its maximum of {self.limits.max_sessions} sessions, none of them idle "
                    f"for {self.limits.evict_idle_s:.0f} s"
                )
        while True:
            try:
                self._reserve(request.session, batch=int(request.data.shape[0]))
                return
            except BusyError:  # over the memory budget: an idle session's KV cache may make room
                if not self._evict_one(now, request.session):
                    raise

    def _evict_one(self, now: float, keep: str) -> bool:
        """Drop the least recently used session idle for `evict_idle_s` or more (never `keep`); False if none is.

        Sessions abandoned by devices that crashed would otherwise hold the table, and their KV caches the memory
        budget, until `idle_timeout_s`; a session in use between two steps of its generation is never idle so long.
        """
        idle = [(s.last_used, sid) for sid, s in self._sessions.items()
                if sid != keep and not s.busy and now - s.last_used >= self.limits.evict_idle_s]  # fmt: skip
        if not idle:
            return False
        last_used, sid = min(idle)
        log.info("session %s evicted after %.0f s idle: the host is full", sid, now - last_used)
        self._drop(sid)
        return True

    def _expire(self, now: float) -> None:
        idle = [sid for sid, s in self._sessions.items()
                if not s.busy and now - s.last_used > self.limits.idle_timeout_s]  # fmt: skip
        for sid in idle:
            log.info("session %s expired after %.0f s idle", sid, self.limits.idle_timeout_s)
            self._drop(sid)

    def _reserve(self, session: str, batch: int) -> None:
        """Reserve the session's KV cache at `max_context` (its buffers' full capacity, validity mask included)."""
        if self.memory is None or not self.stage.spec.num_layers:
            return
        tokens = self.limits.max_context or self.stage.max_length
        nbytes = (self.memory.kv_bytes_per_token + 1) * capacity_for(tokens) * batch  # + 1: the bool mask
        self.memory.ledger.reserve((id(self), session), nbytes, tokens)

    def _drop(self, session: str) -> None:
        dropped = self._sessions.pop(session, None)
        if self.memory is not None:
            self.memory.ledger.release((id(self), session))
        if dropped is not None:
            dropped.dropped = True
            if not dropped.busy:  # else: its request still runs with the adapter; released when it ends
                self._free_adapter(dropped)

    def _free_adapter(self, session: _Session) -> None:
        if self.adapters is not None and session.adapter >= 0:
            self.adapters.release(session.adapter)
            session.adapter = -1


def _rewind(cache: KVCache, request: ForwardRequest) -> None:
    """Drop the cached tokens at and after the request's first position: a speculative round's rejected drafts.

    Positions are cache places in a session of one unpadded sequence, so a request that starts before the cache's
    end rolls the cache back to there (`edgellm.spec`); one that would leave a gap is refused. Padded sessions count
    positions over real tokens only and are left as they are.

    Raises:
        ConfigError: the request's first position is past the session's cached tokens.
    """
    if request.new_session or request.data.shape[0] != 1 or cache.has_padding() or not request.positions.numel():
        return
    first = int(request.positions[0, 0])
    if first > cache.length:
        raise ConfigError(f"position {first} leaves a gap after the session's {cache.length} cached tokens")
    if first < cache.length:
        cache.truncate(first)
