"""peft-format adapter files: ours load in peft with the same logits, peft's load into our stages, bad ones are
refused with an error naming the problem."""

from __future__ import annotations

import json

import pytest
import torch
from test_lora import (
    LOGITS_ATOL,
    TARGETS,
    ids_for,
    lora_stages,
    peft_model,
    peft_params,
    random_state,
    randomize,
    run,
    spec_for,
)

from conftest import reference_model
from edgellm.errors import ConfigError
from edgellm.lora import LoraSpec, load_adapter_state, load_peft_adapter, save_peft_adapter


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_adapter_loads_in_peft(model_dirs, arch, tmp_path):
    from peft import PeftModel

    spec = spec_for(arch)
    stages = lora_stages(model_dirs[arch], [2], spec)
    state = randomize(stages)
    out = tmp_path / "adapter"
    save_peft_adapter(out, spec, {k: torch.zeros_like(v) for k, v in state.items()}, str(model_dirs[arch]))
    save_peft_adapter(out, spec, state, str(model_dirs[arch]), fan_in_fan_out=arch == "gpt2")  # replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary dirs left behind
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == sorted(TARGETS[arch])
    ids = ids_for(2)
    with torch.no_grad():
        ours = run(stages, ids)
        model = PeftModel.from_pretrained(reference_model(model_dirs[arch]), out).eval()
        theirs = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert (theirs - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not an adapter directory"):  # never deletes a non-adapter dir
        save_peft_adapter(tmp_path / "model", spec, state, "x")


def test_peft_saved_adapter_loads_into_stages(tiny_llama_dir, tmp_path):
    ref = peft_model(tiny_llama_dir, "llama")
    theirs = peft_params(ref)
    state = random_state({k: v.shape for k, v in theirs.items()}, seed=11)
    with torch.no_grad():
        for key, p in theirs.items():
            p.copy_(state[key])
    ref.save_pretrained(tmp_path / "peft")
    spec, tensors = load_peft_adapter(tmp_path / "peft")
    assert (spec.r, spec.alpha, spec.dropout) == (4, 8.0, 0.0)
    assert set(spec.target_modules) == set(TARGETS["llama"])
    assert set(tensors) == set(state) and all(torch.equal(tensors[k], state[k]) for k in state)
    stages = lora_stages(tiny_llama_dir, [1, 3], spec)
    for stage in stages:
        load_adapter_state(stage, "a", tensors, strict=False)
    ids = ids_for(3)
    with torch.no_grad():
        torch.testing.assert_close(run(stages, ids), ref(input_ids=ids).logits, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "field use_dora"),
        ({"peft_type": "PREFIX_TUNING"}, "field peft_type is 'PREFIX_TUNING'"),
        ({"bias": "all"}, "field bias"),
        ({"use_rslora": True}, "field use_rslora"),
        ({"rank_pattern": {"q_proj": 8}}, "field rank_pattern"),
        ({"modules_to_save": ["lm_head"]}, "field modules_to_save"),
        ({"target_modules": ".*proj"}, "regular expression"),
        ({"r": 8}, "do not fit rank r=8"),
        (None, "adapter_model.safetensors is missing"),
    ],
)
def test_bad_adapter_dirs_are_refused(tmp_path, change, message):
    spec = LoraSpec(r=2, target_modules=("q_proj",))
    tensors = {"x.q_proj.lora_A.weight": torch.ones(2, 8), "x.q_proj.lora_B.weight": torch.ones(8, 2)}
    save_peft_adapter(tmp_path / "ad", spec, tensors, "tiny")
    loaded_spec, loaded = load_peft_adapter(tmp_path / "ad")  # the good dir loads
    assert loaded_spec == spec and loaded.keys() == tensors.keys()
    config_path = tmp_path / "ad" / "adapter_config.json"
    if change is None:
        (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    else:
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(ConfigError, match=message):
        load_peft_adapter(tmp_path / "ad")
    with pytest.raises(ConfigError, match="needs both lora_A and lora_B"):
        save_peft_adapter(tmp_path / "ad2", spec, {"x.q_proj.lora_A.weight": torch.ones(2, 8)}, "tiny")


def test_an_adapter_on_some_layers_only_keeps_its_module_paths(tmp_path):
    """Targets named by path (adapters on the top layers only) are written as paths, not as leaf names that would
    adapt every layer's module of that name when loaded."""
    spec = LoraSpec(r=2, target_modules=("layers.1.self_attn.q_proj",))
    tensors = {"model.layers.1.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
               "model.layers.1.self_attn.q_proj.lora_B.weight": torch.ones(8, 2)}  # fmt: skip
    save_peft_adapter(tmp_path / "ad", spec, tensors, "tiny")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["layers.1.self_attn.q_proj"]
    assert load_peft_adapter(tmp_path / "ad")[0] == spec
    leaf = LoraSpec(r=2, target_modules=("q_proj",))  # leaf targets: leaf names, as before
    save_peft_adapter(tmp_path / "leaf", leaf, tensors, "tiny")
    assert json.loads((tmp_path / "leaf" / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]
