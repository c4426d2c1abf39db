"""A model's shape from its Hugging Face config: one decoder layer's linear modules, norms, embeddings and head.

Pure arithmetic on a config dict (no torch, no files): the parameter counts equal `sum(p.numel())` of the model
transformers builds from the same config (tests/test_calc.py checks each supported `model_type`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgellm.errors import ConfigError

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
# "gpt3": the GPT-3 preset's layout: GPT-2's block with separate q/k/v projections (named as GPT-J names them),
# so that LoRA can adapt W_q and W_v as Hu et al. did.
MODEL_TYPES = (*LLAMA_LIKE, "gpt2", "gpt3")
# transformers' default `tie_word_embeddings` per config class, for a config.json that leaves it out
TIED_BY_DEFAULT = {
    "llama": False,
    "mistral": False,
    "qwen2": False,
    "qwen3": False,
    "gemma3_text": True,
    "phi3": False,
    "gpt2": True,
    "gpt3": True,
}
# LoRA's own choice (Hu et al. 2021, §7.1: W_q and W_v) where the layer has them; fused projections otherwise
DEFAULT_LORA_TARGETS = {
    **{t: ("q_proj", "v_proj") for t in LLAMA_LIKE},
    "phi3": ("qkv_proj",),
    "gpt2": ("c_attn",),
    "gpt3": ("q_proj", "v_proj"),
}


@dataclass(frozen=True)
class Linear:
    """One linear module of a decoder layer: `name` relative to the layer (as peft matches it), `[out, in]`."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def bias_params(self) -> int:
        return self.out_features if self.bias else 0


