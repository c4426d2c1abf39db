"""Every message that crosses between a device and its stages, and their binary encoding, in one place.

In one process the message objects are passed as they are (`edgellm.net.direct_hop`); network transports send
`encode(message)` bytes and rebuild them with `decode(bytes)`, which validates everything a peer controls.

Frame: b"EDGL" | u16 protocol version | u8 message type | the type's fields in a fixed order.
Strings are a varint length + UTF-8; counts and sizes are unsigned LEB128 varints; times are float32; a tensor
is a byte of codec|compression, a dtype byte, the rank, varint dims, varint payload and scale lengths, then its
bytes. The header of one int8 decode step is ~60 bytes, so a token's smashed data (576 int8 values + scale)
fits in 640 bytes. Anything that does not parse exactly, to the last byte, is refused.

Split learning adds `TrainOpen`, `TrainForward`, `TrainBackward` and `AdapterSync` (answered by `ForwardReply` or
`SyncReply`): activations go towards the servers and activation gradients come back, on the link's codec;
adapter weights always travel losslessly. The byte-level pieces are in `edgellm.net.frame`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import torch

from edgellm.net.codec import CodecSpec, parse_codec
from edgellm.net.frame import (
    F32,
    MAX_ITEMS,
    MAX_RANK,
    MAX_STRING,
    MAX_TENSORS,
    MAX_TEXT,
    Reader,
    WireError,
    codec_byte,
    codec_from_byte,
    put_named_tensors,
    put_str,
    put_strs,
    put_tensor,
    put_varint,
)

__all__ = [
    "MAX_ITEMS", "MAX_RANK", "MAX_STRING", "MAX_TENSORS", "MAX_MESSAGE_BYTES", "PROTOCOL_VERSION", "WireError",
    "ForwardRequest", "ForwardReply", "HopTrace", "CloseSession", "TrainOpen", "TrainForward", "TrainBackward",
    "AdapterSync", "SyncReply", "SYNC_OPS", "encode", "decode",
]  # fmt: skip

PROTOCOL_VERSION = 1
MAGIC = b"EDGL"
_PREFIX = struct.Struct("<4sHB")
MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class ForwardRequest:
    """Run a stage on the next tokens of a session.

    Attributes:
        session: the session id; a stage keys its KV cache by it.
        data: [B, S] int64 token ids for an embedding stage, else [B, S, D] hidden states ("smashed data").
        positions: [B, S] int64 absolute positions of the tokens.
        token_mask: [B, S] bool, False marks padding; None means no padding.
        new_session: True on a session's first request; a stage refuses unknown sessions otherwise.
        last_only: a head stage returns logits of each row's last real token only.
        route: in chain mode, the nodes this request still has to visit after the receiver, in order.
        reply_codec: codec for hidden states in the reply (the link's codec); logits are always lossless.
        argmax: a head stage replies with each row's most likely next token ([B, 1] int64), not logits.
        adapter: on a session's first request, its LoRA adapter on every stage ("" = the base model).
        rows: several sessions' decode steps in one message: row b of `data` is session `rows[b]`'s next token
            (S = 1, no mask, no session start; `session` unused). Empty for one session's request.
        version: protocol version of the sender.
    """

    session: str
    data: torch.Tensor
    positions: torch.Tensor
    token_mask: torch.Tensor | None = None
    new_session: bool = False
    last_only: bool = False
    route: tuple[str, ...] = ()
    reply_codec: str = "none"
    argmax: bool = False
    adapter: str = ""
    rows: tuple[str, ...] = ()
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class HopTrace:
    """What one network hop cost, reported back along the chain.

    Attributes:
        node: the node that served the hop.
        link: "sender->node".
        compute_ms: the node's stage compute.
        server_ms: all time inside the node's handler (compute, codecs, and any downstream hops).
        wire_ms: the sender's call time minus server_ms: emulated link, serialization, transport.
        bytes_up, bytes_down: encoded request and reply sizes on this link.
    """

    node: str
    link: str
    compute_ms: float
    server_ms: float
    wire_ms: float
    bytes_up: int
    bytes_down: int


@dataclass(frozen=True)
class ForwardReply:
    """A stage's output and its costs.

    Attributes:
        output: [B, S, D] hidden states, or float32 logits for a head stage.
        compute_ms: the replying node's own stage compute.
        server_ms: all time in the replying node's handler, downstream hops included (0 in-process).
        trace: the hops the request took beyond the replying node (chain mode), nearest first.
        is_logits: the output is logits (sent losslessly whatever the link codec).
    """

    output: torch.Tensor
    compute_ms: float
    server_ms: float = 0.0
    trace: tuple[HopTrace, ...] = ()
    is_logits: bool = False


@dataclass(frozen=True)
class CloseSession:
    """Drop a session's KV cache on the receiver (and, in chain mode, on every node of `route`)."""

    session: str
    route: tuple[str, ...] = ()
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class TrainOpen:
    """Start (or resume) a split-learning session on the receiver and, in chain mode, on every node of `route`.

    Attributes:
        session: the training session id (one per client); later training messages name it.
        run: the training run; names the adapters and the checkpoints, and stays the same across restarts.
        attempt: one launch of the run; a node holding adapters of another attempt of the same run reloads them
            (fresh, or from the checkpoint of `resume_step`), so every client of a launch starts from one state.
        client, clients: this client's index and how many clients train together (the aggregation round size).
        config: JSON of the server-side settings (`edgellm.splitlearn.settings.ServerTrainConfig`).
        resume_step: 0 starts fresh; N > 0 loads every node's checkpoint of step N.
    """

    session: str
    run: str
    attempt: str
    client: int
    clients: int
    config: str
    resume_step: int = 0
    route: tuple[str, ...] = ()
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class TrainForward:
    """Run the receiver's stage with its adapters on a training batch and keep what the backward pass needs:
    `step` (the matching `TrainBackward` names it), `data` [B, S, D], `positions` [B, S] int64, `token_mask`
    [B, S] bool or None; `eval`: evaluate only (no graph kept, adapter dropout off, no backward to follow)."""

    session: str
    step: int
    data: torch.Tensor
    positions: torch.Tensor
    token_mask: torch.Tensor | None = None
    route: tuple[str, ...] = ()
    reply_codec: str = "none"
    eval: bool = False
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class TrainBackward:
    """The loss's gradient w.r.t. the receiver's output (chain mode: the last node's); the receiver passes it down
    its route, backpropagates through its stage, steps its optimizer, and replies with the input's ([B, S, D])."""

    session: str
    step: int
    grad: torch.Tensor
    route: tuple[str, ...] = ()
    reply_codec: str = "none"
    version: int = PROTOCOL_VERSION


SYNC_OPS = ("get", "put", "checkpoint", "aggregate")


@dataclass(frozen=True)
class AdapterSync:
    """Move adapter weights of a training session.

    Ops: `get`: every node on the route returns its adapter weights (with `grads`, its last backward's gradients
    too), merged in the reply; `put`: every node loads the weights of its layers; `checkpoint`: every node saves its
    adapters and optimizer as of `step` (the first request for a step wins); `aggregate`: the receiver only: this
    client's weights with `weight` (its samples) for the FedAvg round of `step`, answered by the round's average.
    """

    session: str
    op: str
    step: int = 0
    weight: float = 0.0
    tensors: tuple[tuple[str, torch.Tensor], ...] = ()
    grads: bool = False
    route: tuple[str, ...] = ()
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if self.op not in SYNC_OPS:
            raise WireError(f"unknown adapter sync op {self.op!r}; choose from {list(SYNC_OPS)}")


@dataclass(frozen=True)
class SyncReply:
    """Answer to `TrainOpen` and `AdapterSync`: named tensors (adapter weights) and a JSON detail."""

    tensors: tuple[tuple[str, torch.Tensor], ...] = ()
    detail: str = "{}"


_FORWARD, _REPLY, _CLOSE, _TRAIN_OPEN, _TRAIN_FORWARD, _TRAIN_BACKWARD, _SYNC, _SYNC_REPLY = range(1, 9)


def encode(message: Any, codec: CodecSpec = CodecSpec()) -> bytes:
    """Serialize a message; floating tensors use `codec`, integer and bool tensors are always lossless."""
    out = bytearray()
    if isinstance(message, ForwardRequest):
        out += _PREFIX.pack(MAGIC, PROTOCOL_VERSION, _FORWARD)
        put_str(out, message.session)
        flags = (
            message.new_session | message.last_only << 1 | (message.token_mask is not None) << 2 | message.argmax << 3
            | bool(message.adapter) << 4 | bool(message.rows) << 5
        )  # fmt: skip
        out.append(int(flags))
        put_strs(out, message.route)
        if message.adapter:
            put_str(out, message.adapter)
        if message.rows:
            put_strs(out, message.rows)
        out.append(codec_byte(parse_codec(message.reply_codec)))
        put_tensor(out, message.data, codec)
        put_tensor(out, message.positions, codec)
        if message.token_mask is not None:
            put_tensor(out, message.token_mask, codec)
    elif isinstance(message, ForwardReply):
        out += _PREFIX.pack(MAGIC, PROTOCOL_VERSION, _REPLY)
        out.append(int(message.is_logits))
        out += F32.pack(message.compute_ms) + F32.pack(message.server_ms)
        put_varint(out, len(message.trace))
        for t in message.trace:
            put_str(out, t.node)
            put_str(out, t.link)
            out += F32.pack(t.compute_ms) + F32.pack(t.server_ms) + F32.pack(t.wire_ms)
            put_varint(out, t.bytes_up)
            put_varint(out, t.bytes_down)
        put_tensor(out, message.output, codec)
    elif isinstance(message, CloseSession):
        out += _PREFIX.pack(MAGIC, PROTOCOL_VERSION, _CLOSE)
        put_str(out, message.session)
        put_strs(out, message.route)
    else:
        _encode_training(out, message, codec)
    return bytes(out)


def _encode_training(out: bytearray, message: Any, codec: CodecSpec) -> None:
    if isinstance(message, TrainOpen):
        out += _PREFIX.pack(MAGIC, PROTOCOL_VERSION, _TRAIN_OPEN)
        for text in (message.session, message.run, message.attempt):
            put_str(out, text)
        for number in (message.client, message.clients, message.resume_step):
            put_varint(out, number)
        put_str(out, message.config)
        put_strs(out, message.route)
    elif isinstance(message, TrainForward):
        out += _PREFIX.pack(MAGIC, PROTOCOL_VERSION, _TRAIN_FORWARD)
        put_str(out, message.session)
        put_varint(out, message.step)
        out.append(int(message.token_mask is not None) | message.eval << 1)
        put_strs(out, message.route)
        out.append(codec_byte(parse_codec(message.reply_codec)))
        put_tensor(out, message.data, codec)
        put_tensor(out, message.positions, codec)
        if message.token_mask is not None:
            put_tensor(out, message.token_mask, codec)
    elif isinstance(message, TrainBackward):
        out += _PREFIX.pack(MAGIC, PROTOCOL_VERSION, _TRAIN_BACKWARD)
        put_str(out, message.session)
        put_varint(out, message.step)
        put_strs(out, message.route)
        out.append(codec_byte(parse_codec(message.reply_codec)))
        put_tensor(out, message.grad, codec)
    elif isinstance(message, AdapterSync):
        out += _PREFIX.pack(MAGIC, PROTOCOL_VERSION, _SYNC)
        put_str(out, message.session)
        out.append(SYNC_OPS.index(message.op) | message.grads << 4)
        put_varint(out, message.step)
        out += F32.pack(message.weight)
        put_strs(out, message.route)
        put_named_tensors(out, message.tensors)
    elif isinstance(message, SyncReply):
        out += _PREFIX.pack(MAGIC, PROTOCOL_VERSION, _SYNC_REPLY)
        put_str(out, message.detail)
        put_named_tensors(out, message.tensors)
    else:
        raise TypeError(f"not a wire message: {type(message).__name__}")


def decode(frame: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Rebuild a message from `encode`'s bytes, checking everything a peer could get wrong.

    Raises:
        WireError: wrong magic or version, unknown message type, truncated or trailing bytes, sizes that do not
            add up, strings or lists over their limits, a message over `max_bytes`, or non-finite values.
    """
    if len(frame) > max_bytes:
        raise WireError(f"message of {len(frame)} bytes exceeds the limit of {max_bytes}")
    if len(frame) < _PREFIX.size:
        raise WireError(f"message of {len(frame)} bytes is too short to be an edgellm frame")
    magic, version, kind = _PREFIX.unpack_from(frame)
    if magic != MAGIC:
        raise WireError(f"not an edgellm frame (magic {magic!r})")
    if version != PROTOCOL_VERSION:
        raise WireError(f"protocol version {version} is not supported (this node speaks {PROTOCOL_VERSION})")
    r = Reader(frame, _PREFIX.size)
    message: Any
    if kind == _FORWARD:
        session, flags, route = r.string("session"), r.byte("flags"), r.strings("route")
        if flags & ~0b111111:
            raise WireError(f"unknown flags {flags:#x} in a forward message")
        adapter = r.string("adapter") if flags & 0b10000 else ""
        rows = r.strings("rows") if flags & 0b100000 else ()
        reply_codec = codec_from_byte(r.byte("reply_codec"))
        data, positions = r.tensor("data"), r.tensor("positions")
        mask = r.tensor("token_mask") if flags & 0b100 else None
        message = ForwardRequest(
            session, data, positions, mask, bool(flags & 1), bool(flags & 2), route, reply_codec, bool(flags & 8),
            adapter, rows,
        )  # fmt: skip
    elif kind == _REPLY:
        flags = r.byte("flags")
        if flags & ~1:
            raise WireError(f"unknown flags {flags:#x} in a reply")
        compute_ms, server_ms = r.f32("compute_ms"), r.f32("server_ms")
        trace = tuple(
            HopTrace(r.string("trace.node"), r.string("trace.link"), r.f32("trace"), r.f32("trace"), r.f32("trace"),
                     r.varint("trace"), r.varint("trace"))
            for _ in range(r.count("trace"))
        )  # fmt: skip
        message = ForwardReply(r.tensor("output"), compute_ms, server_ms, trace, bool(flags))
    elif kind == _CLOSE:
        message = CloseSession(r.string("session"), r.strings("route"))
    elif _TRAIN_OPEN <= kind <= _SYNC_REPLY:
        message = _decode_training(kind, r)
    else:
        raise WireError(f"unknown message type {kind}")
    r.finish()
    return message


def _decode_training(kind: int, r: Reader) -> Any:
    if kind == _TRAIN_OPEN:
        session, run, attempt = r.string("session"), r.string("run"), r.string("attempt")
        client, clients, resume_step = r.varint("client"), r.varint("clients"), r.varint("resume_step")
        config = r.string("config", MAX_TEXT)
        return TrainOpen(session, run, attempt, client, clients, config, resume_step, r.strings("route"))
    if kind == _TRAIN_FORWARD:
        session, step, flags = r.string("session"), r.varint("step"), r.byte("flags")
        if flags & ~0b11:
            raise WireError(f"unknown flags {flags:#x} in a train forward message")
        route, reply_codec = r.strings("route"), codec_from_byte(r.byte("reply_codec"))
        data, positions = r.tensor("data"), r.tensor("positions")
        mask = r.tensor("token_mask") if flags & 1 else None
        return TrainForward(session, step, data, positions, mask, route, reply_codec, bool(flags & 2))
    if kind == _TRAIN_BACKWARD:
        session, step, route = r.string("session"), r.varint("step"), r.strings("route")
        reply_codec = codec_from_byte(r.byte("reply_codec"))
        return TrainBackward(session, step, r.tensor("grad"), route, reply_codec)
    if kind == _SYNC:
        session, ops = r.string("session"), r.byte("op")
        if ops & 0x0F >= len(SYNC_OPS) or ops & ~0x1F:
            raise WireError(f"unknown adapter sync op byte {ops:#x}")
        step, weight, route = r.varint("step"), r.f32("weight"), r.strings("route")
        return AdapterSync(
            session, SYNC_OPS[ops & 0x0F], step, weight, r.named_tensors("tensors"), bool(ops & 0x10), route
        )
    detail = r.string("detail", MAX_TEXT)
    return SyncReply(r.named_tensors("tensors"), detail)
