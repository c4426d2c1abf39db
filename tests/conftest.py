"""Shared fixtures: tiny seeded models of every supported architecture, a tiny chat model with a tokenizer trained
in-process (no download), and the real default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DATA = Path(__file__).parent / "data"
TINY_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
TINY_LAYERS = 4


def tiny_config(model_type: str):
    """A 4-layer config of `model_type`, small enough to run in milliseconds."""
    from transformers import AutoConfig

    common = dict(vocab_size=97, tie_word_embeddings=model_type in ("qwen2", "gpt2", "gemma3_text"))
    if model_type == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=32, n_layer=TINY_LAYERS, n_head=4, n_positions=128, eos_token_id=3, bos_token_id=1, **common
        )
    if model_type in EXTRA_CONFIGS:
        return AutoConfig.for_model(model_type, **_common_dims(), **EXTRA_CONFIGS[model_type], **common)
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


def _common_dims() -> dict:
    return dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=TINY_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=3, bos_token_id=1,
    )  # fmt: skip


# Architectures with their own tests (tests/test_gemma3_phi3*.py), each config exercising what sets
# it apart: a sliding window of 4 tokens on 3 of 4 layers, local and global rotary tables, a query scale that is not
# head_dim, a final logit softcap that bites (Gemma 3); a partial rotary of 3/4 of each head as Phi-4-mini's,
# longrope with short factors that differ from 1 and long ones from position 16, a window of 8 on every layer.
EXTRA_CONFIGS = {
    "gemma3_text": dict(
        head_dim=8,
        sliding_window=4,
        query_pre_attn_scalar=12,
        final_logit_softcapping=3.0,
        pad_token_id=0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    "phi3": dict(
        sliding_window=8,
        pad_token_id=0,
        original_max_position_embeddings=16,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.3, 2.0],
            "long_factor": [1.5, 3.0, 7.0],
        },
    ),
}


def make_tiny_model(model_type: str, directory: Path) -> Path:
    """Save a seeded random model of `model_type` to `directory`, as `save_pretrained` lays it out."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="sdpa")
    with torch.no_grad():  # the default init is nearly uniform: widen it so logits differ meaningfully
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif model_type in EXTRA_CONFIGS:  # norm weights too, so a norm applied wrongly shows
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return make_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory) -> Path:
    return make_tiny_model("gemma3_text", tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_phi3_dir(tmp_path_factory) -> Path:
    return make_tiny_model("phi3", tmp_path_factory.mktemp("tiny-phi3"))


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


# SmolLM2's chat template, verbatim: ChatML turns, and a default system turn when the chat has none.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2, as in SmolLM2
TINY_CHAT_VOCAB = 768


def make_tiny_tokenizer(directory: Path) -> Path:
    """Save a byte-level BPE tokenizer shaped like SmolLM2's (single digits, ChatML specials and template, EOS =
    `<|im_end|>`) to `directory` as `tokenizer.json` + `tokenizer_config.json` + `chat_template.jinja`.

    Trained in well under a second on the text the tests ship and on the built-in tasks' train examples as chats, so
    the task prompts take about as many tokens as with the real tokenizer; byte-level, so any text round-trips.
    """
    from jinja2 import Template
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgellm.train.tasks import GENERATED_TASKS, task_examples

    lines = (DATA / "eb1911_shakespeare.txt").read_text(encoding="utf-8").splitlines()
    template = Template(CHAT_TEMPLATE)
    # each example as its chat turns, so the scaffold is merged as the real one is; the generated tasks only, so
    # the real tasks' text (train/task_data) leaves the merges that tokenizer-shaped tests depend on as they were
    for name in sorted(GENERATED_TASKS):
        for e in task_examples(name, 200, 0, "train"):
            chat = [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.response}]
            lines.append(template.render(messages=chat, add_generation_prompt=False))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_CHAT_VOCAB, special_tokens=list(CHAT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(lines, trainer)
    unk, bos, eos = CHAT_SPECIAL_TOKENS
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=unk
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


def make_tiny_chat_model(directory: Path, tokenizer_dir: Path) -> Path:
    """A 4-layer llama with the tokenizer (and chat template) saved in `tokenizer_dir`: the whole `finetune` and
    `eval task` path (tokenizing, chat prompts, EOS) in milliseconds per step."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=TINY_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, vocab_size=len(tokenizer), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(4321)
    AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_chat_dir(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny chat model with the tiny tokenizer: no download."""
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tiny_llama_dir):
    """Tiny llama and gpt2 models by architecture name (the LoRA tests cover a Linear and a Conv1D model)."""
    return {"llama": tiny_llama_dir, "gpt2": make_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2-lora"))}


def in_threads(job, count: int, timeout_s: float = 120.0) -> list:
    """`job(i)` for i in 0..count-1, each on its own thread at once; -> their results in order (the first error
    any raised is raised here)."""
    import threading

    results: dict = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = job(i)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    if errors:
        raise errors[0]
    return [results.get(i) for i in range(count)]
