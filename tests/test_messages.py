"""The wire format: every message round-trips, a token's int8 smashed data fits 640 B, and bad frames are refused."""

from __future__ import annotations

import struct

import pytest
import torch

from edgellm.net.codec import parse_codec
from edgellm.net.messages import (
    MAGIC,
    PROTOCOL_VERSION,
    CloseSession,
    ForwardReply,
    ForwardRequest,
    HopTrace,
    WireError,
    decode,
    encode,
)


def request(**overrides):
    fields = dict(
        session="0123456789abcdef",
        data=torch.randn(2, 3, 32),
        positions=torch.arange(6).view(2, 3),
        token_mask=torch.tensor([[True, True, True], [False, True, True]]),
        new_session=True,
        last_only=True,
        route=("edge2", "edge3"),
        reply_codec="int8+zstd",
    )
    fields.update(overrides)
    return ForwardRequest(**fields)


def test_forward_request_round_trip_is_exact_with_lossless_codec():
    msg = request()
    got = decode(encode(msg))
    assert (got.session, got.new_session, got.last_only, got.route, got.reply_codec) == (
        "0123456789abcdef", True, True, ("edge2", "edge3"), "int8+zstd",
    )  # fmt: skip
    assert torch.equal(got.data, msg.data)
    assert torch.equal(got.positions, msg.positions) and got.positions.dtype == torch.int64
    assert torch.equal(got.token_mask, msg.token_mask)


def test_a_session_start_carries_its_adapter_and_other_requests_pay_nothing_for_it():
    with_adapter, without = encode(request(adapter="alice-v2")), encode(request())
    assert decode(with_adapter).adapter == "alice-v2" and decode(without).adapter == ""
    assert len(with_adapter) == len(without) + 1 + len("alice-v2")  # a flag bit, then the name only when set


def test_a_decode_step_of_several_sessions_round_trips_its_rows():
    step = request(session="", data=torch.randn(3, 1, 32), positions=torch.tensor([[4], [9], [2]]), token_mask=None,
                   new_session=False, rows=("s1", "s2", "s3"))  # fmt: skip
    got = decode(encode(step))
    assert got.rows == ("s1", "s2", "s3") and torch.equal(got.data, step.data) and decode(encode(request())).rows == ()


def test_token_ids_stay_exact_under_a_lossy_codec():
    ids = torch.tensor([[5, 49151, 0]])
    got = decode(encode(request(data=ids, positions=torch.arange(3)[None], token_mask=None), parse_codec("int8")))
    assert torch.equal(got.data, ids) and got.token_mask is None


def test_reply_and_close_round_trip():
    trace = (HopTrace("edge2", "edge1->edge2", 1.5, 2.25, 0.5, 640, 700),)
    reply = ForwardReply(torch.randn(1, 1, 97), 3.5, 4.0, trace, is_logits=True)
    got = decode(encode(reply))
    assert got.trace == trace and got.is_logits and got.compute_ms == 3.5 and got.server_ms == 4.0
    assert torch.equal(got.output, reply.output)
    assert decode(encode(CloseSession("s1", ("a", "b")))) == CloseSession("s1", ("a", "b"))


def test_int8_decode_step_fits_640_bytes_for_hidden_576():
    step = ForwardRequest("0123456789abcdef", torch.randn(1, 1, 576), torch.tensor([[41]]), route=("edge2",),
                          reply_codec="int8")  # fmt: skip
    frame = encode(step, parse_codec("int8"))
    assert len(frame) <= 640, len(frame)
    assert (decode(frame).data - step.data).abs().max() <= step.data.abs().max() / 254 + 1e-6


def corrupt(frame: bytes, at: int, value: int) -> bytes:
    return frame[:at] + bytes([value]) + frame[at + 1 :]


GOOD = encode(request())
BAD_FRAMES = {
    "empty": b"",
    "wrong magic": b"XXXX" + GOOD[4:],
    "other version": MAGIC + struct.pack("<H", PROTOCOL_VERSION + 1) + GOOD[6:],
    "unknown type": GOOD[:6] + bytes([9]) + GOOD[7:],
    "truncated": GOOD[:-5],
    "trailing bytes": GOOD + b"\x00",
    "unknown flags": corrupt(GOOD, 7 + 17, 0xF8),
    "huge string": GOOD[:7] + b"\xff\xff\x03" + GOOD[8:],
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_malformed_frames_are_refused(name):
    with pytest.raises(WireError):
        decode(BAD_FRAMES[name])


def test_non_finite_values_are_refused():
    bad = torch.randn(1, 2, 8)
    bad[0, 1, 3] = float("nan")
    with pytest.raises(WireError, match="NaN"):
        decode(encode(request(data=bad, positions=torch.arange(2)[None], token_mask=None)))


def test_oversize_message_is_refused():
    with pytest.raises(WireError, match="exceeds the limit"):
        decode(GOOD, max_bytes=len(GOOD) - 1)
