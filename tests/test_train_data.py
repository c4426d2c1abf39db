"""Fine-tuning data: tasks are seeded with disjoint splits, labels cover exactly the response and EOS, JSONL errors
name file:line, batches are a pure function of (seed, step, client) with disjoint client shards, and
`edgellm eval task` runs end to end. Encoding and `eval task` run on the tiny chat model's tokenizer (trained in
process) and again on the real model's (marked `real_model`)."""

from __future__ import annotations

import json

import pytest
import torch

from edgellm.cli.main import main
from edgellm.errors import ConfigError
from edgellm.train.data import (
    IGNORE,
    Batch,
    InstructionDataset,
    TextDataset,
    batch_for_step,
    causal_lm_loss,
    encode_example,
    load_data,
    pad_right,
    prompt_ids,
)
from edgellm.train.tasks import TASKS, Example, exact_match, split_of, task_examples

TOKENIZERS = ["tiny", pytest.param("real", marks=pytest.mark.real_model)]


@pytest.fixture(scope="module", params=TOKENIZERS)
def tokenizer(request):
    """The tiny chat model's tokenizer, and (marked `real_model`) the real model's."""
    from edgellm.store.weights import load_tokenizer

    return load_tokenizer(request.getfixturevalue("tiny_chat_dir" if request.param == "tiny" else "real_model_dir"))


@pytest.fixture(scope="module")
def real_tokenizer(real_model_dir):
    from edgellm.store.weights import load_tokenizer

    return load_tokenizer(real_model_dir)


