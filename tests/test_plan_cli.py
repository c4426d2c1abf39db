"""`edgellm profile`, `edgellm plan` and `edgellm run --plan auto` end to end, on a tiny chat model: real node
processes, the real transport and its emulation, the real perplexity harness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_LAYERS
from edgellm.cli.main import main
from edgellm.deploy.local_deployment import LocalDeployment, free_port
from edgellm.deploy.topology import load_topology, write_topology

pytestmark = pytest.mark.multiprocess


def document(model_dir: Path, token_file: Path) -> dict:
    node = lambda name, role, **kw: {"name": name, "role": role, "address": f"127.0.0.1:{free_port()}", **kw}  # noqa: E731
    return {
        "model": {"name": str(model_dir), "cuts": [2, 3], "head": "device"},
        "deployment": {
            "route": ["phone", "edge1", "edge2"],
            "mode": "chain",
            "token_file": str(token_file),
            "max_context": 128,
        },  # fmt: skip
        "nodes": [node("phone", "device", compute_scale=4.0), node("edge1", "edge"), node("edge2", "edge")],
        "links": [
            {"between": ["phone", "edge1"], "profile": "6g"},
            {"between": ["edge1", "edge2"], "profile": "metro"},
            {"between": ["phone", "edge2"], "profile": "5g"},
        ],
    }


def edgellm(*args: str, home: Path) -> subprocess.CompletedProcess:
    """`edgellm ARGS` as its own process (`profile`, which starts the nodes itself); it must succeed."""
    env = dict(os.environ, EDGELLM_HOME=str(home))
    proc = subprocess.run([sys.executable, "-m", "edgellm", *args], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def plan(capsys, *args: str) -> tuple[int, str, str]:
    """`edgellm plan ARGS` in this process (pure planning: no model, no node): exit code, stdout, stderr."""
    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def profiled(tiny_chat_dir, tmp_path_factory):
    """A topology, its profile (the nodes started by the profiler itself), and the edgellm home it used."""
    tmp = tmp_path_factory.mktemp("plan-cli")
    token = tmp / "token"
    token.write_text("secret-7f1c")
    path = tmp / "t.toml"
    write_topology(path, document(tiny_chat_dir, token))
    home = tmp / "home"
    edgellm("profile", "--topology", str(path), "--output", str(tmp / "p.json"), "--scheme", "none",
            "--scheme", "int8", "--codec", "none", "--codec", "fp16", home=home)  # fmt: skip
    return path, tmp / "p.json", home


def test_profile_measures_every_node_scheme_and_link(profiled):
    _, profile_path, _ = profiled
    profile = json.loads(profile_path.read_text())
    assert profile["format"] == "edgellm-profile" and set(profile["key"]) == {"topology", "model", "code"}
    phone, edge1 = profile["nodes"]["phone"], profile["nodes"]["edge1"]
    assert [r["name"] for r in phone["schemes"]] == ["none", "int8"]
    for a, b in zip(phone["schemes"], edge1["schemes"]):  # one machine, one thread each: the same measurement,
        assert a["layer_decode_ms"] == pytest.approx(4.0 * b["layer_decode_ms"])  # scaled by compute_scale
        assert a["layer_weight_bytes"] == b["layer_weight_bytes"] > 0 and a["layer_bytes"] >= a["layer_weight_bytes"]
    assert phone["schemes"][1]["layer_weight_bytes"] < phone["schemes"][0]["layer_weight_bytes"]  # int8 is smaller
    assert phone["emulated"]["compute_scale"] == 4.0 and phone["base_bytes"] > 50e6  # a Python+torch process
    links = {(link["a"], link["b"]): link for link in profile["links"]}
    assert set(links) == {("phone", "edge1"), ("edge1", "edge2"), ("phone", "edge2")}  # edge2 too: a spare link
    for link in links.values():
        assert link["up_ms_per_byte"] > 0 and link["up_fixed_ms"] + link["down_fixed_ms"] > 0
    # the 5g link's emulated RTT (10 ms) shows in its fitted fixed cost; the 6g one (1 ms) is far cheaper
    assert links[("phone", "edge2")]["up_fixed_ms"] * 2 > 8.0 > links[("phone", "edge1")]["up_fixed_ms"] * 2
    assert set(profile["quality"]["schemes"]) == {"none", "int8"} and profile["quality"]["codecs"]["none"] == 0.0


def test_plan_writes_a_runnable_topology_and_infeasible_names_the_constraint(profiled, tmp_path, capsys):
    path, profile_path, _ = profiled
    out = tmp_path / "planned.toml"
    code, stdout, err = plan(capsys, "--topology", str(path), "--profile", str(profile_path), "--json", "--write",
                             str(out))  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    stages = report["plan"]["stages"]
    assert stages[0]["node"] == "phone" and stages[-1]["end"] == TINY_LAYERS  # the device first, every layer
    assert all(a["end"] == b["start"] for a, b in zip(stages, stages[1:]))
    assert report["predicted"]["decode_ms_per_token"] > 0 and report["predicted"]["ttft_ms"] > 0
    planned = load_topology(out)
    assert planned.route[0] == "phone" and planned.model.head == report["head"]
    # every node's budget too small for anything: exit 2, one line naming a node and its budget
    profile = json.loads(profile_path.read_text())
    for node in profile["nodes"].values():
        node["emulated"]["memory_mb"] = 1
    tight = tmp_path / "tight.json"
    tight.write_text(json.dumps(profile))
    code, _, err = plan(capsys, "--topology", str(path), "--profile", str(tight))
    assert code == 2, err
    line = err.strip()
    assert "\n" not in line and line.startswith("edgellm: error: no plan") and "budget" in line


def test_plan_refuses_a_stale_profile(profiled, tmp_path, capsys):
    path, profile_path, _ = profiled
    profile = json.loads(profile_path.read_text())
    profile["key"]["topology"] = "0" * 16
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(profile))
    code, _, err = plan(capsys, "--topology", str(path), "--profile", str(stale))
    assert code == 2 and "stale" in err


def test_run_plan_auto_moves_the_running_nodes_to_the_plan(profiled, tmp_path, capsys, monkeypatch):
    path, profile_path, home = profiled
    topology = load_topology(path)
    monkeypatch.setenv("EDGELLM_HOME", str(home))
    with LocalDeployment(topology, path, tmp_path):  # `run` reaches them from this process, as `check` tests do
        code = main(["run", "--topology", str(path), "--plan", "auto", "--profile", str(profile_path),
                     "--max-new-tokens", "4", "--json", "hello"])  # fmt: skip
        stdout, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(stdout)
    code, stdout, err = plan(capsys, "--topology", str(path), "--profile", str(profile_path), "--json")
    assert code == 0, err
    planned = json.loads(stdout)["plan"]
    layers = {n["name"]: n["layers"] for n in report["nodes"]}
    for stage in planned["stages"]:
        if stage["end"] > stage["start"]:
            assert layers[stage["node"]] == [stage["start"], stage["end"]], (report["nodes"], planned)
    assert len(report["new_tokens"]) == 4
