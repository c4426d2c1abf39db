"""Sampling: `filter_logits` equals transformers' warpers and the repetition guard its logits processors; seeded
sampling reproduces; configs validate; loops are spotted."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from edgellm.errors import ConfigError
from edgellm.model.sampling import (
    SamplingConfig,
    ban_repeated_ngrams,
    detect_loop,
    filter_logits,
    guard_repetition,
    next_tokens,
    penalize_repetition,
)

ATOL = 1e-6
V = 200


def random_logits(seed: int, batch: int = 4, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3


def reference_filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' warpers, in the order `generate` applies them."""
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, logits)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [
        (1.0, 0, 1.0),
        (0.7, 0, 1.0),
        (1.0, 10, 1.0),
        (1.0, 0, 0.9),
        (0.5, 50, 0.8),
        (1.5, 5, 0.95),
        (2.0, 1, 0.5),
        (1.0, V + 10, 1.0),  # top-k larger than the vocabulary: keeps everything
        (0.8, 0, 0.05),  # tiny top-p: only the most likely token survives
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_filter_logits_matches_transformers(temperature, top_k, top_p, seed):
    logits = random_logits(seed)
    config = SamplingConfig(greedy=False, temperature=temperature, top_k=top_k, top_p=top_p)
    got = filter_logits(logits, config)
    want = reference_filter(logits, temperature, top_k, top_p)
    kept = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), kept)
    assert torch.all(got[~kept] == float("-inf"))
    torch.testing.assert_close(got[kept], want[kept], atol=ATOL, rtol=0)
    if top_k == 1 or top_p == 0.05:
        assert kept.sum(-1).tolist() == [1] * logits.shape[0]
    elif top_k and top_k < V:
        assert bool((kept.sum(-1) <= top_k).all())


def test_filter_logits_keeps_the_argmax_and_leaves_input_alone():
    logits = random_logits(3)
    before = logits.clone()
    out = filter_logits(logits, SamplingConfig(greedy=False, temperature=0.3, top_k=3, top_p=0.2))
    assert torch.equal(logits, before)
    assert torch.equal(out.argmax(-1), logits.argmax(-1))


def _draws(seed: int, n: int = 40) -> list[list[int]]:
    config = SamplingConfig(greedy=False, temperature=1.5, top_k=50, top_p=0.95, seed=seed)
    rng = torch.Generator().manual_seed(config.seed)
    logits = random_logits(7)
    return [next_tokens(logits, config, rng).tolist() for _ in range(n)]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    first, again, other = _draws(seed=11), _draws(seed=11), _draws(seed=12)
    assert first == again
    assert first != other
    assert len({tuple(d) for d in first}) > 1  # it samples, rather than always taking the same token


def test_greedy_is_argmax():
    logits = random_logits(5, batch=8)
    got = next_tokens(logits, SamplingConfig(greedy=True, temperature=0.1, top_k=3), None)
    assert got.dtype == torch.int64
    assert torch.equal(got, logits.argmax(-1))


def test_top_k_1_always_samples_the_argmax():
    config = SamplingConfig(greedy=False, temperature=2.0, top_k=1, seed=0)
    rng = torch.Generator().manual_seed(0)
    for seed in range(50):
        logits = random_logits(seed, batch=8)
        assert torch.equal(next_tokens(logits, config, rng), logits.argmax(-1))


def test_sampling_follows_the_distribution():
    # Two tokens with probabilities 0.8 / 0.2: 4000 draws land within a few standard deviations (sd ~ 0.0063).
    logits = torch.log(torch.tensor([[0.8, 0.2]])).expand(4000, 2)
    rng = torch.Generator().manual_seed(0)
    share = next_tokens(logits, SamplingConfig(greedy=False), rng).float().mean().item()
    assert abs(share - 0.2) < 0.03


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature must be in .* got 0.0"),
        ({"temperature": -1.0}, "temperature must be in .* got -1.0"),
        ({"temperature": float("nan")}, "temperature must be in"),
        ({"top_p": 0.0}, r"top-p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top-p must be in \(0, 1\], got 1.5"),
        ({"top_p": -0.1}, r"top-p must be in \(0, 1\], got -0.1"),
        ({"top_k": -1}, "top-k must be >= 0 .* got -1"),
    ],
)
def test_sampling_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingConfig(greedy=False, **kwargs)


def test_sampling_config_accepts_edges():
    config = SamplingConfig(greedy=False, temperature=1e-3, top_k=0, top_p=1.0)
    assert (config.top_k, config.top_p) == (0, 1.0)


# --- the repetition guard and loop detection ---

GUARD_ATOL = 1e-6  # the guard divides, multiplies or masks single logits: equal to transformers up to float rounding
SMALL_V = 12  # a small vocabulary, so random histories repeat tokens and n-grams


