"""Progress of long work (`edgellm.progress`): whole log lines with the elapsed time where stderr is not a
terminal (never a carriage return), a bar redrawn in place on a terminal, nothing at all when quiet; and the
long commands report their phases on stderr, leaving stdout to the answer."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import time

import pytest

from edgellm import progress
from edgellm.deploy.local_deployment import layers_text
from edgellm.progress import Phase, note, render_bar, set_quiet


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def lines():
    """A logger whose records land, formatted as `%(message)s`, in the returned StringIO."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("edgellm.test_progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, out
    logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def not_quiet():
    set_quiet(False)
    yield
    set_quiet(False)


def test_a_phase_off_a_terminal_writes_one_line_with_its_elapsed_time(lines):
    logger, out = lines
    stream = io.StringIO()  # stderr as a pipe or a file
    with Phase("eval ppl", unit="windows", log=logger, stream=stream) as phase:
        for done in range(13):
            phase.update(done, 12)
    with Phase("load model", log=logger, stream=stream) as phase:
        phase.summary = "3 stages (int8)"
    text = out.getvalue()
    assert re.fullmatch(r"eval ppl: 12 windows in \d+\.\d s\nload model: 3 stages \(int8\) in \d+\.\d s\n", text)
    assert stream.getvalue() == "" and "\r" not in text  # no bar, whole lines only


def test_announce_heartbeat_and_failure_off_a_terminal(lines, monkeypatch):
    logger, out = lines
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0)  # every update is "long enough" for a heartbeat line
    with Phase("eval task", unit="batches", log=logger, stream=io.StringIO(), announce="eval task: 2 batches") as p:
        p.update(1, 2)
        p.detail = "loss 2.31"
        p.advance()
    with pytest.raises(RuntimeError), Phase("quantize", log=logger, stream=io.StringIO()):
        raise RuntimeError("boom")  # the error speaks for itself: no end line
    got = out.getvalue().splitlines()
    assert got[0] == "eval task: 2 batches"
    assert got[1].startswith("eval task: 1/2 batches after ") and got[2].endswith(" s (loss 2.31)")
    assert re.fullmatch(r"eval task: 2 batches in \d+\.\d s", got[3]) and len(got) == 4


def test_quiet_writes_nothing(lines):
    logger, out = lines
    set_quiet(True)
    terminal = FakeTerminal()
    with Phase("eval ppl", total=3, unit="windows", log=logger, stream=terminal, delay_s=0, announce="go") as p:
        p.update(3)
    note(logger, "edge1 ready")
    assert out.getvalue() == "" and terminal.getvalue() == ""
    logger.warning("still shown")  # warnings are not progress
    assert out.getvalue() == "still shown\n"


