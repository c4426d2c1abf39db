"""KVCache: in-place appends across growth, all-or-nothing passes, limits, truncation and its byte count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgellm.errors import ConfigError
from edgellm.model.kv import MIN_CAPACITY, KVCache
from edgellm.model.stage import ModelDims, Stage, StageSpec

B, H, D = 2, 3, 4


def kv(seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys and values: [B, H, seq, D] each."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, seq, D, generator=g), torch.randn(B, H, seq, D, generator=g)


def step(cache: KVCache, seq: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One committed pass of `seq` tokens over every layer; returns what each layer's update returned."""
    cache.begin(torch.ones(B, seq, dtype=torch.bool))
    out = []
    for layer in range(cache.first_layer, cache.first_layer + cache.num_layers):
        k, v = kv(seq, seed * 100 + layer)
        out.append(cache.update(k, v, layer))
    cache.commit()
    return out


def test_appends_read_back_across_growth():
    cache = KVCache(first_layer=5, num_layers=2)
    written_k: dict[int, list[torch.Tensor]] = {5: [], 6: []}
    written_v: dict[int, list[torch.Tensor]] = {5: [], 6: []}
    seqs = [7] + [1] * 60 + [3] + [1] * 80  # 150 tokens: grows 64 -> 128 -> 256
    pointers = []
    for i, seq in enumerate(seqs):
        cache.begin(torch.ones(B, seq, dtype=torch.bool))
        for layer in (5, 6):
            k, v = kv(seq, i * 10 + layer)
            written_k[layer].append(k)
            written_v[layer].append(v)
            got_k, got_v = cache.update(k, v, layer)
            assert got_k.shape == (B, H, cache.length + seq, D)
            torch.testing.assert_close(got_k, torch.cat(written_k[layer], dim=2), atol=0, rtol=0)
            torch.testing.assert_close(got_v, torch.cat(written_v[layer], dim=2), atol=0, rtol=0)
            if layer == 5:
                pointers.append((cache.length + seq, got_k.data_ptr()))
        cache.commit()
    assert cache.length == sum(seqs) == 150
    # In place: the buffer moves only when the length passes a power-of-two capacity.
    moved_at = [n for (n, p), (_, prev) in zip(pointers[1:], pointers) if p != prev]
    assert moved_at == [MIN_CAPACITY + 1, 2 * MIN_CAPACITY + 1]


class _Block(nn.Module):
    def __init__(self, layer: int, fail: bool) -> None:
        super().__init__()
        self.layer = layer
        self.fail = fail
        self.scale = nn.Parameter(torch.ones(()))


def _call(block, hidden, mask, rotary, positions, cache):
    # hidden: [B, S, D] -> keys [B, 1, S, D]; the block writes its keys, then (maybe) fails, as a real one can
    cache.update(hidden.unsqueeze(1), hidden.unsqueeze(1) * 2, block.layer)
    if block.fail:
        raise RuntimeError("block failed")
    return hidden + 1


def _stage(fail_second: bool) -> Stage:
    blocks = nn.ModuleList([_Block(0, False), _Block(1, fail_second)])
    dims = ModelDims(hidden_size=D, vocab_size=10, max_length=1000)
    return Stage(StageSpec(0, 2), _call, {"blocks": blocks}, dims)


def test_failed_pass_leaves_cache_unchanged():
    good, bad = _stage(False), _stage(True)
    cache = good.new_cache()
    first = torch.randn(1, 3, D)
    good(first, torch.arange(3).view(1, 3), cache)
    assert cache.length == 3
    with pytest.raises(RuntimeError, match="block failed"):
        bad(torch.randn(1, 2, D) + 100, torch.arange(3, 5).view(1, 2), cache, torch.tensor([[False, True]]))
    assert cache.length == 3
    # The next pass sees the first pass's keys and validity, and nothing of the failed one.
    valid = cache.begin(torch.ones(1, 1, dtype=torch.bool))
    assert valid.tolist() == [[True] * 4]
    new = torch.randn(1, 1, 1, D)
    keys, values = cache.update(new, new, 0)
    torch.testing.assert_close(keys, torch.cat([first.unsqueeze(1), new], dim=2), atol=0, rtol=0)
    torch.testing.assert_close(values[:, :, :3], first.unsqueeze(1) * 2, atol=0, rtol=0)


