"""The CLI without its heavy or optional dependencies: `--help` imports no torch, and `edgellm demo` runs without
matplotlib (the `plot` extra), saying in one line that it skipped the chart.

Building the parser must stay light because every `edgellm ... --help` pays for it (torch and transformers take
seconds to import on a small machine). The names the parser offers are mirrored in `edgellm.cli.choices`; the
last test keeps each mirror equal to the library registry it copies.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgellm.cli import choices
from edgellm.cli.main import main

HEAVY = ("torch", "transformers", "grpc", "matplotlib", "numpy", "fastapi", "uvicorn", "prometheus_client")
TIMEOUT_S = 60


def test_building_the_parser_imports_no_heavy_library() -> None:
    code = (
        "import sys, edgellm.cli.main as m; m.build_parser(); "
        f"heavy = [name for name in {HEAVY!r} if name in sys.modules]; "
        "assert 'torch' not in sys.modules and not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr


def _edgellm() -> list[str]:
    """The console script next to this interpreter, as users run it (else the module)."""
    script = Path(sys.executable).with_name("edgellm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "edgellm"]


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["demo"],
        ["generate"],
        ["chat"],
        ["run"],
        ["node"],
        ["serve"],
        ["profile"],
        ["plan"],
        ["finetune"],
        ["models", "pull"],
        ["models", "rm"],
        ["cache"],
        ["cache", "clean"],
        ["eval", "ppl"],
        ["eval", "task"],
        ["draft"],
        ["draft", "train-exit"],
    ],
    ids=lambda command: " ".join(command) or "edgellm",
)
def test_help_exits_zero(command: list[str]) -> None:
    done = subprocess.run([*_edgellm(), *command, "--help"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: edgellm {' '.join(command)}".rstrip())
    assert done.stderr == ""


def _fake_report() -> dict[str, Any]:
    run = {"ttft_ms": 50.0, "decode_tok_per_s": 20.0, "links": []}
    return {
        **run,
        "baselines": {"device_only": dict(run), "cloud": dict(run)},
        "breakdown": {name: {"total": 50.0, "other": 50.0} for name in ("split", "device_only", "cloud")},
    }


@pytest.mark.parametrize("json_output", [True, False])
def test_demo_without_matplotlib_skips_the_chart_in_one_line(
    json_output: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import edgellm.deploy.demo_scenarios as scenarios

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: find_spec and import both fail
    monkeypatch.setattr(scenarios, "run_demo", lambda cfg, on_text=None, on_phase=None: _fake_report())
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # keep pytest's own handlers
    chart = tmp_path / "chart.png"

    # --plan manual: the patched run_demo; the planned story would start real nodes (a minute, not this test)
    code = main(["demo", "--plan", "manual", "--chart", str(chart), *(["--json"] if json_output else [])])

    out, err = capsys.readouterr()
    assert code == 0
    assert not chart.exists()
    skipped = [line for line in err.splitlines() if "chart skipped" in line]
    assert skipped == ["chart skipped: matplotlib is not installed (pip install 'edgellm[plot]')"]
    if json_output:
        assert json.loads(out)["chart"] is None
    else:
        assert "scenario" in out and "chart:" not in out


def test_cli_choices_mirror_the_library() -> None:
    from edgellm.deploy.demo_scenarios import DEFAULT_PROMPT
    from edgellm.engine.select import ENGINES
    from edgellm.lora.config import LoraSpec
    from edgellm.model.stage import HEAD_PLACEMENTS
    from edgellm.net.codec import CODECS
    from edgellm.quant.scheme import NO_QUANT, PART_PATTERNS, SCHEMES
    from edgellm.serve.local_engine import DTYPES
    from edgellm.splitlearn.settings import SHARE_MODES

    assert HEAD_PLACEMENTS == choices.HEAD_PLACEMENTS
    assert ENGINES == choices.ENGINES
    assert tuple(sorted(DTYPES)) == choices.DTYPE_NAMES
    assert NO_QUANT == choices.NO_QUANT
    assert tuple(SCHEMES) == choices.QUANT_SCHEMES
    assert tuple(sorted(PART_PATTERNS)) == choices.QUANT_PARTS
    assert CODECS == choices.CODECS
    assert LoraSpec().target_modules == choices.LORA_TARGETS
    assert tuple(sorted(SHARE_MODES)) == choices.SHARE_MODES
    assert DEFAULT_PROMPT == choices.DEMO_PROMPT
    from edgellm.cli import plan as plan_cli
    from edgellm.cli import profile as profile_cli
    from edgellm.control import demo as story
    from edgellm.control import profiler
    from edgellm.deploy.specs import CONTROL_OBJECTIVES
    from edgellm.plan.placement import OBJECTIVES

    assert tuple(OBJECTIVES) == plan_cli.OBJECTIVES == CONTROL_OBJECTIVES
    assert profiler.DEFAULT_SCHEMES == profile_cli.DEFAULT_SCHEMES
    assert profiler.DEFAULT_CODECS == profile_cli.DEFAULT_CODECS
    assert story.DEFAULT_PROMPT == choices.DEMO_PROMPT
