"""Perplexity harness: windows score every token once, the result equals a direct computation and is the same
with and without cuts, the smashed-data codec is applied at every cut, and bad input gives clear errors."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import reference_model
from edgellm.cli import eval as eval_cli
from edgellm.errors import ConfigError
from edgellm.eval.ppl import PplConfig, codec_hop, evaluate_ppl, windows
from edgellm.model.stage import stage_specs
from edgellm.net.codec import parse_codec
from edgellm.split.one_process import load_stages

TEXT = Path(__file__).parent / "data" / "eb1911_shakespeare.txt"  # public domain (Encyclopaedia Britannica, 1911)
IDS = torch.randint(4, 97, (200,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("n", "ctx", "stride"), [(11, 4, None), (11, 4, 2), (12, 4, 1), (5, 4, None), (100, 16, 7)])
def test_windows_score_every_token_once_with_enough_context(n, ctx, stride):
    config = PplConfig(ctx, stride)
    spans = windows(n, config)
    scored = [t for w in spans for t in range(w.score_from, w.end + 1)]
    assert scored == list(range(1, n))
    for w in spans:
        assert w.end - w.begin <= ctx and w.begin < w.score_from
        if w is not spans[0]:
            assert w.score_from - w.begin >= ctx + 1 - config.step  # context of the first scored token


def test_too_short_text_is_a_clear_error():
    with pytest.raises(ConfigError, match="the text has 512 tokens; one window of --ctx 512 needs 513"):
        windows(512, PplConfig(512))


@pytest.mark.parametrize(
    "kwargs", [{"ctx": 1}, {"ctx": 8, "stride": 9}, {"ctx": 8, "stride": 0}, {"ctx": 8, "max_tokens": 8}]
)
def test_bad_window_settings(kwargs):
    with pytest.raises(ConfigError):
        PplConfig(**kwargs)


def test_single_window_equals_direct_cross_entropy(tiny_llama_dir):
    stages = load_stages(tiny_llama_dir, stage_specs(4, []))
    ids = IDS[:65]
    result = evaluate_ppl(stages, ids, PplConfig(64))
    with torch.no_grad():
        logits = reference_model(tiny_llama_dir)(ids.unsqueeze(0)).logits[0]
    want = float(F.cross_entropy(logits[:-1], ids[1:], reduction="sum"))
    assert result.tokens == 64 and result.windows == 1
    assert result.nll_sum == pytest.approx(want, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(want / 64), rel=1e-5)


def test_cuts_do_not_change_perplexity(tiny_model_dir):
    whole = evaluate_ppl(load_stages(tiny_model_dir, stage_specs(4, [])), IDS, PplConfig(48, 24))
    split = evaluate_ppl(load_stages(tiny_model_dir, stage_specs(4, [1, 3], "device")), IDS, PplConfig(48, 24))
    assert split.tokens == whole.tokens == 199
    assert split.ppl == pytest.approx(whole.ppl, rel=1e-5)


def test_codec_is_applied_at_every_cut(tiny_llama_dir):
    stages = load_stages(tiny_llama_dir, stage_specs(4, [2], "device"))
    calls = []

    def spy(x):
        calls.append(tuple(x.shape))
        return codec_hop(parse_codec("int8"))(x)

    exact = evaluate_ppl(stages, IDS, PplConfig(64))
    lossy = evaluate_ppl(stages, IDS, PplConfig(64), spy)
    assert len(calls) == 2 * exact.windows  # two cuts: after layer 2, and before the device's head
    assert lossy.ppl != exact.ppl and lossy.ppl == pytest.approx(exact.ppl, rel=0.05)
    fp16 = evaluate_ppl(stages, IDS, PplConfig(64), codec_hop(parse_codec("fp16")))
    assert fp16.ppl == pytest.approx(exact.ppl, rel=1e-3)


def run_cli(argv: list[str]) -> int:
    """`edgellm eval ...` through the subcommand's own parser (as cli/main.py wires it)."""
    parser = argparse.ArgumentParser(prog="edgellm")
    eval_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:  # what main() turns into exit code 2 and one line on stderr
        print(f"edgellm: error: {exc}")
        return 2


def with_word_tokenizer(model_dir: Path, dest: Path) -> Path:
    """A copy of a tiny model directory with a whitespace tokenizer over the words w0..w89."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(model_dir, dest)
    vocab = {f"w{i}": i for i in range(90)} | {"[UNK]": 90}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(dest)
    return dest


def test_cli_json(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    model_dir = with_word_tokenizer(tiny_llama_dir, tmp_path / "model")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 37}" for i in range(300)))
    argv = ["eval", "ppl", "--model", str(model_dir), "--text", str(text), "--ctx", "64", "--json"]
    assert run_cli([*argv, "--quant", "int4-g32,head=int8", "--cuts", "2", "--act-codec", "int8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quant"] == "int4-g32,head=int8" and report["act_codec"] == "int8" and report["cuts"] == [2]
    assert (
        report["ppl"] > 1
        and report["tokens"] > 64
        and report["weight_bytes"] == sum(s["weight_bytes"] for s in report["stages"])
    )
    assert run_cli(argv) == 0
    float_report = json.loads(capsys.readouterr().out)
    assert float_report["quant"] == "none" and float_report["weight_bytes"] > report["weight_bytes"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quant", "int5"], "unknown quantization scheme 'int5'; choose from"),
        (["--quant", "int4-g64"], "group size 64 does not divide the input dimension 32"),
        (["--ctx", "100000"], "one window of --ctx 100000 needs 100001"),
        (["--act-codec", "int7"], "unknown codec 'int7'"),
    ],
)
def test_cli_errors(tiny_llama_dir, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    model_dir = with_word_tokenizer(tiny_llama_dir, tmp_path / "model")
    argv = ["eval", "ppl", "--model", str(model_dir), "--text", str(TEXT), "--ctx", "64", *extra]
    assert run_cli(argv) == 2
    assert message in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.real_model
def test_act_codec_int8_perplexity_close_to_none(real_model_dir):
    """Per-token int8 smashed data at both cuts costs < 3% perplexity on a short real text (its first 1,024
    tokens, four 256-token windows; measured: +0.7%, and +1.5% on all 2,345); fp16 costs nothing measurable."""
    from edgellm.store.weights import load_tokenizer

    ids = load_tokenizer(real_model_dir)(TEXT.read_text())["input_ids"][:1024]
    stages = load_stages(real_model_dir, stage_specs(30, [10, 20], "device"))
    config = PplConfig(256)
    exact = evaluate_ppl(stages, ids, config)
    int8 = evaluate_ppl(stages, ids, config, codec_hop(parse_codec("int8")))
    fp16 = evaluate_ppl(stages, ids, config, codec_hop(parse_codec("fp16")))
    assert 10 < exact.ppl < 60  # a real model on real English
    assert exact.ppl < int8.ppl < exact.ppl * 1.03
    assert fp16.ppl == pytest.approx(exact.ppl, rel=1e-3)
