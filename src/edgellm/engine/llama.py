"""One Llama-family decoder block (Llama, Mistral, Qwen2, Qwen3) in the fewest eager operations.

The block's own submodules hold the weights: the projections may be plain, quantized (`edgellm.quant`) or carry
LoRA adapters (`edgellm.lora`), and are called as they are. What is replaced is the code between them, which in
transformers' modules costs more per token than the arithmetic of a small model: each RMSNorm is one fused op,
the rotary embedding is applied with one `roll` instead of slicing, negating and concatenating, and the attention
is one SDPA call on grouped heads, with no mask for a one-token decode step.

The generic path (`edgellm.model.arch`) stays the reference: `tests/test_engine.py` holds this one to it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from edgellm.engine.fuse import Fused, fuse
from edgellm.model.kv import KVCache

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")

# (cos [B, S, Dh], sin with its first half negated [B, S, Dh]) for every block of one forward pass
Rotary = tuple[torch.Tensor, torch.Tensor]


def prepare_rotary(rotary: tuple[torch.Tensor, torch.Tensor]) -> Rotary:
    """transformers' (cos, sin) -> (cos, signed sin), computed once per forward pass, not once per block.

    `rotate_half(x) * sin == roll(x, Dh/2) * signed_sin`, with `signed_sin` the sin with its first half negated.
    """
    cos, sin = rotary
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(1), signed.unsqueeze(1)  # [B, 1, S, Dh]: broadcast over heads


def rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm (in float32, the weight applied in the input's dtype) as one op where it can be.

    x: [..., D] -> [..., D]
    """
    eps = float(norm.variance_epsilon)
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, eps)
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def rotate(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """The rotary embedding applied to queries or keys: x: [B, H, S, Dh], rotary from `prepare_rotary` -> same."""
    cos, signed_sin = rotary
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One SDPA call on grouped heads; plain causal where there is no mask and no cache before the queries.

    q: [B, H, S, Dh], k, v: [B, H_kv, T, Dh], mask: [B, 1, S, T] bool | None -> [B, S, H * Dh]
    """
    batch, _, seq, _ = q.shape
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1 and k.shape[2] == seq,
        scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2).reshape(batch, seq, -1)


def pack_block(block: Any) -> None:
    """Fuse the block's q/k/v and gate/up projections where that is exact (`edgellm.engine.fuse`); once, when the
    fast engine takes a stage. The fused modules live outside the block's state dict."""
    attn, mlp = block.self_attn, block.mlp
    block.__dict__["_edgellm_fused"] = (
        fuse((attn.q_proj, attn.k_proj, attn.v_proj)), fuse((mlp.gate_proj, mlp.up_proj))
    )  # fmt: skip


def project(fused: Fused | None, projections: tuple[Any, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each projection of x: through the fused module where `pack_block` made one, else one by one."""
    out = fused(projections, x) if fused is not None else None
    return out if out is not None else tuple(p(x) for p in projections)


def llama_block(
    block: Any,  # a transformers decoder layer (nn.Module): its submodules are read by name
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    rotary: Any,
    positions: torch.Tensor,
    cache: KVCache | None,
) -> torch.Tensor:
    """The block's forward pass, equal to transformers' up to float rounding (a `BlockCall`).

    hidden: [B, S, D], mask: [B, 1, S, T] bool | None, rotary: from `prepare_rotary` -> [B, S, D]
    """
    attn, mlp = block.self_attn, block.mlp
    batch, seq, _ = hidden.shape
    head_dim = attn.head_dim
    fused_qkv, fused_gate_up = block.__dict__.get("_edgellm_fused", (None, None))
    x = rms_norm(block.input_layernorm, hidden)
    q, k, v = project(fused_qkv, (attn.q_proj, attn.k_proj, attn.v_proj), x)
    q, k = q.view(batch, seq, -1, head_dim), k.view(batch, seq, -1, head_dim)
    v = v.view(batch, seq, -1, head_dim).transpose(1, 2)
    q_norm = getattr(attn, "q_norm", None)
    if q_norm is not None:  # Qwen3: RMSNorm over each head before the rotation
        q, k = rms_norm(q_norm, q), rms_norm(attn.k_norm, k)
    q, k = rotate(q.transpose(1, 2), rotary), rotate(k.transpose(1, 2), rotary)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    hidden = hidden + attn.o_proj(attend(q, k, v, mask, attn.scaling))
    x = rms_norm(block.post_attention_layernorm, hidden)
    gate, up = project(fused_gate_up, (mlp.gate_proj, mlp.up_proj), x)
    return hidden + mlp.down_proj(F.silu(gate) * up)
