"""`edgellm finetune` end to end: real node and client processes, a tiny model with a tiny tokenizer. The test
process coordinates the runs that end normally (one Python start less each); a run a test kills is a process.

Kill a process mid-training, restart with --resume: the loss curve continues exactly as an uninterrupted run's.
Several clients: FedAvg rounds leave every client with the same device-side adapter.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest
import torch

from edgellm.cli.main import main
from edgellm.deploy.local_deployment import free_port
from edgellm.deploy.topology import write_topology
from edgellm.train.client import latest_checkpoint

pytestmark = pytest.mark.multiprocess  # every test runs `edgellm finetune`, which launches nodes and clients

STEPS = 24  # the resume test kills a run twice, a checkpoint (4 steps) apart, well before the end
COMMON = ["--task", "dates", "--task-examples", "200", "--batch-size", "2", "--seq-len", "64", "--lr", "5e-3",
          "--lora-rank", "4", "--json"]  # fmt: skip


def topology(model_dir: Path, folder: Path, servers: int = 2) -> Path:
    names = ["phone", *(f"edge{i + 1}" for i in range(servers))]
    doc = {
        "model": {"name": str(model_dir), "cuts": [1, 3][:servers] if servers < 3 else [1, 2, 3], "head": "device"},
        "deployment": {"route": names, "mode": "chain", "deadline_s": 30.0},
        "nodes": [
            {"name": n, "role": "device" if i == 0 else "edge", "address": f"127.0.0.1:{free_port()}"}
            for i, n in enumerate(names)
        ],
        "links": [{"between": [a, b], "profile": "6g", "codec": "none"} for a, b in zip(names, names[1:])],
    }
    path = folder / "topology.toml"
    write_topology(path, doc)
    return path


def env(home: Path) -> dict[str, str]:
    return {**os.environ, "EDGELLM_HOME": str(home), "OMP_NUM_THREADS": "1"}


def finetune(args: list[str], home: Path) -> dict:
    """`edgellm finetune ARGS` (with --json) run to the end, its report. This process is the coordinator (the one a
    shell would start: the tests that kill a run start it as a process of its own); the servers and clients it
    starts are processes, in the environment `env(home)` gives them."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setenv("EDGELLM_HOME", str(home))
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setattr(signal, "signal", lambda *_: None)  # keep pytest's own handlers
        code = main(["finetune", *args])
    assert code == 0, f"finetune exited with {code} (its stderr is in the captured output)"
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def uninterrupted(tiny_chat_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune-ref")
    topo = topology(tiny_chat_dir, folder)
    args = ["--topology", str(topo), "--steps", str(STEPS), "--checkpoint-every", "4", "--output", str(folder / "run")]
    result = finetune(args + COMMON, folder / "home")
    return topo, result


def test_finetune_trains_through_the_split_and_exports_a_peft_adapter(uninterrupted):
    _, result = uninterrupted
    losses = result["losses"]["0"]
    assert len(losses) == STEPS
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, "the loss must go down"
    assert set(result["bytes_per_step"]) == {"phone->edge1", "edge1->edge2"}
    assert result["device_trainable_params"] > 0 and set(result["server_trainable_params"]) == {"edge1", "edge2"}
    adapter = Path(result["adapters"][0])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4


def victim(proc: psutil.Process, which: str) -> psutil.Process:
    for child in proc.children(recursive=True):
        cmd = " ".join(child.cmdline())
        if which.startswith("client") and "--worker" in cmd and (which == "client" or f"{which}.plan" in cmd):
            return child
        if not which.startswith("client") and f"--name {which}" in cmd:
            return child
    raise AssertionError(f"no {which} process among {[c.cmdline() for c in proc.children(recursive=True)]}")


def wait_for_checkpoint(proc: subprocess.Popen, folder: Path, past: int) -> None:
    """Until `folder` holds a device checkpoint of a step after `past`; the run must not end first."""
    deadline = time.monotonic() + 240
    while latest_checkpoint(folder) <= past:
        assert proc.poll() is None and time.monotonic() < deadline, "finetune ended before its next checkpoint"
        time.sleep(0.05)


def test_resume_after_kills_continues_the_same_loss_curve(uninterrupted, tmp_path):
    """One run killed twice: its client at the first checkpoint, then, resumed, a server at the next one. Each kill
    is a failed peer (exit 3, pointing at --resume); the last resume's losses are the uninterrupted run's, which
    they can only be if the first resume continued exactly too (the second starts from its checkpoint)."""
    topo, reference = uninterrupted
    home, out = tmp_path / "home", tmp_path / "run"
    args = ["--topology", str(topo), "--steps", str(STEPS), "--checkpoint-every", "4", "--output", str(out), *COMMON]
    cmd = [sys.executable, "-m", "edgellm", "finetune", *args]
    for which, resume in (("client", []), ("edge2", ["--resume"])):
        past = latest_checkpoint(out / "client-0")
        proc = subprocess.Popen([*cmd, *resume], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env(home))  # fmt: skip
        wait_for_checkpoint(proc, out / "client-0", past)
        victim(psutil.Process(proc.pid), which).send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 3, stderr[-2000:]  # a killed client or server is a failed peer: resume
        assert "--resume" in stderr and ("client 0" in stderr or "edge2" in stderr), stderr[-2000:]

    resumed = finetune(args + ["--resume"], home)
    start = resumed["start_step"]
    assert 8 <= start < STEPS
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]["0"]), torch.tensor(reference["losses"]["0"][start:]), rtol=1e-5, atol=1e-6
    )


