"""The device's Flower `ClientApp`: one split-learning device per SuperNode (or virtual device in simulation).

It takes three messages from the ServerApp (`edgellm.flower.server_app`):
- query `hello`: which device it is, and the device-side adapter every device starts from;
- train: a round of split training steps from the global device-side adapter, over the project's transport to
  the edge servers (text, labels, embedding, first layers and head stay here); replies with its adapter, its
  FedAvg weight and its step events;
- query `export`: the final adapter in peft format (the global device side and its servers' side); closes its
  sessions on the servers.

The run's settings come in each message (`plan`), so one ClientApp object serves every run. A SuperNode started
with `--node-config "partition-id=K"` is device K; `output` and `topology` in its node config override the
plan's paths on that machine. Between rounds the device's state (its session on the servers, its optimizer)
lives in the node's Flower context.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgellm.train.client import ClientPlan
from edgellm.train.coordinator import plan_from_dict

from . import device
from .strategies import WEIGHT_KEY, from_record, to_record

STATE_KEY = "edgellm-device"

app = ClientApp()


def device_plan(config: Any, context: Context) -> ClientPlan:
    """The plan of this node's device: the message's run settings, this node's index and local paths."""
    plan = plan_from_dict(json.loads(str(config["plan"])))
    node = context.node_config
    if "partition-id" not in node:
        raise KeyError("this SuperNode has no partition-id: start it with --node-config 'partition-id=K'")
    plan = replace(plan, client=int(node["partition-id"]))
    if "output" in node:
        plan = replace(plan, output=Path(str(node["output"])))
    if "topology" in node:
        plan = replace(plan, topology=Path(str(node["topology"])))
    return plan


def _state(context: Context) -> device.DeviceState:
    return device.DeviceState.from_record(context.state.config_records.get(STATE_KEY))


def _keep(context: Context, state: device.DeviceState) -> None:
    context.state[STATE_KEY] = ConfigRecord(state.to_record())


def _number(config: ConfigRecord, key: str, default: float | None = None) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"message config {key!r} must be a number, got {value!r}")
    return value


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    plan = device_plan(config, context)
    order = device.RoundOrder(
        int(_number(config, "first")), int(_number(config, "last")), bool(config["checkpoint"]),
        _number(config, "proximal-mu", 0.0), _number(config, "sample-rate"),
    )  # fmt: skip
    adapter = from_record(msg.content.array_records["arrays"])
    trained, weight, events, state, ledger = device.train_round(plan, _state(context), adapter, order)
    _keep(context, state)
    detail = {"client": plan.client, "events": events, "privacy": ledger}
    losses = [e["loss"] for e in events if e["event"] == "step"]
    metrics = MetricRecord({WEIGHT_KEY: weight, "loss": sum(losses) / max(len(losses), 1)})
    content = RecordDict(
        {"arrays": to_record(trained), "metrics": metrics, "detail": ConfigRecord({"json": json.dumps(detail)})}
    )
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    plan = device_plan(config, context)
    op = str(config["op"])
    records: dict[str, Any] = {}
    detail: dict[str, Any] = {"client": plan.client}
    if op == "hello":
        records["arrays"] = to_record(device.initial_adapter(plan))
    elif op == "export":
        state = _state(context)
        adapter = from_record(msg.content.array_records["arrays"])
        detail["adapter"] = device.export(plan, state, adapter) if bool(config["write"]) else None
        if not bool(config["write"]):
            device.close(plan, state)
        _keep(context, replace(state, session=""))
    else:
        raise ValueError(f"unknown query {op!r}; expected hello or export")
    records["detail"] = ConfigRecord({"json": json.dumps(detail)})
    return Message(RecordDict(records), reply_to=msg)
