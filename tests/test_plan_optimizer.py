"""The exact optimizer: equal to brute force on random small instances, valid plans, binding constraints,
infeasibility messages, tie-breaks, thin clients, and the 64-layer benchmark instance."""

from __future__ import annotations

import math
import random

import pytest

from edgellm.errors import ConfigError
from edgellm.plan import (
    CodecCost,
    InfeasiblePlan,
    Instance,
    LinkCaps,
    ModelDims,
    NodeCaps,
    SchemeCost,
    check,
    evaluate,
    solve,
)
from edgellm.plan.cost import objective_key
from edgellm.plan.exhaustive import costed_plans, count_plans, exhaustive_solve, pick
from edgellm.plan.optimizer import benchmark_instance, make_space
from edgellm.plan.synthetic import random_instance

OBJECTIVES = ("latency", "ttft", "throughput")
MAX_PLANS = 2500  # keeps brute force fast: the instances are redrawn until their space is this small
# Words an infeasibility message names its constraint with.
CONSTRAINT_WORDS = ("memory", "cannot hold", "ppl", "linked")


def _random_case(rng: random.Random) -> tuple[Instance, dict]:
    while True:
        instance = random_instance(rng, max_nodes=5, max_layers=12, max_schemes=3, max_codecs=3)
        space = {
            "device_first": rng.random() < 0.6,
            "heads": rng.choice((("device", "server"), ("device",), ("server",))),
            "modes": rng.choice((None, ("chain",), ("star",), ("chain", "star"))),
        }
        if count_plans(instance, make_space(instance, "latency", math.inf, **space)) <= MAX_PLANS:
            return instance, space


@pytest.mark.parametrize("seed", range(12))
def test_solve_equals_brute_force(seed: int):
    rng = random.Random(seed)
    solved = infeasible = 0
    for _ in range(25):  # 12 x 25 = 300 instances, each with all three objectives
        instance, space = _random_case(rng)
        costed = costed_plans(instance, make_space(instance, "latency", math.inf, **space))
        for objective in OBJECTIVES:
            cap = rng.choice((math.inf, math.inf, rng.uniform(0.0, 2.0)))
            expected = pick(instance, costed, objective, cap)
            if expected is None:
                with pytest.raises(InfeasiblePlan) as caught:
                    solve(instance, objective, cap, **space)
                message = str(caught.value)
                assert "\n" not in message and any(w in message for w in CONSTRAINT_WORDS), message
                infeasible += 1
                continue
            solution = solve(instance, objective, cap, **space)
            assert check(instance, solution.plan, cap, space["device_first"]) == []
            got, want = objective_key(solution.cost, objective)[0], objective_key(expected[1], objective)[0]
            assert got == pytest.approx(want, rel=1e-9, abs=1e-9), (objective, cap, solution.plan, expected[0])
            assert (solution.binding is None) == (expected[2] is None)
            solved += 1
    assert solved >= 25 and infeasible >= 1  # both branches ran


def _node(name: str, role: str, *schemes: SchemeCost, memory: int | None = None, overhead: float = 0.0) -> NodeCaps:
    return NodeCaps(name, role, schemes, memory, 0, overhead)


def _line(a: str, b: str, fixed: float = 1.0) -> LinkCaps:
    return LinkCaps(a, b, fixed, 0.0, fixed, 0.0)


MODEL = ModelDims(num_layers=4, hidden_size=8, max_context=16)
CODECS = (CodecCost("f16", 2.0), CodecCost("i8", 1.0, 4, 0.25))
SLOW = SchemeCost("fp", 8.0, 8.0, 100, 10, 10, 1.0)


def test_latency_ties_go_to_the_lower_ttft():
    # s1 and s2 decode alike (exact binary fractions, so the sums tie exactly); s2 prefills faster.
    s1 = _node("s1", "edge", SchemeCost("fp", 0.5, 0.5, 100, 10, 10, 0.25))
    s2 = _node("s2", "edge", SchemeCost("fp", 0.5, 0.25, 100, 10, 10, 0.25))
    instance = Instance(MODEL, (_node("dev", "device", SLOW), s1, s2), (_line("dev", "s1"), _line("dev", "s2")), CODECS)
    for mode in ("chain", "star"):
        solution = solve(instance, "latency", modes=(mode,))
        assert [s.node for s in solution.plan.stages] == ["dev", "s2"]
        assert exhaustive_solve(instance, "latency", modes=(mode,)).plan == solution.plan


def test_memory_binds():
    fast = _node("s1", "edge", SchemeCost("fp", 0.5, 0.5, 100, 10, 10, 0.25), memory=250)
    slower = _node("s2", "cloud", SchemeCost("fp", 1.0, 1.0, 100, 10, 10, 0.25))
    links = (_line("dev", "s1"), _line("s1", "s2"), _line("dev", "s2", 4.0))
    instance = Instance(MODEL, (_node("dev", "device", SLOW), fast, slower), links, CODECS)
    solution = solve(instance)
    assert solution.binding == "memory of 's1'"
    assert [(s.node, s.num_layers) for s in solution.plan.stages] == [("dev", 0), ("s1", 2), ("s2", 2)]
    assert solution.cost.memory_bytes["s1"] == 200 <= 250
    assert solve(instance, heads=("device",)).binding == "memory of 's1'"


