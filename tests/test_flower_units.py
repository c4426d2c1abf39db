"""The Flower engine's pieces without a simulation: rounds and settings, strategies (DP-FedAvg against the
project's mechanism, FedProx's proximal term, FedAdam's state across a checkpoint), the CLI's checks."""

from __future__ import annotations

import io
import tomllib
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from edgellm.cli.main import main
from edgellm.errors import ConfigError
from edgellm.flower.device import DeviceState, _proximal
from edgellm.flower.settings import FlowerSettings, Round, check_flower_config, round_checkpointed, rounds
from edgellm.flower.strategies import (
    DPFedAvg,
    build_strategy,
    from_record,
    load_strategy_state,
    strategy_state,
    to_record,
)
from edgellm.lora.fedavg import dp_fedavg, fedavg
from edgellm.privacy.config import DPConfig
from edgellm.train.config import DataSpec, TrainConfig


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps every Message with its process's run and node, which a ServerApp or ClientApp has set."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def config(**kwargs) -> TrainConfig:
    return TrainConfig(**{"steps": 5, "data": DataSpec(task="dates"), "clients": 3, "aggregate_every": 2, **kwargs})


def test_rounds_cover_the_steps_as_the_default_engines_fedavg_rounds_do():
    cfg = config(checkpoint_every=2)
    assert rounds(cfg) == [Round(1, 0, 2), Round(2, 2, 4), Round(3, 4, 5)]
    assert [r.number for r in rounds(cfg) if round_checkpointed(cfg, r)] == [1, 2, 3]
    assert [r.last for r in rounds(cfg) if cfg.aggregates_after(r.last)] == [2, 4, 5]
    assert [r.number for r in rounds(config()) if round_checkpointed(config(), r)] == [3]


@pytest.mark.parametrize(
    ("cfg", "settings", "match"),
    [
        (config(clients=1), FlowerSettings(), "--clients 2 or more"),
        (config(), FlowerSettings(min_clients=4), "exceeds --clients 3"),
        (config(dp=DPConfig(2.0, 0.5)), FlowerSettings(), "smashed data"),
        (config(qat="int4-g64"), FlowerSettings(), "LoRA adapters only"),
        (config(dp_fedavg=DPConfig(1.0, 0.5)), FlowerSettings(strategy="fedprox"), "replaces the fedprox"),
    ],
)
def test_runs_the_flower_engine_does_not_run_are_refused_with_what_to_do(cfg, settings, match):
    with pytest.raises(ConfigError, match=match):
        check_flower_config(cfg, settings)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"strategy": "krum"}, "unknown Flower strategy"), ({"fraction": 0.0}, "fraction"), ({"fraction": 1.5}, "fraction"),
     ({"min_clients": 0}, "min-clients"), ({"server_lr": 0.0}, "server-lr"), ({"proximal_mu": float("nan")}, "mu")],
)  # fmt: skip
def test_bad_flower_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FlowerSettings(**kwargs)


def test_settings_and_device_state_survive_their_wire_forms():
    settings = FlowerSettings(strategy="fedadam", fraction=0.25, min_clients=2, server_lr=0.05)
    assert FlowerSettings.from_json(settings.to_json()) == settings
    state = DeviceState("run-c1-ab", b"\x00\x01", [0.1, 0.1])
    assert DeviceState.from_record(ConfigRecord(state.to_record())) == state
    assert DeviceState.from_record(None) == DeviceState()


def adapters(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"a.lora_A.weight": torch.randn(4, 8, generator=gen), "a.lora_B.weight": torch.randn(8, 4, generator=gen)}
            for _ in range(n)]  # fmt: skip


def replies(states: list[dict[str, torch.Tensor]], weights: list[float]) -> list[Message]:
    out = []
    for node, (state, weight) in enumerate(zip(states, weights, strict=True), start=1):
        sent = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": to_record(state), "metrics": MetricRecord({"num-examples": weight})})
        out.append(Message(content, reply_to=sent))
    return out


def test_flowers_fedavg_is_the_projects_fedavg():
    states, weights = adapters(3), [16.0, 16.0, 8.0]
    got, _ = build_strategy(FlowerSettings(), 3, None).aggregate_train(1, replies(states, weights))
    assert got is not None
    want = fedavg(states, weights)
    for key, value in from_record(got).items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=1e-6)


def test_dp_fedavg_strategy_is_the_projects_mechanism_with_its_seeded_noise():
    dp = DPConfig(clip_norm=1.0, noise_multiplier=0.7, seed=5)
    strategy = build_strategy(FlowerSettings(), 3, dp)
    assert isinstance(strategy, DPFedAvg)
    strategy.salt = 4  # the round's last step
    states = adapters(3)
    got, _ = strategy.aggregate_train(2, replies(states, [1.0, 1.0, 1.0]))
    assert got is not None
    want = dp_fedavg(states, dp.clip_norm, dp.noise_multiplier, dp.generator(salt=4))
    for key, value in from_record(got).items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=1e-6)


