"""The chained stages equal the whole model: logits (prompt and cached decode) and greedy tokens.

Reference: the transformers model run monolithically, with its own cache for decode steps. fp32 throughout.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_LAYERS, reference_model
from edgellm.model.stage import Stage, StageSpec, stage_specs
from edgellm.split.generator import positions_for
from edgellm.split.one_process import load_stages

ATOL = 1e-4
DECODE_STEPS = 20


def run_chain(stages, caches, data, positions, mask=None):
    """data: [B, S] ids -> [B, S, V] logits through every stage."""
    for stage, cache in zip(stages, caches):
        data = stage(data, positions, cache, mask)
    return data


def reference_run(ref, ids, mask=None, steps=DECODE_STEPS):
    """Monolithic prefill + greedy cached decode. -> prompt logits [B,S,V], step logits [[B,V]...], tokens [B,steps]"""
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    positions = positions_for(mask)
    with torch.no_grad():
        out = ref(ids, attention_mask=mask.long(), position_ids=positions, use_cache=True)
        prompt_logits, cache = out.logits, out.cache
        tokens, step_logits = [], []
        token = prompt_logits[:, -1].argmax(-1)
        next_pos = mask.sum(-1)
        for _ in range(steps):
            tokens.append(token)
            mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=torch.bool)], 1)
            out = ref(
                token[:, None], attention_mask=mask.long(), position_ids=next_pos[:, None], cache=cache, use_cache=True
            )
            cache = out.cache
            step_logits.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1)
            next_pos = next_pos + 1
    return prompt_logits, step_logits, torch.stack(tokens, 1)


def staged_run(stages, ids, mask=None, steps=DECODE_STEPS):
    """Same as reference_run, through the stages with their own caches."""
    caches = [s.new_cache() for s in stages]
    positions = positions_for(mask if mask is not None else torch.ones_like(ids, dtype=torch.bool))
    with torch.no_grad():
        prompt_logits = run_chain(stages, caches, ids, positions, mask)
        tokens, step_logits = [], []
        token = prompt_logits[:, -1].argmax(-1)
        next_pos = positions[:, -1] + 1
        for _ in range(steps):
            tokens.append(token)
            logits = run_chain(stages, caches, token[:, None], next_pos[:, None])
            step_logits.append(logits[:, -1])
            token = logits[:, -1].argmax(-1)
            next_pos = next_pos + 1
    return prompt_logits, step_logits, torch.stack(tokens, 1)


def assert_same_run(got, want, real_rows=None):
    got_prompt, got_steps, got_tokens = got
    want_prompt, want_steps, want_tokens = want
    if real_rows is None:
        torch.testing.assert_close(got_prompt, want_prompt, atol=ATOL, rtol=0)
    else:  # padded positions are not compared: their outputs are defined by nobody
        torch.testing.assert_close(got_prompt[real_rows], want_prompt[real_rows], atol=ATOL, rtol=0)
    for step, (g, w) in enumerate(zip(got_steps, want_steps)):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=lambda m, step=step: f"decode step {step}: {m}")
    assert torch.equal(got_tokens, want_tokens)


PROMPT = torch.tensor([[1, 5, 17, 42, 8, 66, 23, 9, 71, 30, 12]])
CUT_LISTS = [[c] for c in range(1, TINY_LAYERS)] + [[1, 2], [1, 3], [2, 3], [1, 2, 3]]


@pytest.mark.slow  # ~5 s an architecture on the 2-core machine; the fast tier keeps the padded-batch cuts below
@pytest.mark.parametrize("head", ["server", "device"])
def test_every_cut_list_equals_whole_model(tiny_model_dir, head):
    ref = reference_model(tiny_model_dir)
    want = reference_run(ref, PROMPT)
    assert len(set(want[2][0].tolist())) > 1, "reference decodes a constant: the test would be too weak"
    for cuts in [[]] + CUT_LISTS:
        stages = load_stages(tiny_model_dir, stage_specs(TINY_LAYERS, cuts, head))
        assert_same_run(staged_run(stages, PROMPT), want)


def left_padded_batch():
    rows = [[1, 5, 17, 42, 8, 66, 23], [1, 9, 71], [1, 30, 12, 44, 7]]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = True
    return rows, ids, mask


@pytest.mark.parametrize("engine", ["fast", "generic"])
@pytest.mark.parametrize("cuts,head", [([2], "server"), ([1, 3], "device")])
def test_left_padded_batch_equals_whole_model(tiny_model_dir, cuts, head, engine):
    ref = reference_model(tiny_model_dir)
    rows, ids, mask = left_padded_batch()
    stages = load_stages(tiny_model_dir, stage_specs(TINY_LAYERS, cuts, head), engine=engine)
    got = staged_run(stages, ids, mask)
    assert_same_run(got, reference_run(ref, ids, mask), real_rows=mask)
    # and each row equals that prompt run alone, unpadded
    for i, row in enumerate(rows):
        alone = staged_run(stages, torch.tensor([row]))
        assert torch.equal(got[2][i], alone[2][0])
        torch.testing.assert_close(got[1][-1][i], alone[1][-1][0], atol=ATOL, rtol=0)


def test_right_padded_prefill_equals_whole_model(tiny_model_dir):
    ref = reference_model(tiny_model_dir)
    ids = torch.tensor([[1, 5, 17, 42, 8], [1, 9, 71, 0, 0]])
    mask = ids.ne(0)
    stages = load_stages(tiny_model_dir, stage_specs(TINY_LAYERS, [2], "server"))
    with torch.no_grad():
        want = ref(ids, attention_mask=mask.long(), position_ids=positions_for(mask)).logits
        got = run_chain(stages, [s.new_cache() for s in stages], ids, positions_for(mask), mask)
    torch.testing.assert_close(got[mask], want[mask], atol=ATOL, rtol=0)


def test_chunked_prefill_equals_one_shot(tiny_llama_dir):
    """A prompt fed in two chunks (the second attending to the cached first) gives the one-shot logits."""
    stages = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [2], "server"))
    positions = torch.arange(PROMPT.shape[1])[None]
    with torch.no_grad():
        whole = run_chain(stages, [s.new_cache() for s in stages], PROMPT, positions)
        caches = [s.new_cache() for s in stages]
        run_chain(stages, caches, PROMPT[:, :6], positions[:, :6])
        tail = run_chain(stages, caches, PROMPT[:, 6:], positions[:, 6:])
    torch.testing.assert_close(tail, whole[:, 6:], atol=ATOL, rtol=0)


def test_stage_loads_only_its_layers(tiny_llama_dir):
    (middle,) = load_stages(tiny_llama_dir, [stage_specs(TINY_LAYERS, [1, 3], "server")[1]])
    assert middle.embed is None and middle.head is None
    assert len(middle.blocks) == 2
    names = {n for n, _ in middle.named_parameters()}
    assert not any("embed" in n or "lm_head" in n for n in names)


def _merged(parts: list[Stage], spec: StageSpec) -> Stage:
    """One stage holding `spec`, made of the (already loaded) modules of consecutive stages `parts`."""
    first, last = parts[0], parts[-1]
    modules = {"embed": first.embed, "rotary": next((p.rotary for p in parts if p.rotary is not None), None),
               "norm": last.norm, "head": last.head,
               "blocks": torch.nn.ModuleList(b for p in parts for b in p.blocks)}  # fmt: skip
    stage = Stage(spec, first.call, {k: v for k, v in modules.items() if v is not None}, first.dims)
    stage.call, stage.prepare_rotary, stage.engine = first.call, first.prepare_rotary, first.engine
    return stage


REAL_PROMPT = torch.tensor([[1, 504, 3045, 314, 253, 1345, 28, 9, 3575, 282, 4649]])


@pytest.fixture(scope="module")
def real_reference(real_model_dir):
    """The real model run monolithically (transformers), loaded once for this module's tests, and its run on
    `REAL_PROMPT`: prefill and DECODE_STEPS cached greedy steps."""
    ref = reference_model(real_model_dir)
    return ref, reference_run(ref, REAL_PROMPT)


@pytest.mark.slow
@pytest.mark.real_model
def test_real_model_every_single_cut_both_heads(real_model_dir, real_reference):
    """Loads the model once per head side, cut after every layer, and runs each single cut as two stages made of
    those layers (loading only a stage's own weights is `test_stage_loads_only_its_layers`)."""
    # Two cached decode steps after the prefill: the first reads the KV cache each stage's prefill wrote, the second
    # also the entry a decode step appended (58 chains of the whole model; the multi-cut test runs DECODE_STEPS).
    steps = 2
    prompt_logits, step_logits, tokens = real_reference[1]
    want = prompt_logits, step_logits[:steps], tokens[:, :steps]  # a greedy run's first steps are a shorter run's
    layers = 30
    for head in ("server", "device"):
        pieces = load_stages(real_model_dir, stage_specs(layers, list(range(1, layers)), head))  # one per layer
        for cut in range(1, layers):
            specs = stage_specs(layers, [cut], head)
            stages = [_merged(pieces[:cut], specs[0]), _merged(pieces[cut:layers], specs[1])]
            if head == "device":
                stages.append(pieces[-1])  # the head-only stage
            assert_same_run(staged_run(stages, REAL_PROMPT, steps=steps), want)


@pytest.mark.slow
@pytest.mark.real_model
def test_real_model_multi_cut_and_padded_batch(real_model_dir, real_reference):
    ref, want = real_reference
    for cuts, head in [([10, 20], "server"), ([5, 15, 25], "device"), ([1, 2, 28, 29], "server")]:
        stages = load_stages(real_model_dir, stage_specs(30, cuts, head))
        assert_same_run(staged_run(stages, REAL_PROMPT), want)
    ids = torch.tensor([[2, 2, 2, 1, 504, 3045, 314, 253], [1, 3575, 282, 4649, 314, 7042, 30, 198]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8], dtype=torch.bool)
    stages = load_stages(real_model_dir, stage_specs(30, [10, 20], "device"))
    assert_same_run(staged_run(stages, ids, mask), reference_run(ref, ids, mask), real_rows=mask)
