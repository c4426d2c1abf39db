"""`edgellm finetune`'s engine: start the servers and one process per client, follow their progress, report.

Each client is a real device process (`edgellm finetune --worker PLAN`) that prints one JSON event per line;
this coordinator only starts processes and reads events, so a client on another machine runs the same code.
Without a topology there is nothing to split: the whole model trains in this process (centralized).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from edgellm.deploy.local_deployment import LocalDeployment, ensure_local_token
from edgellm.deploy.node_builder import channel_config
from edgellm.deploy.topology import load_topology, write_topology
from edgellm.errors import ConfigError, ProcessFailed
from edgellm.net.rpc import ChannelConfig, serve
from edgellm.splitlearn.rounds import AggregatorServer
from edgellm.store.paths import replace_dir
from edgellm.train.client import ClientPlan, check_topology, checkpoint_steps, latest_checkpoint
from edgellm.train.config import config_from_dict, config_to_dict
from edgellm.train.failover import run_client_failover

log = logging.getLogger(__name__)

Event = dict[str, Any]


class TrainingFailed(ProcessFailed):
    """A client process failed; the run can continue from its last checkpoint with `--resume`.

    A `ProcessFailed`: the CLI exits with the client's own code where that names a kind (2 bad input, 4 busy, 1 a
    bug), else 3 (killed, or its peers failed: resume).
    """


@dataclass(frozen=True)
class FinetuneJob:
    """A whole fine-tuning run as the CLI asks for it.

    Attributes:
        plan: the settings every client shares (`client` is set per process).
        launch: start the topology's servers as local processes (else they must be running).
        quant: quantize the frozen base of every stage (QLoRA); written into the run's copy of the topology.
        client: run only this client, here, against running servers (a device joining from its own machine).
        attempt: the launch id every separately started client of one launch shares (default: a fresh one).
    """

    plan: ClientPlan
    launch: bool = True
    quant: str | None = None
    client: int | None = None
    attempt: str | None = None

    def __post_init__(self) -> None:
        if self.client is None:
            return
        if not 0 <= self.client < self.plan.config.clients:
            raise ConfigError(f"--client {self.client} is out of range for --clients {self.plan.config.clients}")
        if self.launch:
            raise ConfigError("--client K joins servers that are already running: add --no-launch")
        if self.plan.config.clients > 1 and not self.attempt:
            raise ConfigError(
                "clients that start separately must share one launch id: pass the same --attempt ID to each"
            )


def run_name(output: Path) -> str:
    """The run's default name (letters, digits, '.', '_' and '-'): the one `output/run.json` records when the
    folder already holds a run (so a resumed or moved run keeps its name), else the folder's name and a hash of
    this machine's name and the folder's full path. Servers key a run's adapters, FedAvg rounds and checkpoints
    by its name: two runs in folders named alike must not share one."""
    try:
        recorded = json.loads((output / "run.json").read_text())["run"]
        if isinstance(recorded, str) and re.fullmatch(r"[A-Za-z0-9._-]+", recorded):
            return recorded
    except (OSError, ValueError, KeyError, TypeError):
        pass
    folder = output.resolve()
    digest = hashlib.sha256(f"{socket.gethostname()}:{folder}".encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', folder.name) or 'run'}-{digest}"


def checkpoint_dir(output: Path) -> Path:
    """Where the servers `finetune` starts keep the run's checkpoints: `<output>/checkpoints/<run>/<node>/...`."""
    return output / "checkpoints"


def prepare(job: FinetuneJob) -> FinetuneJob:
    """Check the run folder (a resumed run must match the recorded settings), record the run, write the run's
    topology (with the --quant override), and give the launch a fresh attempt id."""
    plan = job.plan
    if not re.fullmatch(r"[A-Za-z0-9._-]+", plan.run):
        raise ConfigError(f"run name {plan.run!r} may only hold letters, digits, '.', '_' and '-'")
    if plan.topology is not None:
        declared = load_topology(plan.topology)
        check_topology(declared)
        if job.launch:  # every process is started here: a missing token_env needs no user action
            ensure_local_token(declared)
    data = plan.config.data.path
    if data is not None and not data.is_file():
        raise ConfigError(f"training data {data} is not a file")
    plan.output.mkdir(parents=True, exist_ok=True)
    record = plan.output / "run.json"
    settings = {"config": config_to_dict(plan.config), "topology": str(plan.topology), "model": plan.model}
    if plan.resume and record.exists():
        recorded = json.loads(record.read_text())
        if recorded["settings"] != settings:
            raise ConfigError(f"{plan.output} holds a run with other settings; resume with the same arguments")
    elif not plan.resume and any(plan.output.glob(f"client-{'*' if job.client is None else job.client}/step-*.pt")):
        raise ConfigError(f"{plan.output} already holds checkpoints: pass --resume to continue, or another --output")
    record.write_text(json.dumps({"run": plan.run, "settings": settings}, indent=2))
    topology = plan.topology
    if topology is not None and job.quant is not None:
        if not job.launch:
            raise ConfigError("--quant needs the servers this command launches; set quant in the topology instead")
        document = tomllib.loads(Path(topology).read_text())
        document["model"]["quant"] = job.quant
        for node in document.get("nodes", []):
            node.pop("quant", None)
        topology = plan.output / "topology.toml"
        write_topology(topology, document)
    attempt = job.attempt or secrets.token_hex(6)
    client = plan.client if job.client is None else job.client
    plan = replace(plan, topology=topology, attempt=attempt, quant=job.quant or plan.quant, client=client)
    if plan.resume and job.client is None and plan.config.clients > 1:
        # Every client must resume from the same step (the servers load one checkpoint): the newest all have.
        steps = [set(checkpoint_steps(plan.output / f"client-{k}")) for k in range(plan.config.clients)]
        common = set.intersection(*steps)
        plan = replace(plan, resume_step=max(common, default=0))
    return replace(job, plan=plan)


