"""Split learning equals centralized training: one step through the split (in one process, and across 2 and 3
real processes over gRPC) gives the loss and the LoRA gradients of a peft step on the unsplit model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY_LAYERS, reference_model
from edgellm.deploy.local_deployment import LocalDeployment, free_port
from edgellm.deploy.node_builder import remote_hop
from edgellm.deploy.topology import write_topology
from edgellm.errors import ConfigError, SessionError
from edgellm.lora.config import LoraSpec
from edgellm.lora.inject import wrappers
from edgellm.model.stage import stage_specs
from edgellm.net.direct_hop import LocalHop
from edgellm.net.messages import AdapterSync, CloseSession, TrainBackward, TrainOpen
from edgellm.split.host import StageHost
from edgellm.split.one_process import load_stages
from edgellm.split.server import InProcessServer, StageServer
from edgellm.splitlearn.device_model import SplitModel
from edgellm.splitlearn.server_host import TrainHost
from edgellm.splitlearn.settings import ServerTrainConfig
from edgellm.train.data import IGNORE, Batch, causal_lm_loss

TOKEN = "train-token-77"
LORA = LoraSpec(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
LAYERS = "model.layers"


def batch() -> Batch:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(4, 97, (2, 9), generator=gen)
    labels = ids.clone()
    labels[:, :3] = IGNORE  # a prompt part without loss
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False  # right padding
    labels[1, 6:] = IGNORE
    return Batch(ids, labels, mask)


def nonzero_adapter(keys: set[str], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Adapter weights with B != 0, so every gradient (A's too) is non-trivial."""
    gen = torch.Generator().manual_seed(11)
    return {k: torch.randn(shapes[k], generator=gen) * 0.3 for k in sorted(keys)}


def open_message(session: str, route: tuple[str, ...] = ()) -> TrainOpen:
    return TrainOpen(session, "run1", "attempt1", 0, 1, ServerTrainConfig(lora=LORA).to_json(), route=route)


def peft_step(model_dir: Path, adapter: dict[str, torch.Tensor], b: Batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The reference: a peft LoRA model on the unsplit transformers model, same adapter weights, same loss."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, target_modules=list(LORA.target_modules), lora_dropout=0.0)
    model = get_peft_model(reference_model(model_dir), config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in adapter.items():
            name = "base_model.model." + key.replace(".weight", ".default.weight")
            params[name].copy_(value)
    logits = model(input_ids=b.ids, attention_mask=b.token_mask.long()).logits
    loss = causal_lm_loss(logits, b.labels)
    loss.backward()
    grads = {}
    for key in adapter:
        grad = params["base_model.model." + key.replace(".weight", ".default.weight")].grad
        assert grad is not None
        grads[key] = grad
    return float(loss.detach()), grads


def check_against_peft(model: SplitModel, model_dir: Path) -> None:
    shapes = {k: v.shape for k, v in model.device_state().items()}
    server, _ = model.sync("get")
    shapes.update({k: v.shape for k, v in server.items()})
    adapter = nonzero_adapter(set(shapes), shapes)
    assert len(server) > 0 and len(model.device_keys()) > 0
    model.load_device_state({k: adapter[k] for k in model.device_keys()})
    model.put_server_adapters(adapter)

    b = batch()
    loss, _ = model.loss(b, step=0, seed=0)
    loss.backward()
    ours = model.device_grads()
    server_grads, details = model.sync("get", grads=True)
    ours.update({k.removeprefix("grad:"): v for k, v in server_grads.items() if k.startswith("grad:")})

    ref_loss, ref_grads = peft_step(model_dir, adapter, b)
    base_loss = causal_lm_loss(
        reference_model(model_dir)(input_ids=b.ids, attention_mask=b.token_mask.long()).logits, b.labels
    )
    assert abs(float(base_loss) - ref_loss) > 1e-3, "the adapter must change the loss, or this test proves nothing"
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert set(ours) == set(ref_grads)
    for key, ref in ref_grads.items():
        assert ref.abs().max() > 0, key
        torch.testing.assert_close(ours[key], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=key)
    assert all(d["optimizer_steps"] == 1 for d in details)


def in_process_servers(model_dir: Path, cuts: list[int]) -> tuple[list, LocalHop]:
    stages = load_stages(model_dir, stage_specs(TINY_LAYERS, cuts, head="device"))
    servers: list[StageServer] = []
    for i, stage in reversed(list(enumerate(stages[1:-1]))):
        host = StageHost(stage)
        downstream = {servers[0].name: LocalHop(servers[0].name, InProcessServer(servers[0]))} if servers else {}
        servers.insert(
            0, StageServer(f"edge{i + 1}", host, downstream, trainer=TrainHost(host, LAYERS, f"edge{i + 1}"))
        )
    route = tuple(s.name for s in servers[1:])
    return [stages[0], stages[-1]], LocalHop(servers[0].name, InProcessServer(servers[0]), route=route)


@pytest.mark.parametrize("cuts", [[2], [1, 3]])
def test_in_process_split_step_equals_peft(tiny_llama_dir, cuts):
    device, hop = in_process_servers(tiny_llama_dir, cuts)
    model = SplitModel(device, [hop], LAYERS, LORA, "s")
    model.open(open_message("s"))
    check_against_peft(model, tiny_llama_dir)


def test_centralized_step_equals_peft(tiny_llama_dir):
    stages = load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, []))
    model = SplitModel(stages, [], LAYERS, LORA, "s")
    shapes = {k: v.shape for k, v in model.device_state().items()}
    adapter = nonzero_adapter(set(shapes), shapes)
    model.load_device_state(adapter)
    b = batch()
    loss, _ = model.loss(b, 0, 0)
    loss.backward()
    ref_loss, ref_grads = peft_step(tiny_llama_dir, adapter, b)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    for key, ref in ref_grads.items():
        torch.testing.assert_close(model.device_grads()[key], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def topology_doc(model_dir: Path, servers: int, mode: str = "chain") -> dict:
    names = ["device", *(f"edge{i + 1}" for i in range(servers))]
    cuts = [round(TINY_LAYERS * i / (servers + 1)) for i in range(1, servers + 1)]
    pairs = list(zip(names, names[1:])) if mode == "chain" else [("device", n) for n in names[1:]]
    return {
        "model": {"name": str(model_dir), "cuts": cuts, "head": "device"},
        "deployment": {"route": names, "mode": mode, "token": TOKEN, "deadline_s": 30.0},
        "nodes": [
            {"name": n, "role": "device" if i == 0 else "edge", "address": f"127.0.0.1:{free_port()}"}
            for i, n in enumerate(names)
        ],
        "links": [{"between": [a, b], "profile": "none", "codec": "none"} for a, b in pairs],
    }


def remote_model(topology, model_dir: Path, session: str) -> SplitModel:
    specs = [spec for owner, spec in topology.stage_assignment(TINY_LAYERS) if owner == "device"]
    servers = [n.name for n in topology.servers]
    if topology.mode == "chain":
        hops = [remote_hop(topology, "device", servers[0], route=tuple(servers[1:]))]
    else:
        hops = [remote_hop(topology, "device", s, route=()) for s in servers]
    return SplitModel(load_stages(model_dir, specs), hops, LAYERS, LORA, session)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("servers", "mode"), [(1, "chain"), (2, "chain"), (2, "star")])
