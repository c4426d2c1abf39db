"""Continuous batching on stage hosts: concurrent sessions share forward passes and each gets its own tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TINY_LAYERS, in_threads
from edgellm.errors import ConfigError, SessionError
from edgellm.model.session_rows import SessionRows
from edgellm.model.stage import stage_specs
from edgellm.net.direct_hop import LocalHop
from edgellm.net.messages import ForwardRequest
from edgellm.split.batching import Work, next_iteration
from edgellm.split.budget import NodeEmulation
from edgellm.split.coalesce import CoalescingHop
from edgellm.split.generator import GenerationConfig, Generator
from edgellm.split.host import SessionLimits, StageHost
from edgellm.split.one_process import load_stages
from edgellm.split.pipeline import Pipeline

PROMPTS = [[1, 5, 17, 42, 8], [1, 9, 71, 30, 12, 44, 7, 66, 23, 4, 4, 9, 13], [1, 30, 12], [2, 8], [1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("engine", ["fast", "generic"])
def test_one_pass_over_sessions_at_different_lengths_equals_each_alone(tiny_model_dir, engine):
    (stage,) = load_stages(tiny_model_dir, stage_specs(TINY_LAYERS, [], "server"), engine=engine)
    caches = [stage.new_cache() for _ in PROMPTS]
    with torch.no_grad():
        for prompt, cache in zip(PROMPTS, caches):
            stage(torch.tensor([prompt]), torch.arange(len(prompt)).view(1, -1), cache)
        lengths = [c.length for c in caches]
        tokens = torch.tensor([[7], [11], [3], [90], [1]])
        positions = torch.tensor(lengths).view(-1, 1)
        alone_caches = [stage.new_cache() for _ in PROMPTS]
        want = []
        for prompt, cache, token in zip(PROMPTS, alone_caches, tokens):
            stage(torch.tensor([prompt]), torch.arange(len(prompt)).view(1, -1), cache)
            want.append(stage(token.view(1, 1), torch.tensor([[len(prompt)]]), cache))
        got = stage(tokens, positions, SessionRows(caches))
    for b in range(len(PROMPTS)):
        torch.testing.assert_close(got[b : b + 1], want[b], atol=1e-5, rtol=0)
        assert caches[b].length == lengths[b] + 1  # committed into each session's own cache
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # rows differ: the test cannot pass by broadcasting


def test_a_failed_batched_pass_leaves_every_session_as_it_was(tiny_llama_dir):
    (stage,) = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [], "server"))
    caches = [stage.new_cache() for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            stage(torch.tensor([[1, 2, 3]]), torch.arange(3).view(1, -1), cache)
        with pytest.raises(IndexError):
            stage(torch.tensor([[5], [500]]), torch.tensor([[3], [3]]), SessionRows(caches))  # 500: not a token
    assert [c.length for c in caches] == [3, 3]


def test_padded_sessions_are_not_batched(tiny_llama_dir):
    (stage,) = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [], "server"))
    cache = stage.new_cache()
    with torch.no_grad():
        stage(torch.tensor([[0, 2, 3]]), torch.tensor([[0, 0, 1]]), cache, torch.tensor([[False, True, True]]))
    with pytest.raises(ConfigError, match="unpadded"):
        SessionRows([cache, stage.new_cache()])


def _work(tokens: int, batch: int = 1) -> Work:
    class _Session:
        cache = type("C", (), {"has_padding": lambda self: False})()

    request = ForwardRequest("s", torch.zeros(batch, tokens, dtype=torch.long), torch.zeros(batch, tokens))
    return Work(request, _Session())


def test_an_iteration_takes_the_oldest_decode_steps_up_to_the_bound_and_one_prompt():
    queue = [_work(1), _work(30), _work(1), _work(1), _work(8), _work(1)]
    rows, other = next_iteration(queue, max_batch=3)
    assert rows == [queue[0], queue[2], queue[3]] and other is queue[1]  # first come, first served
    rows, other = next_iteration(queue[3:], max_batch=3)
    assert rows == [queue[3], queue[5]] and other is queue[4]
    rows, other = next_iteration([_work(1, batch=2)], max_batch=3)
    assert rows == [] and other is not None  # a padded batch of one session runs alone


def _pipeline(hosts):
    return Pipeline([LocalHop(f"stage{i}", h) for i, h in enumerate(hosts)])


def _generate(hosts, prompt, tokens=8):
    return (
        Generator(_pipeline(hosts), GenerationConfig(max_new_tokens=tokens)).run(torch.tensor([prompt])).new_tokens[0]
    )


@pytest.mark.parametrize("cuts", [[], [2]])
def test_concurrent_generations_through_a_split_get_the_tokens_each_gets_alone(tiny_llama_dir, cuts):
    stages = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, cuts, "server"))
    limits = SessionLimits(prefill_chunk=4)  # prompts run in chunks, interleaved with the others' decode steps
    # An emulated slower node (x3) keeps each pass busy long enough for the other sessions' steps to queue up.
    hosts = [StageHost(s, limits, emulation=NodeEmulation(compute_scale=3.0)) for s in stages]
    want = [_generate([StageHost(s) for s in stages], p) for p in PROMPTS]
    assert in_threads(lambda i: _generate(hosts, PROMPTS[i]), len(PROMPTS), 60) == want
    for host in hosts:
        assert max(int(k) for k in host.stats()["batch_sizes"]) > 1, host.stats()  # passes were shared
        assert host.prefill_chunks >= sum(-(-len(p) // 4) for p in PROMPTS)
        assert host.session_count == 0  # every session closed


def test_a_session_with_a_request_in_progress_refuses_another(tiny_llama_dir):
    (stage,) = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [], "server"))
    host = StageHost(stage)
    host.forward(ForwardRequest("a", torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), new_session=True))
    host._sessions["a"].busy = True  # as while its step waits in the queue
    with pytest.raises(ConfigError, match="already has a request in progress"):
        host.forward(ForwardRequest("a", torch.tensor([[3]]), torch.tensor([[2]])))


def test_one_bad_row_fails_alone(tiny_llama_dir):
    (stage,) = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [], "server"))
    host = StageHost(stage)
    for sid in ("a", "b"):
        host.forward(ForwardRequest(sid, torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), new_session=True))
    good = Work(ForwardRequest("a", torch.tensor([[3]]), torch.tensor([[2]])), host._sessions["a"])
    bad = Work(ForwardRequest("b", torch.tensor([[500]]), torch.tensor([[2]])), host._sessions["b"])  # no such token
    with torch.inference_mode():
        host._run_rows([good, bad])
    assert good.error is None and good.output is not None and isinstance(bad.error, IndexError)
    assert host._sessions["a"].cache.length == 3 and host._sessions["b"].cache.length == 2


def test_a_request_carrying_several_sessions_rows_equals_each_session_alone(tiny_llama_dir):
    (stage,) = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [], "server"))
    host, alone = StageHost(stage), StageHost(stage)
    for sid, prompt in zip("abc", PROMPTS):
        for h in (host, alone):
            h.forward(
                ForwardRequest(sid, torch.tensor([prompt]), torch.arange(len(prompt)).view(1, -1), new_session=True)
            )
    tokens, positions = torch.tensor([[7], [11], [3]]), torch.tensor([[len(p)] for p in PROMPTS[:3]])
    reply = host.forward(ForwardRequest("", tokens, positions, rows=("a", "b", "c")))
    for b, sid in enumerate("abc"):
        want = alone.forward(ForwardRequest(sid, tokens[b : b + 1], positions[b : b + 1])).output
        torch.testing.assert_close(reply.output[b : b + 1], want, atol=1e-5, rtol=0)
    assert host.stats()["row_messages"] == 1 and host.stats()["batch_sizes"] == {"3": 1}
    with pytest.raises(SessionError):  # a row naming an unknown session: the whole request is refused ...
        host.forward(ForwardRequest("", tokens[:2], positions[:2] + 1, rows=("a", "zz")))
    host.forward(ForwardRequest("a", tokens[:1], positions[:1] + 1))  # ... and no row of it stays busy


@pytest.mark.parametrize("cuts", [[2], [1, 3]])
def test_a_coalescing_hop_carries_concurrent_sessions_steps_in_one_message(tiny_llama_dir, cuts):
    stages = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, cuts, "server"))
    emulated = NodeEmulation(compute_scale=3.0)
    hosts = [StageHost(s, SessionLimits(prefill_chunk=4), emulation=emulated) for s in stages]
    hops = [LocalHop("stage0", hosts[0])]
    hops += [CoalescingHop(LocalHop(f"stage{i}", h), window_s=0.05) for i, h in enumerate(hosts[1:], 1)]
    want = [_generate([StageHost(s) for s in stages], p) for p in PROMPTS]

    def run(i):
        return (
            Generator(Pipeline(hops), GenerationConfig(max_new_tokens=8)).run(torch.tensor([PROMPTS[i]])).new_tokens[0]
        )

    assert in_threads(run, len(PROMPTS), 60) == want
    for hop, host in zip(hops[1:], hosts[1:]):
        assert hop.messages > 0 and hop.rows > hop.messages  # steps of several sessions shared messages
        assert host.stats()["row_messages"] == hop.messages and host.session_count == 0


def test_rows_that_do_not_fit_a_message_of_several_sessions_are_refused(tiny_llama_dir):
    from edgellm.net.messages import WireError
    from edgellm.split.validate import check_request

    (stage,) = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [], "server"))
    ok = ForwardRequest("", torch.tensor([[1], [2]]), torch.tensor([[3], [4]]), rows=("a", "b"))
    check_request(ok, stage)
    for bad in [
        dict(rows=("a",)),  # fewer rows than the batch
        dict(rows=("a", "a")),
        dict(rows=("a", "")),
        dict(new_session=True),
        dict(token_mask=torch.ones(2, 1, dtype=torch.bool)),
    ]:
        with pytest.raises(WireError):
            check_request(dataclasses.replace(ok, **bad), stage)
