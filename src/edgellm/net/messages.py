"""Every message that crosses between a device and its stages, and their binary encoding, in one place.

In one process the message objects are passed as they are (`edgellm.net.local`); network transports send
`encode(message)` bytes and rebuild them with `decode(bytes)`, which validates everything a peer controls.

Frame: b"EDGL" | u16 protocol version | u8 message type | the type's fields in a fixed order.
Strings are a varint length + UTF-8; counts and sizes are unsigned LEB128 varints; times are float32; a tensor
is a byte of codec|compression, a dtype byte, the rank, varint dims, varint payload and scale lengths, then its
bytes. The header of one int8 decode step is ~60 bytes, so a token's smashed data (576 int8 values + scale)
fits in 640 bytes. Anything that does not parse exactly, to the last byte, is refused.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from edgellm.errors import ConfigError
from edgellm.net.codec import (
    CODECS,
    COMPRESSIONS,
    DTYPES,
    CodecSpec,
    EncodedTensor,
    decode_tensor,
    encode_tensor,
    parse_codec,
)

PROTOCOL_VERSION = 1
MAGIC = b"EDGL"
_PREFIX = struct.Struct("<4sHB")
MAX_MESSAGE_BYTES = 64 << 20
MAX_STRING = 256
MAX_ITEMS = 64  # route entries, trace records
MAX_RANK = 4


class WireError(ConfigError):
    """A message from a peer is malformed, from another protocol version, or out of limits."""


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
        argmax: a head stage replies with each row's most likely next token ([B, 1] int64) instead of logits:
            greedy decoding then moves 8 bytes per row back instead of the whole distribution.
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


_FORWARD, _REPLY, _CLOSE = 1, 2, 3
_F32 = struct.Struct("<f")


def encode(message: Any, codec: CodecSpec = CodecSpec()) -> bytes:
    """Serialize a message; floating tensors use `codec`, integer and bool tensors are always lossless."""
    out = bytearray()
    if isinstance(message, ForwardRequest):
        out += _PREFIX.pack(MAGIC, PROTOCOL_VERSION, _FORWARD)
        _put_str(out, message.session)
        flags = (
            message.new_session | message.last_only << 1 | (message.token_mask is not None) << 2 | message.argmax << 3
        )
        out.append(int(flags))
        _put_strs(out, message.route)
        out.append(_codec_byte(parse_codec(message.reply_codec)))
        _put_tensor(out, message.data, codec)
        _put_tensor(out, message.positions, codec)
        if message.token_mask is not None:
            _put_tensor(out, message.token_mask, codec)
    elif isinstance(message, ForwardReply):
        out += _PREFIX.pack(MAGIC, PROTOCOL_VERSION, _REPLY)
        out.append(int(message.is_logits))
        out += _F32.pack(message.compute_ms) + _F32.pack(message.server_ms)
        _put_varint(out, len(message.trace))
        for t in message.trace:
            _put_str(out, t.node)
            _put_str(out, t.link)
            out += _F32.pack(t.compute_ms) + _F32.pack(t.server_ms) + _F32.pack(t.wire_ms)
            _put_varint(out, t.bytes_up)
            _put_varint(out, t.bytes_down)
        _put_tensor(out, message.output, codec)
    elif isinstance(message, CloseSession):
        out += _PREFIX.pack(MAGIC, PROTOCOL_VERSION, _CLOSE)
        _put_str(out, message.session)
        _put_strs(out, message.route)
    else:
        raise TypeError(f"not a wire message: {type(message).__name__}")
    return bytes(out)


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
    r = _Reader(frame, _PREFIX.size)
    message: Any
    if kind == _FORWARD:
        session, flags, route = r.string("session"), r.byte("flags"), r.strings("route")
        if flags & ~0b1111:
            raise WireError(f"unknown flags {flags:#x} in a forward message")
        reply_codec = _codec_from_byte(r.byte("reply_codec"))
        data, positions = r.tensor("data"), r.tensor("positions")
        mask = r.tensor("token_mask") if flags & 0b100 else None
        message = ForwardRequest(
            session, data, positions, mask, bool(flags & 1), bool(flags & 2), route, reply_codec, bool(flags & 8)
        )
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
    else:
        raise WireError(f"unknown message type {kind}")
    r.finish()
    return message


def _codec_byte(spec: CodecSpec) -> int:
    return CODECS.index(spec.codec) << 4 | COMPRESSIONS.index(spec.compression)


def _codec_from_byte(value: int) -> str:
    codec, compression = value >> 4, value & 0xF
    if codec >= len(CODECS) or compression >= len(COMPRESSIONS):
        raise WireError(f"unknown codec byte {value:#x}")
    return CODECS[codec] if compression == 0 else f"{CODECS[codec]}+{COMPRESSIONS[compression]}"


def _put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError(f"varints are unsigned, got {value}")
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _put_str(out: bytearray, text: str) -> None:
    raw = text.encode()
    _put_varint(out, len(raw))
    out += raw


def _put_strs(out: bytearray, items: tuple[str, ...]) -> None:
    _put_varint(out, len(items))
    for item in items:
        _put_str(out, item)


def _put_tensor(out: bytearray, x: torch.Tensor, codec: CodecSpec) -> None:
    enc = encode_tensor(x, codec)
    out.append(_codec_byte(CodecSpec(enc.codec, enc.compression)))
    out.append(DTYPES.index(enc.dtype))
    out.append(len(enc.shape))
    for dim in enc.shape:
        _put_varint(out, dim)
    _put_varint(out, len(enc.payload))
    _put_varint(out, len(enc.scales))
    out += enc.payload
    out += enc.scales


class _Reader:
    """Reads a frame front to back; every read names its field in the error if the bytes run out or lie."""

    def __init__(self, frame: bytes, offset: int) -> None:
        self._frame = frame
        self._pos = offset

    def _take(self, n: int, field: str) -> bytes:
        if n < 0 or self._pos + n > len(self._frame):
            raise WireError(f"message ends inside field {field!r}")
        chunk = self._frame[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def byte(self, field: str) -> int:
        return self._take(1, field)[0]

    def varint(self, field: str) -> int:
        value, shift = 0, 0
        while True:
            b = self.byte(field)
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise WireError(f"field {field!r}: varint too long")

    def f32(self, field: str) -> float:
        value = _F32.unpack(self._take(4, field))[0]
        if not math.isfinite(value):
            raise WireError(f"field {field!r} is not finite")
        return value

    def string(self, field: str) -> str:
        n = self.varint(field)
        if n > MAX_STRING:
            raise WireError(f"field {field!r}: string of {n} bytes exceeds {MAX_STRING}")
        try:
            return self._take(n, field).decode()
        except UnicodeDecodeError:
            raise WireError(f"field {field!r} is not UTF-8") from None

    def count(self, field: str) -> int:
        n = self.varint(field)
        if n > MAX_ITEMS:
            raise WireError(f"field {field!r}: {n} items exceed {MAX_ITEMS}")
        return n

    def strings(self, field: str) -> tuple[str, ...]:
        return tuple(self.string(field) for _ in range(self.count(field)))

    def tensor(self, field: str) -> torch.Tensor:
        codec = _codec_from_byte(self.byte(field))
        dtype_index, rank = self.byte(field), self.byte(field)
        if dtype_index >= len(DTYPES):
            raise WireError(f"tensor {field!r}: unknown dtype code {dtype_index}")
        if rank > MAX_RANK:
            raise WireError(f"tensor {field!r}: rank {rank} exceeds {MAX_RANK}")
        shape = tuple(self.varint(field) for _ in range(rank))
        payload_len, scales_len = self.varint(field), self.varint(field)
        payload, scales = self._take(payload_len, field), self._take(scales_len, field)
        name, _, compression = codec.partition("+")
        try:
            tensor = decode_tensor(
                EncodedTensor(name, compression or "none", DTYPES[dtype_index], shape, payload, scales)
            )
        except ConfigError as exc:
            raise WireError(f"tensor {field!r}: {exc}") from None
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WireError(f"tensor {field!r} holds NaN or infinite values")
        return tensor

    def finish(self) -> None:
        if self._pos != len(self._frame):
            raise WireError(f"message has {len(self._frame) - self._pos} trailing bytes")
