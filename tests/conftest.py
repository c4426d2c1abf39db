"""Shared fixtures: tiny seeded models of every supported architecture, and the real default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
TINY_LAYERS = 4


def tiny_config(model_type: str):
    """A 4-layer config of `model_type`, small enough to run in milliseconds."""
    from transformers import AutoConfig

    common = dict(vocab_size=97, tie_word_embeddings=model_type in ("qwen2", "gpt2"))
    if model_type == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=32, n_layer=TINY_LAYERS, n_head=4, n_positions=128, eos_token_id=3, bos_token_id=1, **common
        )
    extra = {"sliding_window": None} if model_type == "mistral" else {}
    if model_type == "qwen3":
        extra["head_dim"] = 8
    return AutoConfig.for_model(
        model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=3,
        bos_token_id=1,
        **extra,
        **common,
    )


def make_tiny_model(model_type: str, directory: Path) -> Path:
    """Save a seeded random model of `model_type` to `directory`, as `save_pretrained` lays it out."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="sdpa")
    with torch.no_grad():  # the default init is nearly uniform: widen it so logits differ meaningfully
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return make_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-single"))


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The default model, converted in the cache (pulled on first use, as the CLI does)."""
    from edgellm.store.fetch import pull

    return pull("smollm2-135m")


def reference_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def make_tiny_chat_model(directory: Path, tokenizer_dir: Path) -> Path:
    """A 4-layer llama with the real model's vocabulary, tokenizer and chat template: the whole `finetune` and
    `eval task` path (tokenizing, chat prompts, EOS) in milliseconds per step."""
    import json
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    real = json.loads((tokenizer_dir / "config.json").read_text())
    config = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=TINY_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, vocab_size=real["vocab_size"], tie_word_embeddings=True,
        bos_token_id=real["bos_token_id"], eos_token_id=real["eos_token_id"], pad_token_id=real["pad_token_id"],
    )  # fmt: skip
    torch.manual_seed(4321)
    AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_chat_dir(real_model_dir, tmp_path_factory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), real_model_dir)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tiny_llama_dir):
    """Tiny llama and gpt2 models by architecture name (the LoRA tests cover a Linear and a Conv1D model)."""
    return {"llama": tiny_llama_dir, "gpt2": make_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2-lora"))}
