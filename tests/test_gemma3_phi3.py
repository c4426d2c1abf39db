"""Gemma 3 (`gemma3_text`) and Phi-3 / Phi-4-mini (`phi3`): split stages equal transformers' whole model past the
sliding window (fp32 and bf16), the fast engine equals the generic path (padded batch, int8), slot sessions equal
each alone, and LoRA on Phi-3's fused projections goes through the fast engine as through the generic one.

The tiny configs (`conftest.EXTRA_CONFIGS`) make each feature bite: Gemma 3 slides a window of 4 tokens on 3 of 4
layers, with local and global rotary tables, a query scale that is not head_dim and a final logit softcap of 3;
Phi-3 turns 3/4 of each head (Phi-4-mini's partial rotary) with longrope, whose long factors start at position
16, inside a window of 8 on every layer. `test_dropping_a_trait_breaks_the_equality` shows that each of the
stage's own traits matters, so the equalities cannot hold vacuously.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_slots import _alone, _chain
from test_stage_equivalence import assert_same_run, left_padded_batch, reference_run, staged_run

from conftest import TINY_LAYERS, reference_model
from edgellm.engine.select import engine_for
from edgellm.engine.slots import SlotCache
from edgellm.errors import ModelError
from edgellm.lora.config import LoraSpec
from edgellm.lora.inject import inject_lora
from edgellm.model.arch import arch_for, sliding_window
from edgellm.model.stage import stage_specs
from edgellm.quant.scheme import parse_quant
from edgellm.split.one_process import load_stages
from edgellm.store.weights import load_config

ATOL = 1e-5  # fp32: every path differs from transformers only in the order of float operations
STEPS = 8  # decode steps: Phi-3's positions pass 16, where longrope turns to its long factors
PROMPT = torch.tensor([[1, 5, 17, 42, 8, 66, 23, 9, 71, 30, 12]])  # longer than either window
SPLITS = [([], "server"), ([2], "device"), ([1, 3], "server")]
FIXTURES = {"gemma3_text": "tiny_gemma3_dir", "phi3": "tiny_phi3_dir"}


@pytest.fixture(params=sorted(FIXTURES))
def arch_dir(request):
    return request.getfixturevalue(FIXTURES[request.param])


def _max_error(got, want, rows=None):
    (gp, gs, _), (wp, ws, _) = got, want
    prompt = (gp - wp) if rows is None else (gp[rows] - wp[rows])
    return max([prompt.abs().max().item(), *((g - w).abs().max().item() for g, w in zip(gs, ws))])


def test_split_stages_equal_the_whole_model_past_the_window(arch_dir):
    """The generic path (transformers' blocks, our cache, masks and rotary tables) at every kind of split; the
    fast engine is held to it below."""
    config = load_config(arch_dir)
    assert PROMPT.shape[1] > sliding_window(config)
    want = reference_run(reference_model(arch_dir), PROMPT, steps=STEPS)
    assert len(set(want[2][0].tolist())) > 2, "reference decodes nearly a constant: the test would be too weak"
    for cuts, head in SPLITS:
        stages = load_stages(arch_dir, stage_specs(TINY_LAYERS, cuts, head), engine="generic")
        assert_same_run(staged_run(stages, PROMPT, steps=STEPS), want)


@pytest.mark.parametrize("engine", ["fast", "generic"])
def test_left_padded_batch_equals_the_whole_model(arch_dir, engine):
    _, ids, mask = left_padded_batch()  # rows of 7, 3 and 5 tokens, then 6 steps: past both windows
    want = reference_run(reference_model(arch_dir), ids, mask, steps=6)
    stages = load_stages(arch_dir, stage_specs(TINY_LAYERS, [2], "device"), engine=engine)
    assert_same_run(staged_run(stages, ids, mask, steps=6), want, real_rows=mask)


def test_bfloat16_equals_transformers_in_bfloat16(arch_dir):
    """Norms in float32, the embedding scale and the softcap in the model's dtype, as transformers rounds them."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(arch_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    with torch.no_grad():
        want = ref(PROMPT).logits.float()
    for engine in ("fast", "generic"):
        stages = load_stages(arch_dir, stage_specs(TINY_LAYERS, [2], "device"), torch.bfloat16, engine=engine)
        got = staged_run(stages, PROMPT, steps=1)[0]
        assert (got - want).abs().max() <= 0.016, engine  # one bf16 step at |logit| ~ 2 (measured: equal)


@pytest.mark.parametrize("quant", [None, "int8"])
def test_fast_equals_generic_on_a_padded_batch_and_int8(arch_dir, quant):
    scheme = parse_quant(quant) if quant else None
    specs = stage_specs(TINY_LAYERS, [2], "device")
    fast = load_stages(arch_dir, specs, quant=scheme)
    generic = load_stages(arch_dir, specs, quant=scheme, engine="generic")
    _, ids, mask = left_padded_batch()
    for batch, rows in ((PROMPT, None), (ids, mask)):
        got, want = staged_run(fast, batch, rows, steps=4), staged_run(generic, batch, rows, steps=4)
        assert _max_error(got, want, rows) <= ATOL and torch.equal(got[2], want[2])
    if scheme is not None:  # int8 stays near the float model (the embedding too: it keeps Gemma's scale)
        assert type(fast[0].embed).__name__ == "QuantEmbedding"
        got, want = staged_run(fast, PROMPT, steps=1)[0], staged_run(load_stages(arch_dir, specs), PROMPT, steps=1)[0]
        # logits of mean magnitude ~0.9: int8 moves them by ~0.03 on average; Gemma without its scale by ~0.8
        assert (got - want).abs().mean() < 0.06


@pytest.mark.parametrize("engine", ["fast", "generic"])
def test_slot_sessions_past_the_window_equal_each_alone(arch_dir, engine):
    """As tests/test_slots.py: sessions joining at different times, each step one batch at different positions
    (all below Phi-3's longrope switch at 16, which would move every row of a batch at once)."""
    prompts = [[1, 5, 17, 42, 8], [1, 9, 71, 30, 12, 44, 7, 66, 23], [1, 30, 12]]
    steps = 5
    config = load_config(arch_dir)
    stages = load_stages(arch_dir, stage_specs(TINY_LAYERS, [1], "server"), engine=engine)
    slots = [SlotCache.for_stage(s, config, slots=3, capacity=24) for s in stages]
    want = [_alone(stages, p, steps) for p in prompts]
    got: list[list[torch.Tensor]] = [[] for _ in prompts]
    with torch.no_grad():
        for step in range(steps + 2):
            for session in {0: (0, 1), 2: (2,)}.get(step, ()):  # sessions 0 and 1 start, 2 joins later
                rows = [c.rows([session]) for c in slots]
                ids = torch.tensor([prompts[session]])
                got[session].append(_chain(stages, rows, ids, rows[0].positions(ids.shape[1]))[:, -1])
            live = [s for s in range(3) if 0 < len(got[s]) <= steps]
            rows = [c.rows(live) for c in slots]
            tokens = torch.stack([got[s][-1].argmax(-1) for s in live])  # [B, 1]
            logits = _chain(stages, rows, tokens, rows[0].positions(1))[:, -1]
            for row, session in enumerate(live):
                got[session].append(logits[row : row + 1])
    assert int(slots[0].lengths.max()) > sliding_window(config)
    for session in range(3):
        assert len(got[session]) == steps + 1
        for g, w in zip(got[session], want[session]):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


# every linear of a block by name: Phi-3's fused projections, Gemma 3's Llama-style ones
NAMED_TARGETS = {
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gemma3_text": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


@pytest.mark.parametrize("named", [True, False], ids=["named", "all-linear"])
def test_lora_through_the_fast_engine_equals_generic(arch_dir, named):
    config = load_config(arch_dir)
    targets = NAMED_TARGETS[config.model_type] if named else ("all-linear",)
    positions = torch.arange(PROMPT.shape[1]).view(1, -1)
    results = []
    for engine in ("fast", "generic"):
        (stage,) = load_stages(arch_dir, stage_specs(TINY_LAYERS, [], "server"), engine=engine)
        base = stage(PROMPT, positions).detach()
        layers = arch_for(config).layers
        wrappers = inject_lora(stage, layers, LoraSpec(r=4, alpha=8, target_modules=targets), "a")
        assert len(wrappers) == TINY_LAYERS * (4 if config.model_type == "phi3" else 7)
        for w in wrappers.values():  # B starts at zero; make the adapter matter
            for name, p in w.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
        logits = stage(PROMPT, positions)
        assert (logits.detach() - base).abs().max() > 1e-2, "the adapter changes nothing: the test would be vacuous"
        logits.logsumexp(-1).mean().backward()
        grads = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (fast_logits, fast_grads), (generic_logits, generic_grads) = results
    torch.testing.assert_close(fast_logits, generic_logits, atol=ATOL, rtol=0)
    assert fast_grads.keys() == generic_grads.keys()
    fused = {n for n in fast_grads if "lora_B" in n and ("qkv_proj" in n or "gate_up_proj" in n)}
    assert len(fused) == (2 * TINY_LAYERS if config.model_type == "phi3" else 0)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], generic_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_mistral_and_qwen2_slide_past_their_window_too(tmp_path, model_type):
    """The same mechanism for the Llama family: Mistral slides on every layer, Qwen2 above `max_window_layers`."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = {**tiny_config(model_type).to_dict(), "sliding_window": 4}
    if model_type == "qwen2":  # its layer types follow from these
        config.update(use_sliding_window=True, max_window_layers=2, layer_types=None)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(type(tiny_config(model_type))(**config), attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else None
    model.save_pretrained(tmp_path)
    assert sliding_window(load_config(tmp_path)) == 4
    want = reference_run(model.eval(), PROMPT, steps=4)
    for engine in ("fast", "generic"):
        stages = load_stages(tmp_path, stage_specs(TINY_LAYERS, [2], "device"), engine=engine)
        assert_same_run(staged_run(stages, PROMPT, steps=4), want)


def test_dropping_a_trait_breaks_the_equality(tiny_gemma3_dir, tiny_phi3_dir):
    """Each thing the stage itself does for these architectures moves the logits far past ATOL without it."""
    cases = {
        tiny_gemma3_dir: [{"window": None}, {"logit_softcap": None}, {"embed_scale": None},
                          {"layer_types": ("sliding_attention",) * TINY_LAYERS}],  # global layer: local rotary, window
        tiny_phi3_dir: [{"window": None}],
    }  # fmt: skip
    for model_dir, changes in cases.items():
        stages = load_stages(model_dir, stage_specs(TINY_LAYERS, [], "server"), engine="generic")
        want = staged_run(stages, PROMPT, steps=1)
        for change in changes:
            (stage,) = load_stages(model_dir, stage_specs(TINY_LAYERS, [], "server"), engine="generic")
            stage.traits = dataclasses.replace(stage.traits, **change)
            assert _max_error(staged_run([stage], PROMPT, steps=1), want) > 1e-2, change


def test_phi3_turns_three_quarters_of_each_head_and_switches_to_long_factors(tiny_phi3_dir):
    """The rotary tables the stages use (transformers' module): 6 of 8 dims, short factors below position 16."""
    (stage,) = load_stages(tiny_phi3_dir, stage_specs(TINY_LAYERS, [], "server"), engine="generic")
    scaling = (1 + torch.log(torch.tensor(128 / 16)) / torch.log(torch.tensor(16.0))).sqrt()  # longrope's, always
    base_freq = 10000.0 ** (torch.arange(0, 6, 2) / 6)
    for position, factors in ((15, [1.0, 1.3, 2.0]), (16, [1.5, 3.0, 7.0])):
        cos, _ = stage.rotary(torch.zeros(1, 1, 32), torch.tensor([[position]]))
        assert cos.shape[-1] == 6  # head_dim 8 * partial_rotary_factor 0.75
        want = (position / (torch.tensor(factors) * base_freq)).cos() * scaling
        torch.testing.assert_close(cos[0, 0, :3], want, atol=1e-5, rtol=0)


def test_engines_and_refusals():
    assert engine_for("gemma3_text", "fast") == "fast" and engine_for("phi3", "fast") == "fast"
    assert engine_for("phi3", "generic") == "generic"
    from conftest import tiny_config

    for change, message in [
        ({"use_bidirectional_attention": True}, "bidirectional attention"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({"layer_types": ["chunked_attention"] * TINY_LAYERS}, r"unsupported layer types \['chunked_attention'\]"),
    ]:
        config = tiny_config("gemma3_text")
        for key, value in change.items():
            setattr(config, key, value)
        with pytest.raises(ModelError, match=message):
            arch_for(config)
