"""The exit head of self-speculative drafting (edgellm.spec.exit_head) and its distillation (edgellm.spec.distill):
an untrained head is the model's own norm + head; the draft net decodes with a cache as it runs whole; training
lowers the KL and is reproducible; a saved head loads back equal and only onto a model of its shape; the CLI runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from edgellm.errors import ConfigError
from edgellm.model.stage import Stage, StageSpec
from edgellm.spec.distill import DistillConfig, fit_linear, score, train
from edgellm.spec.distill_data import TokenSet, teacher_pass
from edgellm.spec.exit_head import (
    ExitDraftNet,
    ExitHead,
    ExitMeta,
    load_exit_draft,
    load_exit_head,
    model_identity,
    save_exit_head,
)
from edgellm.split.one_process import load_stages
from edgellm.store.weights import load_config

ATOL = 1e-5
LAYER = 2  # of the tiny models' 4


def _stages(model_dir: Path, layer: int = LAYER) -> tuple[Stage, Stage, Stage]:
    """[0, c) + embed, [c, L), the head alone."""
    lower, upper, head = load_stages(model_dir, [StageSpec(0, layer, embed=True), StageSpec(layer, 4),
                                                 StageSpec(4, 4, head=True)])  # fmt: skip
    for stage in (lower, upper, head):
        stage.requires_grad_(False)
    return lower, upper, head


def _perturbed(exit_head: ExitHead, seed: int = 1) -> ExitHead:
    """The head with a nonzero `up` and a changed norm, so that the adapter acts (no test can pass vacuously)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        exit_head.up.weight.copy_(torch.randn(exit_head.up.weight.shape, generator=g) * 0.5)
        for p in exit_head.norm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return exit_head


def _ids(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(length).expand(batch, -1)


def test_untrained_exit_head_is_the_models_own_norm_and_head(tiny_llama_dir):
    lower, _, head = _stages(tiny_llama_dir)
    ids, positions = _ids(2, 9)
    with torch.no_grad():
        h = lower(ids, positions)  # [B, S, D] after layer c
        want = head(h, positions)
        exit_head = ExitHead(head, rank=4)
        torch.testing.assert_close(exit_head(h), want, atol=1e-6, rtol=0)
        assert not torch.allclose(_perturbed(exit_head)(h), want, atol=1e-2)  # the adapter does act


def test_draft_net_cached_decode_equals_one_pass(tiny_llama_dir):
    lower, _, head = _stages(tiny_llama_dir)
    net = ExitDraftNet(lower, _perturbed(ExitHead(head, rank=4)))
    ids, positions = _ids(1, 10)
    with torch.no_grad():
        whole = net(ids, positions)  # [1, S, V]
        cache = net.new_cache()
        steps = [net(ids[:, :4], positions[:, :4], cache)]  # a prompt, then one token at a time
        steps += [net(ids[:, i : i + 1], positions[:, i : i + 1], cache) for i in range(4, 10)]
        torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=ATOL, rtol=0)
        torch.testing.assert_close(net(ids, positions, last_only=True), whole[:, -1:], atol=ATOL, rtol=0)
    assert whole.dtype == torch.float32 and whole.shape == (1, 10, 97)
    assert net.label == net.describe() == f"exit@{LAYER} (rank 4)" and net.dtype == torch.float32


def test_draft_net_last_only_takes_each_rows_last_real_token(tiny_llama_dir):
    lower, _, head = _stages(tiny_llama_dir)
    net = ExitDraftNet(lower, _perturbed(ExitHead(head, rank=4)))
    ids, _ = _ids(2, 6)
    mask = torch.tensor([[False, False, True, True, True, True], [True] * 6])  # row 0 left-padded
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = net(ids, positions, token_mask=mask, last_only=True)  # [B, 1, V]
        alone = net(ids[:1, 2:], positions[:1, 2:])
    torch.testing.assert_close(got[0, 0], alone[0, -1], atol=ATOL, rtol=0)


def _windows(model_dir: Path, rows: int = 12, length: int = 24) -> tuple[Stage, TokenSet]:
    lower, upper, head = _stages(model_dir)
    ids, _ = _ids(rows, length, seed=3)
    return head, teacher_pass(lower, upper, ids.tolist(), [0] * rows, batch_size=5)


def test_training_lowers_the_kl_and_is_reproducible(tiny_llama_dir):
    head, data = _windows(tiny_llama_dir)
    assert len(data) == 12 * 24
    config = DistillConfig(steps=40, lr=3e-2, batch_tokens=64, top_k=16)
    exit_head = ExitHead(head, rank=8)
    before = score(exit_head, head, data)
    losses = train(exit_head, head, data, config)
    after = score(exit_head, head, data)
    assert after.kl < 0.7 * before.kl, (before, after)
    assert after.agreement >= before.agreement, (before, after)
    assert sum(losses[-5:]) < sum(losses[:5])

    again = ExitHead(head, rank=8)
    assert train(again, head, data, config) == losses  # same seed, same batches, same numbers
    for name, tensor in exit_head.trainable().items():
        torch.testing.assert_close(again.trainable()[name], tensor, atol=0, rtol=0)


def test_exact_kl_training_from_zero_also_lowers_the_kl(tiny_llama_dir):
    head, data = _windows(tiny_llama_dir, rows=4)
    exit_head = ExitHead(head, rank=4)
    before = score(exit_head, head, data)
    config = DistillConfig(steps=15, lr=1e-2, batch_tokens=32, top_k=0, temperature=2.0, ridge=None)
    train(exit_head, head, data, config)
    assert score(exit_head, head, data).kl < before.kl


