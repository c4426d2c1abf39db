"""The in-process transport: a hop that calls its handler directly, for single-process runs and tests."""

from __future__ import annotations

from typing import Protocol

from edgellm.net.messages import CloseSession, ForwardReply, ForwardRequest


class Handler(Protocol):
    """Whatever serves stage requests at the far end of a hop (a `StageHost`, or a router)."""

    def forward(self, request: ForwardRequest) -> ForwardReply: ...

    def close(self, request: CloseSession) -> None: ...


class LocalHop:
    """A hop to a handler in this process. Nothing is serialized; the tensors are passed by reference."""

    def __init__(self, name: str, handler: Handler) -> None:
        self.name = name
        self._handler = handler

    def forward(self, request: ForwardRequest) -> ForwardReply:
        return self._handler.forward(request)

    def close(self, request: CloseSession) -> None:
        self._handler.close(request)
