"""Architecture adapters: where a Hugging Face causal LM keeps its pieces and how to call one decoder block.

A stage never calls a Hugging Face *model* forward; it drives the decoder blocks itself with its own KV cache,
masks and positions. Each supported `model_type` therefore needs exactly one `Arch` entry here, checked by the
equivalence tests in `tests/test_stage_equivalence.py`. Anything else is refused, never run approximately.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgellm.errors import ModelError

# (block, hidden [B,S,D], mask [B,1,S,T] bool | None, rotary (cos, sin) | None, positions [B,S], cache) -> [B,S,D]
BlockCall = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", Any, torch.Tensor, Any], torch.Tensor]


def _call_rotary_block(block, hidden, mask, rotary, positions, cache):
    return block(hidden, attention_mask=mask, position_ids=positions, cache=cache, position_embeddings=rotary)


def _call_gpt2_block(block, hidden, mask, rotary, positions, cache):
    return block(hidden, cache, mask, position_ids=positions)


@dataclass(frozen=True)
class Arch:
    """Dotted paths, relative to the `*ForCausalLM` module, of the parts a stage needs.

    Attributes:
        layers: the `nn.ModuleList` of decoder blocks.
        embed: the token embedding.
        norm: the final norm applied before the LM head.
        head: the LM head (tied to `embed` when the config says so).
        pos_embed: learned absolute position embedding, or None.
        rotary: the rotary embedding module, or None.
        call: how to run one block.
    """

    layers: str
    embed: str
    norm: str
    head: str
    pos_embed: str | None
    rotary: str | None
    call: BlockCall


_LLAMA_LIKE = Arch(
    layers="model.layers",
    embed="model.embed_tokens",
    norm="model.norm",
    head="lm_head",
    pos_embed=None,
    rotary="model.rotary_emb",
    call=_call_rotary_block,
)

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
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
    return ARCHS[model_type]


def sliding_window(config: Any) -> int | None:
    """The attention window if any layer of this config uses sliding-window attention, else None.

    Stages implement full causal attention only; callers refuse sequences longer than this window, where the
    two would differ.
    """
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


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
