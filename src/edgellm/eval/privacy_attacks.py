"""Each attack of `edgellm eval privacy` at one setting (cut, defence), scored against the truth.

Inference traffic (the held-out text's smashed data, as `generate` sends it): nearest-neighbour and learned
inversion. Training traffic (a few real split fine-tuning steps on a built-in task, recorded on the wire by
`edgellm.eval.privacy_traffic`): the optimisation attack on the smashed data of the first batch, and label
recovery from the gradients the device returned. Scores: token recovery and ROUGE-L F1 of the decoded words.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edgellm.eval.privacy_model import CutModel
from edgellm.eval.privacy_traffic import greedy_exact_match, split_training, task_batch, train_steps
from edgellm.lora.config import LoraSpec
from edgellm.privacy.attacks.labels import label_directions, recover_labels
from edgellm.privacy.attacks.learned import learned_inversion, train_inversion
from edgellm.privacy.attacks.metrics import recovery_rate, rouge_l, words
from edgellm.privacy.attacks.nearest import nearest_neighbour
from edgellm.privacy.attacks.optimize import optimize_inversion
from edgellm.privacy.config import DPConfig
from edgellm.privacy.noise import GaussianRows, gaussian_rows
from edgellm.splitlearn.settings import OptimSpec
from edgellm.train.data import IGNORE, eos_id
from edgellm.train.tasks import DEFAULT_TASK, task_examples

if TYPE_CHECKING:
    from edgellm.eval.privacy_engine import PrivacyConfig

log = logging.getLogger(__name__)

TRAIN_BATCH = 8  # examples per split fine-tuning step (the finetune default)


@dataclass
class AttackInputs:
    """What every setting shares: the public text's and the held-out text's rows at each cut ([N] ids, {cut:
    [N, D]}), the nearest-neighbour reference tables ({cut: [V, D]}) and the tokenizer."""

    public_ids: torch.Tensor
    public_rows: dict[int, torch.Tensor]
    heldout_ids: torch.Tensor
    heldout_rows: dict[int, torch.Tensor]
    references: dict[int, torch.Tensor]
    tokenizer: Any

    def frequency_baseline(self) -> float:
        """Recovery of guessing the public text's most frequent token everywhere: the floor of any attack."""
        top = torch.bincount(self.public_ids).argmax()
        return round(recovery_rate(torch.full_like(self.heldout_ids, int(top)), self.heldout_ids), 4)

    def score(self, predicted: torch.Tensor, truth: torch.Tensor, lengths: list[int]) -> dict[str, float]:
        """Token recovery over all positions, and ROUGE-L F1 of the decoded words averaged over the sequences
        (`lengths`: how many positions each holds, in order)."""
        decode = self.tokenizer.decode
        scores, start = [], 0
        for length in lengths:
            got, want = predicted[start : start + length].tolist(), truth[start : start + length].tolist()
            scores.append(rouge_l(words(decode(got)), words(decode(want))))
            start += length
        return {
            "recovery": round(recovery_rate(predicted, truth), 4),
            "rouge_l": round(sum(scores) / len(scores), 4) if scores else 0.0,
        }


