"""`edgellm demo --plan auto`: the paper's story on one machine, planned by the control plane.

Scenarios, all on the same prompt and decoding settings, each as real node processes over gRPC:
- split: the plan the optimizer chose for the topology (default: `paper_topology`), within the quality cap;
- device only: every layer on the device at the best scheme that fits its memory budget ("does not fit" if none);
- cloud: every layer on the cloud node over its WAN link; the device only tokenizes.
Each scenario carries its predicted TTFT and decode ms/token next to the measured ones, and the emulated settings
(node presets, compute slowdowns, memory budgets, link profiles) they depend on. With `switch`, the link
`a-b` is switched to another emulated profile after `switch_after` tokens of the split; the device's re-planner
sees the change in its own traffic, re-plans and migrates, and the report shows it.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.control.documents import planned_document, read_document
from edgellm.control.paper_topology import paper_document
from edgellm.control.planning import obtain_profile, predicted
from edgellm.control.profile_file import instance_from_profile
from edgellm.deploy.demo_scenarios import DEFAULT_PROMPT, generate_request, per_token_breakdown
from edgellm.deploy.local_deployment import LocalDeployment, ensure_local_token
from edgellm.deploy.node_builder import channel_config
from edgellm.deploy.topology import Topology, load_topology, write_topology
from edgellm.errors import ConfigError
from edgellm.model.prompt import encode_prompt
from edgellm.model.sampling import SamplingConfig
from edgellm.net.link import profile as link_profile
from edgellm.net.rpc import RemoteHop
from edgellm.plan import InfeasiblePlan, Instance, Plan, StageAssign, evaluate, solve
from edgellm.store import resolve_model
from edgellm.store.weights import load_tokenizer


@dataclass(frozen=True)
class StoryConfig:
    """What the planned demo deploys and asks."""

    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 48
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    threads: int | None = None  # None: each node preset's
    topology: Path | None = None  # None: the paper topology
    objective: str = "latency"
    max_ppl_increase_pct: float = 0.0  # lossless by default: the split's tokens equal the whole model's
    switch: tuple[str, str, str] | None = None  # (a, b, profile name)
    switch_after: int = 16
    replan: bool = True
    speculative: dict[str, str] | None = None  # the generate request's `speculative` and `draft` (None: off)
    dp: dict[str, Any] | None = None  # the split scenario's request `dp` (DP on its smashed data; None: off)

    def __post_init__(self) -> None:
        if self.switch is not None:
            link_profile(self.switch[2])
            if not 1 <= self.switch_after < self.max_new_tokens:
                raise ConfigError(f"--switch-after must be in 1..{self.max_new_tokens - 1}, got {self.switch_after}")


def restrict(instance: Instance, names: list[str]) -> Instance:
    """The instance with only `names` (the device first) and the links among them."""
    nodes = tuple(n for n in instance.nodes if n.name in names)
    links = tuple(k for k in instance.links if k.a in names and k.b in names)
    return dataclasses.replace(instance, nodes=nodes, links=links)


def _prompt_tokens(model: str, prompt: str) -> int:
    return len(encode_prompt(load_tokenizer(resolve_model(model)), prompt, True))


def _cost_json(instance: Instance, plan: Plan, profile: dict[str, Any]) -> dict[str, Any]:
    pred = predicted(instance, plan, profile)
    memory = evaluate(instance, plan).memory_bytes
    return {"ttft_ms": round(pred["ttft_ms"], 2), "decode_ms_per_token": round(pred["decode_ms"], 3),
            "ppl_increase_pct": round(pred["ppl_increase_pct"], 4),
            "memory_mb": {k: round(v / 1e6, 1) for k, v in memory.items()}}  # fmt: skip


def _emulation(topology: Topology) -> dict[str, Any]:
    """Every emulated quantity of a deployment, as the report states them."""
    nodes = {n.name: {"preset": getattr(n, "preset", None), "compute_scale": getattr(n, "compute_scale", 1.0),
                      "memory_mb": n.memory_mb} for n in topology.nodes}  # fmt: skip
    links = [{"between": [k.a, k.b], "profile": k.profile_name, **vars(k.profile)} for k in topology.links]
    return {"nodes": nodes, "links": links}


def _with_control(doc: dict[str, Any], profile_path: Path, cfg: StoryConfig) -> dict[str, Any]:
    if cfg.switch is None or not cfg.replan:
        return doc
    cap = None if math.isinf(cfg.max_ppl_increase_pct) else cfg.max_ppl_increase_pct
    control = {"replan": True, "profile": str(profile_path), "objective": cfg.objective}
    if cap is not None:
        control["max_ppl_increase"] = cap
    return {**doc, "control": control}


def run_scenario(topology: Topology, path: Path, work: Path, request: dict[str, Any], cfg: StoryConfig,
                 on_text: Callable[[str], None] | None = None, switch: bool = False) -> dict[str, Any]:  # fmt: skip
    """Start the deployment, generate through its device node (switching a link mid-way when asked), stop it.
    The report gets `token_times_s` (when each token arrived) and, with a switch, `switch`."""
    with LocalDeployment(topology, path, work):
        device = topology.device
        assert device.address is not None
        hop = RemoteHop(device.name, device.address, channel_config(topology), sender="demo")
        report: dict[str, Any] = {}
        times: list[float] = []
        switched: dict[str, Any] | None = None
        start = time.perf_counter()
        try:
            for event in hop.generate(request):
                if "report" in event:
                    report = event["report"]
                    continue
                times.append(time.perf_counter() - start)
                if on_text is not None:
                    on_text(event["text"])
                if switch and cfg.switch is not None and switched is None and len(times) == cfg.switch_after:
                    switched = _switch_link(topology, cfg.switch, len(times))
        finally:
            hop.shutdown()
    report["token_times_s"] = [round(t, 4) for t in times]
    if switched is not None:
        report["switch"] = switched
    return report


def _switch_link(topology: Topology, switch: tuple[str, str, str], after: int) -> dict[str, Any]:
    """Tell the node at the near end of link a-b (whose process emulates it) to emulate another profile."""
    a, b, name = switch
    near, far = sorted((a, b), key=topology.route.index)
    node = topology.node(near)
    assert node.address is not None
    hop = RemoteHop(near, node.address, channel_config(topology), sender="demo")
    try:
        answer = hop.control({"op": "set_link", "to": far, "profile_name": name})
    finally:
        hop.shutdown()
    return {"link": f"{near}-{far}", "profile": name, "after_tokens": after, "emulated": answer.get("profile")}


def _rate_ms(times: list[float], first: int, last: int) -> float | None:
    """Mean ms per token between token `first` and token `last` (indices into `times`)."""
    if last - first < 1 or last >= len(times):
        return None
    return round((times[last] - times[first]) / (last - first) * 1e3, 3)


def run_story(cfg: StoryConfig, on_text: Callable[[str], None] | None = None,
              on_phase: Callable[[str], None] = lambda _: None) -> dict[str, Any]:  # fmt: skip
    """Profile (cached), plan, and run the three scenarios; returns the report the CLI prints and charts."""
    with tempfile.TemporaryDirectory(prefix="edgellm-demo-") as tmp:
        work = Path(tmp)
        token_file = work / "token"
        token_file.write_text(secrets.token_hex(16))
        token_file.chmod(0o600)
        if cfg.topology is None:
            source = work / "paper.toml"
            write_topology(source, paper_document(token_file, cfg.threads))
        else:
            source = cfg.topology
        topology = load_topology(source)
        ensure_local_token(topology)  # the demo starts every node itself
        on_phase(f"profile: {topology.source} (reused while the nodes, links, model and code stay the same)")
        profile, profile_path, _ = obtain_profile(topology, on_progress=on_phase)
        instance = instance_from_profile(profile, topology.mode, _prompt_tokens(topology.model.name, cfg.prompt))
        solution = solve(instance, cfg.objective, cfg.max_ppl_increase_pct)
        doc = read_document(source)
        request = generate_request(cfg)  # type: ignore[arg-type]
        scenarios: dict[str, Any] = {}

        split_path = work / "split.toml"
        split_topo = write_topology(split_path, _with_control(planned_document(doc, solution.plan), profile_path, cfg))
        on_phase(f"split: the plan ({_describe(solution.plan)})")
        split_request = {**request, **({"dp": cfg.dp} if cfg.dp is not None else {})}  # no data leaves a baseline
        split = run_scenario(split_topo, split_path, work, split_request, cfg, on_text, switch=cfg.switch is not None)
        split.update(plan=solution.plan.to_json(), predicted=_cost_json(instance, solution.plan, profile),
                     binding=solution.binding, emulation=_emulation(split_topo))  # fmt: skip
        scenarios["split"] = split

        device = topology.route[0]
        try:
            alone = solve(restrict(instance, [device]), cfg.objective)
            alone_path = work / "device.toml"
            alone_topo = write_topology(alone_path, planned_document(doc, alone.plan))
            on_phase(f"baseline: every layer on the {device} ({_describe(alone.plan)})")
            result = run_scenario(alone_topo, alone_path, work, request, cfg)
            result.update(plan=alone.plan.to_json(), predicted=_cost_json(instance, alone.plan, profile),
                          emulation=_emulation(alone_topo))  # fmt: skip
            scenarios["device_only"] = result
        except InfeasiblePlan as exc:
            on_phase(f"baseline: every layer on the {device}: does not fit ({exc})")
            scenarios["device_only"] = {"fits": False, "reason": str(exc)}

        clouds = [n.name for n in topology.nodes if n.role == "cloud"]
        if clouds:
            L = instance.model.num_layers
            cloud_plan = Plan((StageAssign(clouds[0], 0, L, "none"),), ("none",), "server", "chain")
            cloud_path = work / "cloud.toml"
            cloud_topo = write_topology(cloud_path, planned_document(doc, cloud_plan))
            on_phase(f"baseline: every layer on {clouds[0]} over its {cloud_topo.links[0].profile_name} link")
            result = run_scenario(cloud_topo, cloud_path, work, request, cfg)
            result.update(plan=cloud_plan.to_json(), predicted=_cost_json(instance, cloud_plan, profile),
                          emulation=_emulation(cloud_topo))  # fmt: skip
            scenarios["cloud"] = result
    return _story_report(cfg, scenarios, profile_path, solution)


def _describe(plan: Plan) -> str:
    stages = ", ".join(f"{s.node} {s.start}-{s.end} {s.scheme}" for s in plan.stages)
    return f"{stages}; head on {plan.head}; codecs {', '.join(plan.codecs) or '-'}"


def _story_report(cfg: StoryConfig, scenarios: dict[str, Any], profile_path: Path, solution: Any) -> dict[str, Any]:
    for report in scenarios.values():
        if report.get("fits", True):
            report["breakdown"] = per_token_breakdown(report)
    split = scenarios["split"]
    times = split.get("token_times_s", [])
    if "switch" in split:
        k = split["switch"]["after_tokens"]
        migrated = [m.get("step", k) for m in split.get("migrations", [])]
        resume = max(migrated[0] + 2, k + 2) if migrated else k + 4
        split["switch"]["ms_per_token_before"] = _rate_ms(times, 1, k - 1)
        split["switch"]["ms_per_token_after"] = _rate_ms(times, min(resume, len(times) - 2), len(times) - 1)
    cloud = scenarios.get("cloud")
    lossless = solution.cost.ppl_increase_pct == 0.0
    same = None if cloud is None or not lossless else split.get("new_tokens") == cloud.get("new_tokens")
    return {
        "prompt": cfg.prompt,
        "profile": str(profile_path),
        "objective": cfg.objective,
        "max_ppl_increase_pct": cfg.max_ppl_increase_pct,
        "scenarios": scenarios,
        "lossless": lossless,
        "same_tokens_as_whole_model": same,
        "text": split.get("text"),
    }
