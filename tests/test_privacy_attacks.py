"""The attack harness of issue 16: metrics on hand-made cases, label recovery on a tiny model's real split
fine-tuning gradient, the attacks against the real model at cut 1 (the attack works; noise defeats it), and
`edgellm eval privacy --json` on a tiny chat model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgellm.cli.main import main
from edgellm.errors import ConfigError
from edgellm.eval.privacy_engine import PrivacyConfig, epsilon
from edgellm.eval.privacy_model import load_cut_model, states_of
from edgellm.eval.privacy_traffic import split_training, train_steps
from edgellm.lora.config import LoraSpec
from edgellm.privacy.attacks import (
    label_directions,
    nearest_neighbour,
    recover_labels,
    recovery_rate,
    rouge_l,
    token_references,
    words,
)
from edgellm.privacy.attacks.metrics import lcs_length
from edgellm.privacy.noise import GaussianRows, gaussian_rows
from edgellm.splitlearn.settings import OptimSpec
from edgellm.train.data import IGNORE, Batch

HELDOUT = Path(__file__).parent / "data" / "eb1911_shakespeare.txt"


def test_recovery_rate_counts_exact_positions():
    assert recovery_rate([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert recovery_rate(torch.tensor([5]), torch.tensor([6])) == 0.0
    assert recovery_rate([], []) == 0.0
    with pytest.raises(ValueError, match="3 predicted tokens for 2 targets"):
        recovery_rate([1, 2, 3], [1, 2])


def test_rouge_l_on_hand_made_cases():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook case
    ref = words("the cat sat on the mat")
    assert rouge_l(ref, ref) == 1.0
    assert rouge_l(words("dog"), ref) == 0.0
    # "the cat on the mat": LCS 5, precision 5/5, recall 5/6 -> F1 = 2 * 1 * 5/6 / (1 + 5/6) = 10/11
    assert rouge_l(words("the cat on the mat"), ref) == pytest.approx(10 / 11)
    # order matters (a subsequence, not a bag of words): reversed, the longest common one is "the sat the" (3 of 6)
    assert rouge_l(list(reversed(ref)), ref) == pytest.approx(0.5)
    assert rouge_l([], []) == 1.0 and rouge_l([], ref) == 0.0


def test_nearest_neighbour_names_rows_by_angle():
    table = torch.eye(4)  # [V=4, D=4]
    rows = torch.tensor([[0.0, 5.0, 0.1, 0.0], [0.0, 0.0, 0.0, -1.0], [3.0, 0.0, 0.0, 0.2]])
    assert nearest_neighbour(rows, table).tolist() == [1, 0, 0]  # row 2 is most like token 0 (tie-break: first)


def tiny_batch(vocab: int) -> Batch:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, vocab, (4, 12), generator=gen)
    labels = ids.clone()
    labels[:, :5] = IGNORE  # a prompt without loss, as the tasks have
    return Batch(ids, labels, torch.ones(4, 12, dtype=torch.bool))


def test_label_recovery_from_a_real_split_training_gradient(tiny_llama_dir):
    """The gradient the device returns (recorded on the wire of a real split step) names the answer tokens."""
    run = split_training(tiny_llama_dir, 2, LoraSpec(r=4, alpha=8.0), OptimSpec(), None)
    model = load_cut_model(tiny_llama_dir, (2,))
    batch = tiny_batch(int(model.embedding.shape[0]))
    train_steps(run, [batch])
    (grad,) = run.tap.sent_grads  # [B, S, D]: what the last server receives
    targets = batch.labels[:, 1:] != IGNORE
    assert float(grad[:, :-1][~targets].abs().max()) == 0.0  # unlabelled positions carry no gradient
    directions = label_directions(model.head_matrix, model.norm_scale)
    got = recover_labels(grad[:, :-1][targets], directions)
    rate = recovery_rate(got, batch.labels[:, 1:][targets])
    assert rate > 0.8, rate
    # a random guess gets ~1%: shuffling the gradient rows against the labels must break it
    assert recovery_rate(got.roll(1), batch.labels[:, 1:][targets]) < 0.3


def test_epsilon_grows_with_rows_and_falls_with_noise():
    assert epsilon(0.0, 1, 1e-5) is None  # no defence
    one, many = epsilon(1.0, 1, 1e-5), epsilon(1.0, 16, 1e-5)
    assert one is not None and many is not None and 0 < one < many
    more_noise = epsilon(2.0, 16, 1e-5)
    assert more_noise is not None and more_noise < many


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cuts": ()}, "at least one cut"),
        ({"noise": (-1.0,)}, "--noise must be"),
        ({"clip": 0.0}, "--clip must be"),
        ({"attacks": ("nn", "magic")}, "unknown attack(s) ['magic']"),
        ({"task": "poetry"}, "unknown task 'poetry'"),
    ],
)
def test_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        PrivacyConfig(**kwargs)


@pytest.mark.real_model
def test_nearest_neighbour_recovers_most_tokens_at_cut_1_and_noise_defeats_it(real_model_dir):
    from edgellm.store.weights import load_tokenizer

    tokenizer = load_tokenizer(real_model_dir)
    model = load_cut_model(real_model_dir, (1,))
    ids, rows = states_of(model, tokenizer(HELDOUT.read_text())["input_ids"][:256], window=128)
    prefix = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    view = load_cut_model(real_model_dir, (1,))
    view.segments = view.segments[:1]  # only layer 0 is needed for the cut-1 table
    references = token_references(view.hidden_at_cuts, int(model.embedding.shape[0]), prefix)
    clean = recovery_rate(nearest_neighbour(rows[1], references[1]), ids)
    assert clean > 0.5, clean  # the attack works: most tokens come back at cut 1 with no defence
    bound = 2 * float(torch.linalg.vector_norm(rows[1], dim=-1).median())
    noised = gaussian_rows(rows[1], GaussianRows(bound, 0.5), torch.Generator().manual_seed(0))
    defended = recovery_rate(nearest_neighbour(noised, references[1]), ids)
    assert defended < clean / 4, (clean, defended)


def test_cli_json_on_a_tiny_chat_model(tiny_chat_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path))
    args = ["eval", "privacy", "--model", str(tiny_chat_dir), "--cuts", "1,2", "--noise", "0,1", "--tokens", "64",
            "--train-tokens", "600", "--window", "32", "--json", "--quiet"]  # fmt: skip
    code = main(args)
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)
    assert [(r["cut"], r["noise"]) for r in report["rows"]] == [(1, 0.0), (1, 1.0), (2, 0.0), (2, 1.0)]
    for row in report["rows"]:
        assert set(row["attacks"]) == {"nn", "learned", "optimize", "labels"}
        for score in row["attacks"].values():
            assert 0.0 <= score["recovery"] <= 1.0 and 0.0 <= score["rouge_l"] <= 1.0
        assert (row["epsilon_row"] is None) == (row["noise"] == 0)
    assert report["rows"][0]["ppl_increase_pct"] == 0.0  # no defence: the model's own perplexity
    assert set(report["row_norms"]) == {"1", "2"}


def test_the_shipped_attacker_text_does_not_contain_the_devices():
    from edgellm.eval.privacy_engine import HELDOUT_TEXT, PUBLIC_TEXTS, shared_run

    heldout = [ord(c) for c in HELDOUT_TEXT.read_text()]
    assert HELDOUT_TEXT.read_text() == HELDOUT.read_text()  # the tests' copy is the shipped one
    for path in PUBLIC_TEXTS:
        public = [ord(c) for c in path.read_text()]
        assert len(public) > 60_000
        assert shared_run(public, heldout, 80) is None, path  # not one 80-character run in common
    assert shared_run([1, 2, 3, 4, 5], [9, 3, 4, 5, 9], 3) == 1 and shared_run([1, 2, 3], [2, 3, 1], 3) is None


def test_cli_refuses_an_attacker_text_that_holds_the_devices(tiny_chat_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path))
    leaky = tmp_path / "leaky.txt"
    leaky.write_text("Some other words first.\n" + HELDOUT.read_text())
    args = ["eval", "privacy", "--model", str(tiny_chat_dir), "--cuts", "1", "--noise", "0", "--tokens", "64",
            "--train-tokens", "600", "--window", "32", "--public-text", str(leaky), "--quiet"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "contains the device's held-out text" in err and "leaky.txt" in err, err


def test_a_gradient_bound_must_be_positive():
    from edgellm.errors import ConfigError
    from edgellm.eval.privacy_engine import PrivacyConfig

    assert PrivacyConfig(grad_clip=2e-4).grad_clip == 2e-4
    with pytest.raises(ConfigError, match="--grad-clip"):
        PrivacyConfig(grad_clip=0.0)