def test_resume_refuses_a_run_folder_with_other_settings(uninterrupted, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path))
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # keep pytest's own handlers
    topo, reference = uninterrupted
    out = Path(reference["output"])
    # in this process: both are refused before anything starts
    code = main(["finetune", "--topology", str(topo), "--steps", "3", "--output", str(out), "--resume", *COMMON])
    assert code == 2 and "other settings" in capsys.readouterr().err
    code = main(["finetune", "--topology", str(topo), "--steps", str(STEPS), "--output", str(out), *COMMON])
    assert code == 2 and "--resume" in capsys.readouterr().err


@pytest.fixture(scope="module")
def federated(tiny_chat_dir, tmp_path_factory):
    """Federated runs of 4 steps, FedAvg every 2, a checkpoint every 2, by (clients, share, servers): each is run
    once and read by every test that asks for it. Returns (args, output folder, home, report)."""
    runs = {}

    def run(clients: int, share: str, servers: int):
        if (clients, share, servers) not in runs:
            folder = tmp_path_factory.mktemp(f"federated-{clients}-{share}-{servers}")
            where = ["--model", str(tiny_chat_dir)]
            if servers:
                where = ["--topology", str(topology(tiny_chat_dir, folder, servers=servers))]
            out, home = folder / "run", folder / "home"
            args = [*where, "--steps", "4", "--clients", str(clients), "--aggregate-every", "2",
                    "--checkpoint-every", "2", "--share", share, "--output", str(out), *COMMON]  # fmt: skip
            runs[clients, share, servers] = args, out, home, finetune(args, home)
        return runs[clients, share, servers]

    return run


# (2, "per-client", 1) is tests/test_flower.py's reference run, on this engine and on Flower's.
@pytest.mark.parametrize(("clients", "share", "servers"), [(3, "shared", 1), (2, "shared", 0)])
def test_federated_clients_end_each_round_with_the_same_device_adapter(federated, clients, share, servers):
    _, out, _, result = federated(clients, share, servers)
    assert sorted(result["losses"]) == [str(k) for k in range(clients)]
    assert all(sum(sync.values()) > 0 for sync in result["sync_bytes_per_client"].values())  # the rounds went out
    states = [torch.load(out / f"client-{k}" / "step-00000004.pt")["adapter"] for k in range(clients)]
    assert states[0], "the device holds adapters"
    for other in states[1:]:
        for key, value in states[0].items():
            torch.testing.assert_close(other[key], value, rtol=0, atol=0)
    expected = ["adapter"] if share == "shared" else [f"client-{k}/adapter" for k in range(clients)]
    assert sorted(str(Path(a).relative_to(out)) for a in result["adapters"]) == expected
    if share == "per-client":  # the server-side halves differ per client, the device halves do not
        from edgellm.lora.peft_io import load_peft_adapter

        a = load_peft_adapter(out / "client-0" / "adapter")[1]
        b = load_peft_adapter(out / "client-1" / "adapter")[1]
        server_keys = [k for k in a if ".layers.1." in k or ".layers.2." in k]
        assert server_keys and any(not torch.equal(a[k], b[k]) for k in server_keys)


def test_qlora_trains_float_adapters_over_a_4bit_base_on_every_node(tiny_chat_dir, tmp_path):
    out = tmp_path / "run"
    topo = topology(tiny_chat_dir, tmp_path)
    args = ["--topology", str(topo), "--steps", "8", "--quant", "int4", "--output", str(out), *COMMON]
    result = finetune(args, tmp_path / "home")
    losses = result["losses"]["0"]
    assert losses[-1] < losses[0]
    # Without --checkpoint-every: one checkpoint per side, after the last step, all in the run's folder.
    assert result["run"].startswith("run-")  # the folder's name and a hash of its full path
    servers = out / "checkpoints" / result["run"]
    for node in ("edge1", "edge2"):
        assert [p.name for p in (servers / node / "shared").iterdir()] == ["step-00000008.pt"]
    assert [p.name for p in (out / "client-0").glob("step-*.pt")] == ["step-00000008.pt"]
    assert not (tmp_path / "home" / "checkpoints").exists()  # nothing in the shared cache
    assert 'quant = "int4"' in (out / "topology.toml").read_text()  # what the launched servers loaded
    assert list((tmp_path / "home" / "quant").iterdir()), "the quantized stages were built and cached"
    config = json.loads((Path(result["adapters"][0]) / "adapter_config.json").read_text())
    assert config["r"] == 4