def test_strategies_by_name():
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    assert type(build_strategy(FlowerSettings(), 4, None)) is FedAvg
    prox = build_strategy(FlowerSettings(strategy="fedprox", proximal_mu=0.3), 4, None)
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.3
    adam = build_strategy(FlowerSettings(strategy="fedadam", server_lr=0.02, fraction=0.5, min_clients=2), 4, None)
    assert isinstance(adam, FedAdam) and adam.eta == 0.02
    assert (adam.fraction_train, adam.min_train_nodes, adam.min_available_nodes) == (0.5, 2, 4)


def test_fedadam_continues_across_a_checkpoint_as_if_uninterrupted():
    class Grid:
        def get_node_ids(self):
            return [1, 2]

    def run(rounds_: int, resume_from=None):
        strategy = build_strategy(FlowerSettings(strategy="fedadam"), 2, None)
        arrays = to_record(adapters(1, seed=9)[0])
        start = 1
        if resume_from is not None:
            saved, arrays, start = resume_from
            load_strategy_state(strategy, saved)
        for number in range(start, rounds_ + 1):
            list(strategy.configure_train(number, arrays, ConfigRecord(), Grid()))
            arrays, _ = strategy.aggregate_train(number, replies(adapters(2, seed=number), [1.0, 1.0]))
            if number == 2 and resume_from is None:
                checkpoint = (strategy_state(strategy), arrays, 3)
        return arrays, checkpoint if resume_from is None else None

    whole, checkpoint = run(4)
    resumed, _ = run(4, resume_from=checkpoint)
    for key, value in from_record(whole).items():
        np.testing.assert_allclose(from_record(resumed)[key].numpy(), value.numpy(), rtol=0, atol=1e-7)


def test_fedprox_term_and_its_gradient():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    model = SimpleNamespace(params=params)
    term = _proximal(model, 0.5)  # type: ignore[arg-type]
    assert _proximal(model, 0.0) is None  # type: ignore[arg-type]
    anchor = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.ones_like(p))
    assert term is not None
    value = term()
    assert value.item() == pytest.approx(0.25 * sum(((p - a) ** 2).sum().item() for p, a in zip(params, anchor)))
    value.backward()
    for p, a in zip(params, anchor, strict=True):
        torch.testing.assert_close(p.grad, 0.5 * (p.detach() - a))


def run_cli(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(args)
    return code, out.getvalue()


def test_flower_options_need_the_flower_engine(capsys):
    code, _ = run_cli(["finetune", "--task", "dates", "--steps", "2", "--strategy", "fedprox"])
    assert code == 2
    assert "--engine flower" in capsys.readouterr().err


def test_print_run_config_gives_the_deployment_its_plan(tmp_path: Path, tiny_chat_dir):
    from test_finetune import topology

    topo = topology(tiny_chat_dir, tmp_path, servers=1)
    code, out = run_cli(["finetune", "--engine", "flower", "--topology", str(topo), "--task", "dates", "--steps", "4",
                         "--clients", "3", "--strategy", "fedadam", "--output", str(tmp_path / "run"),
                         "--print-run-config"])  # fmt: skip
    assert code == 0
    table = tomllib.loads(out)  # `flwr run APP CONNECTION --run-config FILE` reads these keys
    import json

    plan, settings = json.loads(table["plan"]), json.loads(table["flower"])
    assert plan["config"]["clients"] == 3 and plan["topology"] == str(topo.resolve()) and plan["attempt"]
    assert Path(plan["output"]).is_absolute()  # Flower's app processes run in folders of their own
    assert settings["strategy"] == "fedadam"


def test_a_round_no_device_completes_stops_the_run_with_the_hint_to_resume(tmp_path):
    """The ServerApp's rounds over a Grid whose devices answer hello and then fail every round."""
    import json

    from flwr.app import Error

    from edgellm.flower.server_app import RoundsFailed, run_rounds
    from edgellm.train.client import ClientPlan

    class Grid:
        def get_node_ids(self):
            return [11, 12]

        def send_and_receive(self, messages, timeout=None):
            out = []
            for msg in messages:
                if msg.metadata.message_type == MessageType.QUERY:  # hello: the device's index and adapter
                    detail = ConfigRecord({"json": json.dumps({"client": msg.metadata.dst_node_id - 11})})
                    content = RecordDict({"arrays": to_record(adapters(1)[0]), "detail": detail})
                    out.append(Message(content, reply_to=msg))
                else:
                    out.append(Message(Error(0, "radio link lost"), reply_to=msg))
            return out

    events: list[dict] = []
    plan = ClientPlan(config(clients=2), tmp_path, "run", "attempt")
    with pytest.raises(RoundsFailed, match="round 1: no device completed it.*--resume"):
        run_rounds(Grid(), plan, FlowerSettings(), events.append)
    assert [e["event"] for e in events] == ["flower", "dropped", "dropped"]
    assert sorted(e["client"] for e in events[1:]) == [0, 1]
