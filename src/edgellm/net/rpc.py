"""The gRPC transport: a node serves edgellm frames over gRPC; a `RemoteHop` calls one.

gRPC gives deadlines, TLS (and mutual TLS), HTTP/2 flow control and cross-language reach; the payloads are
edgellm's own frames (`edgellm.net.messages`), so no protobuf code generation is needed. Methods of the
`edgellm.Node` service:

- `Forward` (frame -> frame): run the node's stage on a `ForwardRequest`.
- `Close` (frame -> empty): drop a session.
- `Info` (JSON -> JSON): what the node serves; doubles as the readiness probe.
- `Generate` (JSON -> stream of JSON events): a device node generates text for a prompt.
- `Train` (frame -> frame): a split-learning message (`TrainOpen`, `TrainForward`, `TrainBackward`,
  `AdapterSync`), answered with a `ForwardReply` or a `SyncReply`.
- `Control` (JSON -> JSON): a control-plane op `{"op": ..., ...}` (`edgellm.split.control`): probe a link,
  change its emulation, load another stage, migrate.

Every call carries the deployment's shared token in the `x-edgellm-token` metadata; nodes compare it in
constant time and refuse calls without it. Errors cross as gRPC statuses, one per kind (`edgellm.net.rpc_status`):
a caller gets back the kind the node raised.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, Protocol

import grpc

from edgellm.errors import ConfigError
from edgellm.net.channel import ChannelConfig as ChannelConfig  # re-exported: callers import it from here
from edgellm.net.channel import TlsFiles as TlsFiles
from edgellm.net.channel import grpc_options, is_loopback_address, open_channel, server_credentials
from edgellm.net.codec import CodecSpec
from edgellm.net.link import EmulatedLink
from edgellm.net.messages import (
    CloseSession,
    ForwardReply,
    ForwardRequest,
    HopTrace,
    SyncReply,
    TrainBackward,
    TrainForward,
    WireError,
    decode,
    encode,
)
from edgellm.net.probe import echo_request
from edgellm.net.rpc_status import AuthError as AuthError  # re-exported: RemoteHop's callers catch it from here
from edgellm.net.rpc_status import NodeUnreachable, RemoteError, abort_with, error_from

_log = logging.getLogger(__name__)

SERVICE = "edgellm.Node"
TOKEN_HEADER = "x-edgellm-token"


def codec_name(spec: CodecSpec) -> str:
    """ "int8+zstd" for CodecSpec("int8", "zstd"); the inverse of `parse_codec`."""
    return spec.codec if spec.compression == "none" else f"{spec.codec}+{spec.compression}"


class RemoteHop:
    """A hop to a stage on another node, over gRPC, through an emulated link.

    Implements `edgellm.split.pipeline.Hop`. Requests are encoded with the link's `codec`; the reply's hidden
    states come back in the same codec. The reply's `trace` starts with this hop's `HopTrace`, followed by
    those of the hops the node forwarded to.

    Args:
        name: the remote node's name (for errors and traces).
        address: "host:port".
        channel: token, deadline, TLS.
        link: the emulated link to the node, or None for the raw network.
        codec: the smashed-data codec on this link.
        sender: this side's node name, for traces.
        route: chain mode: the nodes the remote node must forward to, in order; None passes on the route of
            each request (a node forwarding along a chain).
    """

    def __init__(
        self,
        name: str,
        address: str,
        channel: ChannelConfig,
        link: EmulatedLink | None = None,
        codec: CodecSpec = CodecSpec(),
        sender: str = "device",
        route: tuple[str, ...] | None = (),
    ) -> None:
        self.name = name
        self.address = address
        self.channel = channel
        self.link = link
        self.codec = codec
        self.sender = sender
        self.route = route
        self._metadata = ((TOKEN_HEADER, channel.token),) if channel.token else ()
        self.sync_bytes = 0  # adapter traffic (open, get, put, checkpoint, aggregate), both directions
        self._grpc = open_channel(address, channel)
        self._forward = self._grpc.unary_unary(f"/{SERVICE}/Forward")
        self._close = self._grpc.unary_unary(f"/{SERVICE}/Close")
        self._info = self._grpc.unary_unary(f"/{SERVICE}/Info")
        self._generate = self._grpc.unary_stream(f"/{SERVICE}/Generate")
        self._train = self._grpc.unary_unary(f"/{SERVICE}/Train")
        self._control = self._grpc.unary_unary(f"/{SERVICE}/Control")

    def forward(self, request: ForwardRequest) -> ForwardReply:
        route = request.route if self.route is None else self.route
        request = dataclasses.replace(request, route=route, reply_codec=codec_name(self.codec))
        reply = self._exchange(self._forward, encode(request, self.codec))
        if not isinstance(reply, ForwardReply):
            raise RemoteError(f"node {self.name} answered Forward with a {type(reply).__name__}")
        return reply

    def train(self, message: Any, wait_s: float = 0.0) -> ForwardReply | SyncReply:
        """Send a split-learning message; activations and gradients use the link's codec, adapters go lossless.

        A `ForwardReply` comes back with this hop's `HopTrace` first, as from `forward`. `wait_s` extends the
        deadline by how long the receiver may rightly keep the call waiting (for a FedAvg round to fill, or for
        another client's turn on a shared adapter).
        """
        route = message.route if self.route is None else self.route
        message = dataclasses.replace(message, route=route)
        if isinstance(message, TrainForward | TrainBackward):
            message = dataclasses.replace(message, reply_codec=codec_name(self.codec))
        reply = self._exchange(self._train, encode(message, self.codec), self.channel.deadline_s + wait_s)
        if not isinstance(reply, ForwardReply | SyncReply):
            raise RemoteError(f"node {self.name} answered Train with a {type(reply).__name__}")
        return reply

    def _exchange(self, method: Callable[..., bytes], frame: bytes, timeout_s: float | None = None) -> Any:
        """Send `frame` through the emulated link, decode the answer; a `ForwardReply` gets this hop's trace
        first, a `SyncReply` (adapter traffic) is counted in `sync_bytes`."""
        reply_frame, call_ms = self._through_link(method, frame, timeout_s)
        try:
            reply = decode(reply_frame, self.channel.max_message_bytes)
        except WireError as exc:  # the peer's fault, not this side's input
            raise RemoteError(f"node {self.name} sent a reply that does not decode: {exc}") from exc
        if isinstance(reply, SyncReply):
            self.sync_bytes += len(frame) + len(reply_frame)
        if not isinstance(reply, ForwardReply):
            return reply
        own = HopTrace(
            node=self.name,
            link=f"{self.sender}->{self.name}",
            compute_ms=reply.compute_ms,
            server_ms=reply.server_ms,
            wire_ms=max(call_ms - reply.server_ms, 0.0),
            bytes_up=len(frame),
            bytes_down=len(reply_frame),
        )
        return dataclasses.replace(reply, trace=(own, *reply.trace))

    def _through_link(
        self, method: Callable[..., bytes], frame: bytes, timeout_s: float | None = None
    ) -> tuple[bytes, float]:
        """Call `method` with `frame`, each way through the emulated link; -> the reply and the call's ms."""
        link = self.link  # read once: `set_link` may replace it between messages, never within one
        start = time.perf_counter()
        if link is not None:
            link.send(len(frame), "up")
        reply_frame = self._call(method, frame, timeout_s)
        if link is not None:
            link.send(len(reply_frame), "down")
        return reply_frame, (time.perf_counter() - start) * 1e3

    def control(self, request: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        """Send a control op (`{"op": ..., ...}`, see `edgellm.split.control`) and return the node's answer.
        Control calls bypass the link emulation: they manage the deployment, they are not its traffic."""
        return self._json(self._call(self._control, json.dumps(request).encode(), timeout_s), "Control")

    def probe(self, up_bytes: int, down_bytes: int, timeout_s: float | None = None) -> float:
        """Seconds for an echo of about `up_bytes` out and `down_bytes` back, through the emulated link both
        ways as `forward` goes: a measurement of the link, transport included."""
        reply, call_ms = self._through_link(self._control, echo_request(up_bytes, down_bytes), timeout_s)
        self._json(reply, "Control")
        return call_ms / 1e3

    def close(self, request: CloseSession) -> None:
        route = request.route if self.route is None else self.route
        self._call(self._close, encode(dataclasses.replace(request, route=route)))

    def info(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The node's description (name, layers, model); raises NodeUnreachable if it does not answer."""
        return self._json(self._call(self._info, b"{}", timeout_s), "Info")

    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Ask a device node to generate; yields its events (tokens, then a final report)."""
        try:
            for event in self._generate(json.dumps(request).encode(), timeout=None, metadata=self._metadata):
                yield self._json(event, "Generate")
        except grpc.RpcError as exc:
            raise error_from(exc, f"node {self.name} at {self.address}") from None

    def _json(self, payload: bytes, method: str) -> dict[str, Any]:
        try:
            answer = json.loads(payload)
        except ValueError as exc:  # JSON and UTF-8 errors: the peer's fault
            raise RemoteError(f"node {self.name} answered {method} with invalid JSON: {exc}") from None
        if not isinstance(answer, dict):
            raise RemoteError(f"node {self.name} answered {method} with JSON that is not an object")
        return answer

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Poll `Info` until the node answers or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.info(timeout_s=1.0)
            except NodeUnreachable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def connect_now(self) -> None:
        """Open the connection now instead of at the first call (a standby replica's hop: its first call is a
        failover's replay, which should not also pay the connection's setup)."""
        self._grpc.subscribe(lambda _: None, try_to_connect=True)

    def shutdown(self) -> None:
        self._grpc.close()

    def _call(self, method: Callable[..., bytes], payload: bytes, timeout_s: float | None = None) -> bytes:
        try:
            return method(payload, timeout=timeout_s or self.channel.deadline_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from(exc, f"node {self.name} at {self.address}") from None


class NodeHandler(Protocol):
    """What a node does with each call; `edgellm.deploy.node_builder` builds one. Raise an `EdgellmError` of the
    right kind (bad input, a failed peer, busy); any other exception is answered as an internal error."""

    def forward(self, frame: bytes) -> bytes: ...

    def close(self, frame: bytes) -> None: ...

    def info(self) -> dict[str, Any]: ...

    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]: ...

    def train(self, frame: bytes) -> bytes: ...

    def control(self, request: dict[str, Any]) -> dict[str, Any]: ...


def serve(handler: NodeHandler, address: str, channel: ChannelConfig, workers: int = 8) -> tuple[grpc.Server, int]:
    """Start a gRPC server for `handler` on `address`; returns the server and the bound port.

    Raises:
        ConfigError: the address cannot be bound.
    """
    # No SO_REUSEPORT (gRPC's default is on): a second node on a taken port must fail, not share the port.
    options = [*grpc_options(channel.max_message_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    service = _Service(handler, channel.token)
    methods = {
        "Forward": grpc.unary_unary_rpc_method_handler(service.forward),
        "Close": grpc.unary_unary_rpc_method_handler(service.close),
        "Info": grpc.unary_unary_rpc_method_handler(service.info),
        "Generate": grpc.unary_stream_rpc_method_handler(service.generate),
        "Train": grpc.unary_unary_rpc_method_handler(service.train),
        "Control": grpc.unary_unary_rpc_method_handler(service.control),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    try:
        if channel.tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, server_credentials(channel.tls))
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"cannot listen on {address} (in use, or not an address of this machine)")
    if channel.tls is None and not is_loopback_address(address):
        _log.warning("WARNING: listening on %s without TLS: hidden states, tokens, adapters and the shared token cross "
                     "the network in the clear; give the deployment [security] tls files", address)  # fmt: skip
    server.start()
    return server, port


class _Service:
    """Adapts a NodeHandler to gRPC: token check, one status per error kind, and a node that keeps serving after
    bad input and after its own bugs."""

    def __init__(self, handler: NodeHandler, token: str | None) -> None:
        self._handler = handler
        self._token = token.encode() if token else None

    def forward(self, frame: bytes, context: grpc.ServicerContext) -> bytes:
        return self._guard(context, lambda: self._handler.forward(frame))

    def train(self, frame: bytes, context: grpc.ServicerContext) -> bytes:
        return self._guard(context, lambda: self._handler.train(frame))

    def close(self, frame: bytes, context: grpc.ServicerContext) -> bytes:
        def call() -> bytes:
            self._handler.close(frame)
            return b""

        return self._guard(context, call)

    def info(self, _: bytes, context: grpc.ServicerContext) -> bytes:
        return self._guard(context, lambda: json.dumps(self._handler.info()).encode())

    def control(self, payload: bytes, context: grpc.ServicerContext) -> bytes:
        return self._guard(
            context, lambda: json.dumps(self._handler.control(_json_object(payload, "control"))).encode()
        )

    def generate(self, payload: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._check_token(context)
        try:
            for event in self._handler.generate(_json_object(payload, "generate")):
                yield json.dumps(event).encode()
        except Exception as exc:  # noqa: BLE001 - abort_with answers each kind, and logs a bug with its traceback
            abort_with(context, exc)

    def _guard(self, context: grpc.ServicerContext, call: Callable[[], bytes]) -> bytes:
        self._check_token(context)
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - a bug must not take the node down either: abort_with logs it
            abort_with(context, exc)

    def _check_token(self, context: grpc.ServicerContext) -> None:
        if self._token is None:
            return
        sent = dict(context.invocation_metadata()).get(TOKEN_HEADER, "")
        if not hmac.compare_digest(str(sent).encode(), self._token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong deployment token")


def _json_object(payload: bytes, method: str) -> dict[str, Any]:
    try:
        request = json.loads(payload)
    except ValueError as exc:  # JSON and UTF-8 errors
        raise ConfigError(f"a {method} request must be JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ConfigError(f"a {method} request must be a JSON object")
    return request