def random_history(seed: int, batch: int = 4, length: int = 30, vocab: int = SMALL_V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@pytest.mark.parametrize("penalty", [1.2, 0.7, 2.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repetition_penalty_matches_transformers(penalty, seed):
    logits, history = random_logits(seed, vocab=SMALL_V), random_history(seed, length=5)
    want = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    got = penalize_repetition(logits, history.tolist(), penalty)
    assert not torch.equal(got, logits)  # some logits moved, so the comparison is not vacuous
    torch.testing.assert_close(got, want, atol=GUARD_ATOL, rtol=0)
    unseen = torch.ones_like(logits, dtype=torch.bool).scatter(1, history, False)
    assert torch.equal(got[unseen], logits[unseen])


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_repeat_ngram_matches_transformers(size, seed):
    logits, history = random_logits(seed, vocab=SMALL_V), random_history(seed, length=40, vocab=6)
    want = NoRepeatNGramLogitsProcessor(size)(history, logits.clone())
    got = ban_repeated_ngrams(logits, history.tolist(), size)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert bool(torch.isinf(got).any())  # something was banned
    kept = torch.isfinite(want)
    torch.testing.assert_close(got[kept], want[kept], atol=GUARD_ATOL, rtol=0)
    assert torch.equal(got[kept], logits[kept])


def test_guard_matches_transformers_chain_on_ragged_rows():
    """Rows of different lengths (a left-padded batch's real tokens) each equal transformers on that row alone."""
    logits = random_logits(9, batch=3, vocab=SMALL_V)
    histories = [random_history(s, batch=1, length=n, vocab=5)[0].tolist() for s, n in [(1, 2), (2, 17), (3, 30)]]
    config = SamplingConfig(repetition_penalty=1.3, no_repeat_ngram=2)
    got = guard_repetition(logits, histories, config)
    for row, seen in enumerate(histories):
        ids = torch.tensor([seen])
        scores = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits[row : row + 1].clone())
        want = NoRepeatNGramLogitsProcessor(2)(ids, scores)
        assert torch.equal(torch.isinf(got[row : row + 1]), torch.isinf(want))
        kept = torch.isfinite(want)
        torch.testing.assert_close(got[row : row + 1][kept], want[kept], atol=GUARD_ATOL, rtol=0)


def test_history_shorter_than_the_ngram_bans_nothing():
    logits = random_logits(4, batch=2, vocab=SMALL_V)
    assert torch.equal(ban_repeated_ngrams(logits, [[1, 2], [3]], 3), logits)


def test_guard_is_off_by_default_and_next_tokens_needs_history_when_on():
    logits = random_logits(5, batch=3)
    assert not SamplingConfig().guarded
    assert torch.equal(guard_repetition(logits, [[], [], []], SamplingConfig()), logits)
    top = logits.argmax(-1)
    history = [[int(t)] for t in top]  # each row has seen its own favourite token
    banned = next_tokens(logits, SamplingConfig(no_repeat_ngram=1), None, history)
    assert not bool((banned == top).any())
    assert torch.equal(banned, logits.scatter(1, top.view(-1, 1), float("-inf")).argmax(-1))
    with pytest.raises(ValueError, match="needs each row's token history"):
        next_tokens(logits, SamplingConfig(repetition_penalty=1.2), None)


def test_sampling_config_round_trips_through_json_and_a_generate_request():
    """`edgellm run` and the demo send `to_json()` in a device node's Generate request: every field gets there."""
    from edgellm.serve.generate_request import GenerateRequest

    config = SamplingConfig(greedy=False, temperature=0.7, top_k=5, top_p=0.9, seed=3, repetition_penalty=1.2,
                            no_repeat_ngram=3)  # fmt: skip
    assert SamplingConfig(**config.to_json()) == config and config.guarded
    assert GenerateRequest.from_json({"prompt": "hi", **config.to_json()}).sampling == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"repetition_penalty": 0.0}, r"repetition penalty must be in \[0.001, 1000\] \(1.0 = off\), got 0.0"),
        ({"repetition_penalty": -1.2}, "repetition penalty must be in"),
        ({"repetition_penalty": 1e-4}, "repetition penalty must be in"),
        ({"repetition_penalty": 1001.0}, "repetition penalty must be in"),
        ({"repetition_penalty": float("inf")}, "repetition penalty must be in"),
        ({"repetition_penalty": float("nan")}, "repetition penalty must be in"),
        ({"no_repeat_ngram": -1}, r"no-repeat n-gram size must be >= 0 \(0 = off\), got -1"),
    ],
)
def test_guard_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingConfig(**kwargs)


SENTENCE = [504, 1655, 2577, 553, 253, 3452, 282, 3729, 216, 35, 33, 33, 1986, 701, 30, 198, 198]  # 17 tokens


@pytest.mark.parametrize(
    "tokens, looped",
    [
        ([10, 11, 12] + [7, 8, 9] * 5, True),  # "la femme, la femme, ..."
        ([5] * 12, True),
        ([5] * 11, False),  # a short run ("!!!...") is not a loop
        ([1, 2, 3] * 3, False),  # three repeats, but under 12 tokens
        ([42] + SENTENCE * 3, True),  # a sentence said three times
        ([42] + SENTENCE * 2 + SENTENCE[:5], False),
        ([7, 8, 9] * 6 + [1, 2, 3, 4], False),  # a loop that ended is not where the answer ends
        (list(range(64)), False),
        ([], False),
    ],
)
def test_detect_loop(tokens, looped):
    assert detect_loop(tokens) is looped
