"""Hostile frames for fuzzing a live node (tests/test_fuzz_live.py, bench/fuzz_live.py): seeded, so a run can be
repeated exactly. Each message is a kind and a payload: a valid frame truncated, bit-flipped, with another
protocol version; random bytes; a request with NaN/Inf, the wrong hidden size or dtype; a session no one opened,
mid-stream; the right frame with the wrong token; a new session, as crashing devices leave them (a flood)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import torch

from edgellm.net.messages import ForwardRequest, encode
from edgellm.net.rpc import SERVICE, TOKEN_HEADER

KINDS = ("truncated", "flipped", "random", "version", "nan", "inf", "shape", "dtype", "forged", "token", "flood")
# what a node may answer a hostile message with: the sender's fault, an unknown session, a limit, a wrong token
ALLOWED = frozenset({grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                     grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED})  # fmt: skip
NEVER_OK = ("nan", "inf", "shape", "dtype", "version", "random", "forged", "token")


def frame(session: str, data: torch.Tensor, start: int = 0, new: bool = True) -> bytes:
    """A Forward frame of `data` ([1, S, D] hidden states) at positions start.. of `session`."""
    positions = torch.arange(start, start + data.shape[1]).unsqueeze(0)
    return encode(ForwardRequest(session, data, positions, new_session=new))


def hostile(rng: np.random.Generator, good: bytes, i: int, width: int, token: str) -> tuple[str, bytes, str]:
    """(kind, payload, token to send it with) of message `i`; `good` is a valid frame to mutate."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    data = torch.from_numpy(rng.standard_normal((1, int(rng.integers(1, 5)), width)).astype(np.float32))
    if kind == "truncated":
        return kind, good[: int(rng.integers(0, len(good)))], token
    if kind == "flipped":
        raw = bytearray(good)
        for at in rng.integers(0, len(raw), int(rng.integers(1, 9))):
            raw[at] ^= int(rng.integers(1, 256))
        return kind, bytes(raw), token
    if kind == "random":
        return kind, rng.bytes(int(rng.integers(0, 2048))), token
    if kind == "version":  # after the 4-byte magic: the protocol version, two bytes
        other = good[4:6]
        while other == good[4:6]:
            other = rng.bytes(2)
        return kind, good[:4] + other + good[6:], token
    if kind in ("nan", "inf"):
        data[0, 0, int(rng.integers(width))] = float("nan") if kind == "nan" else float("inf")
        return kind, frame(f"f-{i}", data), token
    if kind == "shape":
        return kind, frame(f"f-{i}", torch.randn(1, 2, width + 1)), token
    if kind == "dtype":
        return kind, frame(f"f-{i}", torch.ones(1, 2, dtype=torch.int64)), token
    if kind == "forged":  # a session no one opened, mid-stream
        return kind, frame(f"forged-{i}", data, start=int(rng.integers(1, 50)), new=False), token
    if kind == "token":
        return kind, good, "not-the-" + token
    return kind, frame(f"flood-{i}", data), token


def call(channel: grpc.Channel, payload: bytes, token: str, timeout_s: float = 30.0) -> grpc.StatusCode:
    """Send one Forward payload; -> the status it got (OK for a reply)."""
    try:
        channel.unary_unary(f"/{SERVICE}/Forward")(payload, timeout=timeout_s, metadata=((TOKEN_HEADER, token),))
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]


def fuzz(
    channel: grpc.Channel, messages: int, width: int, token: str, seed: int = 0,
    between: Callable[[int], None] | None = None, every: int = 100,
) -> dict[str, dict[str, int]]:  # fmt: skip
    """Send `messages` hostile messages; call `between(i)` every `every` messages (a real session's step).
    -> {kind: {status name: count}}."""
    rng = np.random.default_rng(seed)
    good = frame("template", torch.randn(1, 3, width, generator=torch.Generator().manual_seed(seed)))
    counts: dict[str, dict[str, int]] = {}
    for i in range(messages):
        kind, payload, sent_token = hostile(rng, good, i, width, token)
        status = call(channel, payload, sent_token).name
        counts.setdefault(kind, {})[status] = counts.setdefault(kind, {}).get(status, 0) + 1
        if between is not None and i % every == every - 1:
            between(i)
    return counts


def violations(counts: dict[str, dict[str, int]]) -> list[str]:
    """What a node must never do: answer with a status outside `ALLOWED` (INTERNAL is a bug), or accept a message
    of a kind in `NEVER_OK`."""
    allowed = {s.name for s in ALLOWED}
    bad = [f"{kind}: {status} x{n}" for kind, seen in counts.items() for status, n in seen.items()
           if status not in allowed]  # fmt: skip
    return bad + [f"{kind}: accepted x{counts[kind]['OK']}" for kind in NEVER_OK if counts.get(kind, {}).get("OK")]
