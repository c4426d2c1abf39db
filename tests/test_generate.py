"""The generation loop and the stage host, on a tiny seeded llama cut into three stages plus a device head.

Reference for batching: each prompt run alone through the same stages (greedy, fp32).
"""

from __future__ import annotations

import pytest
import torch

from edgellm.errors import BusyError, ConfigError, SessionError
from edgellm.model.prompt import TextStream, encode_prompt, stop_ids
from edgellm.model.sampling import SamplingConfig
from edgellm.model.stage import stage_specs
from edgellm.net.direct_hop import LocalHop
from edgellm.net.messages import CloseSession, ForwardRequest
from edgellm.split.generator import GenerationConfig, Generator, pad_prompts, positions_for
from edgellm.split.host import SessionLimits, StageHost
from edgellm.split.one_process import load_stages
from edgellm.split.pipeline import Pipeline

PROMPTS = [[1, 5, 17, 42, 8, 66, 23], [1, 9, 71], [1, 30, 12, 88, 4]]
STEPS = 10
PAD_ID = 0


@pytest.fixture(scope="module")
def stages(tiny_llama_dir):
    return load_stages(tiny_llama_dir, stage_specs(4, [1, 3], head="device"))


def make_pipeline(stages, limits: SessionLimits = SessionLimits()) -> tuple[Pipeline, list[StageHost]]:
    hosts = [StageHost(s, limits) for s in stages]
    return Pipeline([LocalHop(f"hop{i}", h) for i, h in enumerate(hosts)]), hosts


def generate(stages, prompts, config: GenerationConfig) -> list[list[int]]:
    pipeline, hosts = make_pipeline(stages)
    ids, mask = pad_prompts(prompts, PAD_ID)
    result = Generator(pipeline, config).run(ids, mask)
    assert [h.session_count for h in hosts] == [0] * len(hosts)
    return result.new_tokens


@pytest.fixture(scope="module")
def alone(stages) -> list[list[int]]:
    """Each prompt's greedy tokens, run on its own."""
    return [generate(stages, [p], GenerationConfig(STEPS))[0] for p in PROMPTS]


def test_padded_batch_equals_each_prompt_alone(stages, alone):
    assert len({tuple(t) for t in alone}) == len(PROMPTS)  # the rows differ, so a mix-up would show
    batched = generate(stages, PROMPTS, GenerationConfig(STEPS))
    assert batched == alone


def test_stops_at_a_stop_id(stages, alone):
    stop = alone[0][3]  # a token the model really emits, at step 3 of row 0
    config = GenerationConfig(STEPS, stop_ids=(stop,))
    pipeline, hosts = make_pipeline(stages)
    ids, mask = pad_prompts(PROMPTS, PAD_ID)
    generator = Generator(pipeline, config)
    steps = list(generator.stream(ids, mask))
    result = generator.result
    assert result is not None
    for row, tokens in enumerate(result.new_tokens):
        full = alone[row]
        want = full[: full.index(stop) + 1] if stop in full else full
        assert tokens == want
    assert result.new_tokens[0][-1] == stop and len(result.new_tokens[0]) <= 4
    assert result.steps == len(steps) == max(len(t) for t in result.new_tokens)
    assert steps[-1].index == len(steps) - 1
    first_stop = result.new_tokens[0].index(stop)
    assert steps[first_stop].finished[0] and not any(s.finished[0] for s in steps[:first_stop])
    assert [h.session_count for h in hosts] == [0] * len(hosts)


@pytest.mark.parametrize("max_new_tokens", [1, 4])
def test_max_new_tokens_is_respected(stages, alone, max_new_tokens):
    got = generate(stages, PROMPTS, GenerationConfig(max_new_tokens))
    assert got == [t[:max_new_tokens] for t in alone]


def test_generation_config_rejects_zero_tokens():
    with pytest.raises(ConfigError, match="max new tokens must be >= 1, got 0"):
        GenerationConfig(0)


def test_sampled_generation_is_seeded(stages):
    def sample(seed: int) -> list[list[int]]:
        sampling = SamplingConfig(greedy=False, temperature=1.5, seed=seed)
        return generate(stages, PROMPTS, GenerationConfig(STEPS, sampling))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_sessions_close_when_the_consumer_stops_early(stages):
    pipeline, hosts = make_pipeline(stages)
    ids, mask = pad_prompts(PROMPTS, PAD_ID)
    generator = Generator(pipeline, GenerationConfig(STEPS))
    stream = generator.stream(ids, mask)
    next(stream)
    next(stream)
    assert [h.session_count for h in hosts] == [1] * len(hosts)
    stream.close()
    assert [h.session_count for h in hosts] == [0] * len(hosts)
    assert generator.result is not None and generator.result.steps == 2


