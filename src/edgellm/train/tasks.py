"""Built-in fine-tuning tasks: seeded generators of short (prompt, response) pairs with one right answer each.

Every task states its target format in the prompt, so the answer is fully determined, and exact match is a fair
score. The train and eval splits are disjoint by construction: a prompt belongs to one split only, decided by a
hash of its text, whatever the seed; so a model trained on any seed's train split is never scored on a prompt it
saw.

Besides these generated tasks, the real tasks of `edgellm.train.real_tasks` (WordNet antonyms, Shakespeare's
plays) are registered here too: fixed pools of items read from files edgellm ships, split the same way.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from edgellm.errors import ConfigError
from edgellm.train import real_tasks

SPLITS = ("train", "eval")
EVAL_PERCENT = 20  # share of the prompt space that belongs to the eval split
DEFAULT_TASK = "dates"


@dataclass(frozen=True)
class Example:
    """One prompt and the one response that is right for it."""

    prompt: str
    response: str


def exact_match(prediction: str, reference: str) -> bool:
    """True when the prediction equals the reference after stripping surrounding whitespace."""
    return prediction.strip() == reference.strip()


@dataclass(frozen=True)
class Task:
    """A named task: generated (`make(rng)` draws one example, a pure function of the generator's state) or real
    (`pool(split)` lists every example of a split, from shipped data); `match(prediction, reference)` scores it.

    Raises:
        ValueError: not exactly one of `make` and `pool` (a bug in the registry).
    """

    name: str
    description: str
    make: Callable[[random.Random], Example] | None = None
    pool: Callable[[str], list[Example]] | None = None
    match: Callable[[str, str], bool] = exact_match

    def __post_init__(self) -> None:
        if (self.make is None) == (self.pool is None):
            raise ValueError(f"task {self.name!r}: give exactly one of make and pool")


MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # no Feb 29: every drawn date exists


def make_date(rng: random.Random) -> Example:
    """`Convert March 5, 2021 to YYYY-MM-DD format.` -> `2021-03-05`; also written `5 March 2021`."""
    year = rng.randint(1950, 2049)
    month = rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    name = MONTHS[month - 1]
    written = f"{name} {day}, {year}" if rng.random() < 0.5 else f"{day} {name} {year}"
    return Example(f"Convert {written} to YYYY-MM-DD format.", f"{year:04d}-{month:02d}-{day:02d}")


FIRST_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Maya", "Noor")
CITIES = ("Paris", "Lagos", "Lima", "Oslo", "Pune", "Quito", "Rome", "Seoul", "Tunis", "Vienna", "Kyoto", "Cairo")
RECORD_FIELDS = ("name", "age", "city")


def make_record(rng: random.Random) -> Example:
    """`Write as CSV (name,age,city): city=Lima; name=Ana; age=31` -> `Ana,31,Lima` (fields in shuffled order)."""
    values = {"name": rng.choice(FIRST_NAMES), "age": str(rng.randint(18, 90)), "city": rng.choice(CITIES)}
    order = list(RECORD_FIELDS)
    rng.shuffle(order)
    pairs = "; ".join(f"{key}={values[key]}" for key in order)
    return Example(f"Write as CSV ({','.join(RECORD_FIELDS)}): {pairs}", ",".join(values[k] for k in RECORD_FIELDS))


SORT_LENGTHS = (4, 9)  # shortest and longest list: short ones are learned fast, long ones are not


def make_sort(rng: random.Random) -> Example:
    """`Sort from smallest to largest: 47 12 85 33` -> `12 33 47 85` (4 to 9 distinct two-digit numbers).

    Harder than `dates` and `records`, which only move and reformat what the prompt holds: every position of
    the answer depends on comparing all the numbers, and one slip anywhere fails the exact match. The list
    length varies, so the score rises gradually with what a model has learned instead of jumping to 1.0.
    """
    values = rng.sample(range(10, 100), rng.randint(*SORT_LENGTHS))
    return Example(f"Sort from smallest to largest: {' '.join(map(str, values))}", " ".join(map(str, sorted(values))))


GENERATED_TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("dates", "rewrite a written date (March 5, 2021 / 5 March 2021) as YYYY-MM-DD", make_date),
        Task("records", "reorder a key=value record into a fixed CSV row (name,age,city)", make_record),
        Task("sort", "sort 4 to 9 distinct two-digit numbers from smallest to largest", make_sort),
    )
}


def real_pool(name: str) -> Callable[[str], list[Example]]:
    """The `pool` of real task `name`: its examples of a split, read from the shipped file on first use."""
    return lambda split: [Example(p, r) for p, r in real_tasks.real_examples(name, split)]


TASKS: dict[str, Task] = {
    **GENERATED_TASKS,
    **{
        name: Task(name, spec.description, pool=real_pool(name), match=real_tasks.answer_match)
        for name, spec in real_tasks.REAL_TASKS.items()
    },
}


def get_task(name: str) -> Task:
    """The registered task `name`.

    Raises:
        ConfigError: no task of that name.
    """
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]


def split_of(prompt: str) -> str:
    """The split a prompt belongs to: "eval" for a fixed EVAL_PERCENT of all prompts (by hash), else "train"."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 100
    return "eval" if bucket < EVAL_PERCENT else "train"


def task_examples(name: str, n: int, seed: int, split: str) -> list[Example]:
    """`n` distinct examples of task `name` from `split`, the same for the same (name, n, seed, split).

    The first k examples for a larger `n` are the examples for `n = k`.

    Raises:
        ConfigError: unknown task or split, `n < 1`, or the task cannot produce `n` distinct examples of the split.
    """
    task = get_task(name)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    if n < 1:
        raise ConfigError(f"the number of examples must be >= 1, got {n}")
    rng = random.Random(f"{name}/{seed}")  # the same stream for both splits: the hash does the partition
    if task.pool is not None:
        return pool_examples(name, task.pool(split), n, rng, split)
    assert task.make is not None  # Task.__post_init__: one of the two
    seen: set[str] = set()
    out: list[Example] = []
    for _ in range(50 * n + 1000):
        example = task.make(rng)
        if example.prompt in seen or split_of(example.prompt) != split:
            continue
        seen.add(example.prompt)
        out.append(example)
        if len(out) == n:
            return out
    raise ConfigError(f"task {name!r} could not produce {n} distinct {split} examples (got {len(out)})")


def pool_examples(name: str, pool: list[Example], n: int, rng: random.Random, split: str) -> list[Example]:
    """The first `n` of `pool` shuffled by `rng`: a prefix for a smaller `n`, as for generated tasks.

    Raises:
        ConfigError: the split holds fewer than `n` examples.
    """
    if n > len(pool):
        raise ConfigError(f"task {name!r} has {len(pool)} {split} examples; asked for {n} (lower --n/--task-examples)")
    order = list(pool)
    rng.shuffle(order)
    return order[:n]
