"""The public base model as the attacker (and the perplexity column) uses it: hidden states at every cut.

`CutModel` holds the model as an embedding-only stage, the decoder layers in segments between the cuts, and a
head-only stage, all loaded once; from them it runs token ids to the hidden states at every cut
(`hidden_at_cuts`), the layers [0, k) on embeddings (`body`, for the optimisation attack), and the device's and
the servers' halves around one cut (`halves`, for perplexity with a defence at that cut).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgellm.model.stage import Stage, StageSpec
from edgellm.split.one_process import load_stages
from edgellm.store.weights import load_config


class Chain(nn.Module):
    """Stages run one after the other, as one stage: x [B, S] ids or [B, S, D], positions [B, S] -> output."""

    def __init__(self, stages: Sequence[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x, positions)
        return x


@dataclass
class CutModel:
    """The model in segments: `embed` (embedding only), `segments[i]` ending at `cuts[i]` (the last at L), `head`."""

    cuts: tuple[int, ...]
    embed: Stage
    segments: list[Stage]
    head: Stage
    config: Any

    @property
    def embedding(self) -> torch.Tensor:
        """The token embedding matrix [V, D] (the tied LM head of SmolLM2)."""
        weight = getattr(self.embed.embed, "weight", None)
        assert isinstance(weight, torch.Tensor)
        return weight.detach()

    @property
    def head_matrix(self) -> torch.Tensor:
        """The LM head [V, D]."""
        weight = getattr(self.head.head, "weight", None)
        assert isinstance(weight, torch.Tensor)
        return weight.detach()

    @property
    def norm_scale(self) -> torch.Tensor:
        """The final RMSNorm's per-dimension scale [D]: its output for a row of ones (whose RMS is 1)."""
        norm = self.head.norm
        assert isinstance(norm, nn.Module)
        with torch.no_grad():
            return norm(torch.ones(1, self.embedding.shape[1])).reshape(-1)

    def hidden_at_cuts(self, ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """ids: [B, S] int64 -> {cut: [B, S, D]} for every cut."""
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        out: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            h = self.embed(ids, positions)
            for cut, segment in zip(self.cuts, self.segments):
                h = segment(h, positions)
                out[cut] = h
        return out

    def body(self, cut: int) -> Chain:
        """The layers [0, cut) as one module on embeddings [B, S, D] (differentiable)."""
        return Chain(self.segments[: self.cuts.index(cut) + 1])

    def halves(self, cut: int) -> tuple[Chain, Chain]:
        """(embedding + [0, cut), [cut, L) + head): the two sides of one cut, for `edgellm.eval.ppl`."""
        i = self.cuts.index(cut) + 1
        return Chain([self.embed, *self.segments[:i]]), Chain([*self.segments[i:], self.head])


def load_cut_model(model_dir: Path, cuts: Sequence[int]) -> CutModel:
    """Load the model once, cut at every one of `cuts` (sorted, each in 1..L-1), frozen, in float32."""
    config = load_config(model_dir)
    layers = int(config.num_hidden_layers)
    ordered = tuple(sorted(set(cuts)))
    bounds = (0, *ordered, layers)
    specs = [StageSpec(0, 0, embed=True)]
    specs += [StageSpec(a, b) for a, b in zip(bounds, bounds[1:])]
    specs += [StageSpec(layers, layers, head=True)]
    stages = load_stages(model_dir, specs)
    for stage in stages:
        stage.requires_grad_(False)
    return CutModel((*ordered, layers), stages[0], stages[1:-1], stages[-1], config)


def states_of(
    model: CutModel, token_ids: Sequence[int], window: int, batch: int = 8
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The text cut into windows of `window` tokens (a shorter tail dropped), each run from position 0.

    -> (ids [N] int64, {cut: rows [N, D] float32}) with N = windows * window
    """
    usable = len(token_ids) // window * window
    ids = torch.as_tensor(list(token_ids[:usable]), dtype=torch.long).view(-1, window)  # [W, window]
    parts: dict[int, list[torch.Tensor]] = {}
    for start in range(0, ids.shape[0], batch):
        for cut, hidden in model.hidden_at_cuts(ids[start : start + batch]).items():
            parts.setdefault(cut, []).append(hidden.reshape(-1, hidden.shape[-1]).float())
    return ids.reshape(-1), {cut: torch.cat(rows) for cut, rows in parts.items()}
