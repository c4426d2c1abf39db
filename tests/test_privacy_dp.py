"""Differential privacy on what leaves the device (issue 16, the defences): the Gaussian mechanism's clipping bound
and noise, the ledger against Opacus' accountant, the budget refused before sending, DP off = today's outputs bit
for bit (generation, the device node, a split training step), DP on = noised, and DP-FedAvg. The options, the
topology's field and the reports: test_privacy_dp_config.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_LAYERS, in_threads
from edgellm.errors import ConfigError
from edgellm.lora.config import LoraSpec
from edgellm.lora.fedavg import clip_update, dp_fedavg, fedavg, update_norm
from edgellm.model.stage import stage_specs
from edgellm.net.direct_hop import LocalHop
from edgellm.net.messages import ForwardReply, ForwardRequest, TrainOpen
from edgellm.privacy.accountant import PrivacyBudgetSpent, PrivacyLedger, epsilon_for
from edgellm.privacy.config import DPConfig, TrainPrivacy
from edgellm.privacy.mods import PrivateHop, RowGuard, private_hops
from edgellm.privacy.noise import GaussianRows, clip_rows, gaussian_rows
from edgellm.split.host import StageHost
from edgellm.split.one_process import load_stages, local_pipeline
from edgellm.split.pipeline import Pipeline
from edgellm.split.server import InProcessServer, StageServer
from edgellm.splitlearn.device_model import SplitModel
from edgellm.splitlearn.rounds import Aggregator
from edgellm.splitlearn.server_host import TrainHost
from edgellm.splitlearn.settings import ServerTrainConfig
from edgellm.train.data import IGNORE, Batch

LORA = LoraSpec(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "o_proj"), init_seed=3)


# -- the mechanism ---------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    clip=st.floats(0.01, 100.0),
    scale=st.floats(1e-3, 1e3),
    rows=st.integers(1, 6),
    dim=st.integers(1, 40),
    seed=st.integers(0, 2**31),
)
def test_clipping_bounds_every_row_and_keeps_rows_within_the_bound(clip, scale, rows, dim, seed):
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)) * scale
    out = clip_rows(x, clip)
    norms = torch.linalg.vector_norm(out, dim=-1)
    assert bool((norms <= clip * (1 + 1e-5)).all())
    inside = torch.linalg.vector_norm(x, dim=-1) <= clip
    assert torch.equal(out[inside], x[inside])  # a row within the bound is sent exactly as it was


@pytest.mark.parametrize(("clip", "noise"), [(1.0, 0.5), (4.0, 1.3), (0.1, 3.0)])
def test_noise_has_the_stated_standard_deviation(clip, noise):
    rows = torch.zeros(2000, 64)  # clipping leaves zeros alone: what comes out is the noise
    out = gaussian_rows(rows, GaussianRows(clip, noise), torch.Generator().manual_seed(5))
    n, std = out.numel(), noise * clip
    # the sample std of n normals is within ~4.5 standard errors (std / sqrt(2n)) of the truth
    assert abs(float(out.std()) - std) < 4.5 * std / math.sqrt(2 * n)
    assert abs(float(out.mean())) < 4.5 * std / math.sqrt(n)


def test_release_clips_then_noises_and_stays_differentiable():
    x = (torch.randn(2, 5, 16) * 10).requires_grad_(True)
    guard = RowGuard(GaussianRows(1.0, 0.0), PrivacyLedger("smashed_data", 1.0, 0.0, 1e-5), torch.Generator())
    out = guard.release(x)
    assert torch.allclose(torch.linalg.vector_norm(out, dim=-1), torch.ones(2, 5))
    out.sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    assert guard.ledger.releases == 10 and guard.ledger.to_json()["epsilon"] is None  # noise 0: no guarantee


# -- the accountant ----------------------------------------------------------------------------------------------
SCHEDULES = [
    [(1.0, 1.0, 1)],
    [(1.0, 1.0, 200)],
    [(0.8, 1.0, 37), (2.0, 1.0, 500)],
    [(1.1, 0.01, 1000)],
    [(1.5, 0.25, 40), (1.5, 0.25, 60), (0.9, 1.0, 3)],
]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_ledger_epsilon_equals_opacus_rdp_accountant(schedule, delta):
    from opacus.accountants import RDPAccountant

    ledger = PrivacyLedger("x", 1.0, schedule[0][0], delta)
    accountant = RDPAccountant()
    for z, q, steps in schedule:
        ledger.noise_multiplier = z
        ledger.charge(steps, sample_rate=q)
        if steps <= 60:
            for _ in range(steps):
                accountant.step(noise_multiplier=z, sample_rate=q)
        else:
            accountant.history.append((z, q, steps))
    expected = accountant.get_epsilon(delta=delta)
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-9)
    assert ledger.releases == sum(n for _, _, n in schedule)


def test_epsilon_for_equals_opacus_analysis_called_directly():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    for z, rows in [(0.7, 1), (1.0, 64), (2.5, 4096)]:
        rdp = compute_rdp(q=1.0, noise_multiplier=z, steps=rows, orders=orders)
        expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
        assert epsilon_for(z, rows, 1e-5) == pytest.approx(float(expected), rel=1e-9)
    assert epsilon_for(1.0, 0, 1e-5) == 0.0
    assert epsilon_for(1.0, 10, 1e-5) < epsilon_for(1.0, 100, 1e-5)  # a session's epsilon grows with its rows


class Recorder:
    """A hop that records what reaches it (a server)."""

    name = "edge1"

    def __init__(self) -> None:
        self.seen: list[ForwardRequest] = []

    def forward(self, request: ForwardRequest) -> ForwardReply:
        self.seen.append(request)
        return ForwardReply(request.data, 0.0)

    def close(self, request) -> None:
        pass


def test_a_spent_budget_is_refused_before_the_hop_sees_the_request():
    config = DPConfig(clip_norm=1.0, noise_multiplier=1.0, max_epsilon=epsilon_for(1.0, 12, 1e-5) * 1.0001, seed=1)
    inner = Recorder()
    hop = PrivateHop(inner, RowGuard.for_rows(config))
    request = ForwardRequest("s", torch.randn(1, 8, 16), torch.arange(8)[None])
    hop.forward(request)  # 8 rows: within the budget
    assert len(inner.seen) == 1 and not torch.equal(inner.seen[0].data, request.data)
    with pytest.raises(PrivacyBudgetSpent, match="max_epsilon"):
        hop.forward(request)  # 16 rows would pass it
    assert len(inner.seen) == 1  # nothing left the device
    assert hop.guard.ledger.releases == 8 and hop.guard.ledger.to_json()["budget"]["refused"] == 1
    masked = ForwardRequest("s", torch.randn(1, 8, 16), torch.arange(8)[None], torch.arange(8)[None] < 4)
    hop.forward(masked)  # 4 real rows (padding is not charged) still fit
    assert hop.guard.ledger.releases == 12


def test_a_thin_device_and_a_run_without_servers_are_refused():
    guard = RowGuard.for_rows(DPConfig(1.0, 1.0))
    with pytest.raises(ConfigError, match="token ids"):
        PrivateHop(Recorder(), guard).forward(ForwardRequest("s", torch.tensor([[1, 2]]), torch.arange(2)[None]))
    with pytest.raises(ConfigError, match="needs a link"):
        private_hops([Recorder()], guard)


# -- generation: off = today's outputs, on = noise ---------------------------------------------------------------
def test_generation_with_dp_off_is_bit_identical_and_with_dp_on_noised(tiny_chat_dir):
    from edgellm.serve.local_engine import LocalSplitConfig, PromptConfig, generate_ids, load_split
    from edgellm.split.generator import GenerationConfig, Generator

    loaded = load_split(LocalSplitConfig(str(tiny_chat_dir), cuts=(2,)))
    prompt = [5, 17, 9, 33, 21, 8]
    plain = Generator(local_pipeline(loaded.stages), GenerationConfig(6)).run(torch.tensor([prompt]))
    off = generate_ids(loaded, prompt, PromptConfig(chat=False, max_new_tokens=6))
    assert off["new_tokens"] == plain.new_tokens[0] and off["privacy"] is None

    ids, positions = torch.tensor([prompt]), torch.arange(len(prompt))[None]
    want = local_pipeline(loaded.stages).forward("a", ids, positions, None, True, last_only=False)
    unguarded = Pipeline(private_hops(local_pipeline(loaded.stages).hops, None))
    assert torch.equal(unguarded.forward("b", ids, positions, None, True, last_only=False), want)
    # a guard whose bound no row reaches and no noise passes every value through exactly
    exact = RowGuard.for_rows(DPConfig(clip_norm=1e9, noise_multiplier=0.0))
    guarded = Pipeline(private_hops(local_pipeline(loaded.stages).hops, exact))
    assert torch.equal(guarded.forward("c", ids, positions, None, True, last_only=False), want)

    dp = DPConfig(clip_norm=1.0, noise_multiplier=5.0, seed=7)
    noisy = generate_ids(loaded, prompt, PromptConfig(chat=False, max_new_tokens=6, dp=dp))
    assert noisy["new_tokens"] != off["new_tokens"]
    rows = len(prompt) + len(noisy["new_tokens"]) - 1  # the prompt, then one row per token fed back
    assert noisy["privacy"]["releases"] == rows
    assert noisy["privacy"]["epsilon"] == pytest.approx(epsilon_for(5.0, rows, 1e-5), rel=1e-12)
    with pytest.raises(ConfigError, match="needs a link"):
        generate_ids(load_split(LocalSplitConfig(str(tiny_chat_dir))), prompt, PromptConfig(chat=False, dp=dp))


def test_the_device_node_guards_its_first_link_and_reports_the_ledger(tiny_chat_dir):
    from edgellm.serve.device import DeviceEngine
    from edgellm.store.weights import load_config, load_tokenizer

    specs = stage_specs(TINY_LAYERS, [2], head="device")
    stages = load_stages(tiny_chat_dir, specs)
    inner = [LocalHop(f"h{i}", StageHost(s)) for i, s in enumerate(stages)]
    layout = [("device", specs[0]), ("edge1", specs[1]), ("device", specs[2])]
    engine = DeviceEngine("device", load_tokenizer(tiny_chat_dir), load_config(tiny_chat_dir), inner, layout, {})
    request = {"prompt_ids": [5, 17, 9, 33], "max_new_tokens": 4}

    def report(extra: dict) -> dict:
        return [e for e in engine.generate({**request, **extra}) if "report" in e][0]["report"]

    off, again = report({}), report({})
    assert off["privacy"] is None and off["new_tokens"] == again["new_tokens"]
    on = report({"dp": {"clip": 1.0, "noise": 5.0, "seed": 3}})
    assert on["new_tokens"] != off["new_tokens"] and on["privacy"]["releases"] == 4 + len(on["new_tokens"]) - 1
    engine.dp_guard = RowGuard.for_rows(DPConfig(1.0, 1.0, max_epsilon=epsilon_for(1.0, 10, 1e-5)))
    first = report({})  # 4 + 3 rows: the topology's ledger lives across generations
    assert first["privacy"]["releases"] == 7
    with pytest.raises(PrivacyBudgetSpent):
        report({})
    with pytest.raises(ConfigError, match="cannot replace"):
        report({"dp": {"clip": 1.0, "noise": 1.0}})


# -- split learning -------------------------------------------------------------------------------------------
def split_model(
    model_dir, privacy: TrainPrivacy | None, settings_: ServerTrainConfig | None = None
) -> tuple[SplitModel, StageServer]:
    stages = load_stages(model_dir, stage_specs(TINY_LAYERS, [2], head="device"))
    host = StageHost(stages[1])
    server = StageServer("edge1", host, {}, trainer=TrainHost(host, "model.layers", "edge1"))
    model = SplitModel([stages[0], stages[2]], [LocalHop("edge1", InProcessServer(server))], "model.layers", LORA,
                       "s", privacy=privacy)  # fmt: skip
    model.open(TrainOpen("s", "run", "a1", 0, 1, (settings_ or ServerTrainConfig(lora=LORA)).to_json()))
    return model, server


def train_batch() -> Batch:
    ids = torch.randint(4, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :2] = IGNORE
    return Batch(ids, labels, torch.ones(2, 7, dtype=torch.bool))


def one_step(model_dir, privacy: TrainPrivacy | None) -> tuple[float, dict[str, torch.Tensor], SplitModel]:
    model, _ = split_model(model_dir, privacy)
    loss, _ = model.loss(train_batch(), step=0, seed=0)
    loss.backward()
    grads = model.device_grads()
    server, _ = model.sync("get", grads=True)
    grads.update({k: v for k, v in server.items() if k.startswith("grad:")})
    return float(loss.detach()), grads, model


def test_split_training_with_dp_off_is_bit_identical_and_with_dp_on_noised(tiny_llama_dir):
    loss, grads, _ = one_step(tiny_llama_dir, None)
    for privacy in (TrainPrivacy(), TrainPrivacy(DPConfig(clip_norm=1e9, noise_multiplier=0.0, grad_clip_norm=1e9))):
        other_loss, other, _ = one_step(tiny_llama_dir, privacy)
        assert other_loss == loss and set(other) == set(grads)
        assert all(torch.equal(other[k], grads[k]) for k in grads)
    dp = DPConfig(clip_norm=1.0, noise_multiplier=1.0, grad_clip_norm=1e-3, seed=4)
    noisy_loss, noisy, model = one_step(tiny_llama_dir, TrainPrivacy(dp))
    assert noisy_loss != loss
    server_keys = [k for k in grads if k.startswith("grad:") and bool(grads[k].abs().sum() > 0)]  # B = 0: A's is 0
    assert server_keys and all(not torch.equal(noisy[k], grads[k]) for k in server_keys)
    report = model.privacy_report()
    assert report is not None and report["smashed_data"]["releases"] == 14 and report["gradients"]["releases"] == 14


# -- DP-FedAvg ---------------------------------------------------------------------------------------------------
def states(n: int, seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    start = {"a": torch.randn(4, 3, generator=gen), "b": torch.randn(5, generator=gen)}
    clients = [{k: v + torch.randn(v.shape, generator=gen) * (i + 1) for k, v in start.items()} for i in range(n)]
    return clients, start


def test_dp_fedavg_clips_updates_and_adds_the_stated_noise():
    clients, start = states(3)
    clipped = [clip_update(s, start, 0.5) for s in clients]
    assert all(update_norm(c, start) == pytest.approx(0.5, rel=1e-5) for c in clipped)
    assert clip_update(clients[0], start, 1e9)["a"] is clients[0]["a"]  # within the bound: untouched
    assert all(torch.equal(dp_fedavg(clients, 1e9, 0.0)[k], fedavg(clients, [1.0] * 3)[k]) for k in start)
    big = [{"w": torch.zeros(200_000)} for _ in range(4)]
    noised = dp_fedavg(big, 2.0, 1.5, torch.Generator().manual_seed(1))["w"]
    std = 1.5 * 2.0 / 4
    assert abs(float(noised.std()) - std) < 4.5 * std / math.sqrt(2 * noised.numel())


def test_the_aggregator_adds_dp_fedavg_noise_once_per_round():
    clients, start = states(2, seed=3)
    clipped = [clip_update(s, start, 1.0) for s in clients]
    aggregator = Aggregator(timeout_s=30)
    dp = DPConfig(clip_norm=1.0, noise_multiplier=0.8, seed=9)
    results = in_threads(lambda i: aggregator.submit(("r", "a", 1), i, 2, clipped[i], 5.0 * (i + 1), dp=dp), 2)
    (first, included), (second, _) = results
    assert included == (0, 1) and all(torch.equal(first[k], second[k]) for k in start)  # one noise, both clients
    want = dp_fedavg(clipped, 1.0, 0.8, dp.generator(salt=1))  # equal weights, the round's seeded noise
    assert all(torch.equal(first[k], want[k]) for k in start)


def test_dp_fedavg_charges_the_client_ledger_per_round_and_refuses_past_the_budget():
    budget = epsilon_for(2.0, 2, 1e-5) * 1.0001  # two rounds fit, a third does not
    ledger = PrivacyLedger("dp_fedavg", 1.0, 2.0, 1e-5, max_epsilon=budget, unit="client update")
    ledger.charge(1)
    ledger.charge(1)
    with pytest.raises(PrivacyBudgetSpent):
        ledger.charge(1)
    assert ledger.releases == 2 and ledger.to_json()["unit"] == "client update"


def test_split_model_sends_a_clipped_update_and_charges_a_round(tiny_llama_dir):
    fed = DPConfig(clip_norm=0.05, noise_multiplier=0.0)
    model, _ = split_model(tiny_llama_dir, TrainPrivacy(fedavg=fed), ServerTrainConfig(lora=LORA, dp_fedavg=fed))
    start = model.device_state()
    trained = {k: v + 0.1 for k, v in start.items()}
    model.load_device_state(trained)
    model._round_start = start  # the round began before the (simulated) local steps
    model.aggregate(1, weight=7.0)
    got = model.device_state()
    assert update_norm(got, start) == pytest.approx(0.05, rel=1e-4)  # one client, no noise: its clipped state
    report = model.privacy_report()
    assert report is not None and report["dp_fedavg"]["releases"] == 1 and report["dp_fedavg"]["epsilon"] is None
