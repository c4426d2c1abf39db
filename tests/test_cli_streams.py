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


def test_generate_reads_the_prompt_from_stdin(tiny_chat_dir, monkeypatch, capsys):
    """`-` reads the prompt from a real pipe, in a process of its own; the same command without a prompt (stdin not
    a terminal), with the prompt given, and with an empty stdin go through `main()` in this process, stdin
    replaced (a process each would cost seconds of imports)."""
    import io
    import json

    from edgellm.cli.main import main

    base = ["generate", "--model", str(tiny_chat_dir), "--max-new-tokens", "3", "--json"]
    piped = subprocess.run([sys.executable, "-m", "edgellm", *base, "-"], input="hello there", capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert piped.returncode == 0, piped.stderr

    def here(args: list[str], stdin: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))  # not a terminal, as a pipe is not
        code = main([*base, *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, implicit, err = here([], "hello there")
    assert code == 0, err
    code, given, err = here(["hello there"], "")
    assert code == 0, err
    assert json.loads(piped.stdout)["new_tokens"] == json.loads(implicit)["new_tokens"]
    assert json.loads(piped.stdout)["prompt_tokens"] == json.loads(given)["prompt_tokens"]
    code, _, err = here([], "  ")
    assert code == 2 and "empty" in err


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