class _FailingHop:
    """Passes requests through, but fails the `fail_at`-th forward."""

    def __init__(self, hop: LocalHop, fail_at: int) -> None:
        self.name = hop.name
        self._hop = hop
        self._left = fail_at

    def forward(self, request):
        self._left -= 1
        if self._left == 0:
            raise ConnectionError("link down")
        return self._hop.forward(request)

    def close(self, request):
        self._hop.close(request)


def test_sessions_close_when_a_hop_fails(stages):
    pipeline, hosts = make_pipeline(stages)
    pipeline.hops[2] = _FailingHop(pipeline.hops[2], fail_at=3)  # fails on the second decode step
    ids, mask = pad_prompts(PROMPTS, PAD_ID)
    with pytest.raises(ConnectionError, match="link down"):
        Generator(pipeline, GenerationConfig(STEPS)).run(ids, mask)
    assert [h.session_count for h in hosts] == [0] * len(hosts)


class _UnreachableOnClose(_FailingHop):
    def close(self, request):
        raise ConnectionError("cannot reach node")


def test_close_reaches_every_hop_even_if_one_fails(stages):
    pipeline, hosts = make_pipeline(stages)
    pipeline.hops[0] = _UnreachableOnClose(pipeline.hops[0], fail_at=-1)
    ids, mask = pad_prompts(PROMPTS, PAD_ID)
    with pytest.raises(ConnectionError, match="cannot reach node"):
        Generator(pipeline, GenerationConfig(2)).run(ids, mask)
    assert [h.session_count for h in hosts[1:]] == [0] * (len(hosts) - 1)


def test_a_failed_close_does_not_hide_the_original_error(stages, caplog):
    pipeline, hosts = make_pipeline(stages)
    pipeline.hops[1] = _UnreachableOnClose(pipeline.hops[1], fail_at=2)  # fails the first decode step
    ids, mask = pad_prompts(PROMPTS, PAD_ID)
    with pytest.raises(ConnectionError, match="link down"):
        Generator(pipeline, GenerationConfig(STEPS)).run(ids, mask)
    assert "cannot reach node" in caplog.text
    assert [h.session_count for i, h in enumerate(hosts) if i != 1] == [0] * (len(hosts) - 1)


def test_pad_prompts_left_pads():
    ids, mask = pad_prompts([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[True, True, True], [False, False, True], [False, True, True]]


@pytest.mark.parametrize("prompts", [[], [[1, 2], []]])
def test_pad_prompts_refuses_empty(prompts):
    with pytest.raises(ConfigError, match="every prompt needs at least one token"):
        pad_prompts(prompts, pad_id=0)


def test_positions_count_real_tokens_only():
    mask = torch.tensor([[False, False, True, True], [True, True, True, True], [False, True, False, True]])
    assert positions_for(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3], [0, 0, 0, 1]]


# --- StageHost ----------------------------------------------------------------------------------------------

IDS = torch.tensor([[1, 5, 17, 42, 8]])


def request(session: str, ids: torch.Tensor = IDS, start: int = 0, new: bool = False, **kw) -> ForwardRequest:
    positions = torch.arange(start, start + ids.shape[1]).expand(ids.shape[0], -1)
    return ForwardRequest(session, ids, positions, new_session=new, **kw)


def test_host_refuses_unknown_session(stages):
    host = StageHost(stages[0])
    with pytest.raises(SessionError, match="unknown session 'nope'"):
        host.forward(request("nope"))
    host.forward(request("a", new=True))
    host.close(CloseSession("a"))
    host.close(CloseSession("a"))  # closing twice (or an expired session) is fine
    with pytest.raises(SessionError, match="unknown session 'a'"):
        host.forward(request("a", IDS[:, :1], start=5))


def test_new_session_on_an_existing_id_resets_it(stages):
    host = StageHost(stages[0])
    fresh = StageHost(stages[0]).forward(request("x", IDS[:, :2], new=True)).output
    host.forward(request("s", new=True))
    continued = host.forward(request("s", IDS[:, :2], start=5)).output
    assert not torch.allclose(continued, fresh, atol=1e-3)  # the cache matters, so a reset is visible
    again = host.forward(request("s", IDS[:, :2], new=True)).output
    torch.testing.assert_close(again, fresh, atol=1e-5, rtol=0)
    assert host.session_count == 1


def test_host_enforces_max_sessions(stages):
    host = StageHost(stages[0], SessionLimits(max_sessions=2))
    host.forward(request("a", new=True))
    host.forward(request("b", new=True))
    with pytest.raises(BusyError, match="maximum of 2 sessions"):
        host.forward(request("c", new=True))
    host.forward(request("a", new=True))  # restarting a held session is not a new one
    host.close(CloseSession("b"))
    host.forward(request("c", new=True))
    assert host.session_count == 2


