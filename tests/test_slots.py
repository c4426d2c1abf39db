"""The slot cache: a batch of sessions, each at its own position in one decode step, equals each session alone."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_LAYERS
from edgellm.engine.slots import SlotCache
from edgellm.errors import ConfigError
from edgellm.model.stage import stage_specs
from edgellm.split.one_process import load_stages
from edgellm.store.weights import load_config

ATOL = 1e-5
PROMPTS = [[1, 5, 17, 42, 8], [1, 9, 71, 30, 12, 44, 7, 66, 23], [1, 30, 12]]


def _chain(stages, caches, data, positions):
    for stage, cache in zip(stages, caches):
        data = stage(data, positions, cache)
    return data  # logits [B, S, V]


def _alone(stages, prompt, steps):
    """Greedy: prompt logits of the last token, then each step's logits, with ordinary per-session caches."""
    caches = [s.new_cache() for s in stages]
    with torch.no_grad():
        logits = _chain(stages, caches, torch.tensor([prompt]), torch.arange(len(prompt)).view(1, -1))[:, -1]
        out = [logits]
        for step in range(steps):
            token = logits.argmax(-1).view(1, 1)
            logits = _chain(stages, caches, token, torch.tensor([[len(prompt) + step]]))[:, -1]
            out.append(logits)
    return out


@pytest.mark.parametrize("engine", ["fast", "generic"])
def test_sessions_at_different_positions_in_one_step_equal_each_alone(tiny_model_dir, engine):
    config = load_config(tiny_model_dir)
    stages = load_stages(tiny_model_dir, stage_specs(TINY_LAYERS, [2], "server"), engine=engine)
    slots = [SlotCache.for_stage(s, config, slots=4, capacity=32) for s in stages]
    steps = 5
    want = [_alone(stages, p, steps) for p in PROMPTS]
    got: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
    order = [3, 0, 2]  # sessions go to arbitrary slots; slot 1 stays free
    with torch.no_grad():
        for session in (0, 1):  # sessions 0 and 1 start; session 2 joins after two steps
            rows = [c.rows([order[session]]) for c in slots]
            ids = torch.tensor([PROMPTS[session]])
            got[session].append(_chain(stages, rows, ids, rows[0].positions(ids.shape[1]))[:, -1])
        for step in range(steps + 2):
            if step == 2:
                rows = [c.rows([order[2]]) for c in slots]
                ids = torch.tensor([PROMPTS[2]])
                got[2].append(_chain(stages, rows, ids, rows[0].positions(ids.shape[1]))[:, -1])
            live = [s for s in range(3) if 0 < len(got[s]) <= steps]
            rows = [c.rows([order[s] for s in live]) for c in slots]
            tokens = torch.stack([got[s][-1].argmax(-1) for s in live])  # [B, 1]
            logits = _chain(stages, rows, tokens, rows[0].positions(1))[:, -1]
            for row, session in enumerate(live):
                got[session].append(logits[row : row + 1])
    for session in range(3):
        assert len(got[session]) == steps + 1
        for g, w in zip(got[session], want[session]):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    assert slots[0].lengths.tolist() == [len(PROMPTS[1]) + steps, 0, len(PROMPTS[2]) + steps, len(PROMPTS[0]) + steps]


def test_a_reused_slot_forgets_its_old_session_and_a_failed_pass_changes_nothing(tiny_llama_dir):
    config = load_config(tiny_llama_dir)
    (stage,) = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [], "server"))
    cache = SlotCache.for_stage(stage, config, slots=1, capacity=16)
    with torch.no_grad():
        rows = cache.rows([0])
        stage(torch.tensor([PROMPTS[1]]), rows.positions(len(PROMPTS[1])), rows)
        cache.reset(0)
        rows = cache.rows([0])
        got = stage(torch.tensor([PROMPTS[2]]), rows.positions(len(PROMPTS[2])), rows)[:, -1]
        torch.testing.assert_close(got, _alone([stage], PROMPTS[2], 0)[0], atol=ATOL, rtol=0)
        before = cache.lengths.clone()
        with pytest.raises(ConfigError, match="capacity of 16"):
            stage(torch.ones(1, 14, dtype=torch.long), rows.positions(14), rows)
        assert torch.equal(cache.lengths, before)


def test_bad_rows_are_refused(tiny_llama_dir):
    (stage,) = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [], "server"))
    cache = SlotCache.for_stage(stage, load_config(tiny_llama_dir), slots=2, capacity=8)
    with pytest.raises(ConfigError, match="slot ids must lie in 0..1"):
        cache.rows([2])
    with pytest.raises(ConfigError, match="each slot once"):
        cache.rows([1, 1])
    rows = cache.rows([0, 1])
    with pytest.raises(ConfigError, match="no padding"):
        stage(
            torch.ones(2, 3, dtype=torch.long), rows.positions(3), rows, torch.tensor([[True] * 3, [False, True, True]])
        )
    with pytest.raises(ConfigError, match="slots >= 1"):
        SlotCache(0, 1, 0, 8, 1, 4)
