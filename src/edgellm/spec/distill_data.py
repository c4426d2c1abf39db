"""What an exit head is distilled on: text windows and the model's own greedy chat answers, run once through the
full model to pair each position's hidden state after layer c with the model's final hidden state.

Training only ever looks at single positions, so the pairs are flattened over every scored position of every
sequence (`TokenSet`). A chat answer's positions are those that predict an answer token, which is what a drafter
is asked to guess; a text window scores every position.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from edgellm.errors import ConfigError
from edgellm.model.prompt import encode_prompt
from edgellm.model.sampling import SamplingConfig
from edgellm.model.stage import Stage
from edgellm.split.generator import GenerationConfig, Generator, pad_prompts
from edgellm.split.one_process import local_pipeline

OnBatch = Callable[[int, int], None]  # (batches done, batches in all)

# Chat prompts made from a sentence of the training text: the kinds of requests a small chat model gets.
PROMPT_TEMPLATES = (
    "Summarise in one sentence: {s}",
    "Explain this in simple words: {s}",
    "What is the main fact in this text? {s}",
    "Rewrite this in modern English: {s}",
    "Write two questions a student could ask about this: {s}",
    "Continue this text: {s}",
    "Who or what is this about, and why does it matter? {s}",
    "Give three keywords for this text and explain each: {s}",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_SENTENCE_CHARS, MAX_SENTENCE_CHARS = 40, 320


@dataclass(frozen=True)
class TokenSet:
    """Distillation pairs, one per scored position.

    hidden: [N, D] the hidden state after layer c (the exit head's input)
    final: [N, D] the full model's last hidden state, before its final norm (the teacher's head input)
    """

    hidden: torch.Tensor
    final: torch.Tensor

    def __post_init__(self) -> None:
        if self.hidden.shape != self.final.shape or self.hidden.dim() != 2:
            raise ValueError(f"hidden {list(self.hidden.shape)} and final {list(self.final.shape)} must be [N, D]")

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @staticmethod
    def concat(parts: Sequence[TokenSet]) -> TokenSet:
        """The pairs of all `parts`, in order."""
        return TokenSet(torch.cat([p.hidden for p in parts]), torch.cat([p.final for p in parts]))


def split_text(text: str, heldout: float) -> tuple[str, str]:
    """`text` cut at a line break into a training part and the last `heldout` fraction (0..1) for evaluation."""
    if not 0 <= heldout < 1:
        raise ConfigError(f"held-out fraction must be in [0, 1), got {heldout}")
    cut = int(len(text) * (1 - heldout))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def text_windows(tokenizer: Any, text: str, window: int) -> list[list[int]]:
    """The tokens of `text` in disjoint windows of `window` tokens (a shorter last one if >= window / 4)."""
    if window < 2:
        raise ConfigError(f"window must be >= 2 tokens, got {window}")
    ids = list(tokenizer(text)["input_ids"])
    rows = [ids[i : i + window] for i in range(0, len(ids), window)]
    return [row for row in rows if len(row) >= max(2, window // 4)]


def sentences(text: str) -> list[str]:
    """The sentences of `text` of a prompt's length, line breaks joined."""
    flat = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(flat) if MIN_SENTENCE_CHARS <= len(s) <= MAX_SENTENCE_CHARS]


def chat_prompts(text: str, count: int, seed: int) -> list[str]:
    """`count` chat requests about sentences of `text`: distinct (sentence, template) pairs in an order drawn with
    `seed` (pairs repeat only when `count` exceeds them)."""
    pairs = list(itertools.product(sentences(text), PROMPT_TEMPLATES))
    if count and not pairs:
        raise ConfigError(f"no sentence of {MIN_SENTENCE_CHARS}..{MAX_SENTENCE_CHARS} characters to make prompts from")
    random.Random(seed).shuffle(pairs)
    return [template.format(s=sentence) for sentence, template in itertools.islice(itertools.cycle(pairs), count)]


def greedy_answers(
    stages: Sequence[Stage],
    prompts: Sequence[list[int]],
    generation: GenerationConfig,
    pad_id: int,
    batch_size: int,
    on_batch: OnBatch | None = None,
) -> list[list[int]]:
    """Each prompt's greedy continuation (its stop token kept, if one came), batch by batch, through `stages`."""
    if generation.sampling != SamplingConfig(greedy=True):
        raise ConfigError("self-distillation answers are greedy")
    answers: list[list[int]] = []
    total = -(-len(prompts) // batch_size)
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        ids, mask = pad_prompts(prompts[start : start + batch_size], pad_id)  # [B, S] left-padded
        answers += Generator(local_pipeline(stages), generation).run(ids, mask).new_tokens
        if on_batch is not None:
            on_batch(index + 1, total)
    return answers


def chat_rows(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """The prompts as chat turns (the model's template, ready for the assistant's answer)."""
    return [encode_prompt(tokenizer, prompt, chat=True) for prompt in prompts]


@torch.no_grad()
def teacher_pass(
    lower: Stage,
    upper: Stage,
    rows: Sequence[list[int]],
    score_from: Sequence[int],
    batch_size: int = 8,
    on_batch: OnBatch | None = None,
) -> TokenSet:
    """Run token rows through the model, split at layer c into `lower` ([0, c) + embed) and `upper` ([c, L)),
    and keep the scored positions of row i, `score_from[i]` to its last.

    Rows go right-padded in batches of similar length: under the causal mask no real token sees the padding.
    """
    if len(rows) != len(score_from):
        raise ValueError(f"{len(rows)} rows, {len(score_from)} score_from")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    hidden: list[torch.Tensor] = []
    final: list[torch.Tensor] = []
    total = -(-len(rows) // batch_size)
    for index, start in enumerate(range(0, len(rows), batch_size)):
        chunk = order[start : start + batch_size]
        width = max(len(rows[i]) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        keep = torch.zeros(len(chunk), width, dtype=torch.bool)
        for b, i in enumerate(chunk):
            ids[b, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
            keep[b, score_from[i] : len(rows[i])] = True
        positions = torch.arange(width).expand(len(chunk), -1)  # [B, S]
        h = lower(ids, positions)  # [B, S, D]
        out = upper(h, positions)  # [B, S, D]
        hidden.append(h[keep].float())
        final.append(out[keep].float())
        if on_batch is not None:
            on_batch(index + 1, total)
    return TokenSet(torch.cat(hidden), torch.cat(final))