class ListDataset:
    """Item i is ([i, i, i], [i, i, i]) repeated `i % 3 + 2` times, so rows differ in length and content."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def item(self, i: int) -> tuple[list[int], list[int]]:
        return [i] * (i % 3 + 2), [i] * (i % 3 + 2)


# --- tasks ---


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_seeded_and_splits_disjoint(name):
    train = task_examples(name, 300, 0, "train")
    assert train == task_examples(name, 300, 0, "train")
    assert task_examples(name, 50, 0, "train") == train[:50]  # a prefix, whatever n
    assert task_examples(name, 50, 1, "train") != train[:50]
    evals = task_examples(name, 100, 0, "eval") + task_examples(name, 100, 7, "eval")
    assert len({e.prompt for e in train}) == 300  # distinct within a split
    assert not {e.prompt for e in train} & {e.prompt for e in evals}  # disjoint across splits and seeds
    assert all(split_of(e.prompt) == "eval" for e in evals)
    assert all(e.response and e.response == e.response.strip() for e in train)


def test_dates_task_answers_are_the_iso_date():
    for example in task_examples("dates", 200, 3, "train"):
        year, month, day = example.response.split("-")
        assert len(year) == 4 and len(month) == 2 and len(day) == 2
        assert "YYYY-MM-DD" in example.prompt and year in example.prompt and str(int(day)) in example.prompt


def test_unknown_task_or_split_lists_the_choices():
    with pytest.raises(ConfigError, match=r"unknown task 'nope'; choose from \['antonyms', 'dates'"):
        task_examples("nope", 5, 0, "train")
    with pytest.raises(ConfigError, match=r"unknown split 'test'; choose from \['train', 'eval'\]"):
        task_examples("dates", 5, 0, "test")


@pytest.mark.parametrize(
    ("prediction", "reference", "want"),
    [
        ("2021-03-05", "2021-03-05", True),
        ("  2021-03-05\n", "2021-03-05", True),
        ("2021-03-05.", "2021-03-05", False),
        ("2021-3-5", "2021-03-05", False),
        ("2021-03-05 is the date", "2021-03-05", False),
        ("", "2021-03-05", False),
    ],
)
def test_exact_match(prediction, reference, want):
    assert exact_match(prediction, reference) is want


# --- encoding ---


def test_labels_cover_the_response_and_eos_only(tokenizer):
    example = Example("Convert March 5, 2021 to YYYY-MM-DD format.", "2021-03-05")
    ids, labels = encode_example(tokenizer, example)
    head = prompt_ids(tokenizer, example.prompt)
    assert ids[: len(head)] == head and len(ids) == len(labels) > len(head)
    assert labels[: len(head)] == [IGNORE] * len(head)
    assert labels[len(head) :] == ids[len(head) :]
    assert ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ids[len(head) : -1]) == "2021-03-05"
    assert tokenizer.decode(head).endswith("<|im_start|>assistant\n")
    batch = pad_right([(ids, labels)], 0)
    assert batch.label_tokens == len(ids) - len(head)  # response tokens + EOS


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_answers_survive_the_tokenizer_so_exact_match_can_score_them(tokenizer, name):
    for example in task_examples(name, 100, 0, "eval"):
        ids, _ = encode_example(tokenizer, example)
        head = prompt_ids(tokenizer, example.prompt)
        assert example.prompt in tokenizer.decode(head)
        answer = tokenizer.decode(ids[len(head) :], skip_special_tokens=True)  # what `eval task` decodes
        assert exact_match(answer, example.response), (answer, example.response)
        cut = tokenizer.decode(ids[len(head) : -2], skip_special_tokens=True)  # one answer token short
        assert not exact_match(cut, example.response)


def test_jsonl_errors_name_file_and_line(tokenizer, tmp_path):
    good = json.dumps({"prompt": "Say hi.", "response": "hi"})
    cases = {
        "not json": "not valid JSON",
        "[1, 2]": "expected an object",
        json.dumps({"prompt": "x"}): "missing 'response'",
        json.dumps({"prompt": "x", "response": "y", "extra": 1}): "unknown fields",
        json.dumps({"prompt": "x", "response": 3}): "'response' must be a non-empty string",
    }
    for line, problem in cases.items():
        path = tmp_path / "data.jsonl"
        path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=rf"data\.jsonl:3: {problem}"):
            InstructionDataset.from_jsonl(path, tokenizer, 64)
    with pytest.raises(ConfigError, match="does not exist"):
        load_data(tmp_path / "missing.jsonl", tokenizer, 64)
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty"):
        load_data(tmp_path / "empty.txt", tokenizer, 64)


def test_long_examples_are_cut_from_the_right_or_refused(tokenizer, tmp_path):
    example = Example("Convert March 5, 2021 to YYYY-MM-DD format.", "2021-03-05")
    ids, labels = encode_example(tokenizer, example)
    head = len(prompt_ids(tokenizer, example.prompt))
    cut = InstructionDataset.from_examples([example], tokenizer, head + 3)
    assert cut.item(0) == (ids[: head + 3], labels[: head + 3])
    with pytest.raises(ConfigError, match=f"example 0: the prompt takes {head} tokens"):
        InstructionDataset.from_examples([example], tokenizer, head)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": example.prompt, "response": example.response}) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"long\.jsonl:1: the prompt takes"):
        InstructionDataset.from_jsonl(path, tokenizer, head)
    assert len(load_data(path, tokenizer, 64)) == 1


def test_text_dataset_chunks_consecutive_tokens(tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    dataset = load_data(path, tokenizer, 16)
    assert isinstance(dataset, TextDataset)
    all_ids = tokenizer(path.read_text(encoding="utf-8"))["input_ids"]
    joined = [t for i in range(len(dataset)) for t in dataset.item(i)[0]]
    assert joined == all_ids and all(len(dataset.item(i)[0]) == 16 for i in range(len(dataset) - 1))
    assert dataset.item(0)[0] == dataset.item(0)[1]


# --- batches ---


def test_batches_are_a_pure_function_of_seed_step_and_client():
    data = ListDataset(23)
    a = batch_for_step(data, 5, 4, seed=1, pad_id=-1)
    b = batch_for_step(data, 5, 4, seed=1, pad_id=-1)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels) and torch.equal(a.token_mask, b.token_mask)
    assert not torch.equal(batch_for_step(data, 5, 4, seed=2, pad_id=-1).ids, a.ids)
    # every epoch visits each item once: 23 items in batches of 4 straddle epochs
    seen = [int(row[0]) for step in range(23) for row in batch_for_step(data, step, 4, 1, -1).ids]
    for epoch in range(4):
        assert sorted(seen[23 * epoch : 23 * (epoch + 1)]) == list(range(23))
    assert seen[:23] != seen[23:46]  # a fresh permutation each epoch


def test_client_shards_are_disjoint_and_cover_the_data():
    data = ListDataset(30)
    shards = [
        {int(row[0]) for step in range(10) for row in batch_for_step(data, step, 5, 0, -1, c, 3).ids} for c in range(3)
    ]
    assert shards == [set(range(c, 30, 3)) for c in range(3)]
    with pytest.raises(ConfigError, match="client 3 of 4 gets no data"):
        batch_for_step(ListDataset(3), 0, 2, 0, -1, client=3, clients=4)
    with pytest.raises(ConfigError, match="client must be in 0..1"):
        batch_for_step(data, 0, 2, 0, -1, client=2, clients=2)


def test_padding_is_on_the_right_without_labels():
    batch = pad_right([([5, 6, 7], [IGNORE, 6, 7]), ([8], [8])], pad_id=0)
    assert batch.ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.labels.tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch.token_mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.ids.dtype == batch.labels.dtype == torch.long and batch.token_mask.dtype == torch.bool
    assert batch.label_tokens == 2  # the first column is never a target


def test_loss_uses_the_shifted_labels_only():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 10)
    batch = Batch(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, IGNORE, 3, 4]]), torch.ones(1, 4, dtype=torch.bool))
    want = torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([3, 4]))
    assert batch.label_tokens == 2
    torch.testing.assert_close(causal_lm_loss(logits, batch.labels), want)


# --- eval task, end to end ---


@pytest.mark.parametrize("model", TOKENIZERS)
def test_eval_task_json_end_to_end(model, request, tmp_path, monkeypatch, capsys):
    if model == "tiny":  # the tiny chat model, named by its folder
        monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
        where = ["--model", str(request.getfixturevalue("tiny_chat_dir"))]
    else:  # the default model, from the cache
        monkeypatch.setenv("EDGELLM_HOME", str(request.getfixturevalue("real_model_dir").parent.parent))
        where = []
    argv = ["eval", "task", "--task", "dates", "--n", "8", "--batch-size", "4", "--max-new-tokens", "6", "--json"]
    assert main([*argv, *where, "--threads", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["task"] == "dates" and report["n"] == 8 and report["adapter"] is None
    assert 0 <= report["correct"] <= 8 and report["exact_match"] == pytest.approx(report["correct"] / 8)
    assert report["eval_loss"] > 0 and report["label_tokens"] >= 8 * 11  # >= 10 digits/dashes + EOS each
    references = [e.response for e in task_examples("dates", 8, 0, "eval")]
    assert [s["reference"] for s in report["samples"]] == references[: len(report["samples"])]
    assert report["samples"] and all(
        s["correct"] == exact_match(s["prediction"], s["reference"]) for s in report["samples"]
    )


def test_eval_task_refuses_bad_input_before_loading(capsys):
    assert main(["eval", "task", "--n", "0", "--model", "/nonexistent"]) == 2
    assert "--n must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "task", "--task", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.real_model
def test_eval_task_with_a_peft_adapter_scores_the_adapted_model(
    real_model_dir, real_tokenizer, tmp_path, monkeypatch, capsys
):
    peft = pytest.importorskip("peft")
    from conftest import reference_model

    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(reference_model(real_model_dir), config)
    model.save_pretrained(tmp_path / "adapter")
    batch = pad_right([encode_example(real_tokenizer, e) for e in task_examples("dates", 4, 0, "eval")], 0)
    with torch.no_grad():
        adapted = float(causal_lm_loss(model(input_ids=batch.ids).logits, batch.labels))
        with model.disable_adapter():
            base = float(causal_lm_loss(model(input_ids=batch.ids).logits, batch.labels))
    assert abs(adapted - base) > 0.05  # the adapter changes the model, so the comparison below can fail

    monkeypatch.setenv("EDGELLM_HOME", str(real_model_dir.parent.parent))
    argv = ["eval", "task", "--n", "4", "--max-new-tokens", "2", "--threads", "2", "--json"]
    assert main([*argv, "--adapter", str(tmp_path / "adapter")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter"] == str(tmp_path / "adapter")
    assert report["eval_loss"] == pytest.approx(adapted, abs=2e-4)
    assert main([*argv, "--adapter", str(tmp_path / "missing")]) == 2
    assert "adapter directory" in capsys.readouterr().err
