"""The engine behind `edgellm eval privacy`: attacks against the smashed data at each cut and noise level, next to
what the defence costs (perplexity, optionally the task's exact match after split fine-tuning) and its epsilon.

A setting is a (cut, noise multiplier) pair. Noise 0 is no defence at all (rows sent as computed); noise z > 0
clips every row to `clip` times the median row norm at that cut (measured on the public text: norms grow with
depth, so one absolute bound cannot fit every cut) and adds Gaussian noise of std z * bound
(`edgellm.privacy.noise`). Attacks: docs/PRIVACY.md and `edgellm.privacy.attacks`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgellm.errors import ConfigError
from edgellm.eval.ppl import PplConfig, evaluate_ppl
from edgellm.eval.ppl_engine import read_text
from edgellm.eval.privacy_attacks import AttackInputs, run_attacks, training_attacks
from edgellm.eval.privacy_model import CutModel, load_cut_model, states_of
from edgellm.privacy.attacks.learned import LearnedConfig
from edgellm.privacy.attacks.nearest import token_references
from edgellm.privacy.attacks.optimize import OptimizeConfig
from edgellm.privacy.noise import GaussianRows, gaussian_rows
from edgellm.progress import Phase
from edgellm.store import resolve_model
from edgellm.store.weights import load_tokenizer
from edgellm.train.tasks import get_task

log = logging.getLogger(__name__)

ATTACKS = ("nn", "learned", "optimize", "labels")
PACKAGE = Path(__file__).resolve().parents[1]  # package data, so the command works from an installed wheel too
# The attacker's text: the rest of the 1911 Britannica article whose first 9 kB are the device's text (disjoint
# from it; same topic and style: the in-domain attacker, the strong case). Both public domain.
PUBLIC_TEXTS = (PACKAGE / "privacy/texts/eb1911_shakespeare_rest.txt",)
HELDOUT_TEXT = PACKAGE / "control/texts/eb1911_shakespeare.txt"
OVERLAP_TOKENS = 32  # a run this long shared by the public and the held-out ids means the attacker saw the text


@dataclass(frozen=True)
class PrivacyConfig:
    """One `edgellm eval privacy` run.

    Attributes:
        model: registered name or model directory.
        cuts: the cuts attacked (each in 1..L-1).
        noise: noise multipliers; 0 = no defence.
        clip: each row's bound as a multiple of the median row norm at its cut (public text).
        attacks: a subset of `ATTACKS`.
        tokens: held-out tokens attacked and scored for perplexity.
        train_tokens: public-text tokens the learned attacker trains on.
        optimize_tokens: rows the optimisation attack reconstructs per setting (from a training batch).
        window: tokens per sequence the texts are cut into (and the perplexity window).
        label_steps: split fine-tuning steps whose returned gradients the label attack reads.
        answer_rows: rows in "a whole answer", for its epsilon.
        delta: the delta of every epsilon.
        task, steps, task_n: optional: fine-tune `steps` steps on built-in task `task` with the defence and
            report exact match on `task_n` eval examples (slow: minutes per setting).
        public_texts, heldout_text: the attacker's text and the device's.
        learned, optimize: the attacks' settings.
        grad_clip: in the training traffic, also clip each gradient row the device sends back to this L2 norm and
            add noise at the setting's multiplier (`--dp-grad-noise` of `finetune`: the labels' defence); None: off.
        seed: noise, training and data order.
    """

    model: str = "smollm2-135m"
    cuts: tuple[int, ...] = (1, 2, 4, 8)
    noise: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    clip: float = 2.0
    attacks: tuple[str, ...] = ATTACKS
    tokens: int = 512
    train_tokens: int = 16000
    optimize_tokens: int = 48
    window: int = 128
    label_steps: int = 2
    answer_rows: int = 16
    delta: float = 1e-5
    task: str | None = None
    steps: int = 30
    task_n: int = 50
    public_texts: tuple[Path, ...] = PUBLIC_TEXTS
    heldout_text: Path = HELDOUT_TEXT
    learned: LearnedConfig = field(default_factory=LearnedConfig)
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)
    grad_clip: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.cuts:
            raise ConfigError("--cuts needs at least one cut")
        if any(c < 1 for c in self.cuts):
            raise ConfigError(f"--cuts must be >= 1 (a cut of 0 sends embeddings), got {list(self.cuts)}")
        if not self.noise or any(not (z >= 0 and math.isfinite(z)) for z in self.noise):
            raise ConfigError(f"--noise must be finite multipliers >= 0, got {list(self.noise)}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"--clip must be a positive multiple of the median row norm, got {self.clip}")
        unknown = set(self.attacks) - set(ATTACKS)
        if unknown or (not self.attacks and self.task is None):
            raise ConfigError(f"unknown attack(s) {sorted(unknown) or '(none given)'}; choose from {list(ATTACKS)}")
        if self.window < 2 or self.tokens < self.window + 1:
            raise ConfigError(f"--tokens ({self.tokens}) must exceed the window ({self.window}), which must be >= 2")
        for name in ("train_tokens", "optimize_tokens", "label_steps", "answer_rows", "steps", "task_n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.grad_clip is not None and not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            raise ConfigError(f"--grad-clip must be a positive L2 bound, got {self.grad_clip}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must lie in (0, 1), got {self.delta}")
        if self.task is not None:
            get_task(self.task)


def epsilon(noise_multiplier: float, rows: int, delta: float) -> float | None:
    """Epsilon of `rows` row releases at `noise_multiplier` (the project's accountant); None: no defence."""
    if noise_multiplier == 0:
        return None
    from edgellm.privacy.accountant import epsilon_for

    eps = epsilon_for(noise_multiplier, rows, delta)
    return eps if math.isfinite(eps) else None


def token_ids_of(tokenizer: Any, paths: tuple[Path, ...], limit: int) -> list[int]:
    """The first `limit` token ids of the files' texts, one after the other."""
    ids: list[int] = []
    for path in paths:
        ids += list(tokenizer(read_text(path))["input_ids"])
        if len(ids) >= limit:
            break
    if len(ids) < limit:
        log.warning("the texts hold %d tokens, fewer than the %d asked for", len(ids), limit)
    return ids[:limit]


def shared_run(public: list[int], heldout: list[int], n: int = OVERLAP_TOKENS) -> int | None:
    """Where in `heldout` a run of `n` tokens also found in `public` starts; None if there is none."""
    seen = {tuple(public[i : i + n]) for i in range(len(public) - n + 1)}
    return next((i for i in range(len(heldout) - n + 1) if tuple(heldout[i : i + n]) in seen), None)


def check_disjoint(public: list[int], heldout: list[int], config: PrivacyConfig) -> None:
    """Refuse an attacker's text that contains the device's: the learned attack would be scored on its training data.

    Raises:
        ConfigError: a run of `OVERLAP_TOKENS` tokens of the held-out text is in the public texts.
    """
    at = shared_run(public, heldout)
    if at is not None:
        names = ", ".join(str(p) for p in config.public_texts)
        raise ConfigError(
            f"the attacker's public text ({names}) contains the device's held-out text {config.heldout_text} "
            f"({OVERLAP_TOKENS} tokens from its token {at} on): the attack would be scored on text it trained on; "
            "give texts that do not overlap"
        )


def norm_stats(rows: torch.Tensor) -> dict[str, float]:
    """Median, 90th percentile and maximum of the rows' L2 norms. rows: [N, D]."""
    norms = torch.linalg.vector_norm(rows.float(), dim=-1)
    return {k: round(float(v), 3) for k, v in (("median", norms.median()), ("p90", norms.quantile(0.9)),
                                                 ("max", norms.max()))}  # fmt: skip


def perplexity(
    model: CutModel, cut: int, ids: list[int], window: int, mechanism: GaussianRows | None, seed: int
) -> float:
    """Perplexity of the held-out ids with the defence at `cut` (the device's rows as the server gets them)."""
    config = PplConfig(ctx=window, max_tokens=len(ids))
    generator = torch.Generator().manual_seed(seed)
    hop = None if mechanism is None else (lambda h: gaussian_rows(h, mechanism, generator))
    return evaluate_ppl(list(model.halves(cut)), ids, config, hop).ppl


def _prepare(config: PrivacyConfig, model: CutModel, tokenizer: Any) -> AttackInputs:
    """States of the public and held-out text at every cut, and the nearest-neighbour reference tables."""
    public = token_ids_of(tokenizer, config.public_texts, config.train_tokens)
    heldout = token_ids_of(tokenizer, (config.heldout_text,), config.tokens)
    check_disjoint(public, heldout, config)
    with Phase("hidden states", log=log) as phase:
        public_ids, public_rows = states_of(model, public, config.window)
        heldout_ids, heldout_rows = states_of(model, heldout, config.window)
        phase.summary = f"{public_ids.numel()} public and {heldout_ids.numel()} held-out rows at {len(model.cuts)} cuts"
    references: dict[int, torch.Tensor] = {}
    if "nn" in config.attacks:
        prefix = int(tokenizer("\n", add_special_tokens=False)["input_ids"][0])
        deepest = max(config.cuts)
        short = load_cut_model_view(model, deepest)
        with Phase("nn reference tables", unit="batches", log=log) as phase:
            references = token_references(short, int(model.embedding.shape[0]), prefix, on_batch=phase.update)
    return AttackInputs(public_ids, public_rows, heldout_ids, heldout_rows, references, tokenizer)


def load_cut_model_view(model: CutModel, deepest: int) -> Any:
    """`model.hidden_at_cuts`, stopped after `deepest` (the reference tables need no deeper layers)."""
    stop = model.cuts.index(deepest) + 1
    view = CutModel(model.cuts[:stop], model.embed, model.segments[:stop], model.head, model.config)
    return view.hidden_at_cuts


@dataclass
class Harness:
    """What every setting of a run shares: the model cut at every cut, the texts' rows, the row norms, the
    perplexity of the held-out text with no defence."""

    model_dir: Path
    model: CutModel
    inputs: AttackInputs
    norms: dict[int, dict[str, float]]
    base_ppl: float
    started: float

    @property
    def heldout(self) -> list[int]:
        return [int(t) for t in self.inputs.heldout_ids.tolist()]


def prepare(config: PrivacyConfig) -> Harness:
    """Load the model and compute what every setting shares (`config.cuts` must cover every cut evaluated).

    Raises:
        ConfigError: a cut at or past the model's last layer, or an unreadable text.
    """
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    model_dir = resolve_model(config.model)
    tokenizer = load_tokenizer(model_dir)
    with Phase("load model", log=log):
        model = load_cut_model(model_dir, config.cuts)
    layers = model.cuts[-1]
    if max(config.cuts) >= layers:
        raise ConfigError(f"--cuts must be below the model's {layers} layers, got {list(config.cuts)}")
    inputs = _prepare(config, model, tokenizer)
    norms = {c: norm_stats(inputs.public_rows[c]) for c in config.cuts}
    heldout = [int(t) for t in inputs.heldout_ids.tolist()]
    base_ppl = perplexity(model, min(config.cuts), heldout, config.window, None, config.seed)
    return Harness(model_dir, model, inputs, norms, base_ppl, started)


def evaluate_setting(config: PrivacyConfig, harness: Harness, cut: int, z: float) -> dict[str, Any]:
    """One row of the report: `config.attacks` (and `config.task`) at `cut` with noise multiplier `z`."""
    clip = config.clip * harness.norms[cut]["median"]
    mechanism = None if z == 0 else GaussianRows(clip, z)
    row: dict[str, Any] = {"cut": cut, "noise": z, "clip_norm": None if z == 0 else round(clip, 3)}
    row["noise_std"] = None if mechanism is None else round(mechanism.noise_std, 4)
    row["epsilon_row"] = epsilon(z, 1, config.delta)
    row["epsilon_answer"] = epsilon(z, config.answer_rows, config.delta)
    row["attacks"] = run_attacks(config, harness.model, harness.inputs, cut, mechanism)
    row["attacks"].update(training_attacks(config, harness.model_dir, harness.model, cut, mechanism, harness.inputs))
    task = row["attacks"].pop("task", None)
    ppl = perplexity(harness.model, cut, harness.heldout, config.window, mechanism, config.seed)
    row["ppl"] = round(ppl, 4)
    row["ppl_increase_pct"] = round(100 * (ppl / harness.base_ppl - 1), 3)
    if task is not None:
        row["task"] = task
    return row


def make_report(config: PrivacyConfig, harness: Harness, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The report of `edgellm eval privacy --json` around its rows."""
    cuts = sorted({r["cut"] for r in rows})
    return {
        "model": config.model,
        "cuts": cuts,
        "noise": sorted({r["noise"] for r in rows}),
        "clip": config.clip,
        "clip_rule": "bound = clip x median row norm at the cut (public text); noise std = noise x bound",
        "grad_clip": config.grad_clip,
        "attacks": list(config.attacks),
        "delta": config.delta,
        "answer_rows": config.answer_rows,
        "row_norms": {str(c): harness.norms[c] for c in cuts},
        "tokens": {
            "heldout": len(harness.heldout),
            "public": int(harness.inputs.public_ids.numel()),
            "window": config.window,
        },
        "baseline_ppl": round(harness.base_ppl, 4),
        "baseline_recovery": harness.inputs.frequency_baseline(),
        "rows": rows,
        "threads": torch.get_num_threads(),
        "eval_s": round(time.perf_counter() - harness.started, 1),
    }


def run_privacy(config: PrivacyConfig) -> dict[str, Any]:
    """Every setting's attacks, perplexity and epsilon (and exact match with `task`); the report of
    `edgellm eval privacy --json` (docs/PRIVACY.md)."""
    harness = prepare(config)
    settings = [(c, z) for c in sorted(config.cuts) for z in config.noise]
    rows: list[dict[str, Any]] = []
    with Phase("eval privacy", unit="settings", log=log) as phase:
        phase.update(0, len(settings))
        for index, (cut, z) in enumerate(settings):
            rows.append(evaluate_setting(config, harness, cut, z))
            phase.update(index + 1, len(settings))
    return make_report(config, harness, rows)
