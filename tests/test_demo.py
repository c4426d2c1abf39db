"""`edgellm demo` end to end on the real model: three scenarios as real processes, same tokens, all stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.real_model
def test_demo_json_runs_three_scenarios_with_the_same_tokens(real_model_dir, tmp_path):
    chart = tmp_path / "demo.png"
    env = dict(os.environ, EDGELLM_HOME=str(real_model_dir.parent.parent))
    proc = subprocess.run(
        [sys.executable, "-m", "edgellm", "demo", "--json", "--codec", "none", "--profile", "5g",
         "--max-new-tokens", "8", "--chart", str(chart), "What is the capital of France?"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    for key in ("new_tokens", "text", "nodes", "links", "ttft_ms", "decode_tok_per_s", "baselines"):
        assert key in report, key
    assert [n["name"] for n in report["nodes"]] == ["device", "edge1", "edge2"]
    assert [n["layers"] for n in report["nodes"]] == [[0, 10], [10, 20], [20, 30]]
    assert {(link["from"], link["to"]) for link in report["links"]} == {("device", "edge1"), ("edge1", "edge2")}
    for link in report["links"]:
        assert link["bytes_per_token"] > 576 * 4 and link["wire_ms"] > 0  # fp32 hidden states each way, 5g RTT
    # lossless codec and greedy decoding: the split, the device alone and the cloud agree token for token
    alone, cloud = report["baselines"]["device_only"], report["baselines"]["cloud"]
    assert len(report["new_tokens"]) == 8
    assert report["new_tokens"] == alone["new_tokens"] == cloud["new_tokens"]
    assert cloud["links"][0]["bytes_down_per_token"] < 100  # a greedy cloud head sends token ids, not logits
    assert chart.stat().st_size > 10_000
    leftovers = subprocess.run(["pgrep", "-f", "edgellm-demo-"], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", f"stray node processes: {leftovers}"


def demo_nodes() -> list[str]:
    out = subprocess.run(["pgrep", "-f", "edgellm-demo-.*split.toml"], capture_output=True, text=True).stdout
    return out.split()


@pytest.mark.real_model
def test_ctrl_c_during_the_demo_stops_every_node(real_model_dir, tmp_path):
    env = dict(os.environ, EDGELLM_HOME=str(real_model_dir.parent.parent))
    demo = subprocess.Popen(
        [sys.executable, "-m", "edgellm", "demo", "--max-new-tokens", "400", "--chart", str(tmp_path / "c.png")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(demo_nodes()) < 3:
            assert demo.poll() is None, demo.stderr.read().decode()[-2000:] if demo.stderr else ""
            assert time.monotonic() < deadline, "the demo's nodes never came up"
            time.sleep(0.5)
        time.sleep(3)  # let generation start
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) != 0
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo_nodes() == [], "node processes outlived the demo"


def test_run_against_a_device_that_is_not_running_fails_naming_it(tmp_path):
    from edgellm.deploy.local_deployment import free_port

    port = free_port()
    topology = tmp_path / "t.toml"
    topology.write_text(
        f"""
[model]
name = "smollm2-135m"
cuts = []
[deployment]
route = ["phone"]
deadline_s = 2.0
[[nodes]]
name = "phone"
role = "device"
address = "127.0.0.1:{port}"
"""
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "edgellm", "run", "--topology", str(topology), "hello"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"phone at 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 30