def test_ppl_cap_binds_and_infeasible_messages():
    server = _node(
        "s1",
        "edge",
        SchemeCost("int4", 0.5, 0.5, 50, 10, 10, 0.25, 0.0, 1.0),
        SchemeCost("fp16", 1.0, 1.0, 100, 20, 20, 0.5),
    )
    instance = Instance(MODEL, (_node("dev", "device", SLOW), server), (_line("dev", "s1"),), CODECS)
    assert solve(instance).plan.stages[1].scheme == "int4"
    capped = solve(instance, max_ppl_increase_pct=0.5)
    assert capped.binding == "ppl increase" and capped.cost.ppl_increase_pct <= 0.5
    assert capped.plan.stages[1].scheme == "fp16" and capped.plan.codecs == ("f16",)
    lossy = Instance(MODEL, instance.nodes, instance.links, CODECS[1:])  # only the int8 codec: +0.25% per hop
    with pytest.raises(InfeasiblePlan, match=r"no plan meets max ppl increase 0\.1%: the best reachable is \+0\.25%"):
        solve(lossy, max_ppl_increase_pct=0.1, heads=("server",))  # (the device alone would be lossless)
    tiny_device = Instance(MODEL, (_node("dev", "device", SLOW, memory=5), server), instance.links, CODECS)
    with pytest.raises(
        InfeasiblePlan,
        match=r"node 'dev' cannot hold the embedding at any scheme \(needs >= 10 bytes at fp, budget 5 bytes\)",
    ):
        solve(tiny_device)
    with pytest.raises(InfeasiblePlan, match="cannot hold the embedding and head"):
        solve(tiny_device, heads=("device",))
    small = _node("s1", "edge", SchemeCost("fp", 0.5, 0.5, 100, 10, 10, 0.25), memory=150)
    crowded = Instance(MODEL, (_node("dev", "device", SLOW, memory=150), small), instance.links, CODECS)
    with pytest.raises(InfeasiblePlan, match="reachable nodes. memory holds at most 2 of the 4 layers"):
        solve(crowded)
    alone = Instance(MODEL, (_node("dev", "device", SLOW), server), (), CODECS)
    with pytest.raises(InfeasiblePlan, match="needs a server linked to the device 'dev'"):
        solve(alone, heads=("server",))
    assert solve(alone).plan.cuts == ()  # the device alone, head on the device


def test_thin_client_when_allowed():
    # The device's every stage call costs 100 ms: a thin client skips it, sending token ids.
    device = _node("dev", "device", SchemeCost("fp", 8.0, 8.0, 100, 10, 10, 1.0), overhead=100.0)
    server = _node("s1", "edge", SchemeCost("fp", 0.5, 0.5, 100, 10, 10, 0.25))
    instance = Instance(MODEL, (device, server), (_line("dev", "s1"),), CODECS)
    assert solve(instance).plan.stages[0].node == "dev"
    thin = solve(instance, device_first=False)
    assert [s.node for s in thin.plan.stages] == ["s1"] and thin.plan.head == "server"
    assert len(thin.plan.codecs) == 1 and check(instance, thin.plan, device_first=False) == []
    assert thin.cost.decode_ms == pytest.approx(exhaustive_solve(instance, device_first=False).cost.decode_ms)


def test_bad_arguments():
    instance = benchmark_instance(0)
    with pytest.raises(ConfigError, match="unknown objective"):
        solve(instance, "fastest")
    with pytest.raises(ConfigError, match="modes"):
        solve(instance, modes=("ring",))
    with pytest.raises(ConfigError, match="heads"):
        solve(instance, heads=())
    with pytest.raises(ConfigError, match="max ppl"):
        solve(instance, max_ppl_increase_pct=math.nan)
    assert issubclass(InfeasiblePlan, ConfigError)


@pytest.mark.parametrize("fully_connected", [False, True])
def test_benchmark_instance_solves(fully_connected: bool):
    # 64 layers x 8 nodes x 5 schemes x 4 codecs; timing is the bench script's job, not this test's.
    instance = benchmark_instance(0, fully_connected)
    assert (instance.model.num_layers, len(instance.nodes), len(instance.codecs)) == (64, 8, 4)
    assert {len(n.schemes) for n in instance.nodes} == {5}
    for objective, cap in (("latency", math.inf), ("throughput", math.inf), ("latency", 0.5)):
        solution = solve(instance, objective, cap, modes=("chain", "star"))
        assert check(instance, solution.plan, cap) == []
        assert solution.cost == evaluate(instance, solution.plan) and solution.solve_ms > 0
