"""`edgellm finetune` in one process (no topology) on the tiny chat model (tiny tokenizer, no download): text and
JSONL data, and bad input refused before anything starts, each with a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_finetune import topology

from edgellm.cli.main import main

FAST = ["--steps", "2", "--batch-size", "2", "--seq-len", "48", "--lora-rank", "2", "--json"]


def run(capsys, args: list[str]) -> tuple[int, dict | None, str]:
    code = main(["finetune", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]) if code == 0 else None, err


@pytest.mark.parametrize("kind", ["jsonl", "text"])
def test_centralized_run_on_a_data_file(tiny_chat_dir, tmp_path, capsys, monkeypatch, kind):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    if kind == "jsonl":
        data = tmp_path / "data.jsonl"
        rows = [{"prompt": f"Say {w}.", "response": w} for w in ("red", "green", "blue", "cyan")]
        data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        data = Path(__file__).parent / "data" / "eb1911_shakespeare.txt"
    code, report, err = run(
        capsys, ["--model", str(tiny_chat_dir), "--data", str(data), "--output", str(tmp_path / "o"), *FAST]
    )
    assert code == 0, err
    assert len(report["losses"]["0"]) == 2 and report["server_trainable_params"] == {}
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").exists()


def test_bad_input_is_refused_with_one_line(tiny_chat_dir, tmp_path, capsys):
    out = ["--output", str(tmp_path / "o")]
    cases = [
        (["--task", "dates", "--steps", "0"], "steps must be >= 1"),
        (["--task", "dates"], "--steps is required"),
        (["--steps", "2"], "--data FILE or --task NAME"),
        (["--data", str(tmp_path / "missing.txt"), "--steps", "2"], "is not a file"),
        (["--task", "dates", "--steps", "2", "--quant", "int3"], "unknown quantization scheme"),
        (["--task", "dates", "--steps", "2", "--lora-rank", "0"], "r"),
        (["--task", "dates", "--steps", "4", "--clients", "2", "--aggregate-every", "3", "--checkpoint-every", "2"],
         "multiple of --aggregate-every"),
    ]  # fmt: skip
    for args, message in cases:
        code, _, err = run(capsys, [*args, "--model", str(tiny_chat_dir), *out])
        assert code == 2, (args, err)
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_a_topology_with_the_head_on_a_server_is_refused(tiny_chat_dir, tmp_path, capsys):
    path = topology(tiny_chat_dir, tmp_path, servers=1)
    path.write_text(path.read_text().replace('head = "device"', 'head = "server"'))
    code, _, err = run(
        capsys, ["--topology", str(path), "--task", "dates", "--steps", "2", "--output", str(tmp_path / "o")]
    )
    assert code == 2 and 'model.head = "device"' in err


def test_runs_in_folders_named_alike_get_distinct_names_kept_across_resumes(tmp_path):
    from edgellm.train.coordinator import run_name

    first, second = run_name(tmp_path / "a" / "split"), run_name(tmp_path / "b" / "split")
    assert first.startswith("split-") and second.startswith("split-") and first != second
    assert run_name(tmp_path / "a" / "split") == first  # the same folder, the same name
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "run.json").write_text(json.dumps({"run": first, "settings": {}}))
    assert run_name(moved) == first  # a run folder keeps the name it recorded


def test_clients_started_separately_must_name_their_run(tiny_chat_dir, tmp_path, capsys):
    args = ["--task", "dates", "--steps", "2", "--clients", "2", "--client", "0", "--no-launch", "--attempt", "x"]
    code, _, err = run(capsys, [*args, "--model", str(tiny_chat_dir), "--output", str(tmp_path / "o")])
    assert code == 2 and "--run NAME" in err