def finetune(job: FinetuneJob, on_event: Callable[[Event], None]) -> dict[str, Any]:
    """Run `job` to the end; `on_event` sees every client event. Returns the run's report.

    Raises:
        TrainingFailed: a client process exited early (the message says which and from where to resume).
    """
    job = prepare(job)
    plan = job.plan
    start_steps = latest_checkpoint(plan.output / f"client-{plan.client}") if plan.resume else 0
    if plan.resume_step is not None:
        start_steps = plan.resume_step
    started = time.perf_counter()
    events: list[Event] = []

    def collect(event: Event) -> None:
        events.append(event)
        on_event(event)

    if job.client is not None or (plan.topology is None and plan.config.clients == 1):
        if plan.topology is None and plan.config.clients > 1:
            raise ConfigError("a client joining a federated run needs the topology of its servers (--topology)")
        run_client_failover(plan, collect)
    else:
        _run_processes(job, collect)
    done = sorted((e for e in events if e["event"] == "done"), key=lambda e: e["client"])
    if not plan.config.adapters:
        adapters = []
    elif plan.config.share == "shared":
        adapters = [str(publish(Path(done[0]["adapter"]), plan.output / "adapter"))]
    else:
        adapters = [e["adapter"] for e in done]
    exports = [e["export"] for e in done if e.get("export")]  # --qat / --train-layers: the trained model(s)
    return {**report(plan, events, time.perf_counter() - started, start_steps), "adapters": adapters,
            "exports": exports}  # fmt: skip


