"""Distilling an exit head: the full model's next-token distribution teaches layers [0, c) + `ExitHead`.

The teacher is the whole model in float32, run once over the training data (`distill_data`); layers [0, c) are
frozen too, so their output is computed once with it. Training starts in closed form: the adapter becomes the best
rank-r linear map from the hidden state after layer c to the model's last hidden state (ridge regression reduced to
rank r), which alone gets about as far as 150 gradient steps from zero (measured at layer 15 of SmolLM2-135M).
Then each step runs only the exit head over a batch of positions: KL(teacher || student) at a temperature, AdamW
with a short warm-up and linear decay. The teacher is cut to its `top_k` most likely tokens plus one bucket for all
the others (so it is computed once, not every step): the KL over those K + 1 outcomes, which never exceeds the full
KL and keeps the tail's mass right. Scores are top-1 agreement (student argmax == teacher argmax: how often a
one-token draft is accepted under greedy decoding) and the exact KL, both on data the head did not train on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgellm.errors import ConfigError
from edgellm.model.stage import Stage
from edgellm.spec.distill_data import TokenSet
from edgellm.spec.exit_head import ExitHead

log = logging.getLogger(__name__)

OnStep = Callable[[int, float], None]  # (steps done, the last step's loss)
SCORE_CHUNK = 512  # positions per scoring pass: [512, V] float32 logits, 100 MB at V = 49152


@dataclass(frozen=True)
class DistillConfig:
    """How the adapter trains.

    Attributes:
        steps: optimizer steps.
        lr: AdamW's peak learning rate (warm-up over the first 5% of steps, then linear decay to 0).
        batch_tokens: positions per step, drawn with replacement from the training set.
        temperature: both distributions are softened by it (the loss is scaled by its square, as usual).
        top_k: teacher tokens kept per position, the rest pooled into one; 0 keeps the whole vocabulary (exact
            KL: the teacher's head then runs every step, ~15% slower, and agreement was the same).
        weight_decay: AdamW's.
        seed: draws the batches.
        ridge: the closed-form start's ridge, relative to the mean squared hidden state; None: no closed-form
            start (the adapter starts at zero: the model's own head).

    Raises:
        ConfigError: a value out of range.
    """

    steps: int = 150
    lr: float = 3e-3
    batch_tokens: int = 512
    temperature: float = 1.0
    top_k: int = 64
    weight_decay: float = 0.0
    seed: int = 0
    ridge: float | None = 1e-3

    def __post_init__(self) -> None:
        for label, value in (("steps", self.steps), ("batch tokens", self.batch_tokens)):
            if value < 1:
                raise ConfigError(f"{label} must be >= 1, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or self.weight_decay < 0:
            raise ConfigError(f"top_k and weight decay must be >= 0, got {self.top_k} and {self.weight_decay}")
        if self.ridge is not None and not self.ridge > 0:
            raise ConfigError(f"ridge must be > 0 (or None: no closed-form start), got {self.ridge}")


@dataclass(frozen=True)
class Score:
    """How well an exit head matches the full model over some positions."""

    agreement: float  # fraction of positions where the argmaxes agree
    kl: float  # mean KL(teacher || student) in nats, at temperature 1
    tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return {"agreement": self.agreement, "kl": self.kl, "tokens": self.tokens}


@dataclass(frozen=True)
class Targets:
    """The teacher's distribution at each position (at the training temperature), cut to its top K and the rest.

    log_probs: [N, K] float32 log-probabilities of its K most likely tokens; token_ids: [N, K] int64;
    tail: [N] float32 log-probability of all the other tokens together
    """

    log_probs: torch.Tensor
    token_ids: torch.Tensor
    tail: torch.Tensor

    def rows(self, index: torch.Tensor) -> Targets:
        """The targets at positions `index` ([n] int64)."""
        return Targets(self.log_probs[index], self.token_ids[index], self.tail[index])


def _split_tail(log_probs: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log_probs: [N, V], token_ids: [N, K] -> the log-probs of those tokens [N, K], of all others [N]."""
    rest = log_probs.scatter(-1, token_ids, float("-inf")).logsumexp(-1)
    return log_probs.gather(-1, token_ids), rest


def head_logits(head_stage: Stage, final: torch.Tensor) -> torch.Tensor:
    """The full model's logits from its last hidden state, through its own final norm and head.

    final: [N, D] -> [N, V] float32 (a head-only stage ignores positions beyond checking them)
    """
    positions = torch.zeros(1, final.shape[0], dtype=torch.long)
    return head_stage(final.to(head_stage.dtype).unsqueeze(0), positions)[0]


@torch.no_grad()
def teacher_targets(head_stage: Stage, data: TokenSet, top_k: int, temperature: float) -> Targets:
    """The teacher's `top_k` most likely tokens at every position of `data`, and the mass of the others.

    -> Targets with [N, top_k] and [N] tensors
    """
    log_probs, token_ids, tails = [], [], []
    for start in range(0, len(data), SCORE_CHUNK):
        logits = head_logits(head_stage, data.final[start : start + SCORE_CHUNK]) / temperature  # [n, V]
        ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices  # [n, K]
        top, tail = _split_tail(logits.log_softmax(-1), ids)
        log_probs.append(top)
        token_ids.append(ids)
        tails.append(tail)
    return Targets(torch.cat(log_probs), torch.cat(token_ids), torch.cat(tails))


def distill_loss(student_logits: torch.Tensor, teacher: torch.Tensor | Targets, temperature: float) -> torch.Tensor:
    """Mean KL(teacher || student) over positions, times temperature squared.

    student_logits: [N, V]; teacher: [N, V] logits, or Targets (the KL over its top K tokens and the rest)
    -> scalar
    """
    log_q = (student_logits / temperature).log_softmax(-1)  # [N, V]
    if isinstance(teacher, Targets):
        top, rest = _split_tail(log_q, teacher.token_ids)
        log_p = torch.cat([teacher.log_probs, teacher.tail.unsqueeze(-1)], -1)  # [N, K + 1]
        log_q = torch.cat([top, rest.unsqueeze(-1)], -1)
    else:
        log_p = (teacher / temperature).log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [N]
    return kl.mean() * temperature**2


@torch.no_grad()
def score(exit_head: ExitHead, head_stage: Stage, data: TokenSet) -> Score:
    """Top-1 agreement and exact KL (temperature 1) of `exit_head` against the full model over `data`."""
    if not len(data):
        return Score(float("nan"), float("nan"), 0)
    agree, kl_sum = 0, 0.0
    for start in range(0, len(data), SCORE_CHUNK):
        teacher = head_logits(head_stage, data.final[start : start + SCORE_CHUNK])  # [n, V]
        student = exit_head(data.hidden[start : start + SCORE_CHUNK].unsqueeze(0))[0]  # [n, V]
        agree += int((teacher.argmax(-1) == student.argmax(-1)).sum())
        kl_sum += float(distill_loss(student, teacher, 1.0)) * teacher.shape[0]
    return Score(agree / len(data), kl_sum / len(data), len(data))


@torch.no_grad()
def fit_linear(exit_head: ExitHead, data: TokenSet, ridge: float) -> None:
    """Set the adapter to the rank-r linear map `h -> h + h A` that best predicts the model's last hidden state
    from the hidden state after layer c over `data`: ridge regression, then reduced-rank (the fitted values'
    top r directions). The norm is left as it is.
    """
    x = data.hidden.double()  # [N, D]
    gram = x.T @ x  # [D, D]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    full = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * eye, x.T @ (data.final.double() - x))  # [D, D]
    fitted = x @ full  # [N, D]
    directions = torch.linalg.eigh(fitted.T @ fitted).eigenvectors[:, -exit_head.rank :]  # [D, r], ascending order
    exit_head.down.weight.copy_((full @ directions).T)  # [r, D]
    exit_head.up.weight.copy_(directions)  # [D, r]: up(down(h)) = h @ full @ directions @ directions.T


def _schedule(steps: int) -> Callable[[int], float]:
    warmup = max(1, steps // 20)
    return lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))


def train(
    exit_head: ExitHead, head_stage: Stage, data: TokenSet, config: DistillConfig, on_step: OnStep | None = None
) -> list[float]:
    """Train the exit head's adapter and norm on `data`: the closed-form start (unless `config.ridge` is None),
    then `config.steps` steps; returns each step's loss.

    Deterministic for a given seed and thread count: batches are drawn from a generator seeded with `config.seed`.
    """
    if not len(data):
        raise ConfigError("no training positions to distill on")
    if config.ridge is not None:
        fit_linear(exit_head, data, config.ridge)
    targets = teacher_targets(head_stage, data, config.top_k, config.temperature) if config.top_k else None
    params = list(exit_head.trainable().values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config.steps))
    batches = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    exit_head.train()
    for step in range(config.steps):
        index = torch.randint(len(data), (config.batch_tokens,), generator=batches)  # [N]
        student = exit_head(data.hidden[index].unsqueeze(0))[0]  # [N, V]
        if targets is not None:
            teacher: torch.Tensor | Targets = targets.rows(index)
        else:
            with torch.no_grad():
                teacher = head_logits(head_stage, data.final[index])
        loss = distill_loss(student, teacher, config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    exit_head.eval()
    return losses
