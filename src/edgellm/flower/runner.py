"""`edgellm finetune --engine flower`: the run's edge servers as local processes, its devices as virtual devices
of Flower's simulation engine (Ray), the ServerApp in this process; the same report as the default engine.

The servers are the project's own node processes over its gRPC transport, exactly as with the default engine;
only the devices' side and the aggregation move to Flower. Across machines the same apps run on Flower's
deployment engine (docs/TRAINING.md).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgellm.deploy.local_deployment import LocalDeployment
from edgellm.deploy.topology import load_topology
from edgellm.errors import ConfigError
from edgellm.train.coordinator import Event, FinetuneJob, checkpoint_dir, prepare, publish, report

from .settings import FlowerSettings, check_flower_config, rounds

log = logging.getLogger(__name__)


def run_flower(job: FinetuneJob, settings: FlowerSettings, on_event: Any, client_app: Any = None) -> dict[str, Any]:
    """Run `job` on Flower's simulation engine; `on_event` sees every event. Returns the run's report (the
    default engine's, plus `flower`: rounds, rounds per minute, adapter bytes per round, drop-outs).

    Args:
        client_app: the ClientApp to run (default: `edgellm.flower.client_app.app`).

    Raises:
        ConfigError: settings the Flower engine does not run, or a topology it cannot use.
        RoundsFailed: a round in which no device succeeded.
    """
    check_flower_config(job.plan.config, settings)
    if job.plan.topology is None:
        raise ConfigError("--engine flower trains through a split: pass --topology (its head on the device)")
    if job.client is not None:
        raise ConfigError("--engine flower runs every device itself; across machines use Flower's SuperNodes")
    job = prepare(job)
    plan = job.plan
    assert plan.topology is not None
    topology = load_topology(plan.topology)
    if plan.config.clients > topology.limits.max_sessions:
        raise ConfigError(
            f"{plan.config.clients} devices each keep a session on every server, but {topology.source} allows "
            f"max_sessions = {topology.limits.max_sessions}: raise it in its [deployment] table"
        )
    start_round = _done_rounds(plan.output) if plan.resume else 0
    plan = replace(plan, resume=plan.resume and start_round > 0)
    events: list[Event] = []

    def collect(event: Event) -> None:
        events.append(event)
        on_event(event)

    started = time.perf_counter()
    logs = plan.output / "logs"
    logs.mkdir(exist_ok=True)
    with ExitStack() as stack:
        servers = [n.name for n in topology.servers]
        if job.launch and servers:
            node_args = ["--checkpoint-dir", str(checkpoint_dir(plan.output).resolve())]
            replicas = [n.name for n in topology.nodes if n.replica_of is not None]
            stack.enter_context(
                LocalDeployment(topology, Path(str(plan.topology)), logs, [*servers, *replicas], node_args)
            )
        _simulate(plan, settings, collect, client_app)
    wall = time.perf_counter() - started
    start_step = rounds(plan.config)[start_round - 1].last if start_round else 0
    return _report(plan, settings, events, wall, start_step)


def _simulate(plan: Any, settings: FlowerSettings, collect: Any, client_app: Any) -> None:
    from flwr.simulation import run_simulation

    from . import client_app as clients
    from .server_app import make_server_app

    saved = os.environ.get("PYTHONPATH")  # Flower's Ray backend rewrites it for its workers
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    if not log.isEnabledFor(logging.DEBUG):  # our events report the rounds; Flower's own lines only with --debug
        flwr_log.setLevel(logging.ERROR)
    try:
        run_simulation(
            server_app=make_server_app(plan, settings, collect),
            client_app=client_app or clients.app,
            num_supernodes=plan.config.clients,
            backend_config={
                "client_resources": {"num_cpus": settings.cpus_per_client, "num_gpus": 0.0},
                "init_args": {"num_cpus": os.cpu_count() or 1, "log_to_driver": False, "logging_level": "error"},
            },
        )
    finally:
        flwr_log.setLevel(level)
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _done_rounds(output: Path) -> int:
    import torch

    saved = sorted((output / "flower").glob("round-*.pt"))
    return int(torch.load(saved[-1], weights_only=True)["round"]) if saved else 0


def _report(plan: Any, settings: FlowerSettings, events: list[Event], wall: float, start_step: int) -> dict[str, Any]:
    out = report(plan, events, wall, start_step)
    done = sorted((e for e in events if e["event"] == "done" and e.get("adapter")), key=lambda e: e["client"])
    if plan.config.share == "shared" and done:
        adapters = [str(publish(Path(done[0]["adapter"]), plan.output / "adapter"))]
    else:
        adapters = [e["adapter"] for e in done]
    privacy: dict[str, Any] = {}
    for e in events:
        if e["event"] == "privacy":
            privacy[str(e["client"])] = e["privacy"]
    rounds_done = [e for e in events if e["event"] == "round"]
    dropped = [e for e in events if e["event"] == "dropped"]
    smashed = sum(sum(e["bytes"].values()) for e in events if e["event"] == "step")
    out.update({
        "adapters": adapters, "exports": [], "privacy": privacy or None,
        "dropped_clients": sorted({e["client"] for e in dropped if e["client"] is not None}),
        "flower": {
            "strategy": settings.strategy if plan.config.dp_fedavg is None else "dp-fedavg",
            "fraction": settings.fraction, "rounds": len(rounds_done),
            "rounds_per_min": 60.0 * len(rounds_done) / max(sum(e["wall_s"] for e in rounds_done), 1e-9),
            "round_wall_s": [e["wall_s"] for e in rounds_done],
            "adapter_bytes_per_round": sum(e["adapter_bytes"] for e in rounds_done) / max(len(rounds_done), 1),
            "smashed_bytes_per_round": smashed / max(len(rounds_done), 1),  # activations + gradients, all devices
            "sampled_per_round": [e["sampled"] for e in rounds_done],
            "included_per_round": [len(e["clients"]) for e in rounds_done],
            "dropouts": [{"client": e["client"], "round": e["round"], "error": e["error"]} for e in dropped],
        },
    })  # fmt: skip
    return out