def test_a_client_that_dies_drops_out_and_the_others_finish(tiny_chat_dir, tmp_path):
    out = tmp_path / "run"
    topo = topology(tiny_chat_dir, tmp_path, servers=1)
    args = ["--topology", str(topo), "--steps", "12", "--clients", "3", "--aggregate-every", "2",
            "--round-timeout", "3", "--output", str(out), *COMMON]  # fmt: skip
    cmd = [sys.executable, "-m", "edgellm", "finetune", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp_path / "home"))
    deadline = time.monotonic() + 240
    while not list((out / "logs").glob("client-2.log")) or not (out / "client-2").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    victim(psutil.Process(proc.pid), "client-2").send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-2000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["dropped_clients"] == [2]
    assert len(result["losses"]["0"]) == len(result["losses"]["1"]) == 12
    assert Path(result["adapters"][0], "adapter_config.json").exists()


def test_devices_started_separately_join_one_run(tiny_chat_dir, tmp_path):
    from edgellm.deploy.local_deployment import LocalDeployment
    from edgellm.deploy.topology import load_topology

    path = topology(tiny_chat_dir, tmp_path, servers=1)
    topo = load_topology(path)
    home = tmp_path / "home"
    os.environ["EDGELLM_HOME"], old = str(home), os.environ.get("EDGELLM_HOME")
    try:
        with LocalDeployment(topo, path, tmp_path, names=["edge1"]):  # the server, already running
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "edgellm",
                        "finetune",
                        "--topology",
                        str(path),
                        "--steps",
                        "4",
                        "--clients",
                        "2",
                        "--client",
                        str(k),
                        "--aggregate-every",
                        "2",
                        "--no-launch",
                        "--run",
                        "r1",
                        "--attempt",
                        "launch-1",
                        "--output",
                        str(tmp_path / f"device{k}"),
                        *COMMON,
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env(home),
                )  # fmt: skip
                for k in range(2)
            ]
            outs = [p.communicate(timeout=240) for p in procs]
    finally:
        if old is None:
            del os.environ["EDGELLM_HOME"]
        else:
            os.environ["EDGELLM_HOME"] = old
    for p, (_, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-2000:]
    states = [torch.load(tmp_path / f"device{k}" / f"client-{k}" / "step-00000004.pt")["adapter"] for k in range(2)]
    assert states[0] and all(torch.equal(states[0][key], states[1][key]) for key in states[0])


def test_several_clients_resume_together_from_the_newest_step_all_of_them_have(federated, tmp_path):
    args, shared, home, first = federated(3, "shared", 1)
    out = tmp_path / "run"
    shutil.copytree(shared, out)  # the run folder as it ended (its recorded name, its servers' checkpoints)
    at = args.index("--output")
    args = [*args[:at], "--output", str(out), *args[at + 2 :]]
    server = out / "checkpoints" / first["run"] / "edge1" / "shared"  # the servers it started kept theirs there
    assert sorted(p.name for p in server.iterdir()) == ["step-00000002.pt", "step-00000004.pt"]
    (out / "client-1" / "step-00000004.pt").unlink()  # client 1 died before its last checkpoint
    resumed = finetune([*args, "--resume"], home)
    assert resumed["start_step"] == 2 and resumed["run"] == first["run"]
    assert [len(v) for v in resumed["losses"].values()] == [2, 2, 2]


def test_a_killed_server_fails_over_to_its_replica_from_the_last_checkpoint(uninterrupted, tmp_path):
    """The reference run's topology plus a replica of edge2 ("spare2"): edge2 is SIGKILLed after a checkpoint; the
    client goes on through spare2 from that checkpoint (it reads edge2's server checkpoint), in the same run, and
    the loss curve is the uninterrupted run's."""
    topo, reference = uninterrupted
    doc = tomllib.loads(topo.read_text())
    doc["nodes"].append(
        {"name": "spare2", "role": "edge", "replica_of": "edge2", "address": f"127.0.0.1:{free_port()}"}
    )
    replicated = tmp_path / "replicated.toml"
    write_topology(replicated, doc)
    home, out = tmp_path / "home", tmp_path / "run"
    args = ["--topology", str(replicated), "--steps", str(STEPS), "--checkpoint-every", "4", "--output", str(out),
            *COMMON]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "edgellm", "finetune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(home))  # fmt: skip
    wait_for_checkpoint(proc, out / "client-0", 4)
    victim(psutil.Process(proc.pid), "edge2").send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    (failover,) = result["failovers"]
    assert failover["down"] == ["edge2"] and failover["resume_step"] >= 8
    assert "resuming from step" in stderr
    torch.testing.assert_close(
        torch.tensor(result["losses"]["0"]), torch.tensor(reference["losses"]["0"]), rtol=1e-5, atol=1e-6
    )
