"""The `edgellm` command line, run as users run it: in a subprocess, checking exit codes, stdout and stderr.

Bad input must give exit code 2 and exactly one stderr line `edgellm: error: ...` naming the problem, never a
traceback. Each process spends seconds importing torch and transformers, so the bad-input processes run
concurrently, and cases that share a code path with one of them go through `main()` in this process.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import reference_model
from edgellm.cli.main import main
from edgellm.store import DEFAULT_MODEL

TIMEOUT_S = 120


def edgellm(args: list[str], home: Path) -> subprocess.CompletedProcess:
    # One thread each: the runs of a group share this machine's cores (spinning OpenMP threads would fight).
    env = {**os.environ, "EDGELLM_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("EDGELLM_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "edgellm", *args], capture_output=True, text=True, env=env, timeout=TIMEOUT_S
    )


def run_all(commands: dict[str, list[str]], home: Path) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(edgellm, args, home) for name, args in commands.items()}
        return {name: f.result() for name, f in futures.items()}


def unsupported_model(directory: Path) -> Path:
    """A tiny saved OPT model: a real checkpoint of an architecture edgellm has no adapter for."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "opt", vocab_size=50, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
        word_embed_proj_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


# name -> (arguments after `generate`, with {tiny}/{opt}/{gguf}/{missing} filled in; text the error must name)
TINY = ["--model", "{tiny}"]
BAD_INPUT = {
    "cut-zero": ([*TINY, "--cuts", "0"], "cut 0 is out of range: cuts must lie in 1..3 for 4 layers"),
    "cuts-not-integers": ([*TINY, "--cuts", "a,b"], "--cuts must be comma-separated layer indices, got 'a,b"),
    "model-missing": (["--model", "{missing}"], "model '{missing}' not found"),
    "arch-unsupported": (["--model", "{opt}"], "unsupported architecture 'opt'; supported model types: ["),
    "gguf-corrupt": (["--model", "{gguf}"], "cannot read GGUF file {gguf}"),
    "greedy-and-sampling": ([*TINY, "--greedy", "--temperature", "0.5"], "--greedy cannot be combined with"),
}


@pytest.fixture(scope="module")
def bad_input_runs(tiny_llama_dir, tmp_path_factory):
    """Every BAD_INPUT case, run once -> (runs by name, placeholder values, their shared EDGELLM_HOME)."""
    work = tmp_path_factory.mktemp("cli")
    gguf = work / "corrupt.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 40) + b"general.arch")
    fill = {
        "tiny": str(tiny_llama_dir),
        "opt": str(unsupported_model(work / "opt")),
        "gguf": str(gguf),
        "missing": str(work / "no-such-model"),
    }
    home = work / "home"
    commands = {}
    for name, (args, _) in BAD_INPUT.items():
        commands[name] = ["generate", "hello", *(a.format(**fill) for a in args)]
    return run_all(commands, home), fill, home


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(bad_input_runs, case):
    runs, fill, home = bad_input_runs
    proc = runs[case]
    expected = BAD_INPUT[case][1].format(**fill)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgellm: error: ")
    assert expected in lines[0]
    assert proc.stdout == ""
    models = home / "models"
    assert not models.exists() or list(models.iterdir()) == []  # nothing half-written in the cache


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--cuts", "30"], "cut 30 is out of range: cuts must lie in 1..3 for 4 layers"),
        (["--cuts", "3,1"], "strictly increasing without duplicates, got [3, 1]"),
        (["--cuts", "2,2"], "strictly increasing without duplicates, got [2, 2]"),
        (["--temperature", "0"], "temperature must be in [0.0001, inf) (use greedy decoding for 0), got 0.0"),
        (["--top-p", "1.5"], "top-p must be in (0, 1], got 1.5"),
        (["--top-k", "-1"], "top-k must be >= 0 (0 = off), got -1"),
        (["--max-new-tokens", "0"], "max new tokens must be >= 1, got 0"),
        (["--repetition-penalty", "0"], "repetition penalty must be in [0.001, 1000] (1.0 = off), got 0.0"),
        (["--no-repeat-ngram", "-1"], "no-repeat n-gram size must be >= 0 (0 = off), got -1"),
        (["--threads", "0"], "threads must be >= 1, got 0"),
        ([], "has no tokenizer (none of tokenizer.json, "),  # the tiny model is saved without one
    ],
)
def test_more_bad_input_in_process(tiny_llama_dir, tmp_path, monkeypatch, capsys, args, expected):
    """The same contract through `main()` in this process: these cases share their code path with one above,
    and a separate process costs seconds of imports on a shared machine."""
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path))
    code = main(["generate", "hello", "--model", str(tiny_llama_dir), *args])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgellm: error: ") and expected in lines[0], captured.err
    assert captured.out == ""


@pytest.mark.multiprocess
def test_the_module_entry_point_runs_in_its_own_process(tmp_path):
    proc = edgellm(["--help"], tmp_path)  # one real process: `python -m edgellm` imports and parses
    assert proc.returncode == 0, proc.stderr
    assert "generate" in proc.stdout and "models" in proc.stdout


def test_help_and_models_list(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "models" in out
    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--cuts" in out and "--head" in out
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path))
    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    default = next(row for row in rows if row["name"] == DEFAULT_MODEL)
    assert default["pulled"] is False and default["path"] == str(tmp_path / "models" / DEFAULT_MODEL)


PROMPT = "The capital of France is"
NEW_TOKENS = 8


@pytest.mark.slow
@pytest.mark.real_model
def test_generate_json_split_equals_unsplit_and_transformers(real_model_dir, monkeypatch, capsys):
    home = real_model_dir.parent.parent
    common = ["generate", "--json", "--no-chat", "--max-new-tokens", str(NEW_TOKENS), PROMPT]
    proc = edgellm([*common, "--cuts", "10,20", "--head", "device"], home)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1  # one JSON object, nothing else on stdout
    split = json.loads(proc.stdout)
    monkeypatch.setenv("EDGELLM_HOME", str(home))
    assert main(common) == 0  # the unsplit run in this process: it saves a second process's imports
    whole = json.loads(capsys.readouterr().out)

    keys = ["model", "cuts", "head", "prompt_tokens", "new_tokens", "text", "stages", "ttft_ms"]
    keys += ["decode_tok_per_s", "loop_detected"]
    assert set(keys) <= set(split), sorted(set(keys) - set(split))
    assert split["model"] == DEFAULT_MODEL and split["cuts"] == [10, 20] and split["head"] == "device"
    assert [s["layers"] for s in split["stages"]] == [[0, 10], [10, 20], [20, 30], [30, 30]]
    assert all(s["compute_ms"] > 0 for s in split["stages"])
    assert split["ttft_ms"] > 0 and split["decode_tok_per_s"] > 0
    assert [s["layers"] for s in whole["stages"]] == [[0, 30]] and whole["head"] == "device"  # the default
    assert len(split["new_tokens"]) == NEW_TOKENS and split["text"].strip()

    assert split["prompt_tokens"] == whole["prompt_tokens"]
    assert split["new_tokens"] == whole["new_tokens"]
    ids = torch.tensor([split["prompt_tokens"]])
    with torch.no_grad():
        out = reference_model(real_model_dir).generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS
        )
    assert out[0, ids.shape[1] :].tolist() == split["new_tokens"]
