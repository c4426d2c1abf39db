"""Differential privacy's settings (issue 16): the `--dp-*` options, a generate request's and the training
settings' `dp`, the topology's per-link `dp`, and the `privacy` ledger reaching `generate --json` and, through
real node processes, `run`'s report. The mechanisms themselves: test_privacy_dp.py."""

from __future__ import annotations

import argparse
import json

import pytest

from edgellm.cli.dp_options import add_dp_arguments, dp_config, dp_fedavg_config, dp_fields
from edgellm.errors import ConfigError
from edgellm.privacy.accountant import epsilon_for
from edgellm.privacy.config import DPConfig
from edgellm.serve.generate_request import GenerateRequest
from edgellm.splitlearn.settings import ServerTrainConfig


# -- configuration -------------------------------------------------------------------------------------------------
def parse(argv: list[str], training: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dp_arguments(parser, training)
    return parser.parse_args(argv)


def test_dp_options_parse_and_refuse_half_settings():
    assert dp_config(parse([])) is None
    config = dp_config(parse(["--dp-clip", "4", "--dp-noise", "0.5", "--dp-max-epsilon", "8", "--dp-seed", "2"]))
    assert config == DPConfig(4.0, 0.5, max_epsilon=8.0, seed=2)
    with pytest.raises(ConfigError, match="both --dp-clip"):
        dp_fields(parse(["--dp-clip", "4"]))
    with pytest.raises(ConfigError, match="--dp-max-epsilon need"):
        dp_fields(parse(["--dp-max-epsilon", "4"]))
    with pytest.raises(ConfigError, match="delta must lie"):
        dp_config(parse(["--dp-clip", "4", "--dp-noise", "1", "--dp-delta", "2"]))
    train = parse(["--dp-fedavg-clip", "1", "--dp-fedavg-noise", "0.7", "--dp-delta", "1e-6"], training=True)
    assert dp_config(train) is None and dp_fedavg_config(train) == DPConfig(1.0, 0.7, delta=1e-6)
    with pytest.raises(ConfigError, match="--dp-grad-noise need"):
        dp_fields(parse(["--dp-grad-noise", "1"], training=True))


def test_a_generate_request_and_the_training_settings_carry_dp():
    request = GenerateRequest.from_json({"prompt": "hi", "dp": {"clip": 2, "noise": 1, "seed": 1}})
    assert request.dp == DPConfig(2.0, 1.0, seed=1)
    with pytest.raises(ConfigError, match="unknown key"):
        GenerateRequest.from_json({"prompt": "hi", "dp": {"clip": 2, "noise": 1, "sigma": 1}})
    settings_ = ServerTrainConfig(dp_fedavg=DPConfig(1.0, 0.5))
    assert ServerTrainConfig.from_json(settings_.to_json()) == settings_
    assert ServerTrainConfig.from_json(ServerTrainConfig().to_json()).dp_fedavg is None


def test_generate_cli_reports_privacy_in_its_json(tiny_chat_dir, tmp_path, monkeypatch, capsys):
    from edgellm.cli.main import main

    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path))
    argv = ["generate", "hello", "--model", str(tiny_chat_dir), "--cuts", "2", "--max-new-tokens", "3", "--json"]
    assert main([*argv, "--dp-clip", "2", "--dp-noise", "1.5", "--dp-seed", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    privacy = report["privacy"]
    assert privacy["mechanism"] == "smashed_data" and privacy["clip_norm"] == 2.0 and privacy["releases"] > 0
    assert privacy["epsilon"] == pytest.approx(epsilon_for(1.5, privacy["releases"], 1e-5), rel=1e-12)
    assert main([*argv, "--dp-clip", "2", "--dp-noise", "1.5", "--dp-max-epsilon", "0.01"]) == 2
    assert "privacy budget spent" in capsys.readouterr().err


# -- the topology's per-link field -------------------------------------------------------------------------------
def topology_doc(dp: dict, between: tuple[str, str] = ("device", "edge1"), cuts: list[int] | None = None) -> dict:
    names = ["device", "edge1", "edge2"]
    links = [{"between": list(pair)} for pair in (("device", "edge1"), ("edge1", "edge2"))]
    for link in links:
        if tuple(link["between"]) == between:
            link["dp"] = dp
    return {
        "model": {"name": "tiny", "cuts": cuts or [1, 3], "head": "device"},
        "deployment": {"route": names, "mode": "chain", "token": "t"},
        "nodes": [
            {"name": n, "role": "device" if n == "device" else "edge", "address": f"127.0.0.1:{5000 + i}"}
            for i, n in enumerate(names)
        ],  # fmt: skip
        "links": links,
    }


def test_a_link_dp_is_parsed_validated_and_only_allowed_on_the_devices_first_link():
    import tomllib

    from edgellm.deploy.node_builder import device_dp
    from edgellm.deploy.topology import parse_topology, render_toml

    def load(doc: dict):
        return parse_topology(tomllib.loads(render_toml(doc)), source="t.toml")

    topology = load(topology_doc({"clip": 4.0, "noise": 0.5, "max_epsilon": 8}))
    assert device_dp(topology) == DPConfig(4.0, 0.5, max_epsilon=8.0)
    assert device_dp(load(topology_doc({}, between=("x", "y")))) is None
    with pytest.raises(ConfigError, match=r"links\[0\]\.dp\.noise: missing"):
        load(topology_doc({"clip": 4.0}))
    with pytest.raises(ConfigError, match=r"links\[0\]\.dp: the DP delta"):
        load(topology_doc({"clip": 4.0, "noise": 1.0, "delta": 1.5}))
    with pytest.raises(ConfigError, match="not edge1 <-> edge2"):
        device_dp(load(topology_doc({"clip": 4.0, "noise": 1.0}, between=("edge1", "edge2"))))
    with pytest.raises(ConfigError, match="token ids"):
        device_dp(load(topology_doc({"clip": 4.0, "noise": 1.0}, cuts=[0, 2])))


@pytest.mark.multiprocess
def test_a_link_dp_reaches_the_run_report_through_real_node_processes(tiny_chat_dir, tmp_path):
    from edgellm.deploy.local_deployment import LocalDeployment, free_port
    from edgellm.deploy.node_builder import channel_config
    from edgellm.deploy.topology import write_topology
    from edgellm.errors import EdgellmError
    from edgellm.net.rpc import RemoteHop

    doc = {
        "model": {"name": str(tiny_chat_dir), "cuts": [2], "head": "device"},
        "deployment": {"route": ["device", "edge1"], "token": "dp-token", "deadline_s": 20.0},
        "nodes": [
            {"name": n, "role": "device" if n == "device" else "edge", "address": f"127.0.0.1:{free_port()}"}
            for n in ("device", "edge1")
        ],  # fmt: skip
        "links": [{"between": ["device", "edge1"], "dp": {"clip": 1.0, "noise": 2.0, "max_epsilon": 20.0}}],
    }
    path = tmp_path / "dp.toml"
    topology = write_topology(path, doc)
    with LocalDeployment(topology, path, tmp_path):
        device = topology.device
        assert device.address is not None
        hop = RemoteHop(device.name, device.address, channel_config(topology), sender="test")
        request = {"prompt_ids": [5, 17, 9, 33], "max_new_tokens": 3}
        try:
            report = [e for e in hop.generate(request) if "report" in e][0]["report"]
            privacy = report["privacy"]
            assert privacy["releases"] == 4 + len(report["new_tokens"]) - 1 and privacy["noise_std"] == 2.0
            assert privacy["epsilon"] == pytest.approx(epsilon_for(2.0, privacy["releases"], 1e-5), rel=1e-12)
            with pytest.raises(EdgellmError, match="cannot replace"):
                list(hop.generate({**request, "dp": {"clip": 1.0, "noise": 1.0}}))
            long = {"prompt_ids": list(range(5, 90)), "max_new_tokens": 2}
            with pytest.raises(EdgellmError, match="privacy budget spent"):
                list(hop.generate(long))
        finally:
            hop.shutdown()
