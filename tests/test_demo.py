"""`edgellm demo` end to end on the real model: three scenarios as real processes, same tokens, all stopped.

Leftover nodes are looked for among the processes the demo itself started (its process tree, watched while it
runs), never by name across the machine: other users' demos are not ours, and ours cannot hide behind a name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import psutil
import pytest

pytestmark = pytest.mark.multiprocess


class ProcessTree:
    """Every process started under `root`, recorded by polling while it runs.

    The psutil handles carry each process's start time, so a pid reused after one of ours exited is not ours.
    """

    def __init__(self, root: subprocess.Popen) -> None:
        self._root = psutil.Process(root.pid)
        self.seen: dict[int, tuple[psutil.Process, str]] = {}  # pid -> (handle, command line)

    def poll(self) -> None:
        try:
            children = self._root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            if child.pid not in self.seen:
                try:
                    self.seen[child.pid] = (child, " ".join(child.cmdline()))
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    continue  # gone before we could read it: it cannot be left over

    def nodes(self, topology: str = "") -> list[psutil.Process]:
        """The `edgellm node` processes seen so far (of topology files named `topology`), running or not."""
        return [p for p, cmd in self.seen.values() if " node " in f" {cmd} " and topology in cmd]

    def running(self) -> list[str]:
        """Command lines of the recorded processes still running (zombies waiting to be reaped do not count)."""
        alive = []
        for process, cmd in self.seen.values():
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(cmd)
            except psutil.NoSuchProcess:
                continue
        return alive


def watch(proc: subprocess.Popen, tree: ProcessTree, until: Callable[[], bool], timeout_s: float) -> None:
    """Poll `tree` every 0.1 s until `until()` holds or `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and not until():
        assert time.monotonic() < deadline, "timed out"
        tree.poll()
        time.sleep(0.1)


@pytest.mark.real_model
def test_demo_json_runs_three_scenarios_with_the_same_tokens(real_model_dir, tmp_path):
    chart = tmp_path / "demo.png"
    env = dict(os.environ, EDGELLM_HOME=str(real_model_dir.parent.parent))
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:  # files: no pipe to fill up
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm", "demo", "--plan", "manual", "--json", "--codec", "none", "--profile", "5g",
             "--max-new-tokens", "8", "--chart", str(chart), "What is the capital of France?"],
            stdout=out, stderr=err, text=True, env=env,
        )  # fmt: skip
        tree = ProcessTree(proc)
        try:
            watch(proc, tree, lambda: False, timeout_s=600)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == 0, (tmp_path / "err").read_text()[-2000:]
    report = json.loads((tmp_path / "out").read_text())
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
    assert len(tree.nodes("split.toml")) == 3, "the watch must have seen the split scenario's nodes"
    assert tree.running() == [], "stray node processes"


@pytest.mark.real_model
def test_ctrl_c_during_the_demo_stops_every_node(real_model_dir, tmp_path):
    env = dict(os.environ, EDGELLM_HOME=str(real_model_dir.parent.parent))
    with open(tmp_path / "err", "w") as err:
        demo = subprocess.Popen(
            [sys.executable, "-m", "edgellm", "demo", "--plan", "manual", "--max-new-tokens", "400", "--chart",
             str(tmp_path / "c.png")],
            stdout=subprocess.DEVNULL, stderr=err, env=env,
        )  # fmt: skip
    tree = ProcessTree(demo)
    try:
        watch(demo, tree, lambda: len(tree.nodes("split.toml")) >= 3, timeout_s=120)
        assert demo.poll() is None, (tmp_path / "err").read_text()[-2000:]
        time.sleep(3)  # let generation start
        tree.poll()
        demo.send_signal(signal.SIGINT)
        watch(demo, tree, lambda: False, timeout_s=60)  # and record whatever it starts while it stops
        assert demo.wait() != 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert tree.running() == [], "node processes outlived the demo"


@pytest.mark.real_model
@pytest.mark.slow
def test_planned_demo_tells_the_story_and_replans_after_a_link_change(real_model_dir, tmp_path):
    """The default demo: the paper topology, planned; every emulated setting in the report; a lossless plan gives
    the whole model's tokens; a link switched mid-answer is seen, re-planned around and migrated live."""
    chart = tmp_path / "demo.png"
    env = dict(os.environ, EDGELLM_HOME=str(real_model_dir.parent.parent))
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm", "demo", "--json", "--max-new-tokens", "20", "--switch-link",
             "phone-edge1=lte", "--switch-after", "6", "--chart", str(chart)],
            stdout=out, stderr=err, text=True, env=env,
        )  # fmt: skip
        tree = ProcessTree(proc)
        try:
            watch(proc, tree, lambda: False, timeout_s=900)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == 0, (tmp_path / "err").read_text()[-3000:]
    report = json.loads((tmp_path / "out").read_text())
    split, alone, cloud = (report["scenarios"][k] for k in ("split", "device_only", "cloud"))
    emulation = split["emulation"]["nodes"]
    assert emulation["phone"] == {"preset": "phone", "compute_scale": 4.0, "memory_mb": 1100}
    assert {link["profile"] for link in split["emulation"]["links"]} >= {"6g", "metro"}
    first = split["plan"]["stages"][0]
    # the raw text stays on the phone: it embeds (how many layers it also runs is the planner's measured choice)
    assert first["node"] == "phone" and first["start"] == 0
    assert report["lossless"] and report["same_tokens_as_whole_model"] is True
    assert alone["plan"]["stages"][0]["scheme"] != "none"  # the fp32 model does not fit the phone's budget
    for scenario in (split, alone, cloud):
        assert scenario["predicted"]["decode_ms_per_token"] > 0 and scenario["ttft_ms"] > 0
    # the switch: edge1 was first on the route; the re-planner moved the chain to start at edge2
    assert split["switch"]["link"] == "phone-edge1" and split["switch"]["profile"] == "lte"
    assert split["migrations"], "the re-planner did not migrate"
    assert split["migrations"][0]["step"] > 6  # seen 3 steps after the switch (min_samples): 11 tokens to spare
    assert chart.stat().st_size > 10_000
    assert tree.running() == [], "stray node processes"


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
