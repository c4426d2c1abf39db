"""A stage: a contiguous slice of a decoder-only LM, run with its own KV cache, positions and masks.

The first stage holds the token embedding and layers `[0, c1)`, middle stages `[ci, ci+1)`, the last stage
`[ck, L)`. The final norm and LM head ("the head") go either on the last server stage, or on a head-only stage
that runs on the device (U-shaped split), so neither the raw text nor the output distribution leaves it.

Blocks of different layer types (full or sliding-window attention: Gemma 3 interleaves them, Mistral and Phi-3
slide on every layer) get their own mask and rotary table, each computed once per pass (`Traits`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from edgellm.errors import ConfigError
from edgellm.model.arch import FULL, SLIDING, BlockCall
from edgellm.model.kv import KVCache, RowsCache

HeadPlacement = Literal["device", "server"]
HEAD_PLACEMENTS: tuple[HeadPlacement, ...] = ("device", "server")


@dataclass(frozen=True)
class StageSpec:
    """Which part of the model a stage holds: layers `[start, end)`, plus the embedding and/or the head."""

    start: int
    end: int
    embed: bool = False
    head: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ConfigError(f"stage layers [{self.start}, {self.end}) are not a valid range")
        if self.start == self.end and not (self.embed or self.head):
            raise ConfigError(f"stage at layer {self.start} holds nothing")

    @property
    def num_layers(self) -> int:
        return self.end - self.start


def parse_cuts(text: str | None) -> tuple[int, ...]:
    """`"10,20"` -> `(10, 20)`; None or an empty string -> `()` (no split).

    Raises:
        ConfigError: a part is not an integer.
    """
    if text is None or not text.strip():
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--cuts must be comma-separated layer indices, got {text!r}") from None


def stage_specs(num_layers: int, cuts: Sequence[int], head: HeadPlacement = "server") -> list[StageSpec]:
    """Cut a model of `num_layers` decoder layers at `cuts` into stage specs, in execution order.

    With `head="device"` and at least one cut, the head becomes a separate final head-only stage that the
    device runs. With no cuts there is one stage holding everything.

    Raises:
        ConfigError: cuts out of `(0, num_layers)`, unsorted or duplicated; unknown head placement.
    """
    if head not in HEAD_PLACEMENTS:
        raise ConfigError(f"unknown head placement {head!r}; choose from {list(HEAD_PLACEMENTS)}")
    for c in cuts:
        if not 0 < c < num_layers:
            raise ConfigError(f"cut {c} is out of range: cuts must lie in 1..{num_layers - 1} for {num_layers} layers")
    if list(cuts) != sorted(set(cuts)):
        raise ConfigError(f"cuts must be strictly increasing without duplicates, got {list(cuts)}")
    if not cuts:
        return [StageSpec(0, num_layers, embed=True, head=True)]
    bounds = [0, *cuts, num_layers]
    specs = [StageSpec(a, b, embed=(a == 0)) for a, b in zip(bounds, bounds[1:])]
    if head == "server":
        last = specs[-1]
        specs[-1] = StageSpec(last.start, last.end, head=True)
    else:
        specs.append(StageSpec(num_layers, num_layers, head=True))
    return specs


def chain_stages(
    num_layers: int,
    cuts: Sequence[int],
    device: str,
    servers: Sequence[str],
    head: HeadPlacement,
    device_embeds: bool = False,
) -> list[tuple[str, StageSpec]]:
    """The stages of a split deployment in execution order, each with the node that runs it.

    `cuts[i]` is the first layer of `servers[i]`. The device runs the embedding and layers `[0, cuts[0])`; a
    first cut of 0 gives the device no layer: then `servers[0]` embeds (a thin device: token ids cross the first
    link) unless `device_embeds`, where the device keeps the embedding alone. The last server runs up to
    `num_layers`; with `head="device"` a final head-only stage goes to the device, else the last stage holds it.

    Raises:
        ConfigError: cuts that do not fit `num_layers`, one cut per server is not given, or `device_embeds`
            with a first cut other than 0.
    """
    if len(cuts) != len(servers):
        raise ConfigError(f"{len(cuts)} cut(s) for {len(servers)} server(s); need one per server")
    zero = bool(cuts) and cuts[0] == 0
    if device_embeds and not zero:
        raise ConfigError("the device keeps the embedding alone only with a first cut of 0")
    owners = list(servers) if zero else [device, *servers]
    specs = stage_specs(num_layers, cuts[1:] if zero else cuts, head="server")
    if zero and device_embeds:
        first = specs[0]
        specs[0] = StageSpec(first.start, first.end, embed=False, head=first.head)
        specs.insert(0, StageSpec(0, 0, embed=True))
        owners.insert(0, device)
    if head == "device":
        last = specs[-1]
        specs[-1] = StageSpec(last.start, last.end, embed=last.embed)
        specs.append(StageSpec(num_layers, num_layers, head=True))
        owners.append(device)
    return list(zip(owners, specs, strict=True))


def attention_mask(key_valid: torch.Tensor, past: int) -> torch.Tensor | None:
    """Causal mask over cached + new keys, hiding padding; None where SDPA's own handling is already right.

    key_valid: [B, T] bool (T = past + S) -> [B, 1, S, T] bool (True = attend) | None

    Every query also sees itself, so a padding row attends to something and stays finite (a fully masked row
    would give NaN, which would then leak into real rows through 0 * NaN in later layers).
    """
    batch, total = key_valid.shape
    new = total - past
    if (new == 1 or past == 0) and bool(key_valid.all()):
        # No padding, and either one query (it sees every key) or no cache (plain causal attention, which SDPA
        # applies itself when given no mask; with a past it would cut the keys instead, hence the `past == 0`).
        return None
    query_index = torch.arange(past, total).unsqueeze(1)  # [S, 1]
    key_index = torch.arange(total).unsqueeze(0)  # [1, T]
    causal = key_index <= query_index  # [S, T]
    mask = causal.unsqueeze(0) & key_valid.unsqueeze(1)  # [B, S, T]
    mask |= (key_index == query_index).unsqueeze(0)
    return mask.unsqueeze(1)


def window_mask(mask: torch.Tensor | None, query_index: torch.Tensor, total: int, window: int) -> torch.Tensor | None:
    """A sliding-window layer's mask: `mask` (a full-attention layer's, None = plain causal) with every key more
    than `window - 1` places before its query hidden; None where the window hides nothing.

    mask: [B, 1, S, T] bool | None, query_index: [B or 1, S] int64 (each query's index among the T keys)
    -> [B, 1, S, T] bool | None

    Indices count cache places, not positions: within a row they differ by a constant (left padding only), so
    distances are the same, as in transformers' `sliding_window_overlay`.
    """
    if int(query_index.max()) < window:  # the oldest key is inside every query's window
        return mask
    key_index = torch.arange(total).view(1, 1, -1)  # [1, 1, T]
    query = query_index.unsqueeze(-1)  # [B, S, 1]
    inside = (key_index > query - window).unsqueeze(1)  # [B, 1, S, T]
    if mask is None:
        return inside & (key_index <= query).unsqueeze(1)
    return mask & inside


def last_real(h: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Each row's hidden state at its last real (non-padding) token; the last position where a row is all padding.

    h: [B, S, D], token_mask: [B, S] bool | None -> [B, 1, D]
    """
    if token_mask is None:
        return h[:, -1:]
    seq = token_mask.shape[1]
    last = seq - 1 - token_mask.flip(-1).to(torch.int8).argmax(-1)  # [B]
    last = torch.where(token_mask.any(-1), last, seq - 1)
    return h.gather(1, last.view(-1, 1, 1).expand(-1, 1, h.shape[-1]))


@dataclass(frozen=True)
class ModelDims:
    """The sizes a stage's inputs are checked against."""

    hidden_size: int
    vocab_size: int
    max_length: int  # longest sequence: the position-encoding limit


@dataclass(frozen=True)
class Traits:
    """The arithmetic around a stage's blocks that differs between architectures (`edgellm.model.arch.Arch`).

    Attributes:
        layer_types: each block's attention, "full_attention" or "sliding_attention" (empty: all full).
        window: the keys a sliding layer's query sees, itself included; None: sliding layers attend fully.
        rotary_by_type: the rotary module takes the layer type (Gemma 3: local and global frequencies).
        embed_scale: the factor on the token embeddings (Gemma: sqrt(hidden_size)), or None.
        logit_softcap: logits become `cap * tanh(logits / cap)` (Gemma's `final_logit_softcapping`), or None.
    """

    layer_types: tuple[str, ...] = ()
    window: int | None = None
    rotary_by_type: bool = False
    embed_scale: float | None = None
    logit_softcap: float | None = None

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ConfigError(f"a sliding window must be >= 1 token, got {self.window}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ConfigError(f"a logit softcap must be > 0, got {self.logit_softcap}")


class Stage(nn.Module):
    """Runs one `StageSpec` of a model. Built by `edgellm.model.build.build_stage`.

    Args:
        spec: what the stage holds.
        call: how to run one decoder block of this architecture.
        parts: the modules: any of `embed`, `pos_embed`, `blocks` (ModuleList), `rotary`, `norm`, `head`.
        dims: the model's hidden size, vocabulary size and sequence limit.
        traits: the architecture's layer types, window, embedding scale and logit softcap (default: none).
    """

    def __init__(
        self, spec: StageSpec, call: BlockCall, parts: dict[str, nn.Module], dims: ModelDims,
        traits: Traits | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        unknown = set(parts) - {"embed", "pos_embed", "blocks", "rotary", "norm", "head"}
        if unknown:
            raise ValueError(f"unknown stage parts {sorted(unknown)}")
        self.spec = spec
        self.call = call
        self.dims = dims
        self.max_length = dims.max_length
        self.embed = parts.get("embed")
        self.pos_embed = parts.get("pos_embed")
        blocks = parts.get("blocks")
        self.blocks: nn.ModuleList = blocks if isinstance(blocks, nn.ModuleList) else nn.ModuleList()
        self.rotary = parts.get("rotary")
        self.norm = parts.get("norm")
        self.head = parts.get("head")
        traits = traits or Traits()
        if not traits.layer_types:
            traits = replace(traits, layer_types=(FULL,) * len(self.blocks))
        if len(traits.layer_types) != len(self.blocks):
            raise ValueError(f"{len(traits.layer_types)} layer types for {len(self.blocks)} blocks")
        self.traits = traits
        self.engine = "generic"  # which code runs the blocks: `edgellm.engine.select.use_engine` may change it
        self.prepare_rotary: Callable[[Any], Any] | None = None  # the engine's form of (cos, sin), once per pass

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def new_cache(self) -> KVCache:
        """An empty KV cache for one session of this stage."""
        return KVCache(self.spec.start, self.spec.num_layers, self.max_length)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | RowsCache | None = None,
        token_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run the stage on `S` new tokens of each of `B` sequences.

        x: [B, S] int64 token ids (embedding stage) or [B, S, D] hidden states
        positions: [B, S] int64 absolute positions; token_mask: [B, S] bool (False = padding) or None
        -> [B, S, D] hidden states, or float32 logits [B, S, V] for a head stage ([B, 1, V] with `last_only`:
           each row's last real token)
        """
        if positions.numel() and int(positions.max()) >= self.max_length:
            raise ConfigError(f"position {int(positions.max())} exceeds this model's limit of {self.max_length}")
        h = self._embed(x, positions)
        if len(self.blocks):
            h = self._run_blocks(h, positions, cache, token_mask)
        if self.head is None:
            return h
        if last_only:
            h = last_real(h, token_mask)
        assert self.norm is not None
        logits = self.head(self.norm(h))
        cap = self.traits.logit_softcap
        if cap is not None:  # in the head's dtype, as transformers
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def _embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            return x.to(self.dtype)
        h = self.embed(x)
        if self.traits.embed_scale is not None:  # as transformers: the scale rounded to the embedding's dtype
            h = h * torch.tensor(self.traits.embed_scale, dtype=h.dtype)
        if self.pos_embed is not None:
            h = h + self.pos_embed(positions)
        return h

    def _run_blocks(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | RowsCache | None,
        token_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        masks = self._masks(h.shape[:2], cache, token_mask)
        rotaries = self._rotaries(h, positions)
        try:
            for block, kind in zip(self.blocks, self.traits.layer_types):
                h = self.call(block, h, masks[kind], rotaries[kind], positions, cache)
        except BaseException:
            if cache is not None:
                cache.rollback()
            raise
        if cache is not None:
            cache.commit()
        return h

    def _masks(
        self, shape: torch.Size, cache: KVCache | RowsCache | None, token_mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor | None]:
        """Each layer type's attention mask for this pass ([B, 1, S, T] bool | None); starts the cache's pass."""
        batch, new = shape
        if token_mask is None:
            token_mask = torch.ones(batch, new, dtype=torch.bool)
        if cache is None:
            mask = attention_mask(token_mask, past=0)
            query_index = torch.arange(new).view(1, -1)
        elif isinstance(cache, KVCache):
            mask = attention_mask(cache.begin(token_mask), past=cache.length)
            query_index = cache.length + torch.arange(new).view(1, -1)  # [1, S]: rows share their cache places
        else:  # rows of a slot cache (edgellm.engine.slots), each at its own length: slots hold no padding
            mask = cache.begin_attention(token_mask)
            query_index = cache.positions(new)
        masks = {FULL: mask}
        if SLIDING in self.traits.layer_types:
            window = self.traits.window
            total = int(query_index.max()) + 1
            masks[SLIDING] = mask if window is None else window_mask(mask, query_index, total, window)
        return masks

    def _rotaries(self, h: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
        """Each layer type's rotary embedding for this pass, in the engine's form (None without rotary)."""
        kinds = sorted(set(self.traits.layer_types))
        if self.rotary is None:
            return dict.fromkeys(kinds)
        if self.traits.rotary_by_type:
            rotaries = {kind: self.rotary(h, positions, kind) for kind in kinds}
        else:
            shared = self.rotary(h, positions)
            rotaries = dict.fromkeys(kinds, shared)
        if self.prepare_rotary is not None:
            prepared = {id(r): self.prepare_rotary(r) for r in rotaries.values()}  # once per distinct table
            rotaries = {kind: prepared[id(r)] for kind, r in rotaries.items()}
        return rotaries
