"""The Flower `ServerApp` of split federated learning: rounds of device training, aggregated by a Flower strategy.

Each round samples devices (the strategy's `fraction_train`, at least `min_train_nodes`), sends them the global
device-side adapter and the round's steps, waits for their replies (a device that fails or misses the round's
timeout is left out, as Flower does), and aggregates the replies. The edge servers' adapters never pass through
here: they stay on the servers, shared by all devices or one per device, as with the default engine. After the
last round every device exports and closes its sessions.

Checkpoints: after each checkpointed round the global adapter and the strategy's state go to
`<output>/flower/round-N.pt`; `resume` continues after the newest one (the devices and servers resume from
their own checkpoints of the same step).

In simulation (`edgellm.flower.runner`) the app is built with `make_server_app`; deployed, the module's `app`
reads the run's settings from the run config (`plan` and `flower`, JSON text: `edgellm finetune --engine flower
--print-run-config` prints them) and writes its events to `<output>/flower/events.jsonl`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from edgellm.errors import ConfigError, PeerError
from edgellm.splitlearn.checkpoints import atomic_save
from edgellm.train.client import ClientPlan
from edgellm.train.coordinator import plan_from_dict, plan_to_dict

from .settings import FlowerSettings, Round, round_checkpointed, rounds
from .strategies import DPFedAvg, build_strategy, from_record, load_strategy_state, strategy_state, to_record

log = logging.getLogger(__name__)

Event = dict[str, Any]


class RoundsFailed(PeerError):
    """No device completed a round (there is nothing to aggregate), or the devices did not start: the run stops;
    `--resume` continues from its last round checkpoint."""


def make_server_app(plan: ClientPlan, settings: FlowerSettings, emit: Callable[[Event], None]) -> ServerApp:
    """A ServerApp running `plan` with `settings`, reporting every event to `emit`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_rounds(grid, plan, settings, emit)

    return app


app = ServerApp()


@app.main()
def _deployed(grid: Grid, context: Context) -> None:
    if not str(context.run_config.get("plan", "")).strip():
        raise ConfigError(
            "the run config has no plan: run `flwr run APP CONNECTION --run-config FILE` with the FILE that "
            "`edgellm finetune --engine flower --print-run-config ...` prints (examples/flower/README.md)"
        )
    plan = plan_from_dict(json.loads(str(context.run_config["plan"])))
    settings = FlowerSettings.from_json(str(context.run_config.get("flower", "{}")))
    events = plan.output / "flower" / "events.jsonl"
    events.parent.mkdir(parents=True, exist_ok=True)
    with open(events, "a") as out:

        def emit(event: Event) -> None:
            out.write(json.dumps(event) + "\n")
            out.flush()

        run_rounds(grid, plan, settings, emit)


def run_rounds(grid: Grid, plan: ClientPlan, settings: FlowerSettings, emit: Callable[[Event], None]) -> None:
    """Run every round of `plan` not yet done, then the export."""
    cfg = plan.config
    random.seed(cfg.seed)  # Flower samples devices with `random`: the same devices on a rerun
    strategy = build_strategy(settings, cfg.clients, cfg.dp_fedavg)
    plan_json = json.dumps(plan_to_dict(plan))
    clients, arrays = _hello(grid, plan_json, cfg.clients, cfg.round_timeout_s)
    emit({"event": "flower", "nodes": len(clients), "strategy": type(strategy).__name__})
    done = 0
    if plan.resume:
        arrays, done = _resume(plan, strategy, arrays)
    trained: set[int] = set()
    sample = max(int(cfg.clients * settings.fraction), settings.min_clients) / cfg.clients
    for rnd in rounds(cfg)[done:]:
        start = time.perf_counter()
        config = ConfigRecord({"plan": plan_json, "first": rnd.first, "last": rnd.last, "sample-rate": sample,
                               "checkpoint": round_checkpointed(cfg, rnd)})  # fmt: skip
        if isinstance(strategy, DPFedAvg):
            strategy.salt = rnd.last
        messages = list(strategy.configure_train(rnd.number, arrays, config, grid))
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout_s))
        included = _report(replies, clients, rnd, emit)
        trained.update(n for n, c in clients.items() if c in included)
        new, _ = strategy.aggregate_train(rnd.number, replies)
        if new is None:
            raise RoundsFailed(
                f"round {rnd.number}: no device completed it ({len(replies)} replies, all failed: "
                f"see the log above); rerun with --resume to continue from the last round checkpoint "
                f"({plan.output}/flower/round-*.pt; with none, from the start)"
            )
        arrays = new
        sent = arrays.count_bytes() * (len(messages) + len(included))
        emit({"event": "round", "round": rnd.number, "sampled": len(messages), "clients": included,
              "adapter_bytes": sent, "wall_s": time.perf_counter() - start})  # fmt: skip
        if round_checkpointed(cfg, rnd):
            _save_round(plan, rnd, arrays, strategy)
    _export(grid, plan, plan_json, arrays, clients, trained, emit, cfg.round_timeout_s)


