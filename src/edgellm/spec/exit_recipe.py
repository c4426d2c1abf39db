"""The recipe behind `edgellm draft train-exit`: load the model, build the distillation data, score, train, score
again, save the exit head.

The data is text (the public-domain article the package ships, plus any `texts`) in windows, and the model's own
greedy answers to chat requests made from that text, which is what a drafter sees while decoding. The last
`heldout` part of every text is kept out of training: its windows, and the answers to requests made from it, are
what the scores are measured on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgellm.engine.select import DEFAULT_ENGINE, check_engine
from edgellm.errors import ConfigError
from edgellm.model.prompt import stop_ids
from edgellm.model.sampling import SamplingConfig
from edgellm.model.stage import Stage, StageSpec
from edgellm.progress import Phase
from edgellm.spec import distill_data as data
from edgellm.spec.distill import DistillConfig, Score, score, train
from edgellm.spec.exit_head import ExitHead, ExitMeta, check_layer, model_identity, save_exit_head
from edgellm.split.generator import GenerationConfig
from edgellm.store import DEFAULT_MODEL
from edgellm.store.paths import home

log = logging.getLogger(__name__)

SHIPPED_TEXT = Path(__file__).resolve().parents[1] / "control" / "texts" / "eb1911_shakespeare.txt"  # package data
DEFAULT_LAYER = 15
DEFAULT_RANK = 128


@dataclass(frozen=True)
class ExitDataConfig:
    """What the exit head learns from.

    Attributes:
        window: tokens per text window.
        chat_prompts: chat requests answered (greedily, by the model) for training.
        eval_prompts: chat requests, made from the held-out text, answered for scoring.
        answer_tokens: the longest answer.
        heldout: the fraction at the end of every text kept for scoring.
        texts: UTF-8 text files to learn from besides the shipped article.
        batch_size: rows per forward pass while answering and running the teacher.

    Raises:
        ConfigError: a value out of range.
    """

    window: int = 128
    chat_prompts: int = 96
    eval_prompts: int = 16
    answer_tokens: int = 64
    heldout: float = 0.2
    texts: tuple[Path, ...] = ()
    batch_size: int = 32

    def __post_init__(self) -> None:
        for label, value in (("window", self.window - 1), ("answer tokens", self.answer_tokens),
                             ("batch size", self.batch_size)):  # fmt: skip
            if value < 1:
                raise ConfigError(f"{label} must be >= {2 if label == 'window' else 1}, got {value}")
        if self.chat_prompts < 0 or self.eval_prompts < 0:
            raise ConfigError(f"prompt counts must be >= 0, got {self.chat_prompts} and {self.eval_prompts}")
        if not 0 < self.heldout < 1:
            raise ConfigError(f"held-out fraction must be in (0, 1), got {self.heldout}")
        for path in self.texts:
            if not path.is_file():
                raise ConfigError(f"text file {path} does not exist")


@dataclass(frozen=True)
class ExitRecipe:
    """One exit head to train.

    Attributes:
        model: registered name, model directory or .gguf file (as `--model`).
        layer: the exit layer c (the head reads the output of layers [0, c)).
        rank: the adapter's rank.
        distill: how it trains.
        data: what it learns from.
        out: where to save it; None: `default_out(...)` under the edgellm home.
        threads: torch threads (None: torch's choice).
        engine: what runs the decoder blocks (`edgellm.engine.select`).
    """

    model: str = DEFAULT_MODEL
    layer: int = DEFAULT_LAYER
    rank: int = DEFAULT_RANK
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: ExitDataConfig = field(default_factory=ExitDataConfig)
    out: Path | None = None
    threads: int | None = None
    engine: str = DEFAULT_ENGINE

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"--rank must be >= 1, got {self.rank}")
        if self.layer < 1:
            raise ConfigError(f"--layer must be >= 1, got {self.layer}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        check_engine(self.engine)


def drafts_dir() -> Path:
    """Where trained drafters are kept by default."""
    return home() / "drafts"


def default_out(model_name: str, layer: int, rank: int) -> Path:
    """`<home>/drafts/<model>-exit<c>-r<rank>.safetensors`."""
    return drafts_dir() / f"{model_name}-exit{layer}-r{rank}.safetensors"


@dataclass(frozen=True)
class _Model:
    tokenizer: Any
    config: Any
    lower: Stage  # [0, c) + embedding
    upper: Stage  # [c, L)
    head: Stage  # the final norm and LM head alone


def _load(model_dir: Path, layer: int, engine: str) -> _Model:
    from edgellm.split.one_process import load_stages
    from edgellm.store.weights import load_config, load_tokenizer

    config = load_config(model_dir)
    layers = int(config.num_hidden_layers)
    check_layer(layer, layers)
    tokenizer = load_tokenizer(model_dir)
    specs = [StageSpec(0, layer, embed=True), StageSpec(layer, layers), StageSpec(layers, layers, head=True)]
    lower, upper, head = load_stages(model_dir, specs, torch.float32, engine=engine)
    for stage in (lower, upper, head):
        stage.requires_grad_(False).eval()
    return _Model(tokenizer, config, lower, upper, head)


def _texts(config: ExitDataConfig) -> list[tuple[str, str]]:
    """Each text split into its training part and its held-out tail."""
    return [data.split_text(p.read_text(encoding="utf-8"), config.heldout) for p in (SHIPPED_TEXT, *config.texts)]


def _answered(model: _Model, texts: list[str], count: int, seed: int, config: ExitDataConfig) -> tuple[list, list]:
    """Chat rows (prompt + the model's greedy answer) about `texts`, and where each row's answer is predicted."""
    per_text = [count // len(texts) + (i < count % len(texts)) for i in range(len(texts))]
    prompts = [p for i, (t, n) in enumerate(zip(texts, per_text)) for p in data.chat_prompts(t, n, seed + i)]
    if not prompts:
        return [], []
    rows = data.chat_rows(model.tokenizer, prompts)
    stops = stop_ids(model.tokenizer, model.config)
    if not stops:
        raise ConfigError("the model defines no end-of-sequence token; cannot tell where an answer ends")
    generation = GenerationConfig(config.answer_tokens, SamplingConfig(greedy=True), stops)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else stops[0]
    with Phase("self answers", unit="batches", log=log) as phase:
        answers = data.greedy_answers([model.lower, model.upper, model.head], rows, generation, pad,
                                      config.batch_size, phase.update)  # fmt: skip
        phase.summary = f"{len(rows)} chat answers, {sum(map(len, answers))} tokens"
    return [r + a for r, a in zip(rows, answers)], [len(r) - 1 for r in rows]


def build_sets(model: _Model, config: ExitDataConfig, seed: int) -> dict[str, data.TokenSet]:
    """The distillation pairs: `train` (text and chat), `text` and `chat` (held out, for scoring)."""
    texts = _texts(config)
    train_text = [w for t, _ in texts for w in data.text_windows(model.tokenizer, t, config.window)]
    eval_text = [w for _, t in texts for w in data.text_windows(model.tokenizer, t, config.window)]
    train_chat, train_from = _answered(model, [t for t, _ in texts], config.chat_prompts, seed, config)
    eval_chat, eval_from = _answered(model, [t for _, t in texts], config.eval_prompts, seed + 1000, config)
    groups = {"train_text": (train_text, [0] * len(train_text)), "train_chat": (train_chat, train_from),
              "text": (eval_text, [0] * len(eval_text)), "chat": (eval_chat, eval_from)}  # fmt: skip
    sets: dict[str, data.TokenSet] = {}
    total = sum(-(-len(rows) // config.batch_size) for rows, _ in groups.values())
    with Phase("teacher pass", total=total, unit="batches", log=log) as phase:
        for name, (rows, starts) in groups.items():
            base = phase.done

            def batch_done(done: int, total: int, base: int = base) -> None:
                phase.update(base + done)

            sets[name] = data.teacher_pass(model.lower, model.upper, rows, starts, config.batch_size, batch_done)
        phase.summary = ", ".join(f"{name} {len(s)} tokens" for name, s in sets.items())
    return {"train": data.TokenSet.concat([sets["train_text"], sets["train_chat"]]), **sets}


def _scores(exit_head: ExitHead, model: _Model, sets: dict[str, data.TokenSet]) -> dict[str, Score]:
    return {name: score(exit_head, model.head, sets[name]) for name in ("text", "chat")}


def train_exit_head(recipe: ExitRecipe) -> dict[str, Any]:
    """Train an exit head as `recipe` says and save it; returns the report of `edgellm draft train-exit --json`.

    Raises:
        ConfigError: a layer outside the model, a text without sentences to ask about, bad settings.
        ModelError: the model cannot be found or read.
    """
    from edgellm.store import resolve_model

    start = time.perf_counter()
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    model_dir = resolve_model(recipe.model)
    with Phase("load model", log=log) as phase:
        model = _load(model_dir, recipe.layer, recipe.engine)
        phase.summary = f"{model_dir.name}: layers [0, {recipe.layer}) + the rest as teacher"
    identity = model_identity(model_dir, model.config)
    out = recipe.out or default_out(identity["name"], recipe.layer, recipe.rank)
    seconds: dict[str, float] = {"load": time.perf_counter() - start}
    sets = build_sets(model, recipe.data, recipe.distill.seed)
    seconds["data"] = time.perf_counter() - start - seconds["load"]
    exit_head = ExitHead(model.head, recipe.rank, seed=recipe.distill.seed)
    before = _scores(exit_head, model, sets)
    mark = time.perf_counter()
    with Phase(f"train exit@{recipe.layer}", total=recipe.distill.steps, unit="steps", log=log) as phase:

        def step_done(step: int, loss: float) -> None:
            phase.detail = f"loss {loss:.3f}"
            phase.update(step)

        losses = train(exit_head, model.head, sets["train"], recipe.distill, step_done)
        phase.summary = f"{recipe.distill.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    seconds["train"] = time.perf_counter() - mark
    after = _scores(exit_head, model, sets)
    seconds["total"] = time.perf_counter() - start
    report = _report(recipe, identity, sets, before, after, losses, seconds)
    report["out"] = str(out)
    report["adapter_bytes"] = 4 * sum(t.numel() for t in exit_head.trainable().values())
    save_exit_head(exit_head, out, ExitMeta(identity, recipe.layer, recipe.rank, _stats(report)))
    log.info("saved exit head exit@%d (rank %d) to %s", recipe.layer, recipe.rank, out)
    return report


def _report(
    recipe: ExitRecipe, identity: dict[str, Any], sets: dict[str, data.TokenSet], before: dict[str, Score],
    after: dict[str, Score], losses: list[float], seconds: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    return {
        "model": identity["name"],
        "layer": recipe.layer,
        "rank": recipe.rank,
        "settings": {
            **asdict(recipe.distill),
            **asdict(recipe.data),
            "texts": [str(p) for p in recipe.data.texts],
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "tokens": {name: len(s) for name, s in sets.items()},
        "before": {name: s.as_dict() for name, s in before.items()},
        "after": {name: s.as_dict() for name, s in after.items()},
        "loss": {"first": losses[0], "last": losses[-1]},
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
    }


def _stats(report: dict[str, Any]) -> dict[str, Any]:
    """What the saved file says about its training."""
    return {key: report[key] for key in ("settings", "tokens", "before", "after", "loss", "seconds")}
