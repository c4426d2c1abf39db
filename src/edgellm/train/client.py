"""One device's fine-tuning run: load its part of the model, open its sessions on the servers, train, aggregate,
checkpoint, export.

Every decision that makes a run reproducible is a function of the run's seed and the step: the batch
(`batch_for_step`), the dropout masks (`seed_for`), and the checkpoint a restart resumes from (the latest one
the device finished, which the servers also kept). A run restarted with `resume` therefore continues the same
loss curve as if it had never stopped.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgellm.deploy.node_builder import channel_config, device_dp, remote_hop
from edgellm.deploy.topology import Topology, load_topology
from edgellm.errors import ConfigError
from edgellm.lora.peft_io import load_peft_adapter, save_peft_adapter
from edgellm.model.arch import Arch, arch_for
from edgellm.model.stage import Stage, StageSpec
from edgellm.net.messages import CloseSession, TrainOpen
from edgellm.net.rpc import ChannelConfig, RemoteHop
from edgellm.privacy.config import DPConfig, TrainPrivacy
from edgellm.quant.scheme import QuantConfig, parse_quant
from edgellm.serve.local_engine import DTYPES
from edgellm.split.one_process import load_stages
from edgellm.split.pipeline import TrainHop
from edgellm.splitlearn.checkpoints import atomic_save
from edgellm.splitlearn.device_model import SplitModel
from edgellm.store import resolve_model
from edgellm.store.weights import load_config, load_tokenizer
from edgellm.train.config import TrainConfig
from edgellm.train.data import Dataset, InstructionDataset, batch_for_step, load_data
from edgellm.train.qat_setup import export_model, exports_model, prepare_stages
from edgellm.train.tasks import task_examples

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ClientPlan:
    """Where and as whom one client trains.

    Attributes:
        config: the run's training settings.
        output: the run's folder: device checkpoints (`client-K/step-N.pt`) and the exported adapter(s).
        run: the run's name (stable across restarts); attempt: this launch (new on every restart).
        client: this client's index in `0..config.clients-1`.
        topology: the deployment; None trains the whole model in this process (centralized).
        model, dtype, quant: the model when there is no topology (the topology's otherwise).
        resume: continue from the latest checkpoint in `output`.
        init_adapter: a peft adapter directory to start from (fresh runs only).
        aggregator: "host:port" of the node FedAvg rounds meet at, when it is not the first server.
        resume_step: with several clients, the step all of them resume from (the newest every one has).
        servers: the node running each server stage, in route order: a server or one of its replicas
            (`edgellm.train.failover` picks them); None: the route's servers.
    """

    config: TrainConfig
    output: Path
    run: str
    attempt: str
    client: int = 0
    topology: Path | None = None
    model: str = "smollm2-135m"
    dtype: str = "fp32"
    quant: str | None = None
    resume: bool = False
    init_adapter: Path | None = None
    aggregator: str | None = None
    resume_step: int | None = None  # resume from this step, not from this client's latest checkpoint
    servers: tuple[str, ...] | None = None  # the replicas to train through, one per server (None: the route's)


def run_client(plan: ClientPlan, emit: Emit) -> dict[str, Any]:
    """Train one client to `plan.config.steps` steps, emitting events; returns the final summary."""
    cfg = plan.config
    side = load_side(plan)
    folder = plan.output / f"client-{plan.client}"
    folder.mkdir(parents=True, exist_ok=True)
    start_step = latest_checkpoint(folder) if plan.resume else 0
    if plan.resume and plan.resume_step is not None:
        start_step = plan.resume_step
        if start_step and not (folder / checkpoint_name(start_step)).exists():
            raise ConfigError(f"client {plan.client} has no checkpoint of step {start_step} in {folder}")
    if plan.resume and start_step == 0:
        log.warning("no checkpoint in %s: starting from step 0", folder)
    session = f"{plan.run}-c{plan.client}-{secrets.token_hex(4)}"
    privacy = run_privacy(cfg, side.dp)
    lora = cfg.lora if cfg.adapters else None
    model = SplitModel(
        side.stages, side.hops, side.layers_path, lora, session, side.aggregator, cfg.round_timeout_s, privacy
    )
    trained = prepare_stages(side.stages, cfg, side.arch, "the device" if side.hops else "this model")
    open_message = TrainOpen(
        session, plan.run, plan.attempt, plan.client, cfg.clients, cfg.server_config().to_json(), start_step
    )
    servers = model.open(open_message)
    params = [*model.params, *trained.values()]
    optimizer = torch.optim.AdamW(params, **cfg.optim.adamw_kwargs()) if params else None
    if start_step:
        state = torch.load(folder / checkpoint_name(start_step), weights_only=True)
        model.load_device_state(state["adapter"])
        _load_weights(trained, state.get("weights", {}))
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    elif plan.init_adapter is not None:
        start_from(model, plan.init_adapter, cfg)
    emit({
        "event": "open", "client": plan.client, "start_step": start_step, "servers": servers,
        "device_trainable": sum(p.numel() for p in params), "examples": len(side.dataset),
    })  # fmt: skip
    try:
        for step in range(start_step, cfg.steps):
            emit(train_step(model, optimizer, side, plan, step))
            done = step + 1
            if cfg.aggregates_after(done):
                # FedAvg weight: the samples this client trained on since the previous round.
                since = done - (done - 1) // cfg.aggregate_every * cfg.aggregate_every
                included = model.aggregate(done, float(cfg.batch_size * since))
                emit({"event": "aggregate", "client": plan.client, "step": done, "clients": included})
            if cfg.checkpoints_after(done):
                save_checkpoint(model, optimizer, folder, done, trained)
                emit({"event": "checkpoint", "client": plan.client, "step": done})
        adapter = export_adapter(model, plan, side) if cfg.adapters else None
        exported = _export_model(model, plan, side, trained) if exports_model(cfg) else None
    finally:
        for hop in [*side.hops, *([side.aggregator] if side.aggregator else [])]:
            try:
                hop.close(CloseSession(session))
            except Exception as exc:  # noqa: BLE001 - a server that is gone has nothing to free
                log.info("closing session on %s: %s", hop.name, exc)
    sync = {
        hop.name: getattr(hop, "sync_bytes", 0) for hop in [*side.hops, *([side.aggregator] if side.aggregator else [])]
    }
    summary = {
        "event": "done", "client": plan.client, "steps": cfg.steps, "adapter": adapter and str(adapter),
        "export": exported,  # --qat / --train-layers: the model directory and its quantized stage files
        "sync_bytes": sync,  # adapter traffic (open, aggregation rounds, checkpoints, export), both directions
        "privacy": model.privacy_report(),  # each defence's ledger (edgellm.privacy.accountant); None: all off
    }  # fmt: skip
    emit(summary)
    return summary


def check_topology(topology: Topology) -> None:
    """Refuse, before anything starts, a topology split learning cannot use.

    Raises:
        ConfigError: the head is on a server (the labels would leave the device), or the first cut is 0 (the
            token ids would).
    """
    if topology.model.head != "device":
        raise ConfigError(
            f'{topology.source}: fine-tuning needs model.head = "device" (U-shaped), so the labels stay on the device'
        )
    if topology.servers and topology.model.cuts[0] == 0:
        raise ConfigError(f"{topology.source}: fine-tuning needs the device to hold the embedding: a first cut above 0")


@dataclass
class DeviceSide:
    """What a device loads once for a run: its stages, its hops to the servers, its data."""

    arch: Arch
    stages: list[Stage]
    hops: list[TrainHop]
    aggregator: TrainHop | None
    layers_path: str
    dataset: Dataset
    pad_id: int
    model_name: str
    fan_in_fan_out: bool
    dp: DPConfig | None = None  # the topology's DP on the device's first link


def load_side(plan: ClientPlan) -> DeviceSide:
    """Load the device's part of the model, connect its hops to the servers and read its training data."""
    topology = load_topology(plan.topology) if plan.topology is not None else None
    model_name = topology.model.name if topology else plan.model
    model_dir = resolve_model(model_name)
    config = load_config(model_dir)
    arch = arch_for(config)
    num_layers = int(config.num_hidden_layers)
    quant = plan.quant if topology is None else (topology.device.quant or topology.model.quant)
    if plan.config.qat is not None and parse_quant(quant) is not None:
        raise ConfigError(f"--qat trains through the floating-point weights: drop the quantization ({quant})")
    if topology is None:  # the head as its own stage, so the loss can skip positions without a label
        specs = [StageSpec(0, num_layers, embed=True), StageSpec(num_layers, num_layers, head=True)]
        stages = load_stages(model_dir, specs, DTYPES[plan.dtype], parse_quant(plan.quant))
        hops: list[TrainHop] = []
    else:
        torch.set_num_threads(topology.device.threads)
        stages, hops = _device_side(topology, model_dir, num_layers, plan.servers)
    aggregator = None
    if plan.aggregator is not None:
        channel = channel_config(topology) if topology is not None else ChannelConfig()
        aggregator = RemoteHop("aggregator", plan.aggregator, channel, sender=f"client{plan.client}")
    tokenizer = load_tokenizer(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = _dataset(plan, tokenizer)
    dp = device_dp(topology) if topology is not None else None
    return DeviceSide(
        arch, stages, hops, aggregator, arch.layers, dataset, int(pad), model_name, config.model_type == "gpt2", dp
    )


def run_privacy(cfg: TrainConfig, topology_dp: DPConfig | None) -> TrainPrivacy:
    """The run's defences: `--dp-*` or the topology's link `dp` (not both), and DP-FedAvg."""
    if cfg.dp is not None and topology_dp is not None:
        raise ConfigError("the topology sets dp on the device's link; drop the --dp-* options or that link's dp")
    return TrainPrivacy(cfg.dp or topology_dp, cfg.dp_fedavg)


def _device_side(
    topology: Topology, model_dir: Path, num_layers: int, chosen: tuple[str, ...] | None = None
) -> tuple[list[Stage], list[TrainHop]]:
    check_topology(topology)
    name = topology.device.name
    specs = [spec for owner, spec in topology.stage_assignment(num_layers) if owner == name]
    quant: QuantConfig | None = parse_quant(topology.device.quant or topology.model.quant)
    stages = load_stages(model_dir, specs, DTYPES[topology.model.dtype], quant, topology.model.engine)
    servers = list(chosen) if chosen is not None else [n.name for n in topology.servers]
    if [topology.primary(s) for s in servers] != [n.name for n in topology.servers]:
        raise ConfigError(f"servers {servers} are not one node per server stage of {topology.source}")
    if not servers:
        return stages, []
    if topology.mode == "chain":
        return stages, [remote_hop(topology, name, servers[0], route=tuple(servers[1:]))]
    return stages, [remote_hop(topology, name, s, route=(), seed=i) for i, s in enumerate(servers)]


def _dataset(plan: ClientPlan, tokenizer: Any) -> Dataset:
    data, cfg = plan.config.data, plan.config
    if data.task is not None:
        examples = task_examples(data.task, data.task_examples, cfg.seed, "train")
        return InstructionDataset.from_examples(examples, tokenizer, cfg.seq_len)
    assert data.path is not None
    return load_data(data.path, tokenizer, cfg.seq_len)


def train_step(
    model: SplitModel,
    optimizer: torch.optim.Optimizer | None,
    side: DeviceSide,
    plan: ClientPlan,
    step: int,
    regularizer: Callable[[], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """One optimizer step of client `plan.client` on its batch of step `step` (0-based), through every side of
    the split; `regularizer()` (e.g. FedProx's proximal term) is added to the loss it backpropagates, not to the
    loss it reports. Returns the step's event (loss, time, bytes per link)."""
    cfg = plan.config
    start = time.perf_counter()
    batch = batch_for_step(side.dataset, step, cfg.batch_size, cfg.seed, side.pad_id, plan.client, cfg.clients)
    loss, traffic = model.loss(batch, step, cfg.seed)
    (loss if regularizer is None else loss + regularizer()).backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {
        "event": "step", "client": plan.client, "step": step + 1, "loss": float(loss.detach()),
        "step_ms": (time.perf_counter() - start) * 1e3, "tokens": batch.label_tokens,
        "bytes": traffic.bytes_by_link, "compute_ms": traffic.compute_ms_by_node,
    }  # fmt: skip


def save_checkpoint(
    model: SplitModel, optimizer: torch.optim.Optimizer | None, folder: Path, step: int, trained: dict[str, Any]
) -> None:
    """Checkpoint step `step`: every server's adapters, then the device's (adapter, optimizer, trained weights)
    in `folder`, keeping the newest three."""
    # The servers first: a device checkpoint exists only where every server has one of the same step.
    if model.hops:
        model.sync("checkpoint", step)
    state = {
        "adapter": model.device_state(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "step": step,
        "weights": {name: p.detach().clone() for name, p in trained.items()},  # --train-layers
    }
    atomic_save(state, folder / checkpoint_name(step))
    for old in sorted(folder.glob("step-*.pt"))[:-3]:
        old.unlink(missing_ok=True)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def checkpoint_steps(folder: Path) -> list[int]:
    """The steps of the complete device checkpoints in `folder` (a partial write has another name)."""
    return [int(m.group(1)) for p in folder.glob("step-*.pt") if (m := re.fullmatch(r"step-(\d+)\.pt", p.name))]


def latest_checkpoint(folder: Path) -> int:
    """The step of the newest complete device checkpoint in `folder`, or 0."""
    return max(checkpoint_steps(folder), default=0)


def start_from(model: SplitModel, directory: Path, cfg: TrainConfig) -> None:
    """Start every side's adapters from the peft adapter in `directory` (`--init-adapter`)."""
    spec, tensors = load_peft_adapter(directory)
    if (spec.r, spec.alpha) != (cfg.lora.r, cfg.lora.alpha):
        raise ConfigError(
            f"adapter {directory} has r={spec.r}, alpha={spec.alpha}; this run uses r={cfg.lora.r}, "
            f"alpha={cfg.lora.alpha} (pass the same --lora-rank/--lora-alpha)"
        )
    mine = model.device_keys()
    model.load_device_state({k: v for k, v in tensors.items() if k in mine})
    if model.hops:
        model.put_server_adapters(tensors)


def gather_adapter(model: SplitModel) -> dict[str, torch.Tensor]:
    """Every side's adapter weights, by full-model name: the device's and each server's."""
    tensors = model.device_state()
    if model.hops:
        server, _ = model.sync("get")
        tensors.update(server)
    return tensors


def _load_weights(trained: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor]) -> None:
    if set(saved) != set(trained):
        raise ConfigError("the checkpoint's trained layers differ from --train-layers: resume with the same arguments")
    with torch.no_grad():
        for name, param in trained.items():
            param.copy_(saved[name])


def _export_model(model: SplitModel, plan: ClientPlan, side: DeviceSide, trained: dict[str, Any]) -> dict[str, Any]:
    # One client: the run's `model/`; several: each its own (with shared server adapters they are the same).
    cfg = plan.config
    target = plan.output / "model" if cfg.clients == 1 else plan.output / f"client-{plan.client}" / "model"
    adapters = gather_adapter(model) if cfg.adapters else {}
    about = {"run": plan.run, "data": cfg.data.label, "steps": cfg.steps, "seed": cfg.seed}
    return export_model(resolve_model(side.model_name), target, cfg, trained, adapters, side.fan_in_fan_out, about)


def export_adapter(model: SplitModel, plan: ClientPlan, side: DeviceSide) -> Path:
    """Write every side's adapters as one peft adapter in `client-K/adapter`; returns that folder."""
    # Every client exports: with shared server adapters all exports are the same model, and the coordinator
    # publishes the first client's that finished; with per-client ones each client has its own.
    directory = plan.output / f"client-{plan.client}" / "adapter"
    save_peft_adapter(directory, plan.config.lora, gather_adapter(model), side.model_name, side.fan_in_fan_out)
    return directory
