"""Sampling: `filter_logits` equals transformers' warpers; seeded sampling reproduces; configs validate."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from edgellm.errors import ConfigError
from edgellm.model.sampling import SamplingConfig, filter_logits, next_tokens

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
