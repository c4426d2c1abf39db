"""The in-process transport: a hop that calls its handler directly, for single-process runs and tests."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from edgellm.errors import ConfigError
from edgellm.net.messages import CloseSession, ForwardReply, ForwardRequest


class Handler(Protocol):
    """Whatever serves stage requests at the far end of a hop (a `StageHost`, or a router)."""

    def forward(self, request: ForwardRequest) -> ForwardReply: ...

    def close(self, request: CloseSession) -> None: ...


class LocalHop:
    """A hop to a handler in this process. Nothing is serialized; the tensors are passed by reference."""

    def __init__(self, name: str, handler: Handler, route: tuple[str, ...] | None = None) -> None:
        self.name = name
        self._handler = handler
        self.route = route  # as `RemoteHop.route`: chain mode's nodes beyond the handler; None passes it on

    @property
    def handler(self) -> Handler:
        return self._handler

    def forward(self, request: ForwardRequest) -> ForwardReply:
        return self._handler.forward(self._routed(request))

    def close(self, request: CloseSession) -> None:
        self._handler.close(self._routed(request))

    def train(self, message: Any, wait_s: float = 0.0) -> Any:
        """A split-learning message to a handler that trains (one with `handle_train`)."""
        handle = getattr(self._handler, "handle_train", None)
        if handle is None:
            raise ConfigError(f"hop {self.name} does not train")
        return handle(self._routed(message))

    def _routed(self, message: Any) -> Any:
        return message if self.route is None else dataclasses.replace(message, route=self.route)
