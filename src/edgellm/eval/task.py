"""The engine behind `edgellm eval task`: exact match and response loss of the model on a built-in task.

The eval split of the task is decoded greedily through the stages (batched, left-padded, as `generate` does),
and scored teacher-forced with the training loss (right-padded, labels on the response and EOS only), so the
numbers before and after fine-tuning are directly comparable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgellm.errors import ConfigError
from edgellm.eval.ppl import chain_logits
from edgellm.model.arch import arch_for
from edgellm.model.prompt import stop_ids
from edgellm.model.sampling import SamplingConfig
from edgellm.model.stage import Stage
from edgellm.progress import Phase
from edgellm.serve.local_engine import LoadedSplit, LocalSplitConfig, load_split
from edgellm.split.generator import GenerationConfig, Generator, pad_prompts
from edgellm.split.one_process import local_pipeline
from edgellm.train.data import causal_lm_loss, encode_example, pad_right, prompt_ids
from edgellm.train.tasks import DEFAULT_TASK, Example, exact_match, get_task, task_examples

log = logging.getLogger(__name__)

ADAPTER_NAME = "task"  # not "eval": adapter names must not shadow nn.Module attributes
OnBatch = Callable[[int, int], None]  # (batches done, batches in all); first called with 0 before any batch


@dataclass(frozen=True)
class TaskEvalConfig:
    """One task evaluation.

    Attributes:
        model: which model, cut where, in what precision (as for `generate`).
        task: a name in `edgellm.train.tasks.TASKS`.
        n, seed: how many eval-split examples, drawn with which seed.
        adapter: a peft-format LoRA adapter directory to apply, or None for the base model.
        batch_size: examples per forward pass.
        max_new_tokens: the longest answer decoded.
        samples: how many predictions the report shows.

    Raises:
        ConfigError: an unknown task or an out-of-range number.
    """

    model: LocalSplitConfig
    task: str = DEFAULT_TASK
    n: int = 100
    seed: int = 0
    adapter: Path | None = None
    batch_size: int = 16
    max_new_tokens: int = 32
    samples: int = 5

    def __post_init__(self) -> None:
        get_task(self.task)
        for label, value in (
            ("--n", self.n),
            ("--batch-size", self.batch_size),
            ("--max-new-tokens", self.max_new_tokens),
        ):
            if value < 1:
                raise ConfigError(f"{label} must be >= 1, got {value}")
        if self.samples < 0:
            raise ConfigError(f"samples must be >= 0, got {self.samples}")


@dataclass
class TaskResult:
    """Predictions and scores over a list of examples."""

    predictions: list[str] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    nll_sum: float = 0.0
    label_tokens: int = 0

    @property
    def exact_match(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0

    @property
    def loss(self) -> float:
        """Mean cross-entropy (nats) per response token, EOS included."""
        return self.nll_sum / self.label_tokens if self.label_tokens else float("nan")


def apply_adapter(stages: Sequence[Stage], model_config: Any, adapter_dir: Path) -> None:
    """Inject the LoRA adapter saved (peft format) in `adapter_dir` into every stage and make it active.

    Raises:
        ConfigError: the directory is missing; edgellm.lora refuses the adapter; the adapter lacks tensors for
            modules its targets name, or has tensors for modules this model does not have.
    """
    if not adapter_dir.is_dir():
        raise ConfigError(f"adapter directory {adapter_dir} does not exist")
    from edgellm.lora.inject import inject_lora, load_adapter_state, set_active, stage_keys
    from edgellm.lora.peft_io import load_peft_adapter

    spec, tensors = load_peft_adapter(adapter_dir)
    layers_path = arch_for(model_config).layers
    expected: set[str] = set()
    for stage in stages:
        inject_lora(stage, layers_path, spec, ADAPTER_NAME)
        load_adapter_state(stage, ADAPTER_NAME, tensors, strict=False)  # each stage takes its own layers
        set_active(stage, ADAPTER_NAME)
        expected |= stage_keys(stage, ADAPTER_NAME)
    missing, unused = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise ConfigError(f"adapter {adapter_dir} lacks {len(missing)} tensors its targets need, e.g. {missing[0]}")
    if unused:
        raise ConfigError(
            f"adapter {adapter_dir} has {len(unused)} tensors this model has no place for, e.g. {unused[0]}"
        )
    log.info("applied LoRA adapter %s (%d tensors)", adapter_dir, len(tensors))


def greedy_answers(
    stages: Sequence[Stage], prompts: Sequence[Sequence[int]], pad_id: int, config: GenerationConfig
) -> list[list[int]]:
    """Each prompt's greedy continuation, stop token removed. prompts: B token lists -> B token lists."""
    ids, mask = pad_prompts(prompts, pad_id)  # [B, S] left-padded
    result = Generator(local_pipeline(stages), config).run(ids, mask)
    return [[t for t in tokens if t not in config.stop_ids] for tokens in result.new_tokens]