def test_a_terminal_gets_a_bar_redrawn_in_place_and_erased(lines, monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    logger, out = lines
    terminal = FakeTerminal()
    with Phase("eval ppl", unit="windows", log=logger, stream=terminal, delay_s=0) as phase:
        phase.update(1, 3)
        drawn = terminal.getvalue()
    assert drawn.startswith("\reval ppl [") and "1/3 windows" in drawn and "\n" not in drawn
    assert terminal.getvalue().endswith("\r\x1b[K")  # erased before the end line
    assert re.fullmatch(r"eval ppl: 1/3 windows in \d+\.\d s\n", out.getvalue())


def test_a_short_phase_draws_no_bar_and_a_silent_one_is_redrawn_by_time(lines, monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    logger, _ = lines
    terminal = FakeTerminal()
    with Phase("load model", log=logger, stream=terminal) as phase:  # the default delay: seconds away
        phase.update(1)
    assert terminal.getvalue() == ""
    monkeypatch.setattr(progress, "REDRAW_S", 0.01)
    with Phase("load model", log=logger, stream=terminal, delay_s=0):  # never counts: the ticker draws it
        deadline = time.monotonic() + 5
        while "load model: " not in terminal.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert terminal.getvalue().startswith("\rload model: 0 s")


def test_bar_and_layers_texts():
    assert (
        render_bar("eval ppl", 6, 12, "windows", 17.2, 80)
        == "eval ppl [##########----------] 6/12 windows 17 s, ~17 s left"
    )
    assert len(render_bar("x" * 200, 1, 2, "steps", 1.0, 40)) == 40
    assert render_bar("load model", 0, None, "", 3.4, 80) == "load model: 3 s"
    assert render_bar("finetune", 2, None, "steps", 3.4, 80, "loss 2.31") == "finetune: 2 steps, 3 s | loss 2.31"
    assert layers_text({"name": "edge2", "layers": [20, 30], "embed": False, "head": False}) == "layers 20-30"
    layout = [{"node": "phone", "layers": [0, 10], "embed": True, "head": False},
              {"node": "edge1", "layers": [10, 30], "embed": False, "head": False},
              {"node": "phone", "layers": [30, 30], "embed": False, "head": True}]  # fmt: skip
    assert layers_text({"name": "phone", "layout": layout}) == "layers 0-10+embed, head"
    assert layers_text({"name": "phone", "layout": layout[1:2]}) == "no layers"


def test_eval_ppl_reports_its_phases_on_a_piped_stderr(tiny_llama_dir, tmp_path):
    from test_eval_ppl import with_word_tokenizer

    model_dir = with_word_tokenizer(tiny_llama_dir, tmp_path / "model")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 37}" for i in range(300)))
    env = {**os.environ, "EDGELLM_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "edgellm", "eval", "ppl", "--model", str(model_dir), "--text", str(text),
         "--ctx", "64", "--quant", "int8", "--cuts", "2", "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)  # stdout: the answer alone
    err = proc.stderr
    assert "\r" not in err, err
    assert "quantizing stage [0:2)+embed (int8)\n" in err
    assert re.search(r"quantize stage \[4:4\)\+head \(int8\): saved to \S+ in \d+\.\d s\n", err), err
    assert re.search(r"load model: 3 stages \(int8\) in \d+\.\d s\n", err), err
    assert re.search(r"eval ppl: 5 windows, 299 tokens in \d+\.\d s\n", err), err


@pytest.mark.multiprocess
def test_a_local_deployment_reports_each_node_as_it_becomes_ready(tiny_chat_dir, tmp_path, caplog):
    from edgellm.deploy.local_deployment import LocalDeployment, free_port
    from edgellm.deploy.topology import write_topology

    doc = {
        "model": {"name": str(tiny_chat_dir), "cuts": [2], "head": "server"},
        "deployment": {"route": ["device", "edge1"], "token": "secret-5e1f"},
        "nodes": [{"name": n, "role": r, "address": f"127.0.0.1:{free_port()}"}
                  for n, r in (("device", "device"), ("edge1", "edge"))],
        "links": [{"between": ["device", "edge1"], "profile": "none"}],
    }  # fmt: skip
    path = tmp_path / "t.toml"
    with caplog.at_level(logging.INFO, logger="edgellm"), LocalDeployment(write_topology(path, doc), path, tmp_path):
        pass
    assert re.search(r"starting 2 nodes: device, edge1 \(logs in ", caplog.text)
    assert re.search(r"edge1 ready \(layers 2-4\+head, \d+\.\d s\)", caplog.text), caplog.text
    assert re.search(r"device ready \(layers 0-2\+embed, \d+\.\d s\)", caplog.text), caplog.text
    assert re.search(r"start nodes: 2 nodes ready in \d+\.\d s", caplog.text)
    node_log = (tmp_path / "edge1.log").read_text()
    assert re.search(r"load node edge1: layers \[2, 4\), \d+ MB of weights in \d+\.\d s\n", node_log), node_log
    assert "node edge1 listening on 127.0.0.1:" in node_log and "\r" not in node_log
