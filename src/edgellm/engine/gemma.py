"""One Gemma 3 decoder block in the fewest eager operations (a `BlockCall` of the fast engine).

As `edgellm.engine.llama`, with Gemma's differences: every RMSNorm scales by `1 + weight`, in float32; the
attention and the MLP outputs are normed again before they join the residual (four norms a block); queries and
keys are normed per head before the rotation; the attention scale is `query_pre_attn_scalar ** -0.5`; the MLP
gate is the config's activation (GELU-tanh). Sliding and global layers differ only in their mask and rotary
table, which the stage gives each block (`edgellm.model.stage.Traits`). The embedding scale and the final logit
softcap are the stage's too. `tests/test_gemma3_phi3.py` holds this block to transformers' module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from edgellm.engine.llama import attend, project, rotate
from edgellm.model.kv import KVCache

SUPPORTED = ("gemma3_text",)


def gemma_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """transformers' Gemma RMSNorm: `x / rms(x) * (1 + weight)` computed in float32, then the input's dtype.

    x: [..., D] -> [..., D]
    """
    scale = 1.0 + norm.weight.float()
    return (F.rms_norm(x.float(), (x.shape[-1],), None, float(norm.eps)) * scale).to(x.dtype)


def gemma_block(
    block: Any,  # a transformers Gemma3DecoderLayer: its submodules are read by name
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    rotary: Any,
    positions: torch.Tensor,
    cache: KVCache | None,
) -> torch.Tensor:
    """The block's forward pass, equal to transformers' up to float rounding (a `BlockCall`).

    hidden: [B, S, D], mask: [B, 1, S, T] bool | None (this layer's: sliding or full),
    rotary: this layer type's, from `edgellm.engine.llama.prepare_rotary` -> [B, S, D]
    """
    attn, mlp = block.self_attn, block.mlp
    batch, seq, _ = hidden.shape
    head_dim = attn.head_dim
    fused_qkv, fused_gate_up = block.__dict__.get("_edgellm_fused", (None, None))  # `llama.pack_block`
    x = gemma_norm(block.input_layernorm, hidden)
    q, k, v = project(fused_qkv, (attn.q_proj, attn.k_proj, attn.v_proj), x)
    q = gemma_norm(attn.q_norm, q.view(batch, seq, -1, head_dim)).transpose(1, 2)
    k = gemma_norm(attn.k_norm, k.view(batch, seq, -1, head_dim)).transpose(1, 2)
    v = v.view(batch, seq, -1, head_dim).transpose(1, 2)
    q, k = rotate(q, rotary), rotate(k, rotary)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    out = attn.o_proj(attend(q, k, v, mask, attn.scaling))
    hidden = hidden + gemma_norm(block.post_attention_layernorm, out)
    x = gemma_norm(block.pre_feedforward_layernorm, hidden)
    gate, up = project(fused_gate_up, (mlp.gate_proj, mlp.up_proj), x)
    x = mlp.down_proj(mlp.act_fn(gate) * up)
    return hidden + gemma_norm(block.post_feedforward_layernorm, x)