@dataclass(frozen=True)
class Dims:
    """The sizes a config names. `intermediate_size` is the MLP's inner width."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer (every layer of a supported model has the same shape).

    Attributes:
        linears: its linear modules, in order.
        norm_params: its norm weights and biases (every parameter that is not in `linears`).
        act_elements_per_token: activation elements autograd keeps for the backward pass per token (see
            `edgellm.calc.memory`): norm inputs, the attention's and MLP's inputs, q, k, v, and the MLP's
            intermediate tensors; no dropout, and memory-efficient attention (no [S, S] score matrix).
    """

    linears: tuple[Linear, ...]
    norm_params: int
    act_elements_per_token: int

    @property
    def params(self) -> int:
        return sum(lin.weight_params + lin.bias_params for lin in self.linears) + self.norm_params

    @property
    def linear_weight_params(self) -> int:
        return sum(lin.weight_params for lin in self.linears)


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only LM as counted here.

    Attributes:
        name: what to call it in a report.
        model_type: a key of `MODEL_TYPES`.
        dims: its sizes.
        layer: one decoder layer.
        embed_params: the token embedding, plus learned position embeddings where the model has them.
        final_norm_params: the final norm.
        lm_head_params: the LM head's matrix `[vocab, hidden]` (held once with the embedding when tied).
        tied: the LM head is the token embedding's matrix.
    """

    name: str
    model_type: str
    dims: Dims
    layer: LayerShape
    embed_params: int
    final_norm_params: int
    lm_head_params: int
    tied: bool

    @property
    def params(self) -> int:
        """Every parameter, a tied matrix once (= `sum(p.numel() for p in model.parameters())`)."""
        head = self.final_norm_params + (0 if self.tied else self.lm_head_params)
        return self.embed_params + self.dims.num_layers * self.layer.params + head


def shape_from_config(config: Mapping[str, Any], name: str) -> ModelShape:
    """The shape of the model a Hugging Face `config.json` (as a dict) describes.

    Raises:
        ConfigError: an unsupported `model_type`, or a size missing or not a positive integer.
    """
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{name}: unsupported model_type {model_type!r}; choose from {list(MODEL_TYPES)}")
    tied = bool(config.get("tie_word_embeddings", TIED_BY_DEFAULT[model_type]))
    if model_type in LLAMA_LIKE:
        return _llama_like(config, name, model_type, tied)
    return _gpt(config, name, model_type, tied)


def _size(config: Mapping[str, Any], name: str, *keys: str) -> int:
    """The first of `keys` the config has, as a positive integer."""
    for key in keys:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: config field {key!r} must be a positive integer, got {value!r}")
        return value
    raise ConfigError(f"{name}: config has no {' or '.join(repr(k) for k in keys)}")


def _llama_like(config: Mapping[str, Any], name: str, model_type: str, tied: bool) -> ModelShape:
    d = _size(config, name, "hidden_size")
    heads = _size(config, name, "num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or d // heads
    dims = Dims(
        num_layers=_size(config, name, "num_hidden_layers"),
        hidden_size=d,
        intermediate_size=_size(config, name, "intermediate_size"),
        num_heads=heads,
        num_kv_heads=_size({"num_key_value_heads": kv_heads}, name, "num_key_value_heads"),
        head_dim=_size({"head_dim": head_dim}, name, "head_dim"),
        vocab_size=_size(config, name, "vocab_size"),
        max_positions=_size(config, name, "max_position_embeddings"),
    )
    q_out, kv_out, ff = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim, dims.intermediate_size
    attn_bias = bool(config.get("attention_bias", False))
    qkv_bias = model_type == "qwen2" or attn_bias  # Qwen2 always has q/k/v biases, and never an o_proj bias
    mlp_bias = bool(config.get("mlp_bias", False)) and model_type == "llama"
    linears: tuple[Linear, ...]
    if model_type == "phi3":
        linears = (
            Linear("self_attn.qkv_proj", d, q_out + 2 * kv_out, False),
            Linear("self_attn.o_proj", q_out, d, False),
            Linear("mlp.gate_up_proj", d, 2 * ff, False),
            Linear("mlp.down_proj", ff, d, False),
        )
    else:
        linears = (
            Linear("self_attn.q_proj", d, q_out, qkv_bias),
            Linear("self_attn.k_proj", d, kv_out, qkv_bias),
            Linear("self_attn.v_proj", d, kv_out, qkv_bias),
            Linear("self_attn.o_proj", q_out, d, attn_bias and model_type != "qwen2"),
            Linear("mlp.gate_proj", d, ff, mlp_bias),
            Linear("mlp.up_proj", d, ff, mlp_bias),
            Linear("mlp.down_proj", ff, d, mlp_bias),
        )
    hidden_norms = 4 if model_type == "gemma3_text" else 2  # Gemma 3 norms before and after attention and MLP
    qk_norms = model_type in ("qwen3", "gemma3_text")  # RMSNorm over each head's q and k
    norm_params = hidden_norms * d + (2 * dims.head_dim if qk_norms else 0)
    # saved per token: every norm's input; the attention's input (shared by q, k, v), q, k, v (at their own
    # heads), the attention's output (o_proj's input); the MLP's input, gate, up, act(gate) and their product
    acts = hidden_norms * d + (q_out + kv_out if qk_norms else 0) + d + q_out + 2 * kv_out + q_out + d + 4 * ff
    return ModelShape(
        name=name,
        model_type=model_type,
        dims=dims,
        layer=LayerShape(linears, norm_params, acts),
        embed_params=dims.vocab_size * d,
        final_norm_params=d,
        lm_head_params=dims.vocab_size * d,
        tied=tied,
    )


def _gpt(config: Mapping[str, Any], name: str, model_type: str, tied: bool) -> ModelShape:
    d = _size(config, name, "n_embd", "hidden_size")
    heads = _size(config, name, "n_head", "num_attention_heads")
    ff = config.get("n_inner") or 4 * d
    dims = Dims(
        num_layers=_size(config, name, "n_layer", "num_hidden_layers"),
        hidden_size=d,
        intermediate_size=_size({"n_inner": ff}, name, "n_inner"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        vocab_size=_size(config, name, "vocab_size"),
        max_positions=_size(config, name, "n_positions", "max_position_embeddings"),
    )
    attn: tuple[Linear, ...]
    if model_type == "gpt2":  # transformers' GPT-2: fused qkv (Conv1D), and two modules called c_proj
        attn = (Linear("attn.c_attn", d, 3 * d, True), Linear("attn.c_proj", d, d, True))
        mlp = (Linear("mlp.c_fc", d, ff, True), Linear("mlp.c_proj", ff, d, True))
    else:
        attn = tuple(Linear(f"attn.{p}_proj", d, d, True) for p in "qkv") + (Linear("attn.out_proj", d, d, True),)
        mlp = (Linear("mlp.fc_in", d, ff, True), Linear("mlp.fc_out", ff, d, True))
    # saved per token (Korthikanti et al. 2022, §4.1, without dropout masks or the [S, S] attention scores):
    # two LayerNorm inputs; attention input, q, k, v, attention output; MLP input, GELU input, GELU output
    acts = 2 * d + d + 3 * d + d + d + 2 * ff
    return ModelShape(
        name=name,
        model_type=model_type,
        dims=dims,
        layer=LayerShape(attn + mlp, 2 * 2 * d, acts),  # two LayerNorms, weight and bias
        embed_params=dims.vocab_size * d + dims.max_positions * d,  # tokens and learned positions
        final_norm_params=2 * d,
        lm_head_params=dims.vocab_size * d,
        tied=tied,
    )