def test_split_step_across_processes_equals_peft(tiny_llama_dir, tmp_path, servers, mode):
    path = tmp_path / "topology.toml"
    topology = write_topology(path, topology_doc(tiny_llama_dir, servers, mode))
    with LocalDeployment(topology, path, tmp_path, names=[n.name for n in topology.servers]):
        model = remote_model(topology, tiny_llama_dir, "s")
        details = model.open(open_message("s"))
        assert [d["node"] for d in details] == [n.name for n in topology.servers]
        check_against_peft(model, tiny_llama_dir)
        # What crossed the links: hidden states up, gradients down, on every hop of the route.
        b = batch()
        loss, traffic = model.loss(b, 1, 0)
        loss.backward()
        expected = {f"{a}->{b_}" for a, b_ in zip(topology.route, topology.route[1:])} if mode == "chain" else {
            f"device->{n.name}" for n in topology.servers}  # fmt: skip
        assert set(traffic.bytes_by_link) == expected
        assert all(n > 2 * 4 * b.ids.numel() * 32 for n in traffic.bytes_by_link.values())


def test_server_refuses_out_of_order_backward_and_unknown_sessions(tiny_llama_dir):
    device, hop = in_process_servers(tiny_llama_dir, [2])
    model = SplitModel(device, [hop], LAYERS, LORA, "s")
    model.open(open_message("s"))
    with pytest.raises(SessionError, match="no training forward of step 5"):
        hop.train(TrainBackward("s", 5, torch.zeros(1, 3, 32)))
    with pytest.raises(SessionError, match="unknown training session"):
        hop.train(AdapterSync("nobody", "get"))
    with pytest.raises(ConfigError, match="lacks"):
        hop.train(
            AdapterSync("s", "put", tensors=(("model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(4, 32)),))
        )
    server_stage = hop._handler.server.host.stage  # type: ignore[attr-defined]
    assert any(w.adapters for w in wrappers(server_stage))
    hop.close(CloseSession("s"))
    with pytest.raises(SessionError):
        hop.train(AdapterSync("s", "get"))
    assert not any(w.adapters for w in wrappers(server_stage)), "the last session's adapter is freed"


@pytest.mark.multiprocess
def test_exported_adapter_reproduces_the_split_models_logits(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    from edgellm.lora.peft_io import load_peft_adapter, save_peft_adapter
    from edgellm.train.client import gather_adapter

    path = tmp_path / "topology.toml"
    topology = write_topology(path, topology_doc(tiny_llama_dir, 2))
    with LocalDeployment(topology, path, tmp_path, names=[n.name for n in topology.servers]):
        model = remote_model(topology, tiny_llama_dir, "s")
        model.open(open_message("s"))
        optimizer = torch.optim.AdamW(model.params, lr=1e-2)
        for step in range(3):  # B starts at zero: train a little so the adapter does something
            loss, _ = model.loss(batch(), step, 0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        b = batch()
        split_logits = model.logits(b)
        save_peft_adapter(tmp_path / "adapter", LORA, gather_adapter(model), str(tiny_llama_dir))

    base = reference_model(tiny_llama_dir)
    base_logits = base(input_ids=b.ids, attention_mask=b.token_mask.long()).logits
    real = b.token_mask
    assert (split_logits - base_logits)[real].abs().max() > 1e-3, "training must have changed the model"
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=b.ids, attention_mask=b.token_mask.long()).logits
    torch.testing.assert_close(split_logits[real], peft_logits[real], rtol=1e-5, atol=1e-5)

    # ...and it loads back into edgellm's own (unsplit) stages for `eval task` with the same logits.
    spec, tensors = load_peft_adapter(tmp_path / "adapter")
    whole = SplitModel(load_stages(tiny_llama_dir, stage_specs(TINY_LAYERS, [])), [], LAYERS, spec, "w")
    whole.load_device_state(tensors)
    torch.testing.assert_close(whole.logits(b)[real], peft_logits[real], rtol=1e-5, atol=1e-5)


def test_training_starts_from_an_adapter_saved_by_peft(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from edgellm.train.client import gather_adapter, start_from
    from edgellm.train.config import DataSpec, TrainConfig

    config = LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, target_modules=list(LORA.target_modules), lora_dropout=0.0)
    peft_model = get_peft_model(reference_model(tiny_llama_dir), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = {
        name.removeprefix("base_model.model.").replace(".default.weight", ".weight"): p.detach()
        for name, p in peft_model.named_parameters() if "lora_" in name
    }  # fmt: skip

    device, hop = in_process_servers(tiny_llama_dir, [1, 3])
    model = SplitModel(device, [hop], LAYERS, LORA, "s")
    model.open(open_message("s"))
    start_from(model, tmp_path / "peft", TrainConfig(steps=1, data=DataSpec(task="dates"), lora=LORA))
    loaded = gather_adapter(model)
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    with pytest.raises(ConfigError, match="r=4"):
        start_from(model, tmp_path / "peft", TrainConfig(steps=1, data=DataSpec(task="dates"), lora=LoraSpec(r=8)))


def test_shared_adapter_is_used_by_one_client_at_a_time_and_a_silent_one_loses_its_turn(tiny_llama_dir):
    import threading
    import time

    from edgellm.net.messages import TrainForward

    _, hop = in_process_servers(tiny_llama_dir, [2])  # one server: layers [2, 4)
    config = ServerTrainConfig(lora=LORA, round_timeout_s=1.0).to_json()
    for k, session in enumerate(["a", "b"]):
        hop.train(TrainOpen(session, "run1", "attempt1", k, 2, config))
    h, pos, grad = torch.randn(1, 3, 32), torch.arange(3).unsqueeze(0), torch.ones(1, 3, 32)

    hop.train(TrainForward("a", 0, h, pos))
    done = threading.Event()
    threading.Thread(target=lambda: (hop.train(TrainForward("b", 0, h, pos)), done.set())).start()
    assert not done.wait(0.4), "b must wait while a is between its forward and its backward"
    hop.train(TrainBackward("a", 0, grad))
    assert done.wait(5), "a's backward ends its turn"

    start = time.monotonic()  # b now holds the turn and goes silent: a waits one timeout, then takes it
    hop.train(TrainForward("a", 1, h, pos))
    assert 0.9 < time.monotonic() - start < 5
    with pytest.raises(SessionError, match="no training forward of step 0"):
        hop.train(TrainBackward("b", 0, grad))  # b's forward was dropped with its turn
    hop.train(TrainBackward("a", 1, grad))


def test_a_client_joining_later_does_not_freeze_the_adapters_of_those_training(tiny_llama_dir):
    """Regression: opening a per-client session injected its adapter and froze the whole stage, the other clients'
    adapters included, so a client that had started training silently stopped training its server-side half."""
    from edgellm.net.messages import TrainForward

    _, hop = in_process_servers(tiny_llama_dir, [2])
    config = ServerTrainConfig(lora=LORA, share="per-client").to_json()
    h, pos, grad = torch.randn(1, 3, 32), torch.arange(3).unsqueeze(0), torch.ones(1, 3, 32)
    hop.train(TrainOpen("a", "run1", "attempt1", 0, 2, config))
    hop.train(TrainForward("a", 0, h, pos))
    hop.train(TrainBackward("a", 0, grad))
    hop.train(TrainOpen("b", "run1", "attempt1", 1, 2, config))  # b joins after a's first step
    before = dict(hop.train(AdapterSync("a", "get")).tensors)
    hop.train(TrainForward("a", 1, h, pos))
    hop.train(TrainBackward("a", 1, grad))
    after = dict(hop.train(AdapterSync("a", "get")).tensors)
    assert any(not torch.equal(before[k], after[k]) for k in before), "a's adapter must still train"
