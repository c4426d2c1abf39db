"""One forward pass over several sessions' own KV caches: what continuous batching runs a decode step on.

Each session keeps its `KVCache` (its own buffers, growing as it grows, reserved against the node's memory budget
as before); a pass whose row b continues session b writes row b's keys into session b's cache and attends over
them. Rows may be at different lengths: the keys are gathered into one `[B, H_kv, T, D_h]` tensor per layer (T the
longest row), and each row's causal mask hides the places past its own length. Like `KVCache`, the keys become
part of each session only on `commit()`; a failed pass leaves every session as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from edgellm.errors import ConfigError
from edgellm.model.kv import KVCache


class SessionRows:
    """The cache of one pass whose row b continues `caches[b]` (each a session of batch 1 with no padding).

    Implements `edgellm.model.kv.RowsCache`, so `Stage.forward` takes it in place of a single `KVCache`.
    """

    def __init__(self, caches: Sequence[KVCache]) -> None:
        if not caches:
            raise ConfigError("a batched pass needs at least one session")
        if len({id(c) for c in caches}) != len(caches):
            raise ConfigError("a batched pass may continue each session once")
        for cache in caches:
            if cache.batch_size not in (None, 1) or cache.has_padding():
                raise ConfigError("only sessions of one unpadded sequence are batched with others")
        self.caches = list(caches)
        self.starts = torch.tensor([c.length for c in self.caches], dtype=torch.long)  # [B]
        self._total = 0  # keys a row may see in this pass: max(starts) + S

    def positions(self, new: int) -> torch.Tensor:
        """The positions of the next `new` tokens of every row: [B, new] int64."""
        return self.starts.view(-1, 1) + torch.arange(new).view(1, -1)

    def begin_attention(self, token_mask: torch.Tensor) -> torch.Tensor:
        """Start a pass over `S` new tokens per row; returns its mask over the gathered keys.

        token_mask: [B, S] bool (all True) -> [B, 1, S, T] bool (True = attend)
        """
        batch, new = token_mask.shape
        if batch != len(self.caches):
            raise ConfigError(f"{batch} rows for {len(self.caches)} sessions")
        if not bool(token_mask.all()):
            raise ConfigError("batched sessions take no padding: give each session its own row")
        for b, cache in enumerate(self.caches):
            cache.begin(token_mask[b : b + 1])  # checks the model's length limit; starts the session's pass
        self._total = int(self.starts.max()) + new
        query = self.positions(new)  # [B, S]: each row's own places
        keys = torch.arange(self._total).view(1, 1, -1)  # [1, 1, T]
        return (keys <= query.unsqueeze(-1)).unsqueeze(1)  # [B, 1, S, T]

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each row's keys/values to its session; return every row's keys so far, padded to T.

        key, value: [B, H_kv, S, D_h] -> ([B, H_kv, T, D_h], same); places past a row's length are zeros
        """
        batch, heads, _, dim = key.shape
        keys = key.new_zeros(batch, heads, self._total, dim)
        values = value.new_zeros(batch, heads, self._total, dim)
        for b, cache in enumerate(self.caches):
            k, v = cache.update(key[b : b + 1], value[b : b + 1], layer_idx)  # [1, H_kv, len_b + S, D_h]
            keys[b, :, : k.shape[2]] = k[0]
            values[b, :, : v.shape[2]] = v[0]
        return keys, values

    def commit(self) -> None:
        for cache in self.caches:
            cache.commit()
        self.starts = torch.tensor([c.length for c in self.caches], dtype=torch.long)

    def rollback(self) -> None:
        for cache in self.caches:
            cache.rollback()
