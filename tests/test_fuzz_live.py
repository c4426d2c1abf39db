"""A fuzz run against a live node process (`edgellm.net.fuzz`): seeded hostile frames (truncated, bit-flipped,
random bytes, wrong versions, shapes and dtypes, NaN/Inf, forged and replayed session ids, the wrong token, a flood
of new sessions) and, between them, a real session's decode steps. Every input gets a reply or an error status that
names the sender's fault or the node's limit, never an internal error; the node stays up, the real session's
outputs stay those of the same stage run here, and the node's memory, threads and file descriptors stay bounded.
bench/fuzz_live.py runs 10,000 messages at a node of the real model."""

from __future__ import annotations

import grpc
import psutil
import pytest
import torch
from test_deployment import TOKEN, Deployed, document

from conftest import TINY_LAYERS
from edgellm.model.stage import stage_specs
from edgellm.net.fuzz import call, fuzz, violations
from edgellm.net.messages import ForwardRequest, decode, encode
from edgellm.net.rpc import SERVICE, TOKEN_HEADER
from edgellm.split.host import StageHost
from edgellm.split.one_process import load_stages

pytestmark = pytest.mark.multiprocess

MESSAGES = 1500
WIDTH = 32  # the tiny model's hidden size


@pytest.fixture(scope="module")
def edge(tiny_llama_dir, tmp_path_factory):
    deployed = Deployed(tmp_path_factory.mktemp("fuzz-live"), document(tiny_llama_dir, 1, "device"))
    yield deployed
    deployed.stop()


def test_a_live_node_survives_a_fuzz_run_and_keeps_its_sessions(edge, tiny_llama_dir):
    spec = stage_specs(TINY_LAYERS, [round(TINY_LAYERS / 2)], "device")[1]
    (stage,) = load_stages(tiny_llama_dir, [spec])
    local = StageHost(stage)  # the same stage in this process: what the node's answers must be
    process = psutil.Process(edge.servers.processes["edge1"].pid)
    channel = grpc.insecure_channel(edge.topology.node("edge1").address)
    sent: list[bytes] = []
    replays: list[grpc.StatusCode] = []

    def real_step(data: torch.Tensor, start: int, new: bool) -> None:
        request = ForwardRequest("real", data, torch.arange(start, start + data.shape[1]).unsqueeze(0),
                                 new_session=new)  # fmt: skip
        sent.append(encode(request))
        reply = channel.unary_unary(f"/{SERVICE}/Forward")(sent[-1], timeout=10, metadata=((TOKEN_HEADER, TOKEN),))
        torch.testing.assert_close(decode(reply).output, local.forward(request).output, rtol=1e-5, atol=1e-5)

    def between(i: int) -> None:  # the real session goes on between the attacks, and is replayed at times
        if i % 300 == 299:
            replays.append(call(channel, sent[-1], TOKEN))  # its last step again, as it was: recomputed
        real_step(torch.randn(1, 1, WIDTH), 4 + i // 100, False)

    real_step(torch.randn(1, 4, WIDTH), 0, True)
    for _ in range(50):  # warm up: the node's allocations settle before the baseline
        call(channel, sent[0], "not-the-token")
    before = (process.memory_info().rss, process.num_threads(), process.num_fds())
    counts = fuzz(channel, MESSAGES, WIDTH, TOKEN, seed=0, between=between)
    channel.close()
    assert edge.servers.processes["edge1"].poll() is None, "the node died"
    assert violations(counts) == [], counts
    assert set(counts["token"]) == {"UNAUTHENTICATED"} and set(counts["forged"]) == {"NOT_FOUND"}
    assert replays and set(replays) == {grpc.StatusCode.OK}
    rss, threads, fds = process.memory_info().rss, process.num_threads(), process.num_fds()
    assert rss - before[0] < 100e6 and threads <= before[1] + 8 and fds <= before[2] + 16