def test_a_full_host_evicts_the_least_recently_used_idle_session(stages):
    now = [0.0]
    host = StageHost(stages[0], SessionLimits(max_sessions=3, evict_idle_s=60), clock=lambda: now[0])
    for t, sid in ((0.0, "a"), (1.0, "b"), (2.0, "c")):  # three devices start; a and b then go silent
        now[0] = t
        host.forward(request(sid, IDS[:, :2], new=True))
    now[0] = 50.0
    host.forward(request("c", IDS[:, 2:3], start=2))
    with pytest.raises(BusyError, match="none of them idle for 60 s"):  # a: 50 s idle, not yet evictable
        host.forward(request("d", new=True))
    now[0] = 61.5  # a: 61.5 s idle, b: 60.5 s, c: 11.5 s
    host.forward(request("d", new=True))
    assert host.session_count == 3
    with pytest.raises(SessionError, match="unknown session 'a'"):  # the least recently used went first
        host.forward(request("a", IDS[:, 2:3], start=2))
    host.forward(request("b", IDS[:, 2:3], start=2))  # b stays, and is fresh again
    now[0] = 130.0  # b: 68.5 s, c: 80 s, d: 68.5 s idle: c is the least recently used
    host.forward(request("e", new=True))
    with pytest.raises(SessionError, match="unknown session 'c'"):
        host.forward(request("c", IDS[:, 3:4], start=3))
    assert host.session_count == 3


def test_abandoned_sessions_lock_new_users_out_for_seconds_at_most(stages):
    now = [0.0]
    host = StageHost(stages[0], SessionLimits(max_sessions=4), clock=lambda: now[0])  # the default eviction
    for k in range(4):  # four devices crash mid-answer: their sessions are never closed
        host.forward(request(f"crashed-{k}", IDS[:, :2], new=True))
    now[0] = 2.5
    for k in range(4):  # new users get in: the abandoned sessions make room, least recently used first
        host.forward(request(f"user-{k}", IDS[:, :2], new=True))
    assert host.session_count == 4


def test_idle_sessions_expire(stages):
    now = [0.0]
    host = StageHost(stages[0], SessionLimits(idle_timeout_s=10), clock=lambda: now[0])
    host.forward(request("a", IDS[:, :2], new=True))
    now[0] = 9.0
    host.forward(request("a", IDS[:, 2:3], start=2))  # 9 s idle: still there, and now fresh again
    host.forward(request("b", new=True))
    now[0] = 18.5
    host.forward(request("a", IDS[:, 3:4], start=3))  # 9.5 s after its last use
    assert host.session_count == 2
    now[0] = 29.0  # a: 10.5 s idle, b: 20 s idle
    host.forward(request("c", new=True))
    assert host.session_count == 1
    with pytest.raises(SessionError, match="unknown session 'a'"):
        host.forward(request("a", IDS[:, 4:5], start=4))


def test_host_refuses_another_protocol_version(stages):
    host = StageHost(stages[0])
    with pytest.raises(ConfigError, match="protocol version 99 is not supported"):
        host.forward(request("a", new=True, version=99))
    assert host.session_count == 0


