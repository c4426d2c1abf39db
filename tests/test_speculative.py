"""Speculative decoding (`edgellm.spec`): the acceptance rules, the cost model, the KV rewind on stage hosts, and
generation with every drafter through several splits equal to the target model alone.

References: plain greedy generation through the same stages (`edgellm.split.generator.Generator`), which
tests/test_generate.py and tests/test_stage_equivalence.py tie to transformers; for sampling, the target's own
distribution at every place (a chi-square test on a small vocabulary).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import make_tiny_chat_model
from edgellm.errors import ConfigError
from edgellm.model.sampling import SamplingConfig
from edgellm.model.stage import stage_specs
from edgellm.net.direct_hop import LocalHop
from edgellm.net.messages import CloseSession, ForwardRequest
from edgellm.spec.accept import accept_greedy, accept_sampled
from edgellm.spec.config import SpeculativeConfig, load_draft, parse_draft
from edgellm.spec.cost import AdaptiveK, RoundCosts, best_k, expected_tokens
from edgellm.spec.generator import SpeculativeGenerator
from edgellm.split.generator import GenerationConfig, Generator
from edgellm.split.host import StageHost
from edgellm.split.one_process import load_stages
from edgellm.split.pipeline import Pipeline

PROMPTS = [[1, 5, 17, 42, 8, 66, 23], [1, 9, 71], [2, 30, 12, 88, 4, 19]]
STEPS = 20


# -- the rules, pure -------------------------------------------------------------------------------------------------


def test_greedy_rule_keeps_the_longest_matching_prefix_then_the_targets_token():
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]).emitted([5, 6, 7]) == [5, 6, 7, 8]
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]).emitted([5, 6, 7]) == [5, 9]
    assert accept_greedy([5, 6, 7], [4, 6, 7, 8]).emitted([5, 6, 7]) == [4]
    assert accept_greedy([], [3]).emitted([]) == [3]
    with pytest.raises(ValueError):
        accept_greedy([1, 2], [1, 2])


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    return float(
        torch.special.gammaincc(
            torch.tensor(df / 2.0, dtype=torch.float64), torch.tensor(stat / 2.0, dtype=torch.float64)
        )
    )


def test_sampling_rule_emits_every_place_from_the_targets_distribution():
    """Rounds of k=3 drafts from q over a 5-token vocabulary until 4 tokens are out: the token at each place
    follows p at that place (chi-square, 20000 sequences), though q differs from p everywhere."""
    gen = torch.Generator().manual_seed(0)
    vocab, places, k, runs = 5, 4, 3, 20000
    p = torch.softmax(torch.randn(places + k, vocab, generator=gen) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(places + k, vocab, generator=gen) * 1.5, dim=-1)
    counts = torch.zeros(places, vocab)
    rounds = drafted_total = 0
    for _ in range(runs):
        out: list[int] = []
        while len(out) < places:
            at = len(out)
            drafts = [int(torch.multinomial(q[at + i], 1, generator=gen)) for i in range(k)]
            verdict = accept_sampled(drafts, p[at : at + k + 1], q[at : at + k], gen)
            out.extend(verdict.emitted(drafts))
            rounds += 1
            drafted_total += k
        for place in range(places):
            counts[place, out[place]] += 1
    for place in range(places):
        assert _chi2_pvalue(counts[place], p[place]) > 1e-4, (place, counts[place] / runs, p[place])
    assert rounds < runs * places  # drafts were accepted: fewer rounds than tokens
    # and the rule is not vacuous: drawing from q instead would fail the same test
    wrong = torch.bincount(torch.multinomial(q[0], runs, replacement=True, generator=gen), minlength=vocab)
    assert _chi2_pvalue(wrong.float(), p[0]) < 1e-6


def test_cost_model_drafts_only_when_it_pays():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    far = RoundCosts(draft_ms=10, verify_ms=200, verify_ms_per_draft=2, alpha=0.8)
    near = RoundCosts(draft_ms=10, verify_ms=12, verify_ms_per_draft=4, alpha=0.8)
    assert best_k(far, 8) >= 4  # a long round trip: several drafts per trip
    assert best_k(near, 8) == 0  # a draft costs about what it saves: plain decoding
    assert best_k(RoundCosts(10, 200, 2, alpha=0.0), 8) == 0  # nothing is ever accepted


def test_adaptive_k_measures_plain_then_probes_then_decides():
    chooser = AdaptiveK(k_max=8)
    assert chooser.next_k(room=50) == 0  # nothing measured: a plain step first
    chooser.record(0, 0, 0.0, 200.0)
    assert chooser.next_k(room=50) == chooser.probe_k  # the drafter is unmeasured: probe it
    chooser.record(2, 2, 20.0, 204.0)
    assert chooser.next_k(room=50) > 2  # drafts are cheap against a 200 ms round trip and were accepted
    assert chooser.next_k(room=1) == 1  # never more drafts than tokens still to make
    slow = AdaptiveK(k_max=8)
    slow.record(0, 0, 0.0, 10.0)
    slow.record(2, 0, 40.0, 14.0)
    assert slow.next_k(room=50) == 0
    assert AdaptiveK(k_max=8, fixed=3).next_k(room=50) == 3


def test_speculative_settings_refuse_bad_values():
    assert SpeculativeConfig.parse("auto").k is None and SpeculativeConfig.parse("4").k == 4
    assert parse_draft("exit:/tmp/x.safetensors") == ("exit", "/tmp/x.safetensors")
    assert parse_draft("model:smollm2-135m") == ("model", "smollm2-135m")
    for bad in ("fast", "-1", "99"):
        with pytest.raises(ConfigError, match="speculative"):
            SpeculativeConfig.parse(bad)
    with pytest.raises(ConfigError, match="draft"):
        parse_draft("int3")
    with pytest.raises(ConfigError, match="names no"):
        parse_draft("model:")


# -- the stage hosts' KV rewind --------------------------------------------------------------------------------------


def test_a_request_that_starts_early_rewinds_the_cache_to_a_run_without_drafts(tiny_llama_dir):
    """One session decodes plainly; another verifies wrong drafts, then goes on from the kept prefix: every
    layer's keys and values end equal to the plain session's."""
    stage = load_stages(tiny_llama_dir, stage_specs(4, [2], head="server"))[0]
    host = StageHost(stage)
    prompt = torch.tensor([[1, 5, 17, 42, 8]])
    plain_tokens = [66, 23, 9]

    def request(session, ids, start, new=False):
        positions = torch.arange(start, start + ids.shape[1]).view(1, -1)
        return ForwardRequest(session, ids, positions, None, new, last_only=False)

    host.forward(request("plain", prompt, 0, new=True))
    for i, token in enumerate(plain_tokens):
        host.forward(request("plain", torch.tensor([[token]]), 5 + i))
    host.forward(request("spec", prompt, 0, new=True))
    host.forward(request("spec", torch.tensor([[66, 23, 70, 71]]), 5))  # drafts 23, 70, 71: 70 is rejected
    assert host._sessions["spec"].cache.length == 9
    host.forward(request("spec", torch.tensor([[9]]), 7))  # the target's token at place 7: 70 and 71 dropped
    plain, spec = host._sessions["plain"].cache, host._sessions["spec"].cache
    assert spec.length == plain.length == 8
    for layer in range(2):
        torch.testing.assert_close(spec._keys[layer][:, :, :8], plain._keys[layer][:, :, :8], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(spec._values[layer][:, :, :8], plain._values[layer][:, :, :8], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="gap"):
        host.forward(request("spec", torch.tensor([[4]]), 12))


# -- generation equals the target's ----------------------------------------------------------------------------------


def _pipeline(stages) -> Pipeline:
    return Pipeline([LocalHop(f"hop{i}", StageHost(s)) for i, s in enumerate(stages)])


def _plain(stages, prompt, sampling=SamplingConfig()) -> list[int]:
    result = Generator(_pipeline(stages), GenerationConfig(STEPS, sampling)).run(torch.tensor([prompt]))
    return result.new_tokens[0]


def _speculative(stages, prompt, drafter, k, sampling=SamplingConfig()):
    config = SpeculativeConfig(k, max(k or 0, 4), "none")
    generator = SpeculativeGenerator(_pipeline(stages), GenerationConfig(STEPS, sampling), drafter, config)
    for _ in generator.stream(torch.tensor([prompt])):
        pass
    return generator.result


@pytest.fixture(scope="module")
def drafters(tiny_chat_dir, tiny_tokenizer_dir, tmp_path_factory):
    """Every kind of drafter over the tiny chat model: itself (always right), itself at int8, another model with
    the same tokenizer (mostly wrong)."""
    from transformers import AutoModelForCausalLM

    other = make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-draft"), tiny_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(other)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # another model than the target: its weights perturbed
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    model.save_pretrained(other)
    return {
        "none": load_draft("none", tiny_chat_dir),
        "int8": load_draft("int8", tiny_chat_dir),
        "model": load_draft(f"model:{other}", tiny_chat_dir),
    }


@pytest.mark.parametrize("cuts,head", [((), "server"), ((2,), "device"), ((1, 3), "server"), ((1, 2, 3), "device")])
def test_greedy_tokens_equal_the_target_alone_for_every_drafter(tiny_chat_dir, drafters, cuts, head):
    stages = load_stages(tiny_chat_dir, stage_specs(4, list(cuts), head=head))
    runs = [("none", 3), ("int8", 3), ("int8", None), ("model", 3)]  # k None: auto
    for prompt in PROMPTS[:2]:
        want = _plain(stages, prompt)
        for name, k in runs:
            result = _speculative(stages, prompt, drafters[name], k)
            assert result.new_tokens[0] == want, (name, k, prompt)
            spec = result.speculative
            assert spec["rounds"] >= 1 and spec["drafted"] >= spec["accepted"]
            if name == "none":  # the target itself drafts: every draft is kept
                assert spec["acceptance_rate"] == 1.0 and spec["tokens_per_round"] > 3


def test_the_repetition_guard_applies_to_every_drafted_place(tiny_chat_dir, drafters):
    stages = load_stages(tiny_chat_dir, stage_specs(4, [2], head="device"))
    guard = SamplingConfig(repetition_penalty=1.5, no_repeat_ngram=2)
    for prompt in PROMPTS[:2]:
        assert _speculative(stages, prompt, drafters["int8"], 3, guard).new_tokens[0] == _plain(stages, prompt, guard)


def test_sampled_speculative_generation_runs_and_is_reproducible(tiny_chat_dir, drafters):
    stages = load_stages(tiny_chat_dir, stage_specs(4, [2], head="server"))
    sampling = SamplingConfig(greedy=False, temperature=0.8, top_k=20, seed=random.Random(1).randrange(1000))
    a = _speculative(stages, PROMPTS[0], drafters["none"], 3, sampling)
    b = _speculative(stages, PROMPTS[0], drafters["none"], 3, sampling)
    assert a.new_tokens == b.new_tokens and len(a.new_tokens[0]) == STEPS
    assert a.speculative["acceptance_rate"] == 1.0  # p == q: the rule keeps every draft


def test_a_draft_model_with_another_vocabulary_is_refused(tiny_chat_dir, tiny_llama_dir):
    with pytest.raises((ConfigError, Exception), match="vocabulary|tokenizer"):
        load_draft(f"model:{tiny_llama_dir}", tiny_chat_dir)


def test_speculative_generation_refuses_a_batch(tiny_chat_dir, drafters):
    stages = load_stages(tiny_chat_dir, stage_specs(4, [], head="server"))
    generator = SpeculativeGenerator(_pipeline(stages), GenerationConfig(4), drafters["none"], SpeculativeConfig(2))
    with pytest.raises(ConfigError, match="one unpadded sequence"):
        list(generator.stream(torch.tensor([[1, 2], [3, 4]])))


# -- the commands --------------------------------------------------------------------------------------------------


def test_generate_command_with_speculative_prints_the_same_answer_and_its_account(tiny_chat_dir, capsys):
    from edgellm.cli.main import main

    base = ["generate", "hello there", "--model", str(tiny_chat_dir), "--cuts", "2", "--max-new-tokens", "12", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["speculative"] is None
    assert main([*base, "--speculative", "3", "--draft", "int8"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["new_tokens"] == plain["new_tokens"]
    assert spec["speculative"]["drafter"] == "int8" and spec["speculative"]["k"] == 3
    assert spec["decode_ms_per_token"] > 0
    assert main([*base[:-1], "--draft", "int8"]) == 2  # a drafter without --speculative
    assert "add --speculative" in capsys.readouterr().err


def test_generate_request_fields_are_checked():
    from edgellm.serve.generate_request import GenerateRequest

    assert GenerateRequest.from_json({"prompt": "x", "speculative": "auto"}).speculative == SpeculativeConfig()
    with pytest.raises(ConfigError, match="needs 'speculative'"):
        GenerateRequest.from_json({"prompt": "x", "draft": "int8"})
    with pytest.raises(ConfigError, match="speculative"):
        GenerateRequest.from_json({"prompt": "x", "speculative": "lots"})


def test_http_server_answers_speculatively_with_the_same_tokens(tiny_chat_dir):
    from starlette.testclient import TestClient

    from edgellm.serve.http.app import create_app
    from edgellm.serve.http.config import ServeConfig
    from edgellm.serve.local_device import local_device_engine

    engine = local_device_engine(str(tiny_chat_dir))
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "temperature": 0}
    answers = []
    for speculative in (None, {"speculative": "2", "draft": "int8"}):
        app = create_app(engine, ServeConfig(speculative=speculative))
        with TestClient(app) as client:
            body["model"] = client.get("/v1/models").json()["data"][0]["id"]
            reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            answers.append(reply.json()["choices"][0]["message"]["content"])
    assert answers[0] == answers[1] and answers[0]
    assert engine.drafts is not None and "int8" in engine.drafts._loaded  # the second server drafted


class ForgetfulHop(LocalHop):
    """A hop whose stage loses every session once, before its `at`-th call (as a node restart would)."""

    def __init__(self, name, host, at: int) -> None:
        super().__init__(name, host)
        self.calls, self.at = 0, at

    def forward(self, request):
        self.calls += 1
        if self.calls == self.at:
            for session in list(self.handler._sessions):
                self.handler.close(CloseSession(session))
        return super().forward(request)


def test_a_session_lost_mid_answer_is_replayed_and_the_tokens_stay_the_targets(tiny_chat_dir, drafters):
    stages = load_stages(tiny_chat_dir, stage_specs(4, [2], head="device"))
    prompt = [1, 5, 17, 42, 8]
    want = _plain(stages, prompt)
    hops = [LocalHop("hop0", StageHost(stages[0])), ForgetfulHop("hop1", StageHost(stages[1]), at=3),
            LocalHop("hop2", StageHost(stages[2]))]  # fmt: skip
    generator = SpeculativeGenerator(Pipeline(hops), GenerationConfig(STEPS), drafters["model"],
                                     SpeculativeConfig(3, 4, "none"))  # fmt: skip
    got = [t for step in generator.stream(torch.tensor([prompt])) for t in step.tokens]
    assert generator.result is not None and len(generator.result.recoveries) == 1, "the session must be lost once"
    assert generator.result.new_tokens[0] == want and got[: len(want)] == want[: len(got)]