def run_attacks(
    config: PrivacyConfig, model: CutModel, inputs: AttackInputs, cut: int, mechanism: GaussianRows | None
) -> dict[str, Any]:
    """Nearest-neighbour and learned inversion of the held-out text's rows at `cut` under `mechanism`."""
    generator = torch.Generator().manual_seed(config.seed + cut)
    clean = inputs.heldout_rows[cut]
    observed = clean if mechanism is None else gaussian_rows(clean, mechanism, generator)
    out: dict[str, Any] = {}
    windows = [config.window] * (inputs.heldout_ids.numel() // config.window)
    if "nn" in config.attacks:
        out["nn"] = inputs.score(nearest_neighbour(observed, inputs.references[cut]), inputs.heldout_ids, windows)
    if "learned" in config.attacks:
        inverter = train_inversion(inputs.public_rows[cut], inputs.public_ids, model.embedding, config.learned,
                                   mechanism)  # fmt: skip
        out["learned"] = inputs.score(learned_inversion(inverter, observed), inputs.heldout_ids, windows)
    return out


def training_attacks(
    config: PrivacyConfig, model_dir: Path, model: CutModel, cut: int, mechanism: GaussianRows | None,
    inputs: AttackInputs,
) -> dict[str, Any]:  # fmt: skip
    """Split fine-tuning at `cut` with the defence; the optimisation and label attacks on its recorded traffic,
    and (with `config.task`) the task's exact match after `config.steps` steps."""
    wanted = {"optimize", "labels"} & set(config.attacks)
    if not wanted and config.task is None:
        return {}
    dp = None if mechanism is None else DPConfig(mechanism.clip_norm, mechanism.noise_multiplier,
                                                 grad_clip_norm=config.grad_clip, seed=config.seed)  # fmt: skip
    run = split_training(model_dir, cut, LoraSpec(), OptimSpec(), dp, config.seed)
    task = config.task or DEFAULT_TASK
    steps = max(config.label_steps, config.steps if config.task else 0)
    examples = task_examples(task, steps * TRAIN_BATCH, config.seed, "train")
    pad = eos_id(inputs.tokenizer)
    batches = [
        task_batch(inputs.tokenizer, examples[i : i + TRAIN_BATCH], pad) for i in range(0, len(examples), TRAIN_BATCH)
    ]

    def stop_recording(done: int, total: int) -> None:
        run.tap.record = done < config.label_steps

    train_steps(run, batches[: config.label_steps if config.task is None else steps], config.seed, stop_recording)
    out: dict[str, Any] = {}
    if "optimize" in wanted:
        out["optimize"] = _optimize(config, model, inputs, cut, run.tap.sent_hidden[0], batches[0])
    if "labels" in wanted:
        out["labels"] = _labels(model, inputs, run.tap.sent_grads, batches[: config.label_steps])
    if config.task is not None:
        eval_examples = task_examples(task, config.task_n, config.seed, "eval")
        longest = max(len(inputs.tokenizer(e.response, add_special_tokens=False)["input_ids"]) for e in eval_examples)
        out["task"] = {"task": task, "steps": steps,
                       "exact_match": round(greedy_exact_match(run, inputs.tokenizer, eval_examples, pad, longest + 2), 4)}  # fmt: skip
    return out


def _optimize(
    config: PrivacyConfig, model: CutModel, inputs: AttackInputs, cut: int, sent: torch.Tensor, batch: Any
) -> dict[str, float]:
    """The optimisation attack on the first rows of the first training batch, row by row of the batch, over the
    whole vocabulary (the chat template's special tokens are rare in public text)."""
    candidates = torch.arange(model.embedding.shape[0])
    body = model.body(cut)
    predicted, truth = [], []
    budget = config.optimize_tokens
    for b in range(sent.shape[0]):
        length = min(int(batch.token_mask[b].sum()), budget)
        if length == 0:
            break
        positions = torch.arange(length).unsqueeze(0)

        def layers(x: torch.Tensor, positions: torch.Tensor = positions) -> torch.Tensor:
            return body(x, positions)

        ids = optimize_inversion(sent[b, :length], layers, model.embedding, candidates, config.optimize)
        predicted.append(ids)
        truth.append(batch.ids[b, :length])
        budget -= length
    return inputs.score(torch.cat(predicted), torch.cat(truth), [t.numel() for t in truth])


def _labels(model: CutModel, inputs: AttackInputs, grads: list[torch.Tensor], batches: list[Any]) -> dict[str, float]:
    """Label recovery from every recorded gradient: each labelled row's answer token."""
    directions = label_directions(model.head_matrix, model.norm_scale)
    predicted, truth, lengths = [], [], []
    for grad, batch in zip(grads, batches):
        targets = batch.labels[:, 1:] != IGNORE  # [B, S-1]: the rows that predict a label
        predicted.append(recover_labels(grad[:, :-1][targets], directions))
        truth.append(batch.labels[:, 1:][targets])
        lengths += targets.sum(dim=1).tolist()  # one answer per example
    return inputs.score(torch.cat(predicted), torch.cat(truth), lengths)
