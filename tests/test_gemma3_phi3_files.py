"""Gemma 3 and Phi-3 / Phi-4-mini as they come: GGUF files (converted through transformers, with the config fields
it drops read back from the file: `edgellm.store.gguf_config`) and the Hub's multimodal Gemma 3 checkpoint, whose
language model runs alone. Each converted or unwrapped model equals the original transformers model.

The GGUF files are written here, in llama.cpp's layout (`gguf`'s tensor names, Gemma's norms stored as 1 + w),
from tiny seeded models whose configs use every field transformers' reader would lose.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_stage_equivalence import assert_same_run, reference_run, staged_run

from conftest import tiny_config
from edgellm.model.stage import stage_specs
from edgellm.split.one_process import load_stages
from edgellm.store.convert import convert_gguf

PROMPT = torch.tensor([[1, 5, 17, 42, 8, 66, 23, 9, 71, 30, 12, 14, 15, 16, 17, 18, 19]])  # past 16: long factors
STEPS = 4
VOCAB = 97


def _seeded(config, directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(directory)
    return model.eval()


def _write_gguf(model, path: Path, arch: str, metadata: dict, extra: dict[str, list[float]]) -> Path:
    """`model` as llama.cpp's converter lays it out: renamed tensors, fp32, a stand-in SentencePiece vocabulary."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        {int: writer.add_uint32, float: writer.add_float32, str: writer.add_string}[type(value)](f"{arch}.{key}", value)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "<pad>", "</s>"] + [f"t{i}" for i in range(VOCAB - 4)])
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([2, 3, 3, 3] + [1] * (VOCAB - 4))
    writer.add_bos_token_id(1), writer.add_eos_token_id(3), writer.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3 if arch == "gemma3" else gguf.MODEL_ARCH.PHI3, 6)
    for name, tensor in model.state_dict().items():
        base, _, suffix = name.rpartition(".")
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        value = tensor.float().numpy() + (1.0 if arch == "gemma3" and base.endswith("norm") else 0.0)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", value.astype(np.float32))
    for name, values in extra.items():
        writer.add_tensor(name, np.asarray(values, dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return path


def _phi4_like(tmp_path: Path):
    config = tiny_config("phi3")  # partial rotary 3/4, longrope from position 16, window 8
    model = _seeded(config, tmp_path / "hf")
    factor = (1 + np.log(128 / 16) / np.log(16)) ** 0.5
    metadata = {
        "context_length": 128, "block_count": 4, "embedding_length": 32, "feed_forward_length": 64,
        "attention.head_count": 4, "attention.head_count_kv": 2, "attention.layer_norm_rms_epsilon": 1e-5,
        "rope.freq_base": 10000.0, "rope.dimension_count": 6, "rope.scaling.original_context_length": 16,
        "rope.scaling.attn_factor": float(factor), "attention.sliding_window": 8, "vocab_size": VOCAB,
    }  # fmt: skip
    rope = config.rope_parameters
    extra = {"rope_factors_long.weight": rope["long_factor"], "rope_factors_short.weight": rope["short_factor"]}
    return model, _write_gguf(model, tmp_path / "phi4-like.gguf", "phi3", metadata, extra)


def _gemma3_4b_like(tmp_path: Path):
    """Six layers in Gemma 3's own pattern (5 sliding, 1 global), the global rotary scaled linearly (as 4B+)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=128, vocab_size=VOCAB,
        sliding_window=4, bos_token_id=1, eos_token_id=3, pad_token_id=0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    )  # fmt: skip
    model = _seeded(config, tmp_path / "hf")
    metadata = {
        "context_length": 128, "block_count": 6, "embedding_length": 32, "feed_forward_length": 64,
        "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 8,
        "attention.value_length": 8, "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 1000.0,
        "attention.sliding_window": 4, "rope.scaling.type": "linear", "rope.scaling.factor": 8.0, "vocab_size": VOCAB,
    }  # fmt: skip
    return model, _write_gguf(model, tmp_path / "gemma3-like.gguf", "gemma3", metadata, {})


@pytest.mark.parametrize("make", [_phi4_like, _gemma3_4b_like], ids=["phi3", "gemma3"])
def test_a_converted_gguf_equals_the_model_it_was_written_from(tmp_path, make):
    original, gguf_path = make(tmp_path)
    converted = convert_gguf(gguf_path, tmp_path / "converted", {"gguf": gguf_path.name})
    layers = original.config.num_hidden_layers
    want = reference_run(original, PROMPT, steps=STEPS)
    for engine in ("fast", "generic"):
        stages = load_stages(converted, stage_specs(layers, [2], "device"), engine=engine)
        assert_same_run(staged_run(stages, PROMPT, steps=STEPS), want)
    saved = json.loads((converted / "config.json").read_text())
    if saved["model_type"] == "phi3":  # what transformers' reader alone would have lost
        assert saved["sliding_window"] == 8 and saved["rope_parameters"]["partial_rotary_factor"] == 0.75
        assert saved["rope_parameters"]["rope_type"] == "longrope"
    else:
        assert saved["rope_parameters"]["full_attention"]["factor"] == 8.0 and saved["query_pre_attn_scalar"] == 8


def test_the_hub_multimodal_gemma3_runs_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (tiny vision tower included): stages load the text weights
    from under `language_model.` and equal the wrapper's own text-only forward."""
    from transformers import Gemma3Config

    text = tiny_config("gemma3_text")
    text.final_logit_softcapping = None  # the wrapper's forward ignores it (real Gemma 3 has none)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=90, eoi_token_index=91, image_token_index=92)  # fmt: skip
    wrapper = _seeded(config, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3"
    want = reference_run(wrapper, PROMPT[:, :11], steps=STEPS)
    for engine in ("fast", "generic"):
        stages = load_stages(tmp_path, stage_specs(4, [1, 3], "device"), engine=engine)
        assert_same_run(staged_run(stages, PROMPT[:, :11], steps=STEPS), want)


def test_a_conversion_made_before_the_config_fixes_is_made_again(tmp_path, monkeypatch):
    """`--model x.gguf` reuses a cached conversion, except a Phi-3 or Gemma 3 one without the fixed config (an
    earlier edgellm converted such files, then refused to run them): it would now run, wrongly."""
    from edgellm.store.resolve import resolve_model

    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    _, gguf_path = _phi4_like(tmp_path)
    converted = resolve_model(str(gguf_path))
    assert resolve_model(str(gguf_path)) == converted  # current: reused
    marker, config = converted / "edgellm.json", converted / "config.json"
    old = {k: v for k, v in json.loads(marker.read_text()).items() if k != "gguf_config_fixes"}
    marker.write_text(json.dumps(old))
    config.write_text(json.dumps({**json.loads(config.read_text()), "sliding_window": None}))
    assert resolve_model(str(gguf_path)) == converted
    assert json.loads(config.read_text())["sliding_window"] == 8 and "gguf_config_fixes" in json.loads(
        marker.read_text()
    )