def test_the_closed_form_start_alone_lowers_the_kl(tiny_llama_dir):
    head, data = _windows(tiny_llama_dir)
    exit_head = ExitHead(head, rank=16)
    before = score(exit_head, head, data)
    fit_linear(exit_head, data, ridge=1e-3)
    after = score(exit_head, head, data)
    assert after.kl < 0.8 * before.kl, (before, after)
    with pytest.raises(ConfigError, match="ridge must be > 0"):
        DistillConfig(ridge=0.0)


def _saved(model_dir: Path, path: Path, **model_changes) -> ExitHead:
    _, _, head = _stages(model_dir)
    exit_head = _perturbed(ExitHead(head, rank=4))
    identity = {**model_identity(model_dir, load_config(model_dir)), **model_changes}
    save_exit_head(exit_head, path, ExitMeta(identity, LAYER, 4, {"note": "test"}))
    return exit_head


def test_save_and_load_round_trip(tiny_llama_dir, tmp_path):
    path = tmp_path / "exit.safetensors"
    saved = _saved(tiny_llama_dir, path)
    _, _, head = _stages(tiny_llama_dir)
    loaded, meta = load_exit_head(path, head, model_identity(tiny_llama_dir, load_config(tiny_llama_dir)))
    assert (meta.layer, meta.rank, meta.stats) == (LAYER, 4, {"note": "test"})
    for name, tensor in saved.trainable().items():
        torch.testing.assert_close(loaded.trainable()[name], tensor, atol=0, rtol=0)

    net = load_exit_draft(tiny_llama_dir, path)
    lower, _, _ = _stages(tiny_llama_dir)
    ids, positions = _ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(net(ids, positions), ExitDraftNet(lower, saved)(ids, positions), atol=0, rtol=0)
    assert path.stat().st_size < 20_000  # the adapter and norm only, not the head
    assert net.exit_head.head.weight is not net.stage.embed.weight  # this model's are not tied


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": 64}, "hidden_size 64 (model has 32)"),
        ({"num_layers": 30}, "num_layers 30 (model has 4)"),
        ({"vocab_size": 49152}, "vocab_size 49152 (model has 97)"),
        ({"model_type": "qwen2"}, "model_type qwen2 (model has llama)"),
    ],
)
def test_loading_onto_another_model_is_refused(tiny_llama_dir, tmp_path, changes, message):
    path = tmp_path / "exit.safetensors"
    _saved(tiny_llama_dir, path, **changes)
    with pytest.raises(ConfigError, match="trained on another model") as caught:
        load_exit_draft(tiny_llama_dir, path)
    assert message in str(caught.value)


def test_other_files_are_refused(tiny_llama_dir, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ConfigError, match="does not exist"):
        load_exit_draft(tiny_llama_dir, tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="not an edgellm exit head file"):
        load_exit_draft(tiny_llama_dir, tmp_path / "other.safetensors")
    meta = ExitMeta(model_identity(tiny_llama_dir, load_config(tiny_llama_dir)), 4, 4)
    _, _, head = _stages(tiny_llama_dir)
    save_exit_head(ExitHead(head, 4), tmp_path / "deep.safetensors", meta)
    with pytest.raises(ConfigError, match="exit layer 4 is out of range: choose 1..3"):
        load_exit_draft(tiny_llama_dir, tmp_path / "deep.safetensors")


def test_cli_train_exit(tiny_chat_dir, tmp_path, monkeypatch, capsys):
    from edgellm.cli.draft import summary
    from edgellm.cli.main import main

    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    out = tmp_path / "exit1.safetensors"
    argv = ["draft", "train-exit", "--model", str(tiny_chat_dir), "--layer", "1", "--steps", "3", "--rank", "8",
            "--chat-prompts", "4", "--json", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out) and out.is_file()
    assert (report["layer"], report["rank"], report["settings"]["steps"]) == (1, 8, 3)
    for when in ("before", "after"):
        for name in ("text", "chat"):
            assert 0 <= report[when][name]["agreement"] <= 1 and report[when][name]["tokens"] > 0
    assert report["seconds"]["total"] > 0
    net = load_exit_draft(tiny_chat_dir, out)
    assert net.label == "exit@1 (rank 8)"
    assert net.exit_head.head.weight is net.stage.embed.weight  # tied embeddings: one tensor
    assert summary(report).startswith(f"exit@1 (rank 8) of {tiny_chat_dir.name}: agreement with the full model ")

    assert main([*argv[:-1], str(tmp_path / "bad.safetensors"), "--layer", "4"]) == 2
    assert "exit layer 4 is out of range: choose 1..3 for 4 layers" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "bad.safetensors"), "--rank", "64"]) == 2
    assert "exit head rank must be in 1..32 (the hidden size), got 64" in capsys.readouterr().err


def test_cli_defaults_mirror_the_library():
    from edgellm.cli import draft
    from edgellm.spec import exit_recipe

    config = DistillConfig()
    assert (draft.DEFAULT_LAYER, draft.DEFAULT_RANK) == (exit_recipe.DEFAULT_LAYER, exit_recipe.DEFAULT_RANK)
    assert (config.steps, config.lr) == (draft.DEFAULT_STEPS, draft.DEFAULT_LR)
    assert exit_recipe.ExitDataConfig().chat_prompts == draft.DEFAULT_CHAT_PROMPTS
    assert dataclasses.is_dataclass(exit_recipe.ExitRecipe)
