"""Optimisation inversion (UnSplit-style): search for the input whose cut-k output matches the smashed data.

The attacker holds the public layers [0, k). It keeps one free logit vector per position over a candidate
vocabulary, feeds the softmax-weighted mix of their embeddings through those layers, and moves the logits by
gradient descent until each output row points where the observed row points (cosine distance: robust to the
clipping's rescaling), then names each position by its largest logit. The device's LoRA adapter is unknown to
the attacker, so it optimises against the base layers; where the observed rows are noised it matches the noisy
rows, which is the best a single observation allows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgellm.errors import ConfigError

# the public layers [0, k): embeddings [1, S, D] -> hidden states at cut k [1, S, D], differentiable
Body = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class OptimizeConfig:
    """The search: `steps` Adam steps of learning rate `lr` at softmax temperature `temperature`.

    Raises:
        ConfigError: a value out of range.
    """

    steps: int = 300
    lr: float = 0.3
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"optimisation attack: steps must be >= 1, got {self.steps}")
        if not self.lr > 0 or not self.temperature > 0:
            raise ConfigError("optimisation attack: lr and temperature must be > 0")


def optimize_inversion(
    observed: torch.Tensor,
    body: Body,
    embedding: torch.Tensor,
    candidates: torch.Tensor,
    config: OptimizeConfig,
) -> torch.Tensor:
    """Reconstruct the tokens behind one sequence of smashed rows.

    observed: [S, D] rows at cut k (as received), embedding: [V, D] (scaled as the model scales it),
    candidates: [C] int64 token ids the search ranges over -> [S] int64 token ids
    """
    torch.manual_seed(config.seed)
    table = embedding[candidates].float().detach()  # [C, D]
    target = F.normalize(observed.float().detach(), dim=-1)  # [S, D]
    logits = torch.zeros(observed.shape[0], table.shape[0], requires_grad=True)  # [S, C]
    optimizer = torch.optim.Adam([logits], lr=config.lr)
    for _ in range(config.steps):
        mix = torch.softmax(logits / config.temperature, dim=-1) @ table  # [S, D]
        out = body(mix.unsqueeze(0))[0].float()  # [S, D]
        loss = (1 - (F.normalize(out, dim=-1) * target).sum(-1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return candidates[logits.detach().argmax(dim=-1)]
