"""A stage node's request handler: decode, validate, run the stage, forward along the chain, encode."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from edgellm.errors import ConfigError
from edgellm.net.codec import CodecSpec, parse_codec
from edgellm.net.messages import (
    MAX_MESSAGE_BYTES,
    AdapterSync,
    CloseSession,
    ForwardReply,
    ForwardRequest,
    HopTrace,
    SyncReply,
    TrainBackward,
    TrainForward,
    TrainOpen,
    WireError,
    decode,
    encode,
)
from edgellm.split.budget import rss_bytes, to_mb
from edgellm.split.control import link_profiles, node_ops
from edgellm.split.host import StageHost
from edgellm.split.pipeline import Hop, TrainHop
from edgellm.split.validate import check_hidden, check_request

TrainMessage = TrainOpen | TrainForward | TrainBackward | AdapterSync


class Trainer(Protocol):
    """What a stage server needs from the split-learning side of a node (`edgellm.splitlearn.TrainHost`)."""

    def open(self, msg: TrainOpen) -> dict[str, Any]: ...

    def close(self, session: str) -> None: ...

    def forward(self, msg: TrainForward) -> ForwardReply: ...

    def backward(self, msg: TrainBackward) -> ForwardReply: ...

    def sync(self, msg: AdapterSync) -> tuple[dict[str, Any], dict[str, Any]]: ...


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
        trainer: trains adapters of the stage for split-learning clients; None refuses training messages.
    """

    def __init__(
        self,
        name: str,
        host: StageHost,
        downstream: Mapping[str, Hop] | None = None,
        info: Mapping[str, Any] | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        trainer: Trainer | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.downstream = dict(downstream or {})
        self._info = dict(info or {})
        self._max_bytes = max_message_bytes
        self.trainer = trainer
        # Control ops (edgellm.split.control); a node builder adds `load_stage`, which swaps `host`,
        # `downstream` and `trainer` whole, so a request reads each once.
        self.control_ops = node_ops(name, self.info, lambda: self.downstream)

    def forward(self, frame: bytes) -> bytes:
        start = time.perf_counter()
        request = decode(frame, self._max_bytes)
        if not isinstance(request, ForwardRequest):
            raise WireError(f"Forward takes a forward message, got {type(request).__name__}")
        reply_codec = parse_codec(request.reply_codec)
        host = self.host
        check_request(request, host.stage)
        next_hop = self._next(request.route[0]) if request.route else None  # refuse a bad route before computing
        local = host.forward(request)
        output = local.output
        trace: tuple[HopTrace, ...] = ()
        is_logits = host.stage.spec.head and local.output.is_floating_point()
        if next_hop is not None:
            ahead = dataclasses.replace(request, data=local.output, route=request.route[1:], reply_codec="none")
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
        if self.trainer is not None:
            self.trainer.close(request.session)
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
            "sessions": self.host.expire_idle(),  # idle sessions expire at the next request or Info
            "batching": self.host.stats(),
            "link_emulation": link_profiles(self.downstream),
            "emulated": self.host.emulation.to_json(),
            "memory": host_memory(self.host),
        }

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """A control op (`edgellm.split.control`): echo, info, probe_link, set_link, and those registered."""
        return self.control_ops.dispatch(request)

    def replace_stage(
        self, host: StageHost, downstream: Mapping[str, Hop], trainer: Trainer | None, info: Mapping[str, Any]
    ) -> None:
        """Serve `host` from the next request on (a `load_stage`), with its hops, trainer and Info fields.

        Swapped under the old host's lock, so a computation in progress finishes first; the old host's sessions
        are dropped (a request still holding it then finds its session gone).
        """
        old = self.host
        with old.lock:
            self.host, self.downstream, self.trainer = host, dict(downstream), trainer
            self._info.update(info)
            old.close_all()

    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        raise ConfigError(f"node {self.name} is a stage server; send prompts to the device node")

    def train(self, frame: bytes) -> bytes:
        """A split-learning message in, its reply out (`handle_train` on the decoded message)."""
        start = time.perf_counter()
        message = decode(frame, self._max_bytes)
        if not isinstance(message, TrainOpen | TrainForward | TrainBackward | AdapterSync):
            raise WireError(f"Train takes a training message, got {type(message).__name__}")
        reply = self.handle_train(message)
        if isinstance(reply, SyncReply):
            return encode(reply)
        server_ms = (time.perf_counter() - start) * 1e3
        codec = parse_codec(message.reply_codec) if isinstance(message, TrainForward | TrainBackward) else CodecSpec()
        return encode(dataclasses.replace(reply, server_ms=server_ms), codec)

    def handle_train(self, message: TrainMessage) -> ForwardReply | SyncReply:
        """Run this node's part of a training message and pass it along its route.

        Forward: this stage, then the rest of the route. Backward: the rest of the route first (it returns the
        gradient with respect to this stage's output), then this stage. Open, get, put and checkpoint: this node
        and every node of the route, details and tensors merged. Aggregate: this node only.
        """
        trainer = self._trainer()
        route = message.route
        nxt = (
            self._next_train(route[0])
            if route and not (isinstance(message, AdapterSync) and message.op == "aggregate")
            else None
        )
        ahead = dataclasses.replace(message, route=route[1:]) if nxt is not None else None
        if isinstance(message, TrainForward):
            check_hidden(message.data, message.positions, message.token_mask, self.host.stage)
            local = trainer.forward(message)
            if nxt is None:
                return local
            down = nxt.train(dataclasses.replace(ahead, data=local.output))  # type: ignore[type-var]
            return ForwardReply(down.output, local.compute_ms, trace=down.trace)
        if isinstance(message, TrainBackward):
            grad, trace, down_ms = message.grad, (), 0.0
            if nxt is not None:
                down = nxt.train(ahead)  # type: ignore[arg-type]
                grad, trace = down.output, down.trace
            local = trainer.backward(dataclasses.replace(message, grad=grad))
            return ForwardReply(local.output, local.compute_ms + down_ms, trace=trace)
        if isinstance(message, TrainOpen):
            detail: list[Any] = [trainer.open(message)]
            tensors: dict[str, Any] = {}
        else:
            part, info = trainer.sync(message)
            detail, tensors = [info], dict(part)
        if nxt is not None:
            down_sync = nxt.train(ahead)  # type: ignore[arg-type]
            detail += json.loads(down_sync.detail)
            tensors.update(dict(down_sync.tensors))
        return SyncReply(tuple(tensors.items()), json.dumps(detail))

    def _trainer(self) -> Trainer:
        if self.trainer is None:
            raise ConfigError(f"node {self.name} does not train (it serves inference only)")
        return self.trainer

    def _next_train(self, name: str) -> TrainHop:
        hop = self._next(name)
        if not hasattr(hop, "train"):
            raise ConfigError(f"node {self.name}'s link to {name!r} cannot carry training messages")
        return hop  # type: ignore[return-value]

    def _next(self, name: str) -> Hop:
        hop = self.downstream.get(name)
        if hop is None:
            raise ConfigError(f"node {self.name} has no link to {name!r}; it can forward to {sorted(self.downstream)}")
        return hop


def host_memory(host: StageHost) -> dict[str, Any]:
    """The node's measured RSS against its budget (`MemoryLedger.report`); RSS alone when the host has no ledger."""
    if host.memory is not None:
        return host.memory.ledger.report()
    return {
        "rss_mb": to_mb(rss_bytes()),
        "peak_rss_mb": to_mb(rss_bytes("VmHWM")),
        "budget_mb": host.emulation.memory_mb,
    }


class InProcessServer:
    """A `StageServer` reached without serialization: the handler of an `edgellm.net.direct_hop.LocalHop`, for
    single-process runs and tests of the same routing code the network uses."""

    def __init__(self, server: StageServer) -> None:
        self.server = server

    def forward(self, request: ForwardRequest) -> ForwardReply:
        return self.server.host.forward(request)

    def close(self, request: CloseSession) -> None:
        self.server.host.close(request)
        if self.server.trainer is not None:
            self.server.trainer.close(request.session)
        if request.route:
            self.server._next(request.route[0]).close(CloseSession(request.session, route=request.route[1:]))

    def handle_train(self, message: TrainMessage) -> ForwardReply | SyncReply:
        return self.server.handle_train(message)
