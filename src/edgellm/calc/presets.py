"""Named models for `edgellm calc`, each written as the Hugging Face config its paper's numbers give, with the source.

Every size below is quoted from the cited paper or released config; nothing is fitted to a published total.
The parameter count is then computed from the sizes (`ModelShape.params`), and the paper's own total is kept next
to it (`published_params`) so that a report shows both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgellm.calc.shape import ModelShape, shape_from_config
from edgellm.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """A model known by name.

    Attributes:
        name: the key users pass to `--preset`.
        config: its sizes as a Hugging Face config dict (`shape_from_config` reads it).
        source: where every size in `config` comes from.
        nominal_params: the size in the model's name (65e9 for "LLaMA-65B"): what round published figures use.
        published_params: the exact count its paper reports, and `published_source` says where.
    """

    name: str
    config: dict[str, Any]
    source: str
    nominal_params: int
    published_params: int
    published_source: str

    @property
    def shape(self) -> ModelShape:
        return shape_from_config(self.config, self.name)


def _llama_ffn(d: int) -> int:
    # Meta's reference code (facebookresearch/llama, model.py): 2/3 of 4d, rounded up to a multiple of 256
    return 256 * -(-int(2 * 4 * d / 3) // 256)


def _llama(d: int, heads: int, layers: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": d,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "num_hidden_layers": layers,
        "intermediate_size": _llama_ffn(d),
        "vocab_size": 32000,  # SentencePiece BPE, 32k tokens (released tokenizer and configs)
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }


_LLAMA = (
    "Touvron et al. 2023, LLaMA: Open and Efficient Foundation Language Models (arXiv:2302.13971), Table 2 "
    "(dimension, heads, layers); MLP width 2/3 x 4d rounded up to 256 and vocabulary 32000 from Meta's "
    "released code and configs; untied embedding and LM head"
)
_GPT3 = (
    "Brown et al. 2020, Language Models are Few-Shot Learners (arXiv:2005.14165), Table 2.1 (96 layers, d_model "
    "12288, 96 heads of 128) and §2.1 (GPT-2's architecture, feed-forward 4 x d_model, context 2048); GPT-2's "
    "BPE vocabulary of 50257 (Radford et al. 2019), tied embedding and LM head, learned positions, biases"
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="smollm2-135m",
            config={
                "model_type": "llama",
                "hidden_size": 576,
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "head_dim": 64,
                "num_hidden_layers": 30,
                "intermediate_size": 1536,
                "vocab_size": 49152,
                "max_position_embeddings": 8192,
                "tie_word_embeddings": True,
            },
            source="SmolLM2-135M-Instruct's config.json (Allal et al. 2025, arXiv:2502.02737): the project's "
            "default model, as `edgellm models pull` converts it",
            nominal_params=135_000_000,
            published_params=135_000_000,
            published_source="its name, SmolLM2-135M",
        ),
        Preset("llama-7b", _llama(4096, 32, 32), _LLAMA, 7 * 10**9, 6_700_000_000, "LLaMA paper, Table 2: 6.7B"),
        Preset("llama-13b", _llama(5120, 40, 40), _LLAMA, 13 * 10**9, 13_000_000_000, "LLaMA paper, Table 2: 13.0B"),
        Preset("llama-33b", _llama(6656, 52, 60), _LLAMA, 33 * 10**9, 32_500_000_000, "LLaMA paper, Table 2: 32.5B"),
        Preset("llama-65b", _llama(8192, 64, 80), _LLAMA, 65 * 10**9, 65_200_000_000, "LLaMA paper, Table 2: 65.2B"),
        Preset(
            name="gpt3-175b",
            config={
                "model_type": "gpt3",
                "n_embd": 12288,
                "n_head": 96,
                "n_layer": 96,
                "n_positions": 2048,
                "vocab_size": 50257,
                "tie_word_embeddings": True,
            },
            source=_GPT3,
            nominal_params=175 * 10**9,
            published_params=175_255_800_000,
            published_source="LoRA paper (Hu et al. 2021, arXiv:2106.09685), Table 4: GPT-3 (FT) 175,255.8M "
            "trainable parameters (the GPT-3 paper does not say how its total is counted; an untied LM head would add "
            "617,558,016, for 175.22 B in all)",
        ),
    )
}
ALIASES = {"llama-30b": "llama-33b", "gpt3": "gpt3-175b", "gpt-3": "gpt3-175b"}


def get_preset(name: str) -> Preset:
    """The preset called `name` (case-insensitive, or one of `ALIASES`).

    Raises:
        ConfigError: an unknown name (the message lists the valid ones).
    """
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[key]
