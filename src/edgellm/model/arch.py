"""Architecture adapters: where a Hugging Face causal LM keeps its pieces and how to call one decoder block.

A stage never calls a Hugging Face *model* forward; it drives the decoder blocks itself with its own KV cache,
masks and positions. Each supported `model_type` therefore needs exactly one `Arch` entry here, checked by the
equivalence tests in `tests/test_stage_equivalence.py`. Anything else is refused, never run approximately.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from edgellm.errors import ModelError

# (block, hidden [B,S,D], mask [B,1,S,T] bool | None, rotary (cos, sin) | None, positions [B,S], cache) -> [B,S,D]
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer types

BlockCall = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", Any, torch.Tensor, Any], torch.Tensor]


def _call_rotary_block(block, hidden, mask, rotary, positions, cache):
    return block(hidden, attention_mask=mask, position_ids=positions, cache=cache, position_embeddings=rotary)


def _call_gpt2_block(block, hidden, mask, rotary, positions, cache):
    return block(hidden, cache, mask, position_ids=positions)


@dataclass(frozen=True)
class Arch:
    """Dotted paths, relative to the `*ForCausalLM` module, of the parts a stage needs, and the arithmetic around
    the blocks that differs between architectures.

    Attributes:
        layers: the `nn.ModuleList` of decoder blocks.
        embed: the token embedding.
        norm: the final norm applied before the LM head.
        head: the LM head (tied to `embed` when the config says so).
        pos_embed: learned absolute position embedding, or None.
        rotary: the rotary embedding module, or None.
        call: how to run one block.
        rotary_by_type: the rotary module takes the layer type and gives each type its own frequencies (Gemma 3:
            `rope_local_base_freq` for sliding layers, `rope_theta` for global ones).
        embed_scale: the factor on the token embeddings, from the config (Gemma: sqrt(hidden_size), applied by
            transformers inside the embedding module, by the stage here), or None.
    """

    layers: str
    embed: str
    norm: str
    head: str
    pos_embed: str | None
    rotary: str | None
    call: BlockCall
    rotary_by_type: bool = False
    embed_scale: Callable[[Any], float] | None = None


_LLAMA_LIKE = Arch(
    layers="model.layers",
    embed="model.embed_tokens",
    norm="model.norm",
    head="lm_head",
    pos_embed=None,
    rotary="model.rotary_emb",
    call=_call_rotary_block,
)


def _gemma_embed_scale(config: Any) -> float:
    return float(config.hidden_size) ** 0.5


ARCHS: dict[str, Arch] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,  # fused qkv_proj and gate_up_proj, partial rotary: all inside the block and its rotary
    "gemma3_text": replace(_LLAMA_LIKE, rotary_by_type=True, embed_scale=_gemma_embed_scale),
    "gpt2": Arch(
        layers="transformer.h",
        embed="transformer.wte",
        norm="transformer.ln_f",
        head="lm_head",
        pos_embed="transformer.wpe",
        rotary=None,
        call=_call_gpt2_block,
    ),
}


def arch_for(config: Any) -> Arch:
    """The adapter for a Hugging Face config.

    Raises:
        ModelError: the model type is not supported, or uses a feature stages do not implement.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ModelError(f"unsupported architecture {model_type!r}; supported model types: {sorted(ARCHS)}")
    if getattr(config, "add_cross_attention", False):
        raise ModelError(f"{model_type} with cross-attention is not a decoder-only model; not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise ModelError(f"{model_type} with bidirectional attention is an encoder (embeddings); not supported")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        # transformers' Gemma 3 attention does not apply it either: refuse rather than guess which is meant
        raise ModelError(f"{model_type} with attn_logit_softcapping is not supported")
    layer_types(config)  # unknown layer types are refused here, before any weight is read
    return ARCHS[model_type]


def sliding_window(config: Any) -> int | None:
    """The attention window of this config's sliding-window layers, or None if no layer slides.

    A query of a sliding layer sees itself and the `window - 1` keys before it (transformers'
    `sliding_window_overlay`); stages build that mask for those layers (`Stage`), so sequences may pass it.
    """
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and SLIDING not in types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def layer_types(config: Any) -> tuple[str, ...]:
    """Each decoder layer's attention, `"full_attention"` or `"sliding_attention"`, from `config.layer_types`
    where the config has it (Gemma 3, Qwen2/3), else every layer sliding if the config names a window (Mistral,
    Phi-3), else full. A sliding layer of a config without a window (`sliding_window(config)` None) attends
    fully.

    Raises:
        ModelError: a layer type stages do not implement (the message names the ones they do).
    """
    num_layers = int(config.num_hidden_layers)
    window = sliding_window(config)
    types = getattr(config, "layer_types", None)
    if types is None:
        return ((SLIDING if window else FULL),) * num_layers
    unknown = sorted(set(types) - {FULL, SLIDING})
    if unknown:
        raise ModelError(f"unsupported layer types {unknown}; stages implement {[FULL, SLIDING]}")
    if len(types) != num_layers:
        raise ModelError(f"config names {len(types)} layer types for {num_layers} layers")
    return tuple(types)


def max_positions(config: Any) -> int:
    """The longest sequence the model's position encoding covers."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ModelError(f"config of {config.model_type!r} names no maximum sequence length")


def get_module(root: nn.Module, path: str) -> nn.Module:
    """`root.a.b.c` for `path == "a.b.c"`."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module
