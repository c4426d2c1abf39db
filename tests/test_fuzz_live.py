"""A fuzz run against a live node process: seeded random frames (truncated, bit-flipped, random bytes, wrong
versions, shapes and dtypes, NaN/Inf, forged and replayed session ids, the wrong token, a flood of new sessions) and, between
them, a real session's decode steps. Every input gets a reply or an error status that names the sender's fault or
the node's limit, never an internal error; the node stays up, the real session's outputs stay those of the same
stage run here, and the node's memory, threads and file descriptors stay bounded."""

from __future__ import annotations

import grpc
import numpy as np
import psutil
import pytest
import torch
from test_deployment import TOKEN, Deployed, document

from conftest import TINY_LAYERS
from edgellm.model.stage import stage_specs
from edgellm.net.messages import ForwardRequest, encode
from edgellm.net.rpc import SERVICE, TOKEN_HEADER
from edgellm.split.host import StageHost
from edgellm.split.one_process import load_stages

pytestmark = pytest.mark.multiprocess

MESSAGES = 1500  # bench-sized runs: raise it (each message takes about 5 ms on loopback)
WIDTH = 32  # the tiny model's hidden size
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.UNAUTHENTICATED}  # fmt: skip


def frame(session: str, data: torch.Tensor, start: int = 0, new: bool = True) -> bytes:
    positions = torch.arange(start, start + data.shape[1]).unsqueeze(0)
    return encode(ForwardRequest(session, data, positions, new_session=new))


def fuzzed(rng: np.random.Generator, good: bytes, i: int) -> tuple[str, bytes, str]:
    """(kind, payload, token) of message i."""
    kind = ["truncated", "flipped", "random", "version", "nan", "inf", "shape", "dtype", "forged", "token",
            "flood"][int(rng.integers(11))]  # fmt: skip
    data = torch.from_numpy(rng.standard_normal((1, int(rng.integers(1, 5)), WIDTH)).astype(np.float32))
    if kind == "truncated":
        return kind, good[: int(rng.integers(0, len(good)))], TOKEN
    if kind == "flipped":
        raw = bytearray(good)
        for at in rng.integers(0, len(raw), int(rng.integers(1, 9))):
            raw[at] ^= int(rng.integers(1, 256))
        return kind, bytes(raw), TOKEN
    if kind == "random":
        return kind, rng.bytes(int(rng.integers(0, 2048))), TOKEN
    if kind == "version":
        version = good[4:6]  # after the magic: the protocol version, two bytes
        other = version
        while other == version:
            other = rng.bytes(2)
        return kind, good[:4] + other + good[6:], TOKEN
    if kind in ("nan", "inf"):
        data[0, 0, int(rng.integers(WIDTH))] = float("nan") if kind == "nan" else float("inf")
        return kind, frame(f"f-{i}", data), TOKEN
    if kind == "shape":
        return kind, frame(f"f-{i}", torch.randn(1, 2, WIDTH + 1)), TOKEN
    if kind == "dtype":
        return kind, frame(f"f-{i}", torch.ones(1, 2, dtype=torch.int64)), TOKEN
    if kind == "forged":  # a session no one opened, mid-stream
        return kind, frame(f"forged-{i}", data, start=int(rng.integers(1, 50)), new=False), TOKEN
    if kind == "token":
        return kind, good, "not-the-token"
    return kind, frame(f"flood-{i}", data), TOKEN  # a new session, as a crashing device leaves them


def call(channel: grpc.Channel, payload: bytes, token: str) -> grpc.StatusCode:
    try:
        channel.unary_unary(f"/{SERVICE}/Forward")(payload, timeout=10, metadata=((TOKEN_HEADER, token),))
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


@pytest.fixture(scope="module")
def edge(tiny_llama_dir, tmp_path_factory):
    deployed = Deployed(tmp_path_factory.mktemp("fuzz-live"), document(tiny_llama_dir, 1, "device"))
    yield deployed
    deployed.stop()


def test_a_live_node_survives_a_fuzz_run_and_keeps_its_sessions(edge, tiny_llama_dir):
    spec = stage_specs(TINY_LAYERS, [round(TINY_LAYERS / 2)], "device")[1]
    (stage,) = load_stages(tiny_llama_dir, [spec])
    local = StageHost(stage)  # the same stage in this process: what the node's answers must be
    address = edge.topology.node("edge1").address
    process = psutil.Process(edge.servers.processes["edge1"].pid)
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
    rng = np.random.default_rng(0)
    good = frame("template", torch.randn(1, 3, WIDTH))
    prompt = torch.randn(1, 4, WIDTH)

    sent: list[bytes] = []

    def real_step(data: torch.Tensor, start: int, new: bool) -> None:
        request = ForwardRequest("real", data, torch.arange(start, start + data.shape[1]).unsqueeze(0),
                                 new_session=new)  # fmt: skip
        sent.append(encode(request))
        reply = channel.unary_unary(f"/{SERVICE}/Forward")(sent[-1], timeout=10,
                                                            metadata=((TOKEN_HEADER, TOKEN),))  # fmt: skip
        from edgellm.net.messages import decode

        want = local.forward(request).output
        torch.testing.assert_close(decode(reply).output, want, rtol=1e-5, atol=1e-5)

    real_step(prompt, 0, True)
    position = prompt.shape[1]
    for _ in range(50):  # warm up: the node's allocations settle before the baseline
        call(channel, good, TOKEN)
    before = (process.memory_info().rss, process.num_threads(), process.num_fds())
    codes: dict[str, set[grpc.StatusCode]] = {}
    for i in range(MESSAGES):
        kind, payload, token = fuzzed(rng, good, i)
        if i % 50 == 7:  # a replayed message of the real session: its last step, sent again as it was
            kind, payload, token = "replayed", sent[-1], TOKEN
        codes.setdefault(kind, set()).add(call(channel, payload, token))
        if i % 100 == 99:  # the real session goes on between the attacks
            real_step(torch.randn(1, 1, WIDTH), position, False)
            position += 1
    channel.close()
    assert edge.servers.processes["edge1"].poll() is None, "the node died"
    for kind, seen in codes.items():
        assert seen <= ALLOWED | {grpc.StatusCode.OK}, (kind, seen)  # never INTERNAL or UNKNOWN
    for kind in ("nan", "inf", "shape", "dtype", "version", "random"):
        assert grpc.StatusCode.OK not in codes.get(kind, set()), kind
    assert codes["token"] == {grpc.StatusCode.UNAUTHENTICATED}
    assert codes["forged"] == {grpc.StatusCode.NOT_FOUND}
    assert codes["replayed"] == {grpc.StatusCode.OK}  # the stage recomputes the step; the session goes on unchanged
    rss, threads, fds = process.memory_info().rss, process.num_threads(), process.num_fds()
    assert rss - before[0] < 100e6 and threads <= before[1] + 8 and fds <= before[2] + 16