def test_host_serves_correctly_after_errors(stages):
    reference = StageHost(stages[1])
    host = StageHost(stages[1])
    hidden = stages[0](IDS, torch.arange(5).view(1, 5))  # [1, 5, D]
    prefix = torch.arange(4).view(1, 4)
    want_prefill = reference.forward(ForwardRequest("r", hidden[:, :4], prefix, new_session=True))
    want = reference.forward(ForwardRequest("r", hidden[:, 4:], torch.tensor([[4]]))).output

    got_prefill = host.forward(ForwardRequest("s", hidden[:, :4], prefix, new_session=True))
    torch.testing.assert_close(got_prefill.output, want_prefill.output, atol=0, rtol=0)
    bad = [
        ForwardRequest("s", hidden[:, 4:, :-1], torch.tensor([[4]])),  # wrong hidden size
        ForwardRequest("s", hidden[:, 4:].expand(2, 1, -1), torch.tensor([[4], [4]])),  # wrong batch size
        ForwardRequest("s", hidden[:, 4:], torch.tensor([[10_000]])),  # past the position limit
    ]
    for r in bad:
        with pytest.raises((ConfigError, RuntimeError)):
            host.forward(r)
    got = host.forward(ForwardRequest("s", hidden[:, 4:], torch.tensor([[4]]))).output
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("last_only", [False, True])
def test_a_long_prompt_runs_in_chunks_equal_to_one_pass_and_a_failed_chunk_changes_nothing(stages, last_only):
    ids, mask = pad_prompts([[1, *range(5, 16)], [1, 30, 12, 88, 4]], PAD_ID)  # [2, 12], left-padded
    positions = positions_for(mask)
    whole, chunked = (
        StageHost(stages[0], SessionLimits(prefill_chunk=None)),
        StageHost(stages[0], SessionLimits(prefill_chunk=5)),
    )  # 12 tokens: passes of 5, 5 and 2
    for host in (whole, chunked):
        host.forward(ForwardRequest("s", ids, positions, mask, new_session=True))
    want = whole.forward(ForwardRequest("s", ids[:, :1], positions[:, -1:] + 1)).output
    got = chunked.forward(ForwardRequest("s", ids[:, :1], positions[:, -1:] + 1)).output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # the chunked prefill filled the same cache

    head = StageHost(stages[-1], SessionLimits(prefill_chunk=5))  # the device's head-only stage
    hidden = stages[2](stages[1](stages[0](ids, positions, None, mask), positions, None, mask), positions, None, mask)
    out = head.forward(ForwardRequest("h", hidden, positions, mask, new_session=True, last_only=last_only)).output
    assert out.shape[1] == (1 if last_only else 12)
    torch.testing.assert_close(out, stages[-1](hidden, positions, None, mask, last_only), atol=1e-5, rtol=0)

    middle = StageHost(stages[1], SessionLimits(prefill_chunk=5))
    middle.forward(ForwardRequest("m", hidden[:, :2], positions[:, :2], mask[:, :2], new_session=True))
    bad_positions = torch.cat([positions[:, 2:7], torch.full((2, 5), 10_000)], 1)  # the second pass fails
    with pytest.raises(ConfigError, match="exceeds this model's limit"):
        middle.forward(ForwardRequest("m", hidden[:, 2:12], bad_positions, mask[:, 2:12]))
    assert middle._sessions["m"].cache.length == 2  # the first pass of the failed request was undone
    fresh = StageHost(stages[1], SessionLimits(prefill_chunk=5))
    with pytest.raises(ConfigError):
        fresh.forward(ForwardRequest("f", hidden[:, :10], bad_positions, mask[:, :10], new_session=True))
    assert fresh._sessions["f"].cache.length == 0 and fresh._sessions["f"].cache.batch_size is None


# --- prompts and text ---------------------------------------------------------------------------------------


class _ByteTokenizer:
    """Token i is byte i; decoding shows an incomplete UTF-8 sequence as U+FFFD, as real tokenizers do."""

    eos_token_id = 2
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode())}

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_split_characters():
    stream = TextStream(_ByteTokenizer())
    pieces = [stream.push(b) for b in "a€b".encode()]  # "€" is three bytes
    assert pieces == ["a", "", "", "€", "b"]


def test_stop_ids_merge_tokenizer_and_config():
    class Config:
        eos_token_id = [7, 2]

    assert stop_ids(_ByteTokenizer(), Config()) == (2, 7)
    assert stop_ids(object(), object()) == ()


def test_encode_prompt_refusals():
    assert encode_prompt(_ByteTokenizer(), "hi", chat=False) == [104, 105]
    with pytest.raises(ConfigError, match="the prompt is empty"):
        encode_prompt(_ByteTokenizer(), "", chat=False)
    with pytest.raises(ConfigError, match="no chat template; run with --no-chat"):
        encode_prompt(_ByteTokenizer(), "hi", chat=True)


GUARD = SamplingConfig(repetition_penalty=1.3, no_repeat_ngram=2)


def test_guarded_generation_equals_transformers_and_asks_for_logits(stages, alone, tiny_llama_dir):
    """With the repetition guard on, the head returns the distribution (not its argmax) and the device chooses:
    each prompt's tokens equal transformers' `generate(repetition_penalty=..., no_repeat_ngram_size=...)`."""
    from conftest import reference_model

    pipeline, _ = make_pipeline(stages)
    asked: list[bool] = []
    forward = pipeline.forward

    def spy(*args, **kwargs):
        asked.append(kwargs["argmax"])
        return forward(*args, **kwargs)

    pipeline.forward = spy
    ids, mask = pad_prompts(PROMPTS, PAD_ID)
    guarded = Generator(pipeline, GenerationConfig(STEPS, GUARD)).run(ids, mask).new_tokens
    assert asked == [False] * STEPS
    assert guarded != alone  # the guard changed the answer, so the comparison below is not vacuous
    model = reference_model(tiny_llama_dir)
    for prompt, got in zip(PROMPTS, guarded):
        prompt_ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                 max_new_tokens=STEPS, min_new_tokens=STEPS, repetition_penalty=1.3,
                                 no_repeat_ngram_size=2)  # fmt: skip
        assert out[0, len(prompt) :].tolist() == got  # (min_new_tokens: the tiny model's EOS, 3, is not a stop here)
    assert not any(3 in row for row in guarded)