def test_rollback_without_commit():
    cache = KVCache(0, 1)
    step(cache, 4, seed=1)
    cache.begin(torch.ones(B, 6, dtype=torch.bool))
    cache.update(*kv(6, 2), 0)
    cache.rollback()
    assert cache.length == 4
    cache.commit()  # nothing pending after a rollback: commit must not resurrect the failed pass
    assert cache.length == 4


def test_failed_first_pass_does_not_fix_the_batch_size():
    cache = KVCache(0, 1)
    cache.begin(torch.ones(2, 3, dtype=torch.bool))
    cache.update(*kv(3, 0), 0)
    cache.rollback()
    assert cache.batch_size is None
    cache.begin(torch.ones(1, 2, dtype=torch.bool))
    k = torch.randn(1, H, 2, D)
    got, _ = cache.update(k, k, 0)
    cache.commit()
    assert cache.length == 2 and cache.batch_size == 1
    torch.testing.assert_close(got, k, atol=0, rtol=0)


def test_batch_size_mismatch_raises():
    cache = KVCache(0, 1)
    step(cache, 2, seed=0)
    with pytest.raises(ConfigError, match="batch size 2.* 3"):
        cache.begin(torch.ones(3, 1, dtype=torch.bool))
    assert cache.length == 2


def test_exceeding_max_length_raises_and_keeps_cache():
    cache = KVCache(0, 1, max_length=10)
    step(cache, 8, seed=0)
    with pytest.raises(ConfigError, match="11 tokens exceeds .* limit of 10"):
        cache.begin(torch.ones(B, 3, dtype=torch.bool))
    assert cache.length == 8
    step(cache, 2, seed=1)  # exactly at the limit is fine
    assert cache.length == 10


def test_truncate_drops_the_tail():
    cache = KVCache(0, 1)
    (first,) = step(cache, 5, seed=0)
    cache.truncate(3)
    assert cache.length == 3
    cache.begin(torch.ones(B, 1, dtype=torch.bool))
    new_k, new_v = kv(1, 9)
    keys, values = cache.update(new_k, new_v, 0)
    cache.commit()
    assert keys.shape[2] == 4 and cache.length == 4
    torch.testing.assert_close(keys, torch.cat([first[0][:, :, :3], new_k], dim=2), atol=0, rtol=0)
    torch.testing.assert_close(values, torch.cat([first[1][:, :, :3], new_v], dim=2), atol=0, rtol=0)
    cache.truncate(4)  # to its own length: a no-op
    cache.truncate(0)
    assert cache.length == 0
    for bad in (-1, 1):
        with pytest.raises(ConfigError, match=f"cannot truncate a cache of 0 tokens to {bad}"):
            cache.truncate(bad)


def test_update_refuses_a_layer_outside_its_range():
    cache = KVCache(first_layer=4, num_layers=2)
    cache.begin(torch.ones(B, 1, dtype=torch.bool))
    with pytest.raises(IndexError, match="layer 6"):
        cache.update(*kv(1, 0), 6)


def test_nbytes_counts_allocated_capacity():
    cache = KVCache(0, 2)
    assert cache.nbytes() == 0
    step(cache, 3, seed=0)
    per_buffer = B * H * MIN_CAPACITY * D * 4  # float32, full capacity although 3 tokens are used
    assert cache.nbytes() == 4 * per_buffer + B * MIN_CAPACITY  # keys + values of 2 layers, bool validity
    step(cache, MIN_CAPACITY, seed=1)  # 67 tokens: capacity doubles
    assert cache.nbytes() == 2 * (4 * per_buffer + B * MIN_CAPACITY)
