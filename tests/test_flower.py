"""`edgellm finetune --engine flower`: split federated learning with Flower's simulation engine (Ray) running the
devices, real node processes running the edge servers over the project's transport, a tiny model.

- With the same seed and settings (FedAvg, every device in every round, per-client server adapters), the Flower
  run's loss curve and final adapters equal the default engine's.
- A device that fails a round is left out of that round (Flower's own failure handling) and the run finishes.
- A run stopped after a checkpointed round resumes from it and ends as the uninterrupted run did.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from test_finetune import COMMON, finetune, topology

from edgellm.flower import client_app as flower_client
from edgellm.lora.peft_io import load_peft_adapter

pytestmark = pytest.mark.multiprocess  # node processes, and Ray's worker processes

STEPS = 4
ARGS = ["--steps", str(STEPS), "--clients", "2", "--aggregate-every", "2", "--checkpoint-every", "2",
        "--share", "per-client", *COMMON]  # fmt: skip
LOSS_TOL = 1e-5  # float32 sums in another order (numpy's weighted mean vs torch's): far below one step's change
ADAPTER_TOL = 1e-6


def flower_run(args: list[str], home: Path, app: ClientApp | None = None) -> dict:
    """`edgellm finetune --engine flower ARGS` in this process, optionally with another ClientApp."""
    if app is None:
        return finetune(["--engine", "flower", *args], home)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flower_client, "app", app)
        return finetune(["--engine", "flower", *args], home)


@pytest.fixture(scope="module")
def server(tiny_chat_dir, tmp_path_factory):
    """One edge server process for every run of this module (`--no-launch`): each run has its own name on it."""
    from edgellm.deploy.local_deployment import LocalDeployment
    from edgellm.deploy.topology import load_topology

    folder = tmp_path_factory.mktemp("flower-server")
    topo = topology(tiny_chat_dir, folder, servers=1)
    with LocalDeployment(load_topology(topo), topo, folder, ["edge1"], ["--checkpoint-dir", str(folder / "ckpt")]):
        yield topo


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """The same job on both engines: {"default": (output, report), "flower": (output, report)}."""
    folder = tmp_path_factory.mktemp("flower-ref")
    runs = {}
    for engine in ("default", "flower"):
        out = folder / engine
        args = ["--topology", str(server), "--no-launch", "--output", str(out), *ARGS]
        report = finetune(args, folder / "home") if engine == "default" else flower_run(args, folder / "home")
        runs[engine] = out, report
    return server, runs


def test_flower_run_equals_the_default_engine_run(reference):
    _, runs = reference
    (out_a, a), (out_b, b) = runs["default"], runs["flower"]
    assert sorted(b["losses"]) == ["0", "1"]
    for client in ("0", "1"):
        assert len(b["losses"][client]) == STEPS
        torch.testing.assert_close(torch.tensor(b["losses"][client]), torch.tensor(a["losses"][client]),
                                   rtol=0, atol=LOSS_TOL)  # fmt: skip
    assert b["flower"]["rounds"] == 2 and b["flower"]["included_per_round"] == [2, 2]
    assert b["flower"]["adapter_bytes_per_round"] > 0
    # The same smashed data on the wire (the frames differ only by the run's name in the session id).
    assert b["bytes_per_step"] == pytest.approx(a["bytes_per_step"], rel=1e-3)
    for client in (0, 1):
        mine = load_peft_adapter(out_b / f"client-{client}" / "adapter")[1]
        theirs = load_peft_adapter(out_a / f"client-{client}" / "adapter")[1]
        assert sorted(mine) == sorted(theirs)
        for key, value in theirs.items():
            torch.testing.assert_close(mine[key], value, rtol=0, atol=ADAPTER_TOL)
        assert any(".layers.1." in k for k in mine), "the server's half is in the export"


@pytest.mark.parametrize("engine", ["default", "flower"])
def test_per_client_devices_end_with_one_device_half_and_their_own_server_halves(reference, engine):
    _, runs = reference
    out, result = runs[engine]
    assert sorted(str(Path(a).relative_to(out)) for a in result["adapters"]) == ["client-0/adapter", "client-1/adapter"]
    a, b = (load_peft_adapter(out / f"client-{k}" / "adapter")[1] for k in (0, 1))
    server = [k for k in a if ".layers.1." in k or ".layers.2." in k or ".layers.3." in k]
    device = [k for k in a if k not in server]
    assert server and device
    for key in device:  # the last round's FedAvg
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert any(not torch.equal(a[k], b[k]) for k in server)
    if engine == "default":
        assert all(sum(sync.values()) > 0 for sync in result["sync_bytes_per_client"].values())  # rounds went out


# A device that fails: a ClientApp around the project's, whose device 1 raises in round 2 (Ray's workers import
# this module by name, so it must be importable there: the runner passes sys.path on).
flaky = ClientApp()


@flaky.train()
def _flaky_train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    fail = json.loads(Path(json.loads(str(config["plan"]))["output"], "fail.json").read_text())
    client = int(context.node_config["partition-id"])
    if [client, int(config["first"])] in fail:
        raise RuntimeError(f"device {client} lost its radio link (test fault)")
    return flower_client.train(msg, context)


@flaky.query()
def _flaky_query(msg: Message, context: Context) -> Message:
    return flower_client.query(msg, context)


def test_a_device_failing_a_round_is_left_out_and_the_run_finishes(server, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "fail.json").write_text(json.dumps([[1, 2]]))  # device 1, the round starting at step 2
    args = ["--topology", str(server), "--no-launch", "--output", str(out), *ARGS[:3], "3", *ARGS[4:],
            "--cpus-per-client", "2"]  # fmt: skip
    result = flower_run(args, tmp_path / "home", flaky)
    assert result["dropped_clients"] == [1]
    assert result["flower"]["included_per_round"] == [3, 2]
    assert [d["round"] for d in result["flower"]["dropouts"]] == [2]
    assert len(result["losses"]["0"]) == len(result["losses"]["2"]) == STEPS
    assert len(result["losses"]["1"]) == 2  # its first round only
    assert sorted(Path(a).parent.name for a in result["adapters"]) == ["client-0", "client-1", "client-2"]


def test_a_stopped_run_resumes_from_its_last_round_checkpoint(reference, tmp_path):
    """The reference Flower run as a run stopped after round 1 leaves it (its round-1 checkpoints, on the device
    side, the ServerApp's and the server's, and nothing later), resumed: it ends as the run that never stopped.
    (A round no device completes stops a run: tests/test_flower_units.py.)"""
    topo, runs = reference
    ref_out, whole = runs["flower"]
    out = tmp_path / "run"
    shutil.copytree(ref_out, out, ignore=shutil.ignore_patterns("adapter", "step-00000004.pt", "round-000002.pt",
                                                                 "global-device-adapter.pt", "logs"))  # fmt: skip
    assert sorted(p.name for p in (out / "flower").glob("round-*.pt")) == ["round-000001.pt"]
    # One Ray worker runs both devices here (two did in the reference run): the numbers must not depend on it.
    args = ["--topology", str(topo), "--no-launch", "--output", str(out), *ARGS, "--cpus-per-client", "2"]
    resumed = flower_run([*args, "--resume"], tmp_path / "home")
    assert resumed["start_step"] == 2 and resumed["flower"]["rounds"] == 1
    for client in ("0", "1"):
        assert resumed["losses"][client] == pytest.approx(whole["losses"][client][2:], abs=LOSS_TOL)
    for client in (0, 1):
        mine = load_peft_adapter(out / f"client-{client}" / "adapter")[1]
        for key, value in load_peft_adapter(ref_out / f"client-{client}" / "adapter")[1].items():
            torch.testing.assert_close(mine[key], value, rtol=0, atol=ADAPTER_TOL)