def response_nll(
    stages: Sequence[nn.Module], rows: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[float, int]:
    """Summed teacher-forced NLL of the labelled tokens of `rows` (ids, labels), and how many there were."""
    batch = pad_right(rows, pad_id)  # right padding: causal attention keeps real tokens blind to it
    with torch.inference_mode():
        logits = chain_logits(stages, batch.ids)  # [B, S, V]
        return float(causal_lm_loss(logits, batch.labels, reduction="sum")), batch.label_tokens


def evaluate_examples(
    stages: Sequence[Stage],
    tokenizer: Any,
    examples: Sequence[Example],
    generation: GenerationConfig,
    batch_size: int,
    on_batch: OnBatch | None = None,
    match: Callable[[str, str], bool] = exact_match,
) -> TaskResult:
    """Greedy exact match (`match(prediction, reference)`, the task's) and teacher-forced response loss of the
    stages over `examples`, batch by batch."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else generation.stop_ids[0]
    result = TaskResult()
    total = -(-len(examples) // batch_size)
    if on_batch is not None:
        on_batch(0, total)
    for index, start in enumerate(range(0, len(examples), batch_size)):
        chunk = examples[start : start + batch_size]
        answers = greedy_answers(stages, [prompt_ids(tokenizer, e.prompt) for e in chunk], pad_id, generation)
        for example, answer in zip(chunk, answers):
            text = tokenizer.decode(answer, skip_special_tokens=True)
            result.predictions.append(text)
            result.correct.append(match(text, example.response))
        nll, count = response_nll(stages, [encode_example(tokenizer, e) for e in chunk], pad_id)
        result.nll_sum += nll
        result.label_tokens += count
        if on_batch is not None:
            on_batch(index + 1, total)
    return result


def run_task(config: TaskEvalConfig, on_batch: OnBatch | None = None) -> dict[str, Any]:
    """Load the model (and adapter), evaluate the task; returns the report of `edgellm eval task --json`.

    Progress (`edgellm.progress`): a phase for the load and one for the batches; `on_batch`, if given, also
    hears how many batches are done.
    """
    examples = task_examples(config.task, config.n, config.seed, "eval")
    with Phase("load model", log=log) as phase:
        loaded: LoadedSplit = load_split(config.model)
        if config.adapter is not None:
            apply_adapter(loaded.stages, loaded.model_config, config.adapter)
        phase.summary = f"{len(loaded.stages)} stages ({config.model.dtype}, quant {config.model.quant})"
    stops = stop_ids(loaded.tokenizer, loaded.model_config)
    if not stops:
        raise ConfigError("the model defines no end-of-sequence token; cannot tell where an answer ends")
    generation = GenerationConfig(config.max_new_tokens, SamplingConfig(greedy=True), stops)
    start = time.perf_counter()
    with Phase(f"eval task {config.task}", unit="batches", log=log) as phase:

        def batch_done(done: int, total: int) -> None:
            phase.update(done, total)
            if on_batch is not None:
                on_batch(done, total)

        result = evaluate_examples(
            loaded.stages,
            loaded.tokenizer,
            examples,
            generation,
            config.batch_size,
            batch_done,
            get_task(config.task).match,
        )
        phase.summary = f"{len(examples)} examples ({phase.total} batches), exact match {result.exact_match:.1%}"
    eval_s = time.perf_counter() - start
    return {
        "model": config.model.model,
        "task": config.task,
        "split": "eval",
        "n": config.n,
        "seed": config.seed,
        "adapter": None if config.adapter is None else str(config.adapter),
        "exact_match": round(result.exact_match, 4),
        "correct": sum(result.correct),
        "eval_loss": result.loss,
        "label_tokens": result.label_tokens,
        "samples": [
            {"prompt": e.prompt, "reference": e.response, "prediction": p, "correct": c}
            for e, p, c in list(zip(examples, result.predictions, result.correct))[: config.samples]
        ],
        "cuts": list(config.model.cuts),
        "head": config.model.head,
        "dtype": config.model.dtype,
        "quant": config.model.quant,
        "threads": torch.get_num_threads(),
        "batch_size": config.batch_size,
        "max_new_tokens": config.max_new_tokens,
        "load_s": round(loaded.load_s, 3),
        "eval_s": round(eval_s, 3),
    }
