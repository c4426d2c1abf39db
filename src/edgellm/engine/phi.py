"""One Phi-3 / Phi-4-mini decoder block in the fewest eager operations (a `BlockCall` of the fast engine).

As `edgellm.engine.llama`, with Phi-3's differences: queries, keys and values come out of one fused `qkv_proj`,
gate and up out of one fused `gate_up_proj` (both may be quantized or carry LoRA adapters, as any projection);
the rotary embedding may turn only the first `partial_rotary_factor` of each head (Phi-4-mini: 3/4), the rest
passes through, as transformers' `apply_rotary_pos_emb` for Phi-3 does. `tests/test_gemma3_phi3.py` holds this
block to transformers' module.
"""

from __future__ import annotations

from typing import Any

import torch

from edgellm.engine.llama import Rotary, attend, rms_norm, rotate
from edgellm.model.kv import KVCache

SUPPORTED = ("phi3",)


def rotate_partial(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """The rotary embedding on the first `Dr` dims of each head, where the tables cover `Dr <= Dh` of them.

    x: [B, H, S, Dh], rotary: ([B, 1, S, Dr], same) -> [B, H, S, Dh]
    """
    turned = rotary[0].shape[-1]
    if turned == x.shape[-1]:
        return rotate(x, rotary)
    return torch.cat((rotate(x[..., :turned], rotary), x[..., turned:]), dim=-1)


def phi_block(
    block: Any,  # a transformers Phi3DecoderLayer: its submodules are read by name
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    rotary: Any,
    positions: torch.Tensor,
    cache: KVCache | None,
) -> torch.Tensor:
    """The block's forward pass, equal to transformers' up to float rounding (a `BlockCall`).

    hidden: [B, S, D], mask: [B, 1, S, T] bool | None, rotary: from `edgellm.engine.llama.prepare_rotary`
    -> [B, S, D]
    """
    attn, mlp = block.self_attn, block.mlp
    batch, seq, _ = hidden.shape
    kv_heads = attn.num_key_value_heads
    x = rms_norm(block.input_layernorm, hidden)
    qkv = attn.qkv_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)  # [B, H + 2 H_kv, S, Dh]
    q, k, v = qkv.split([qkv.shape[1] - 2 * kv_heads, kv_heads, kv_heads], dim=1)
    q, k = rotate_partial(q, rotary), rotate_partial(k, rotary)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    hidden = hidden + block.resid_attn_dropout(attn.o_proj(attend(q, k, v, mask, attn.scaling)))
    gate, up = mlp.gate_up_proj(rms_norm(block.post_attention_layernorm, hidden)).chunk(2, dim=-1)
    return hidden + block.resid_mlp_dropout(mlp.down_proj(up * mlp.activation_fn(gate)))
