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
