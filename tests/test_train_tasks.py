"""The `sort` task: seeded, hash-split like every task, answers are the prompt's numbers sorted, exact-match scored.

(The checks every task shares, seeding and split disjointness included, are in test_train_data.py; these are the
ones particular to `sort`, plus those shared checks run here on a larger sample.)
"""

from __future__ import annotations

from collections import Counter

from edgellm.train.tasks import SORT_LENGTHS, TASKS, exact_match, split_of, task_examples


def numbers(text: str) -> list[int]:
    return [int(x) for x in text.split()]


def test_sort_is_registered_for_the_cli():
    assert "sort" in TASKS and "sort" in TASKS["sort"].description


def test_sort_is_deterministic_per_seed_and_differs_across_seeds():
    first = task_examples("sort", 500, 0, "train")
    assert first == task_examples("sort", 500, 0, "train")
    assert task_examples("sort", 200, 0, "train") == first[:200]
    assert task_examples("sort", 200, 1, "train") != first[:200]


def test_sort_splits_are_disjoint_across_seeds():
    train = {e.prompt for seed in (0, 1, 2) for e in task_examples("sort", 1000, seed, "train")}
    evals = {e.prompt for seed in (0, 3) for e in task_examples("sort", 300, seed, "eval")}
    assert not train & evals
    assert all(split_of(p) == "eval" for p in evals) and all(split_of(p) == "train" for p in train)


def test_sort_answers_are_the_prompts_numbers_sorted():
    lengths: Counter[int] = Counter()
    for example in task_examples("sort", 400, 5, "eval"):
        head, _, listed = example.prompt.partition(": ")
        assert head == "Sort from smallest to largest"
        given = numbers(listed)
        assert numbers(example.response) == sorted(given)
        assert len(set(given)) == len(given) and all(10 <= x <= 99 for x in given)
        assert example.response == " ".join(map(str, sorted(given)))  # one spelling: exact match is fair
        lengths[len(given)] += 1
    assert sorted(lengths) == list(range(SORT_LENGTHS[0], SORT_LENGTHS[1] + 1))  # every length occurs


def test_sort_scoring_is_exact():
    example = task_examples("sort", 1, 0, "eval")[0]
    assert exact_match(f" {example.response}\n", example.response)
    given = numbers(example.prompt.partition(": ")[2])
    assert not exact_match(" ".join(map(str, given)), example.response) or given == sorted(given)
    assert not exact_match(", ".join(map(str, sorted(given))), example.response)  # another separator: wrong
    assert not exact_match(" ".join(map(str, sorted(given)[:-1])), example.response)  # one number missing
