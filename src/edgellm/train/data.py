"""Training data: token ids with loss labels, datasets over text or instruction files, and deterministic batches.

Labels follow transformers' causal-LM convention: `labels[b, t]` is the token at position t when predicting it
counts for the loss, else -100, and the loss is `CE(logits[:, :-1], labels[:, 1:])`. Batches are padded on the
right, so under a causal mask no real token ever attends to padding and positions are plain 0..S-1.

`batch_for_step` depends only on (dataset, seed, step, client, clients): a resumed run, or a client of a
federated run, sees exactly the batches it would have seen without the interruption.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from edgellm.errors import ConfigError
from edgellm.model.prompt import encode_prompt
from edgellm.train.tasks import Example

IGNORE = -100  # the label of a position that carries no loss (transformers' and torch's ignore_index)


@dataclass(frozen=True)
class Batch:
    """A right-padded batch.

    ids: [B, S] int64; labels: [B, S] int64 (IGNORE = no loss); token_mask: [B, S] bool (False = padding)
    """

    ids: torch.Tensor
    labels: torch.Tensor
    token_mask: torch.Tensor

    @property
    def label_tokens(self) -> int:
        """How many targets the loss uses (the labels after the shift: `labels[:, 1:] != IGNORE`)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each position's prediction of the next labelled token.

    logits: [B, S, V], labels: [B, S] int64 -> scalar ("mean" over the label tokens, or "sum")
    """
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction=reduction
    )


def eos_id(tokenizer: Any) -> int:
    """The tokenizer's end-of-sequence id (`<|im_end|>` for ChatML models), which ends every response.

    Raises:
        ConfigError: the tokenizer has none.
    """
    value = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(value, int):
        raise ConfigError("the tokenizer has no end-of-sequence token; cannot mark where a response ends")
    return value


def prompt_ids(tokenizer: Any, prompt: str, chat: bool = True) -> list[int]:
    """The ids a response is generated after: exactly the prefix `encode_example` trains on."""
    return encode_prompt(tokenizer, prompt, chat)


def encode_example(tokenizer: Any, example: Example, chat: bool = True) -> tuple[list[int], list[int]]:
    """Ids and labels of one example: the prompt (as one chat turn) carries no loss; the response and EOS do.

    Raises:
        ConfigError: the response is empty, or the tokenizer has no EOS token.
    """
    head = prompt_ids(tokenizer, example.prompt, chat)
    response = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    if not response:
        raise ConfigError(f"empty response for prompt {example.prompt[:40]!r}")
    tail = [*response, eos_id(tokenizer)]
    return head + tail, [IGNORE] * len(head) + tail


class Dataset(Protocol):
    """Token sequences with their labels, by index."""

    def __len__(self) -> int: ...

    def item(self, i: int) -> tuple[list[int], list[int]]: ...


@dataclass(frozen=True)
class TextDataset:
    """Plain text cut into consecutive chunks of `seq_len` tokens (the last may be shorter); every token is a label."""

    chunks: tuple[tuple[int, ...], ...]

    @classmethod
    def from_ids(cls, ids: Sequence[int], seq_len: int) -> TextDataset:
        """Chunks of `ids`; a last chunk under 2 tokens (nothing to predict) is dropped."""
        check_seq_len(seq_len)
        chunks = [tuple(ids[i : i + seq_len]) for i in range(0, len(ids), seq_len)]
        return cls(tuple(c for c in chunks if len(c) >= 2))

    @classmethod
    def from_file(cls, path: Path, tokenizer: Any, seq_len: int) -> TextDataset:
        """The UTF-8 text of `path`, tokenized and chunked.

        Raises:
            ConfigError: the file is missing, unreadable, or holds fewer than 2 tokens.
        """
        text = read_data(path)
        dataset = cls.from_ids(tokenizer(text)["input_ids"], seq_len)
        if not dataset.chunks:
            raise ConfigError(f"text file {path} has fewer than 2 tokens")
        return dataset

    def __len__(self) -> int:
        return len(self.chunks)

    def item(self, i: int) -> tuple[list[int], list[int]]:
        return list(self.chunks[i]), list(self.chunks[i])


@dataclass(frozen=True)
class InstructionDataset:
    """Prompt/response pairs encoded with `encode_example`, cut to at most `seq_len` tokens."""

    rows: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]

    @classmethod
    def from_examples(
        cls, examples: Sequence[Example], tokenizer: Any, seq_len: int, chat: bool = True
    ) -> InstructionDataset:
        """Encode `examples`.

        Raises:
            ConfigError: no examples, or an example keeps no response token within `seq_len`.
        """
        if not examples:
            raise ConfigError("no examples to train on")
        return cls(tuple(fit_example(tokenizer, e, seq_len, chat, f"example {i}") for i, e in enumerate(examples)))

    @classmethod
    def from_jsonl(cls, path: Path, tokenizer: Any, seq_len: int, chat: bool = True) -> InstructionDataset:
        """One `{"prompt": str, "response": str}` object per line (blank lines skipped).

        Raises:
            ConfigError: the file is missing or empty; a line is not such an object, or keeps no response token
                within `seq_len` (the message names file:line).
        """
        check_seq_len(seq_len)
        rows = []
        for number, line in enumerate(read_data(path).splitlines(), start=1):
            if line.strip():
                where = f"{path}:{number}"
                rows.append(fit_example(tokenizer, parse_example(line, where), seq_len, chat, where))
        return cls(tuple(rows))

    def __len__(self) -> int:
        return len(self.rows)

    def item(self, i: int) -> tuple[list[int], list[int]]:
        ids, labels = self.rows[i]
        return list(ids), list(labels)


def parse_example(line: str, where: str) -> Example:
    """One JSONL line as an Example. Raises ConfigError naming `where` (file:line) and the problem."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ConfigError(f'{where}: expected an object with "prompt" and "response", got {type(record).__name__}')
    missing = [key for key in ("prompt", "response") if key not in record]
    if missing:
        raise ConfigError(f"{where}: missing {' and '.join(repr(k) for k in missing)}")
    extra = sorted(set(record) - {"prompt", "response"})
    if extra:
        raise ConfigError(f"{where}: unknown fields {extra}; expected only 'prompt' and 'response'")
    for key in ("prompt", "response"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise ConfigError(f"{where}: {key!r} must be a non-empty string")
    return Example(record["prompt"], record["response"])


def fit_example(
    tokenizer: Any, example: Example, seq_len: int, chat: bool, where: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Encode an example and cut it to `seq_len` tokens from the right (the prompt's start is kept).

    Raises:
        ConfigError: no response token is left to learn (the message names `where`).
    """
    check_seq_len(seq_len)
    try:
        ids, labels = encode_example(tokenizer, example, chat)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if all(label == IGNORE for label in labels[1:seq_len]):
        prompt_len = labels.count(IGNORE)
        raise ConfigError(
            f"{where}: the prompt takes {prompt_len} tokens, leaving none of the {seq_len} for the response; "
            "raise the sequence length or shorten the prompt"
        )
    return tuple(ids[:seq_len]), tuple(labels[:seq_len])


def check_seq_len(seq_len: int) -> None:
    """Raises ConfigError unless `seq_len >= 2` (one token in, one to predict)."""
    if seq_len < 2:
        raise ConfigError(f"sequence length must be >= 2, got {seq_len}")


def read_data(path: Path) -> str:
    """The UTF-8 text of a data file. Raises ConfigError if it is missing, unreadable or blank."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"data file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read data file {path}: {exc}") from None
    if not text.strip():
        raise ConfigError(f"data file {path} is empty")
    return text


def load_data(path: Path, tokenizer: Any, seq_len: int, chat: bool = True) -> Dataset:
    """An InstructionDataset for a `.jsonl` file, else a TextDataset of the file's text.

    Raises:
        ConfigError: the file is missing, empty or malformed.
    """
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return InstructionDataset.from_jsonl(path, tokenizer, seq_len, chat)
    return TextDataset.from_file(path, tokenizer, seq_len)


def epoch_order(size: int, seed: int, client: int, clients: int, epoch: int) -> list[int]:
    """A seeded permutation of `range(size)`: the order of one client's shard in one epoch."""
    order = list(range(size))
    random.Random(f"{seed}/{clients}/{client}/{epoch}").shuffle(order)  # str seeds hash stably (sha512)
    return order


def batch_for_step(
    dataset: Dataset, step: int, batch_size: int, seed: int, pad_id: int, client: int = 0, clients: int = 1
) -> Batch:
    """The batch of training step `step` for `client`, drawn from its shard (indices `i % clients == client`).

    The shard is walked in epochs, each a seeded permutation; a batch may straddle two epochs.

    Raises:
        ConfigError: a bad step, batch size or client index, or the client's shard is empty.
    """
    if step < 0:
        raise ConfigError(f"step must be >= 0, got {step}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if not 0 <= client < clients:
        raise ConfigError(f"client must be in 0..{clients - 1}, got {client}")
    shard = range(client, len(dataset), clients)
    if not shard:
        raise ConfigError(f"client {client} of {clients} gets no data: the dataset has only {len(dataset)} items")
    orders: dict[int, list[int]] = {}
    rows = []
    for slot in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(slot, len(shard))
        if epoch not in orders:
            orders[epoch] = epoch_order(len(shard), seed, client, clients, epoch)
        rows.append(dataset.item(shard[orders[epoch][offset]]))
    return pad_right(rows, pad_id)


def pad_right(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> Batch:
    """Right-pad (ids, labels) rows into a Batch; padding gets `pad_id` and label IGNORE."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (row_ids, row_labels) in enumerate(rows):
        ids[row, : len(row_ids)] = torch.tensor(list(row_ids), dtype=torch.long)
        labels[row, : len(row_labels)] = torch.tensor(list(row_labels), dtype=torch.long)
        mask[row, : len(row_ids)] = True
    return Batch(ids, labels, mask)