def _hello(grid: Grid, plan_json: str, clients: int, timeout: float) -> tuple[dict[int, int], ArrayRecord]:
    """Wait for every device; returns {node id: device index} and the adapter every device starts from."""
    while len(nodes := list(grid.get_node_ids())) < clients:
        log.info("waiting for devices: %d of %d connected", len(nodes), clients)
        time.sleep(1.0)
    replies = list(grid.send_and_receive(
        [_query(node, plan_json, "hello") for node in nodes], timeout=timeout))  # fmt: skip
    found: dict[int, int] = {}
    initial: ArrayRecord | None = None
    for reply in replies:
        if reply.has_error():
            raise RoundsFailed(f"device node {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
        detail = json.loads(str(reply.content["detail"]["json"]))
        found[reply.metadata.src_node_id] = int(detail["client"])
        initial = initial if initial is not None else reply.content.array_records["arrays"]
    if sorted(found.values()) != list(range(clients)) or initial is None:
        raise RoundsFailed(f"the devices' partition-ids are {sorted(found.values())}; expected 0..{clients - 1}, "
                           f"once each")  # fmt: skip
    return found, initial


def _query(node: int, plan_json: str, op: str, arrays: ArrayRecord | None = None, **extra: Any) -> Message:
    records: dict[str, Any] = {"config": ConfigRecord({"plan": plan_json, "op": op, **extra})}
    if arrays is not None:
        records["arrays"] = arrays
    return Message(RecordDict(records), message_type=MessageType.QUERY, dst_node_id=node)


def _report(replies: list[Message], clients: dict[int, int], rnd: Round, emit: Callable[[Event], None]) -> list[int]:
    """Emit each device's step events, or its drop-out; returns the devices whose replies count."""
    included = []
    for reply in replies:
        client = clients.get(reply.metadata.src_node_id)
        if reply.has_error():
            emit({"event": "dropped", "client": client, "round": rnd.number, "error": reply.error.reason})
            continue
        detail = json.loads(str(reply.content["detail"]["json"]))
        for event in detail["events"]:
            emit(event)
        included.append(int(detail["client"]))
        if detail.get("privacy"):
            emit({"event": "privacy", "client": detail["client"], "privacy": {"dp_fedavg": detail["privacy"]}})
    for client in sorted(included):
        emit({"event": "aggregate", "client": client, "step": rnd.last, "clients": sorted(included)})
    return sorted(included)


def _export(grid: Grid, plan: ClientPlan, plan_json: str, arrays: ArrayRecord, clients: dict[int, int],
            trained: set[int], emit: Callable[[Event], None], timeout: float) -> None:  # fmt: skip
    """Every device closes its sessions; those that write export the final adapter (with shared server adapters
    one device suffices: they would all write the same)."""
    nodes = list(clients)
    writers = set(trained) if plan.config.share == "per-client" else set(sorted(trained)[:1])
    messages = [_query(n, plan_json, "export", arrays, write=n in writers) for n in nodes]
    for reply in grid.send_and_receive(messages, timeout=timeout):
        client = clients.get(reply.metadata.src_node_id)
        if reply.has_error():
            emit({"event": "dropped", "client": client, "round": "export", "error": reply.error.reason})
            continue
        detail = json.loads(str(reply.content["detail"]["json"]))
        emit({"event": "done", "client": client, "steps": plan.config.steps, "adapter": detail["adapter"],
              "export": None, "sync_bytes": {}, "privacy": None})  # fmt: skip
    (plan.output / "flower").mkdir(parents=True, exist_ok=True)
    atomic_save({"arrays": from_record(arrays)}, plan.output / "flower" / "global-device-adapter.pt")


def _round_path(plan: ClientPlan, number: int) -> Path:
    return plan.output / "flower" / f"round-{number:06d}.pt"


def _save_round(plan: ClientPlan, rnd: Round, arrays: ArrayRecord, strategy: Any) -> None:
    state = {"round": rnd.number, "step": rnd.last, "arrays": from_record(arrays), "strategy": strategy_state(strategy)}
    (plan.output / "flower").mkdir(parents=True, exist_ok=True)
    atomic_save(state, _round_path(plan, rnd.number))
    for old in sorted((plan.output / "flower").glob("round-*.pt"))[:-3]:
        old.unlink(missing_ok=True)


def _resume(plan: ClientPlan, strategy: Any, initial: ArrayRecord) -> tuple[ArrayRecord, int]:
    """The newest round checkpoint's adapter and the rounds it covers (none: the initial adapter, 0)."""
    saved = sorted((plan.output / "flower").glob("round-*.pt"))
    if not saved:
        log.warning("no round checkpoint in %s/flower: starting from round 1", plan.output)
        return initial, 0
    state = torch.load(saved[-1], weights_only=True)
    load_strategy_state(strategy, state["strategy"])
    return to_record(state["arrays"]), int(state["round"])
