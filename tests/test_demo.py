"""`edgellm demo` end to end on the real model: three scenarios as real processes, same tokens, all stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
