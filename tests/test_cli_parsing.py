"""The shared parser: "did you mean" on typos, flags common to every command, exit codes that survive --debug."""

from __future__ import annotations

import pytest

from edgellm.cli.main import build_parser, main


def _exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    return int(raised.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["genrate", "x"], "did you mean 'generate'?"),
        (["models", "lst"], "did you mean 'list'?"),
        (["generate", "--head", "devce", "x"], "did you mean 'device'?"),
        (["models", "list", "--jsn"], "did you mean --json?"),
        (["generate", "--max-new-tokns=3", "x"], "did you mean --max-new-tokens?"),
    ],
)
def test_a_typo_gets_the_closest_name(argv: list[str], suggestion: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _exit(argv, capsys)
    assert code == 2 and suggestion in err


def test_a_mistyped_option_runs_nothing_and_its_value_is_not_the_prompt(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgellm.cli import generate

    ran: list[object] = []
    monkeypatch.setattr(generate, "run", lambda args: ran.append(args.prompt) or 0)
    code, err = _exit(["generate", "--temprature", "0.7", "What is the capital of France?"], capsys)
    assert code == 2 and ran == []
    assert "'--temprature' (did you mean --temperature?)" in err and "edgellm generate --help" in err


def test_far_typos_get_no_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _exit(["zzzzzz"], capsys)
    assert code == 2 and "did you mean" not in err


def test_common_flags_work_before_and_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["-q", "--debug", "generate", "x"])
    after = parser.parse_args(["generate", "x", "-q", "--debug"])
    plain = parser.parse_args(["generate", "x"])
    assert before.quiet and before.debug and after.quiet and after.debug
    assert not plain.quiet and not plain.debug and not plain.verbose
    assert parser.parse_args(["models", "list", "-v"]).verbose  # nested subcommands too


def test_debug_prints_the_traceback_and_keeps_the_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--debug", "generate", "--temperature", "0", "x"])  # refused before any model loads
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "edgellm: error: temperature must be in" in err
    assert main(["generate", "--temperature", "0", "x"]) == 2 and "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cuts", "5"], "cut 5 is out of range"),  # the tiny model has 2 layers
        (["--cuts", "1,1"], "increasing"),
        (["--quant", "int3"], "unknown"),
        (["--max-new-tokens", "0"], "max new tokens must be >= 1"),
        (["--repetition-penalty", "0"], "repetition"),
    ],
)
def test_bad_input_is_refused_before_the_weights_load(
    argv: list[str], message: str, tiny_chat_dir, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgellm.split import one_process

    def never(*_: object, **__: object) -> None:
        raise AssertionError("the weights were loaded before the input was checked")

    monkeypatch.setattr(one_process, "load_stages", never)
    monkeypatch.setattr("edgellm.serve.local_engine.load_stages", never)
    assert main(["generate", "--model", str(tiny_chat_dir), *argv, "hi"]) == 2
    assert message in capsys.readouterr().err
