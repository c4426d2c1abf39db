"""Learned inversion: a small network trained on the public model's smashed data of public text.

The attacker runs the public base model over text it owns (the texts the project ships), keeps the hidden states
at cut k with their token ids, and fits `InversionModel`: a two-layer MLP with a linear skip over the rows,
normalised first (so the scale of a row, its clipping and the sinks' huge norms do not matter), whose output is
scored against a fixed token table (the tied embedding / LM head), so a softmax over 49k tokens costs one matmul
and no output parameters. Training uses the softmax over the tokens the public text holds (the attacker's
vocabulary, a few thousand); inversion scores every token of the vocabulary. Against DP noise the attacker trains
on states passed through the same mechanism (fresh noise every epoch): the realistic, noise-aware attacker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.errors import ConfigError
from edgellm.privacy.noise import GaussianRows, gaussian_rows

log = logging.getLogger(__name__)

OnEpoch = Callable[[int, int], None]  # (epochs done, epochs in all)


@dataclass(frozen=True)
class LearnedConfig:
    """How the inversion model is trained.

    Attributes:
        hidden: width of the MLP's hidden layer.
        epochs: passes over the training rows.
        batch_rows: rows per optimizer step.
        lr: AdamW learning rate (cosine-decayed to 0).
        seed: initialisation, batch order and the noise of a noise-aware attacker.

    Raises:
        ConfigError: a value out of range.
    """

    hidden: int = 1024
    epochs: int = 3
    batch_rows: int = 256
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "epochs", "batch_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"learned attack: {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"learned attack: lr must be > 0, got {self.lr}")


class InversionModel(nn.Module):
    """Rows of hidden states -> logits over a fixed token table.

    rows: [N, D] -> [N, V'] where V' is the table's (or the candidates') row count
    """

    def __init__(self, dim: int, hidden: int, table: torch.Tensor) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.skip = nn.Linear(dim, dim)
        self.table: torch.Tensor
        self.register_buffer("table", F.normalize(table.float(), dim=-1), persistent=False)  # [V, D]
        self.scale = nn.Parameter(torch.tensor(10.0))  # softmax temperature over cosine-like scores

    def features(self, rows: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(rows.float(), rows.shape[-1:])  # [N, D]
        return F.normalize(self.mlp(x) + self.skip(x), dim=-1)

    def forward(self, rows: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        table = self.table if candidates is None else self.table[candidates]
        return self.scale * (self.features(rows) @ table.T)


def train_inversion(
    rows: torch.Tensor,
    ids: torch.Tensor,
    table: torch.Tensor,
    config: LearnedConfig,
    mechanism: GaussianRows | None = None,
    on_epoch: OnEpoch | None = None,
) -> InversionModel:
    """Fit an inversion model on (smashed row, token id) pairs of public text.

    rows: [N, D] hidden states at the cut (before any DP mechanism), ids: [N] int64, table: [V, D]
    mechanism: the defence the attacked device applies; given, each epoch sees freshly noised rows.
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = InversionModel(rows.shape[-1], config.hidden, table)
    candidates, target = torch.unique(ids, return_inverse=True)  # the attacker's vocabulary; ids -> its indices
    steps_per_epoch = -(-rows.shape[0] // config.batch_rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    for epoch in range(config.epochs):
        seen = rows if mechanism is None else gaussian_rows(rows, mechanism, generator)
        order = torch.randperm(rows.shape[0], generator=generator)
        total = 0.0
        for start in range(0, rows.shape[0], config.batch_rows):
            pick = order[start : start + config.batch_rows]
            loss = F.cross_entropy(model(seen[pick], candidates), target[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * pick.numel()
        log.debug("learned inversion epoch %d: loss %.3f", epoch + 1, total / rows.shape[0])
        if on_epoch is not None:
            on_epoch(epoch + 1, config.epochs)
    return model.eval()


def learned_inversion(model: InversionModel, rows: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """The most likely token of each row over the whole vocabulary.

    rows: [N, D] -> [N] int64 token ids
    """
    with torch.inference_mode():
        out = [model(rows[i : i + batch]).argmax(dim=-1) for i in range(0, rows.shape[0], batch)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
