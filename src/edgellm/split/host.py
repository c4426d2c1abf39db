"""A stage host: one stage serving many sessions, each with its own KV cache."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgellm.errors import BusyError, ConfigError, SessionError
from edgellm.model.kv import KVCache, capacity_for
from edgellm.model.stage import Stage
from edgellm.net.messages import PROTOCOL_VERSION, CloseSession, ForwardReply, ForwardRequest
from edgellm.split.budget import NodeEmulation, StageMemory

log = logging.getLogger(__name__)

EVICT_IDLE_S = 60.0  # a full host makes room by evicting a session idle this long, least recently used first
PREFILL_CHUNK = 512  # tokens per forward pass of a long prompt (docs/BENCHMARKS.md: the TTFT it costs)


@dataclass(frozen=True)
class SessionLimits:
    """How many sessions a host keeps, for how long an idle one survives, and how long one may grow.

    `max_context` (tokens; None = the model's own limit) is what each session's KV cache is reserved for in the
    node's memory budget, so no request may reach a position past it. `prefill_chunk` (tokens; None = whole)
    bounds one forward pass: a longer prompt runs as consecutive passes over the session's cache, so its
    activations never exceed those of `prefill_chunk` tokens. A full host makes room for a new session by
    evicting one idle for `evict_idle_s` or more, least recently used first.
    """

    max_sessions: int = 64
    idle_timeout_s: float = 600.0
    max_context: int | None = None
    prefill_chunk: int | None = PREFILL_CHUNK
    evict_idle_s: float = EVICT_IDLE_S

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ConfigError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if not self.idle_timeout_s > 0:
            raise ConfigError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s}")
        if not self.evict_idle_s >= 0:
            raise ConfigError(f"evict_idle_s must be >= 0, got {self.evict_idle_s}")
        if self.max_context is not None and self.max_context < 1:
            raise ConfigError(f"max_context must be >= 1, got {self.max_context}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")


@dataclass
class _Session:
    cache: KVCache
    last_used: float


class StageHost:
    """Runs requests for one stage; keeps a KV cache per session id.

    A session starts with a request flagged `new_session` (which also resets an existing session of that id)
    and ends with `close`, after `idle_timeout_s` without requests, when a full host (`max_sessions`, or the
    memory budget) evicts it to make room for a new one (only after `evict_idle_s` without requests, least
    recently used first), or when the host stops. Requests are run
    one at a time: the stage's matrix kernels already use every core.

    Args:
        stage: the stage to serve.
        limits: sessions, idle expiry and `max_context`.
        clock: monotonic seconds, for idle expiry.
        emulation: a node slower than this machine waits `compute_scale - 1` times each computation (holding the
            lock, so the emulated node is busy meanwhile) and reports the scaled time as `compute_ms`.
        memory: where each new session reserves its KV cache for `max_context` tokens; None reserves nothing.
    """

    def __init__(
        self,
        stage: Stage,
        limits: SessionLimits = SessionLimits(),
        clock: Callable[[], float] = time.monotonic,
        emulation: NodeEmulation = NodeEmulation(),
        memory: StageMemory | None = None,
    ) -> None:
        self.stage = stage
        self.limits = limits
        self.emulation = emulation
        self.memory = memory
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self.lock = threading.RLock()  # also held by the training host: one computation at a time

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def forward(self, request: ForwardRequest) -> ForwardReply:
        """Run the stage on a request's tokens.

        Raises:
            SessionError: the session is unknown (and the request is not a session start).
            BusyError: the host already serves its maximum of sessions, or a new session's KV cache would pass
                the node's memory budget.
            ConfigError: protocol mismatch, or a position past `max_context` or the model's limits.
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
        with self.lock:
            now = self._clock()
            self._expire(now)
            session = self._session_for(request, now)
            start = time.perf_counter()
            with torch.inference_mode():
                output = self._run(request, session.cache)
                if request.argmax and self.stage.spec.head:
                    output = output[:, -1:].argmax(dim=-1)  # [B, 1, V] -> [B, 1] token ids
            measured_s = time.perf_counter() - start
            scale = self.emulation.compute_scale
            if scale > 1.0:  # an emulated slower node: busy for the rest of its time, still holding the lock
                time.sleep((scale - 1.0) * measured_s)
            session.last_used = self._clock()
            return ForwardReply(output=output, compute_ms=scale * measured_s * 1e3)

    def _run(self, request: ForwardRequest, cache: KVCache) -> torch.Tensor:
        """The stage on the request's tokens, in passes of at most `prefill_chunk` tokens; a failed pass leaves
        the cache as it was before the first."""
        data, positions, mask = request.data, request.positions, request.token_mask
        chunk, new = self.limits.prefill_chunk, int(data.shape[1])
        if chunk is None or new <= chunk:
            return self.stage(data, positions, cache, mask, request.last_only)
        start, outputs = cache.length, []
        try:
            for a in range(0, new, chunk):
                last = a + chunk >= new
                part = slice(a, a + chunk)
                out = self.stage(data[:, part], positions[:, part], cache, None if mask is None else mask[:, part],
                                 request.last_only)  # fmt: skip
                if last or not (self.stage.spec.head and request.last_only):  # else: a row of logits not asked for
                    outputs.append(out)
        except BaseException:
            cache.truncate(start)
            if start == 0:
                cache.rollback()  # an empty cache forgets the batch size too
            raise
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def close(self, request: CloseSession) -> None:
        """Drop a session; closing an unknown session is not an error (it may have expired)."""
        with self.lock:
            self._drop(request.session)

    def close_all(self) -> None:
        """Drop every session: the stage is being replaced, and their KV caches belong to its layers."""
        with self.lock:
            for session in list(self._sessions):
                self._drop(session)

    def _session_for(self, request: ForwardRequest, now: float) -> _Session:
        if request.new_session:
            while request.session not in self._sessions and len(self._sessions) >= self.limits.max_sessions:
                if not self._evict_one(now, request.session):
                    raise BusyError(
                        f"stage is serving its maximum of {self.limits.max_sessions} sessions, none of them idle "
                        f"for {self.limits.evict_idle_s:.0f} s"
                    )
            while True:
                try:
                    self._reserve(request.session, batch=int(request.data.shape[0]))
                    break
                except BusyError:  # over the memory budget: an idle session's KV cache may make room
                    if not self._evict_one(now, request.session):
                        raise
            self._sessions[request.session] = _Session(self.stage.new_cache(), now)
        session = self._sessions.get(request.session)
        if session is None:
            raise SessionError(f"unknown session {request.session!r} (expired, closed, or the node restarted)")
        return session

    def _evict_one(self, now: float, keep: str) -> bool:
        """Drop the least recently used session idle for `evict_idle_s` or more (never `keep`); False if none is.

        Sessions abandoned by devices that crashed would otherwise hold the table, and their KV caches the memory
        budget, until `idle_timeout_s`; a session in use between two steps of its generation is never idle so long.
        """
        idle = [(s.last_used, sid) for sid, s in self._sessions.items()
                if sid != keep and now - s.last_used >= self.limits.evict_idle_s]  # fmt: skip
        if not idle:
            return False
        last_used, sid = min(idle)
        log.info("session %s evicted after %.0f s idle: the host is full", sid, now - last_used)
        self._drop(sid)
        return True

    def _expire(self, now: float) -> None:
        idle = [sid for sid, s in self._sessions.items() if now - s.last_used > self.limits.idle_timeout_s]
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
        self._sessions.pop(session, None)
        if self.memory is not None:
            self.memory.ledger.release((id(self), session))
