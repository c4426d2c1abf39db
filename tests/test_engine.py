"""The fast engine equals the generic path (transformers' block modules), which the stage-equivalence tests hold
to the whole transformers model: logits of prefill, cached decode and padded batches, LoRA gradients, and every
weight scheme. `tests/test_stage_equivalence.py` runs the default (fast) engine against transformers itself.
"""

from __future__ import annotations

import pytest
import torch
from test_stage_equivalence import left_padded_batch, staged_run

from conftest import TINY_LAYERS
from edgellm.engine.select import engine_for, use_engine
from edgellm.errors import ConfigError
from edgellm.lora.config import LoraSpec
from edgellm.lora.inject import inject_lora
from edgellm.model.stage import stage_specs
from edgellm.quant.scheme import parse_quant
from edgellm.split.one_process import load_stages
from edgellm.store.weights import load_config

ATOL = 1e-5  # fp32: the two paths differ only in the order of a few float operations


def _both(model_dir, cuts, head, quant=None):
    fast = load_stages(model_dir, stage_specs(TINY_LAYERS, cuts, head), quant=quant)
    generic = load_stages(model_dir, stage_specs(TINY_LAYERS, cuts, head), quant=quant, engine="generic")
    return fast, generic


def _assert_close_runs(got, want, rows=None):
    (gp, gs, gt), (wp, ws, wt) = got, want
    torch.testing.assert_close(gp if rows is None else gp[rows], wp if rows is None else wp[rows], atol=ATOL, rtol=0)
    for g, w in zip(gs, ws):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    assert torch.equal(gt, wt)


@pytest.mark.parametrize("cuts,head", [([], "server"), ([2], "device"), ([1, 3], "server")])
def test_fast_equals_generic_prefill_decode_and_padded_batch(tiny_model_dir, cuts, head):
    model_type = load_config(tiny_model_dir).model_type
    fast, generic = _both(tiny_model_dir, cuts, head)
    assert {s.engine for s in fast} == {engine_for(model_type, "fast")}
    assert {s.engine for s in generic} == {"generic"}
    prompt = torch.tensor([[1, 5, 17, 42, 8, 66, 23, 9]])
    _assert_close_runs(staged_run(fast, prompt, steps=6), staged_run(generic, prompt, steps=6))
    _, ids, mask = left_padded_batch()  # a mask in every attention call
    _assert_close_runs(staged_run(fast, ids, mask, steps=4), staged_run(generic, ids, mask, steps=4), rows=mask)


def test_gpt2_falls_back_to_generic_and_unknown_engines_are_refused():
    assert engine_for("gpt2", "fast") == "generic" and engine_for("qwen3", "fast") == "fast"
    assert engine_for("llama", "generic") == "generic"
    with pytest.raises(ConfigError, match=r"unknown engine 'turbo'; choose from \['fast', 'generic'\]"):
        engine_for("llama", "turbo")


def test_lora_through_the_fast_engine_equals_generic_logits_and_grads(tiny_llama_dir):
    ids = torch.tensor([[1, 5, 17, 42, 8, 66, 23, 9]])
    positions = torch.arange(ids.shape[1]).view(1, -1)
    results = []
    for engine in ("fast", "generic"):
        (stage,) = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [], "server"), engine=engine)
        wrappers = inject_lora(stage, "model.layers", LoraSpec(r=4, alpha=8, target_modules=("all-linear",)), "a")
        for w in wrappers.values():  # B starts at zero; make the adapter matter
            for name, p in w.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
        logits = stage(ids, positions)
        logits.logsumexp(-1).mean().backward()
        grads = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (fast_logits, fast_grads), (generic_logits, generic_grads) = results
    torch.testing.assert_close(fast_logits, generic_logits, atol=ATOL, rtol=0)
    assert fast_grads.keys() == generic_grads.keys() and any("lora_B" in n for n in fast_grads)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], generic_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("quant", ["int8", "int4-g32,head=int8"])
def test_fast_equals_generic_on_quantized_weights(tiny_llama_dir, quant):
    fast, generic = _both(tiny_llama_dir, [2], "device", parse_quant(quant))
    prompt = torch.tensor([[1, 5, 17, 42, 8, 66, 23, 9]])
    _assert_close_runs(staged_run(fast, prompt, steps=6), staged_run(generic, prompt, steps=6))


@pytest.mark.real_model
@pytest.mark.parametrize("quant", [None, "int4-g32,head=int8"])
def test_real_model_fast_equals_generic(real_model_dir, quant):
    scheme = parse_quant(quant) if quant else None
    # cut in fp32; whole at 4-bit, the stage file README's 4-bit example (tests/test_doc_examples.py) caches too
    specs = stage_specs(30, [10, 20] if quant is None else [], "device")
    fast = load_stages(real_model_dir, specs, quant=scheme)
    generic = load_stages(real_model_dir, specs, quant=scheme, engine="generic")
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1789]])
    got, want = staged_run(fast, prompt, steps=8), staged_run(generic, prompt, steps=8)
    torch.testing.assert_close(got[0], want[0], atol=2e-4, rtol=0)  # 49152 logits of a 30-layer model
    assert torch.equal(got[2], want[2])


def test_use_engine_switches_a_loaded_stage_back_and_forth(tiny_llama_dir):
    stages = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [2], "server"))
    assert use_engine(stages, "llama", "generic") == "generic" and stages[0].prepare_rotary is None
    assert use_engine(stages, "llama", "fast") == "fast" and stages[0].prepare_rotary is not None


@pytest.mark.parametrize("argv,engine", [([], "fast"), (["--engine", "generic"], "generic")])
def test_generate_records_the_engine_and_both_give_the_same_tokens(tiny_chat_dir, capsys, argv, engine):
    import json

    from edgellm.cli.main import main

    assert main(["generate", "--json", "--model", str(tiny_chat_dir), "--max-new-tokens", "6", *argv, "hi"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["engine"] == engine
    assert main(["generate", "--json", "--model", str(tiny_chat_dir), "--max-new-tokens", "6", "--engine",
                 "generic" if engine == "fast" else "fast", "hi"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["new_tokens"] == report["new_tokens"]


def test_a_topology_names_its_engine(tmp_path):
    from edgellm.deploy.topology import load_topology

    text = (
        '[model]\nname = "m"\ncuts = [1]\nengine = "{}"\n[deployment]\nroute = ["a", "b"]\n'
        '[[nodes]]\nname = "a"\nrole = "device"\naddress = "127.0.0.1:50001"\n'
        '[[nodes]]\nname = "b"\nrole = "edge"\naddress = "127.0.0.1:50002"\n'
        '[[links]]\nbetween = ["a", "b"]\nprofile = "6g"\n'
    )
    path = tmp_path / "t.toml"
    path.write_text(text.format("generic"))
    assert load_topology(path).model.engine == "generic"
    path.write_text(text.format("turbo"))
    with pytest.raises(ConfigError, match="engine: unknown engine 'turbo'"):
        load_topology(path)
