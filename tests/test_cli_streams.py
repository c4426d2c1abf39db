"""stdout carries the answer alone; the stats table goes to stderr (`edgellm generate ... > answer.txt`)."""

from __future__ import annotations

import subprocess
import sys


def test_generate_prints_the_answer_on_stdout_and_the_stats_on_stderr(tiny_chat_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "edgellm", "generate", "--model", str(tiny_chat_dir), "--max-new-tokens", "4",
         "--cuts", "2", "hello"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "TTFT" not in proc.stdout and "compute ms" not in proc.stdout
    assert "TTFT" in proc.stderr and "compute ms" in proc.stderr
    assert proc.stdout.endswith("\n")


def test_generate_reads_the_prompt_from_stdin(tiny_chat_dir):
    base = [sys.executable, "-m", "edgellm", "generate", "--model", str(tiny_chat_dir), "--max-new-tokens", "3",
            "--json"]  # fmt: skip
    import json

    piped = subprocess.run([*base, "-"], input="hello there", capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    implicit = subprocess.run(base, input="hello there", capture_output=True, text=True, timeout=300)
    given = subprocess.run([*base, "hello there"], capture_output=True, text=True, timeout=300)
    assert json.loads(piped.stdout)["new_tokens"] == json.loads(implicit.stdout)["new_tokens"]
    assert json.loads(piped.stdout)["prompt_tokens"] == json.loads(given.stdout)["prompt_tokens"]
    empty = subprocess.run(base, input="  ", capture_output=True, text=True, timeout=300)
    assert empty.returncode == 2 and "empty" in empty.stderr


HINT = "edgellm: hint: the answer ends in a loop; try --repetition-penalty 1.2 or --no-repeat-ngram 3"


def test_a_looping_answer_gets_one_hint_line_unless_guarded_or_quiet(tiny_chat_dir, capsys):
    """The tiny model answers "\\n" over and over: stderr ends with the hint, `--json` says `loop_detected`;
    the repetition guard breaks the loop; `--quiet` prints neither the table nor the hint."""
    import json

    from edgellm.cli.main import main

    base = ["generate", "--model", str(tiny_chat_dir), "--max-new-tokens", "16", "hello"]
    assert main(base) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == HINT and err.count(HINT) == 1 and any("TTFT" in line for line in err)
    assert main([*base, "--json"]) == 0
    looped = json.loads(capsys.readouterr().out)
    assert looped["loop_detected"] is True and looped["head"] == "device"
    assert looped["prompt_tokens"][0] == 1  # <|im_start|>: the chat template is on by default
    assert main([*base, "--json", "--no-repeat-ngram", "1"]) == 0
    guarded = json.loads(capsys.readouterr().out)
    assert guarded["loop_detected"] is False and len(set(guarded["new_tokens"])) == len(guarded["new_tokens"])
    assert guarded["prompt_tokens"] == looped["prompt_tokens"]
    assert main([*base, "--no-chat", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"][0] != 1
    assert main(["--quiet", *base]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out.strip() == ""
