"""The split-learning wire messages round-trip exactly and refuse malformed frames."""

from __future__ import annotations

import pytest
import torch

from edgellm.net.codec import CodecSpec
from edgellm.net.messages import (
    AdapterSync,
    SyncReply,
    TrainBackward,
    TrainForward,
    TrainOpen,
    WireError,
    decode,
    encode,
)


def test_training_messages_round_trip():
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    positions = torch.arange(5).expand(2, 5).contiguous()
    messages = [
        TrainOpen("s1", "run-a", "att", 1, 3, '{"share": "shared"}', 40, route=("e2",)),
        TrainForward("s1", 7, hidden, positions, mask, ("e2", "e3"), "int8", eval=True),
        TrainForward("s1", 7, hidden, positions, None),
        TrainBackward("s1", 7, hidden * 1e-4, ("e2",), "fp16"),
        AdapterSync("s1", "aggregate", 20, 16.0, (("a.lora_A.weight", torch.randn(4, 8)),), grads=True, route=("x",)),
        SyncReply((("a.lora_B.weight", torch.randn(8, 4)),), '[{"node": "e1"}]'),
    ]
    for message in messages:
        back = decode(encode(message))
        assert type(back) is type(message)
        for field in message.__dataclass_fields__:
            a, b = getattr(message, field), getattr(back, field)
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), field
            elif isinstance(a, tuple) and a and isinstance(a[0], tuple):
                assert [n for n, _ in a] == [n for n, _ in b]
                assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))
            else:
                assert a == b, field


def test_adapter_tensors_stay_lossless_under_a_lossy_link_codec():
    weights = torch.randn(4, 8)
    back = decode(encode(AdapterSync("s", "put", tensors=(("w", weights),)), CodecSpec("int8")))
    assert torch.equal(back.tensors[0][1], weights)


def test_gradients_use_the_link_codec():
    grad = torch.randn(1, 4, 64) * 1e-3
    assert len(encode(TrainBackward("s", 1, grad), CodecSpec("int8"))) < len(encode(TrainBackward("s", 1, grad))) / 3


def test_malformed_training_frames_are_refused():
    frame = bytearray(encode(AdapterSync("s", "get")))
    with pytest.raises(WireError, match="trailing"):
        decode(bytes(frame) + b"\0")
    with pytest.raises(WireError):
        decode(bytes(frame[:-2]))
    bad_op = bytearray(frame)
    bad_op[7 + 2] = 0x0E  # after magic+version+type (7 bytes) and the session string (1 + 1 bytes): the op byte
    with pytest.raises(WireError, match="op"):
        decode(bytes(bad_op))
    twice = SyncReply((("w", torch.zeros(1)), ("w", torch.ones(1))))
    with pytest.raises(WireError, match="twice"):
        decode(encode(twice))
    with pytest.raises(WireError, match="unknown adapter sync op"):
        AdapterSync("s", "delete")
