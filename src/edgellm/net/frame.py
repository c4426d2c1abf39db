"""The byte-level pieces of an edgellm frame: varints, strings, float32s, tensors, and a checking reader.

`edgellm.net.messages` lays messages out with these; nothing here knows a message type.
"""

from __future__ import annotations

import math
import struct

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
)

MAX_STRING = 256
MAX_TEXT = 1 << 20  # JSON details (training session setup and acknowledgements)
MAX_ITEMS = 64  # route entries, trace records
MAX_TENSORS = 4096  # named tensors in one adapter message
MAX_RANK = 4
F32 = struct.Struct("<f")


class WireError(ConfigError):
    """A message from a peer is malformed, from another protocol version, or out of limits."""


def codec_byte(spec: CodecSpec) -> int:
    return CODECS.index(spec.codec) << 4 | COMPRESSIONS.index(spec.compression)


def codec_from_byte(value: int) -> str:
    codec, compression = value >> 4, value & 0xF
    if codec >= len(CODECS) or compression >= len(COMPRESSIONS):
        raise WireError(f"unknown codec byte {value:#x}")
    return CODECS[codec] if compression == 0 else f"{CODECS[codec]}+{COMPRESSIONS[compression]}"


def put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError(f"varints are unsigned, got {value}")
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def put_str(out: bytearray, text: str) -> None:
    raw = text.encode()
    put_varint(out, len(raw))
    out += raw


def put_strs(out: bytearray, items: tuple[str, ...]) -> None:
    put_varint(out, len(items))
    for item in items:
        put_str(out, item)


def put_named_tensors(out: bytearray, items: tuple[tuple[str, torch.Tensor], ...]) -> None:
    """Named tensors, always lossless (adapter weights must arrive exactly)."""
    put_varint(out, len(items))
    for name, tensor in items:
        put_str(out, name)
        put_tensor(out, tensor, CodecSpec())


def put_tensor(out: bytearray, x: torch.Tensor, codec: CodecSpec) -> None:
    enc = encode_tensor(x, codec)
    out.append(codec_byte(CodecSpec(enc.codec, enc.compression)))
    out.append(DTYPES.index(enc.dtype))
    out.append(len(enc.shape))
    for dim in enc.shape:
        put_varint(out, dim)
    put_varint(out, len(enc.payload))
    put_varint(out, len(enc.scales))
    out += enc.payload
    out += enc.scales


class Reader:
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
        value = F32.unpack(self._take(4, field))[0]
        if not math.isfinite(value):
            raise WireError(f"field {field!r} is not finite")
        return value

    def string(self, field: str, limit: int = MAX_STRING) -> str:
        n = self.varint(field)
        if n > limit:
            raise WireError(f"field {field!r}: string of {n} bytes exceeds {limit}")
        try:
            return self._take(n, field).decode()
        except UnicodeDecodeError:
            raise WireError(f"field {field!r} is not UTF-8") from None

    def count(self, field: str, limit: int = MAX_ITEMS) -> int:
        n = self.varint(field)
        if n > limit:
            raise WireError(f"field {field!r}: {n} items exceed {limit}")
        return n

    def named_tensors(self, field: str) -> tuple[tuple[str, torch.Tensor], ...]:
        items = []
        for _ in range(self.count(field, MAX_TENSORS)):
            name = self.string(f"{field}.name")
            items.append((name, self.tensor(f"{field}[{name}]")))
        if len({name for name, _ in items}) != len(items):
            raise WireError(f"field {field!r} names a tensor twice")
        return tuple(items)

    def strings(self, field: str) -> tuple[str, ...]:
        return tuple(self.string(field) for _ in range(self.count(field)))

    def tensor(self, field: str) -> torch.Tensor:
        codec = codec_from_byte(self.byte(field))
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