def publish(source: Path, target: Path) -> Path:
    """Copy the adapter folder `source` to `target`, replacing an older one only once the copy is complete."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    replace_dir(tmp, target)
    return target


def _run_processes(job: FinetuneJob, collect: Callable[[Event], None]) -> None:
    plan = job.plan
    topology = load_topology(plan.topology) if plan.topology is not None else None
    logs = plan.output / "logs"
    logs.mkdir(exist_ok=True)
    with ExitStack() as stack:
        servers = [n.name for n in topology.servers] if topology is not None else []
        if topology is not None and job.launch and servers:
            # The servers started here keep their checkpoints in the run's folder, next to the device's.
            node_args = ["--checkpoint-dir", str(checkpoint_dir(plan.output).resolve())]
            replicas = [n.name for n in topology.nodes if n.replica_of is not None]  # same checkpoint folder
            stack.enter_context(
                LocalDeployment(topology, Path(str(plan.topology)), logs, [*servers, *replicas], node_args)
            )
        if not servers and plan.config.clients > 1:  # federated without a split: meet at an aggregator here
            channel = channel_config(topology) if topology is not None else ChannelConfig()
            server, port = serve(AggregatorServer(), "127.0.0.1:0", channel)
            stack.callback(lambda: server.stop(grace=1.0))
            plan = replace(plan, aggregator=f"127.0.0.1:{port}")
        workers = [_Worker(replace(plan, client=k), logs) for k in range(plan.config.clients)]
        for worker in workers:
            stack.callback(worker.stop)
        for event in _merged(workers, tolerate=plan.config.clients > 1):
            collect(event)


class _Worker:
    """One client process and its event stream."""

    def __init__(self, plan: ClientPlan, logs: Path) -> None:
        self.plan = plan
        self.log_path = logs / f"client-{plan.client}.log"
        plan_path = logs / f"client-{plan.client}.plan.json"
        plan_path.write_text(json.dumps(plan_to_dict(plan)))
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgellm", "finetune", "--worker", str(plan_path)],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip

    def events(self) -> Iterator[Event]:
        assert self.proc.stdout is not None
        for line in _lines(self.proc.stdout):
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                log.info("client %d: %s", self.plan.client, line.strip())
        code = self.proc.wait()
        if code != 0:
            tail = " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-3:]) or "(no output)"
            step = latest_checkpoint(self.plan.output / f"client-{self.plan.client}")
            hint = f"rerun with --resume to continue from step {step}" if step else "no checkpoint was written yet"
            raise TrainingFailed(f"client {self.plan.client} exited with code {code}: {tail}; {hint}", code)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _lines(stream: IO[bytes]) -> Iterator[str]:
    for raw in iter(stream.readline, b""):
        yield raw.decode(errors="replace")


def _merged(workers: list[_Worker], tolerate: bool) -> Iterator[Event]:
    """Events of all workers as they come. A failed worker raises its error, unless `tolerate`: then it is a
    "dropped" event and the others go on (their FedAvg rounds close without it), until none is left."""
    q: queue.Queue[tuple[int, Event | BaseException | None]] = queue.Queue()

    def pump(k: int, worker: _Worker) -> None:
        try:
            for event in worker.events():
                q.put((k, event))
            q.put((k, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            q.put((k, exc))

    for k, worker in enumerate(workers):
        threading.Thread(target=pump, args=(k, worker), daemon=True).start()
    running = finished = len(workers)
    while running:
        k, item = q.get()
        if item is None:
            running -= 1
        elif isinstance(item, BaseException):
            running -= 1
            finished -= 1
            if not tolerate or finished == 0:
                raise item
            log.warning("client %d dropped out: %s", k, item)
            yield {"event": "dropped", "client": k, "error": str(item)}
        else:
            yield item


def report(plan: ClientPlan, events: list[Event], wall_s: float, start_step: int) -> dict[str, Any]:
    """The run's summary from its events: losses, step times, bytes per link, trainable parameters, adapters."""
    steps = [e for e in events if e["event"] == "step"]
    by_step: dict[int, dict[int, float]] = {}  # a step run again after a failover: its last loss counts
    for e in steps:
        by_step.setdefault(e["client"], {})[e["step"]] = e["loss"]
    losses = {client: [v for _, v in sorted(values.items())] for client, values in by_step.items()}
    links: dict[str, int] = {}
    for e in steps:
        for link, nbytes in e["bytes"].items():
            links[link] = links.get(link, 0) + nbytes
    opened = [e for e in events if e["event"] == "open"]
    servers = {d["node"]: d["trainable_params"] for e in opened[:1] for d in e["servers"]}
    done = [e for e in events if e["event"] == "done"]
    count = max(len(steps), 1)
    return {
        "run": plan.run, "output": str(plan.output), "data": plan.config.data.label, "steps": plan.config.steps,
        "start_step": start_step, "clients": plan.config.clients, "share": plan.config.share,
        "losses": {str(k): v for k, v in sorted(losses.items())},
        "final_loss": sum(v[-1] for v in losses.values()) / max(len(losses), 1) if losses else None,
        "step_ms": sum(e["step_ms"] for e in steps) / count,
        "bytes_per_step": {link: n / count for link, n in links.items()},
        "device_trainable_params": opened[0]["device_trainable"] if opened else 0,
        "server_trainable_params": servers,
        "dropped_clients": sorted(e["client"] for e in events if e["event"] == "dropped"),
        "failovers": [{k: e[k] for k in ("client", "down", "resume_step", "error")}
                      for e in events if e["event"] == "failover"],  # fmt: skip
        "sync_bytes_per_client": {str(e["client"]): e.get("sync_bytes", {}) for e in done},
        "privacy": {str(e["client"]): e["privacy"] for e in done if e.get("privacy")} or None,  # per device
        "wall_s": wall_s,
    }  # fmt: skip


def plan_to_dict(plan: ClientPlan) -> dict[str, Any]:
    return {
        "config": config_to_dict(plan.config), "output": str(plan.output), "run": plan.run, "attempt": plan.attempt,
        "client": plan.client, "topology": str(plan.topology) if plan.topology else None, "model": plan.model,
        "dtype": plan.dtype, "quant": plan.quant, "resume": plan.resume,
        "init_adapter": str(plan.init_adapter) if plan.init_adapter else None, "aggregator": plan.aggregator,
        "resume_step": plan.resume_step,
    }  # fmt: skip


def plan_from_dict(data: dict[str, Any]) -> ClientPlan:
    return ClientPlan(
        config=config_from_dict(data["config"]), output=Path(data["output"]), run=data["run"],
        attempt=data["attempt"], client=int(data["client"]),
        topology=Path(data["topology"]) if data["topology"] else None, model=data["model"], dtype=data["dtype"],
        quant=data["quant"], resume=bool(data["resume"]),
        init_adapter=Path(data["init_adapter"]) if data["init_adapter"] else None, aggregator=data["aggregator"],
        resume_step=data["resume_step"],
    )  # fmt: skip


def run_worker(plan_path: Path) -> int:
    """The body of a client process: run the plan, print each event as one JSON line."""
    plan = plan_from_dict(json.loads(Path(plan_path).read_text()))

    def emit(event: Event) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    run_client_failover(plan, emit)
    return 0
