"""A stage node's request handler: decode, validate, run the stage, forward along the chain, encode."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from edgellm.errors import ConfigError
from edgellm.net.codec import CodecSpec, parse_codec
from edgellm.net.messages import (
    MAX_MESSAGE_BYTES,
    CloseSession,
    ForwardReply,
    ForwardRequest,
    HopTrace,
    WireError,
    decode,
    encode,
)
from edgellm.split.host import StageHost
from edgellm.split.pipeline import Hop
from edgellm.split.validate import check_request


class StageServer:
    """Serves one stage host to peers (implements `edgellm.net.rpc.NodeHandler`).

    In chain mode a request names the nodes still ahead of it (`route`); the server runs its stage, then sends
    the result to the first of them through `downstream[name]` and relays the answer back, with the trace of
    every hop beyond it.

    Args:
        name: this node's name.
        host: the stage and its sessions.
        downstream: hops to the nodes this one may forward to, by name.
        info: extra fields for `Info` (model name, role, ...).
        max_message_bytes: largest frame accepted.
    """

    def __init__(
        self,
        name: str,
        host: StageHost,
        downstream: Mapping[str, Hop] | None = None,
        info: Mapping[str, Any] | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.name = name
        self.host = host
        self.downstream = dict(downstream or {})
        self._info = dict(info or {})
        self._max_bytes = max_message_bytes

    def forward(self, frame: bytes) -> bytes:
        start = time.perf_counter()
        request = decode(frame, self._max_bytes)
        if not isinstance(request, ForwardRequest):
            raise WireError(f"Forward takes a forward message, got {type(request).__name__}")
        reply_codec = parse_codec(request.reply_codec)
        check_request(request, self.host.stage)
        next_hop = self._next(request.route[0]) if request.route else None  # refuse a bad route before computing
        local = self.host.forward(request)
        output = local.output
        trace: tuple[HopTrace, ...] = ()
        is_logits = self.host.stage.spec.head and local.output.is_floating_point()
        if next_hop is not None:
            ahead = ForwardRequest(
                request.session, local.output, request.positions, request.token_mask,
                request.new_session, request.last_only, route=request.route[1:], argmax=request.argmax,
            )  # fmt: skip
            down = next_hop.forward(ahead)
            output, is_logits, trace = down.output, down.is_logits, down.trace
        # Logits decide the tokens: never send them through a lossy codec.
        codec = CodecSpec("none", reply_codec.compression) if is_logits else reply_codec
        server_ms = (time.perf_counter() - start) * 1e3
        return encode(ForwardReply(output, local.compute_ms, server_ms, trace, is_logits), codec)

    def close(self, frame: bytes) -> None:
        request = decode(frame, self._max_bytes)
        if not isinstance(request, CloseSession):
            raise WireError(f"Close takes a close message, got {type(request).__name__}")
        self.host.close(request)
        if request.route:
            self._next(request.route[0]).close(CloseSession(request.session, route=request.route[1:]))

    def info(self) -> dict[str, Any]:
        spec = self.host.stage.spec
        return {
            **self._info,
            "name": self.name,
            "layers": [spec.start, spec.end],
            "embed": spec.embed,
            "head": spec.head,
            "hidden_size": self.host.stage.dims.hidden_size,
            "sessions": self.host.session_count,
        }

    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        raise ConfigError(f"node {self.name} is a stage server; send prompts to the device node")

    def _next(self, name: str) -> Hop:
        hop = self.downstream.get(name)
        if hop is None:
            raise ConfigError(f"node {self.name} has no link to {name!r}; it can forward to {sorted(self.downstream)}")
        return hop
