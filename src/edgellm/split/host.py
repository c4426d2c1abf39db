"""A stage host: one stage serving many sessions, each with its own KV cache."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgellm.errors import BusyError, ConfigError, SessionError
from edgellm.model.kv import KVCache
from edgellm.model.stage import Stage
from edgellm.net.messages import PROTOCOL_VERSION, CloseSession, ForwardReply, ForwardRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionLimits:
    """How many sessions a host keeps and for how long an idle one survives."""

    max_sessions: int = 64
    idle_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ConfigError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if not self.idle_timeout_s > 0:
            raise ConfigError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s}")


@dataclass
class _Session:
    cache: KVCache
    last_used: float


class StageHost:
    """Runs requests for one stage; keeps a KV cache per session id.

    A session starts with a request flagged `new_session` (which also resets an existing session of that id)
    and ends with `close`, after `idle_timeout_s` without requests, or when the host stops. Requests are run
    one at a time: the stage's matrix kernels already use every core.
    """

    def __init__(
        self, stage: Stage, limits: SessionLimits = SessionLimits(), clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stage = stage
        self.limits = limits
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
            BusyError: the host already serves its maximum of sessions.
            ConfigError: protocol mismatch, or a sequence past the model's limits.
        """
        if request.version != PROTOCOL_VERSION:
            raise ConfigError(
                f"protocol version {request.version} is not supported (this host speaks {PROTOCOL_VERSION})"
            )
        with self.lock:
            now = self._clock()
            self._expire(now)
            session = self._session_for(request, now)
            start = time.perf_counter()
            with torch.inference_mode():
                output = self.stage(
                    request.data, request.positions, session.cache, request.token_mask, request.last_only
                )
                if request.argmax and self.stage.spec.head:
                    output = output[:, -1:].argmax(dim=-1)  # [B, 1, V] -> [B, 1] token ids
            session.last_used = self._clock()
            return ForwardReply(output=output, compute_ms=(time.perf_counter() - start) * 1e3)

    def close(self, request: CloseSession) -> None:
        """Drop a session; closing an unknown session is not an error (it may have expired)."""
        with self.lock:
            self._sessions.pop(request.session, None)

    def _session_for(self, request: ForwardRequest, now: float) -> _Session:
        if request.new_session:
            if request.session not in self._sessions and len(self._sessions) >= self.limits.max_sessions:
                raise BusyError(f"stage is serving its maximum of {self.limits.max_sessions} sessions")
            self._sessions[request.session] = _Session(self.stage.new_cache(), now)
        session = self._sessions.get(request.session)
        if session is None:
            raise SessionError(f"unknown session {request.session!r} (expired, closed, or the node restarted)")
        return session

    def _expire(self, now: float) -> None:
        idle = [sid for sid, s in self._sessions.items() if now - s.last_used > self.limits.idle_timeout_s]
        for sid in idle:
            log.info("session %s expired after %.0f s idle", sid, self.limits.idle_timeout_s)
            del self._sessions[sid]
