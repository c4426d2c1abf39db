"""The plan cost model against hand computations on tiny literal instances, plus validation and JSON round trips.

The arithmetic is written out in each test; floats compare to 1e-12 relative.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from edgellm.errors import ConfigError
from edgellm.plan import (
    CodecCost,
    Instance,
    LinkCaps,
    ModelDims,
    NodeCaps,
    Plan,
    SchemeCost,
    StageAssign,
    check,
    decode_ms,
    evaluate,
    memory_bytes,
    ppl_increase_pct,
    throughput_tok_s,
    ttft_ms,
)

# hidden 10, header 8 bytes, token id 4 bytes, prompt P = 4 tokens, context 100.
MODEL = ModelDims(num_layers=4, hidden_size=10, max_context=100, header_bytes=8, token_bytes=4)
# name, layer_decode, prefill/token, layer_bytes, embed_bytes, head_bytes, head_decode, embed_decode, ppl
DEV_Q = SchemeCost("q", 2.0, 0.5, 100, 50, 60, 1.0, 0.25, 0.4)
S1_Q = SchemeCost("q", 1.0, 0.25, 100, 50, 60, 0.5, 0.125, 0.8)
S1_F = SchemeCost("f", 1.5, 0.375, 200, 100, 120, 0.75, 0.25, 0.0)
S2_Q = SchemeCost("q", 0.5, 0.125, 100, 40, 80, 0.25, 0.0625, 0.0)
# name, role, schemes, memory, base, stage overhead, activation, kv per token per layer
DEV = NodeCaps("dev", "device", (DEV_Q,), 1000, 10, 0.5, 5, 1)
S1 = NodeCaps("s1", "edge", (S1_Q, S1_F), None, 20, 1.0, 0, 2)
S2 = NodeCaps("s2", "cloud", (S2_Q,), 300, 30, 0.25, 0, 0)
LINKS = (
    LinkCaps("dev", "s1", 1.0, 0.01, 2.0, 0.02),
    LinkCaps("s1", "s2", 0.5, 0.001, 0.5, 0.002),
    LinkCaps("dev", "s2", 3.0, 0.1, 3.0, 0.1),
)
# f16: 2 bytes a value; i8: 1 byte a value + 4 bytes a row, +0.5% ppl.
CODECS = (CodecCost("f16", 2.0), CodecCost("i8", 1.0, 4, 0.5))
INSTANCE = Instance(MODEL, (DEV, S1, S2), LINKS, CODECS, "chain", prompt_tokens=4, sessions=1)
# One row of hidden: f16 8 + 20 = 28 bytes, i8 8 + 10 + 4 = 22; a token id 8 + 4 = 12 bytes.


def near(value: float) -> object:
    return pytest.approx(value, rel=1e-12, abs=1e-12)


def stages(*spec: tuple[str, int, str]) -> tuple[StageAssign, ...]:
    out, start = [], 0
    for node, n, scheme in spec:
        out.append(StageAssign(node, start, start + n, scheme))
        start += n
    return tuple(out)


CHAIN_SERVER = Plan(stages(("dev", 1, "q"), ("s1", 2, "q"), ("s2", 1, "q")), ("f16", "i8"), "server", "chain")


def test_chain_head_on_server_by_hand():
    # stages: dev 0.5 + 1*2 + embed 0.25 = 2.75; s1 1 + 2*1 = 3; s2 0.25 + 0.5 + head 0.25 = 1
    # hop0 dev->s1 f16: up 1 + 28*0.01 = 1.28, token back 2 + 12*0.02 = 2.24; hop1 i8: 0.5 + 0.022, 0.5 + 0.024
    assert decode_ms(INSTANCE, CHAIN_SERVER) == near(2.75 + 3.0 + 1.0 + (1.28 + 2.24) + (0.522 + 0.524))
    # prefill, P = 4: dev 0.5 + 4*0.5 + 0.25; s1 1 + 2*4*0.25; s2 0.25 + 4*0.125 + 0.25
    # hop0 up 8 + 4*20 = 88 bytes: 1 + 0.88, back 2.24; hop1 up 8 + 4*14 = 64 bytes: 0.5 + 0.064, back 0.524
    assert ttft_ms(INSTANCE, CHAIN_SERVER) == near(2.75 + 3.0 + 1.0 + (1.88 + 2.24) + (0.564 + 0.524))
    # dev: base 10 + act 5 + 100 + embed 50 + kv 1*1*100; s1: 20 + 200 + kv 2*2*100; s2: 30 + 100 + head 80
    assert memory_bytes(INSTANCE, CHAIN_SERVER) == {"dev": 265, "s1": 620, "s2": 210}
    # a scheme's share per layer, embedding or head is 1/(L+2) = 1/6: dev (layer + embed) 2*0.4, s1 2*0.8, s2 0;
    # plus both hops carry hidden states: f16 0 + i8 0.5
    assert ppl_increase_pct(INSTANCE, CHAIN_SERVER) == near((2 * 0.4 + 2 * 0.8) / 6 + 0.5)
    # one session: 1000 / decode; four: the bottleneck is s1's compute (3 ms), not 4000 / decode
    assert throughput_tok_s(INSTANCE, CHAIN_SERVER) == near(1000 / decode_ms(INSTANCE, CHAIN_SERVER))
    assert throughput_tok_s(replace(INSTANCE, sessions=4), CHAIN_SERVER) == near(1000 / 3.0)


def test_chain_head_on_device_by_hand():
    plan = Plan(stages(("dev", 1, "q"), ("s1", 3, "q")), ("i8",), "device", "chain")
    # dev 2.75 + its head stage (overhead 0.5 + head 1); s1 1 + 3; hop: up 1 + 0.22, hidden back 2 + 22*0.02
    assert decode_ms(INSTANCE, plan) == near(2.75 + 1.5 + 4.0 + (1.22 + 2.44))
    # the reply carries all P = 4 rows back: 8 + 4*14 = 64 bytes each way
    assert ttft_ms(INSTANCE, plan) == near((0.5 + 2.0 + 0.25 + 1.5) + (1.0 + 3.0) + (1.64 + 3.28))
    # tied: the device counts max(embed 50, head 60) once; untied: both
    assert memory_bytes(INSTANCE, plan)["dev"] == 10 + 5 + 100 + 60 + 100
    untied = replace(INSTANCE, model=replace(MODEL, tied_embeddings=False))
    assert memory_bytes(untied, plan)["dev"] == 10 + 5 + 100 + 50 + 60 + 100
    assert ppl_increase_pct(INSTANCE, plan) == near((3 * 0.4 + 3 * 0.8) / 6 + 0.5)  # dev: layer, embed, head


def test_star_by_hand():
    plan = Plan(stages(("dev", 1, "q"), ("s2", 1, "q"), ("s1", 2, "q")), ("f16", "i8"), "server", "star")
    # dev 2.75; s2 0.25 + 0.5; s1 1 + 2 + head 0.5
    # hop0 dev<->s2 f16: hidden both ways, 3 + 28*0.1 each; hop1 dev<->s1 i8: up 1.22, the token back 2.24
    assert decode_ms(INSTANCE, plan) == near(2.75 + 0.75 + 3.5 + (5.8 + 5.8) + (1.22 + 2.24))
    assert ppl_increase_pct(INSTANCE, plan) == near((2 * 0.4 + 0.0 + 3 * 0.8) / 6 + 0.0 + 0.5)  # s1 has the head
    # throughput: the busiest resource is the dev->s2 direction (28 * 0.1 = 2.8) or s1's compute (3.5)
    assert throughput_tok_s(replace(INSTANCE, sessions=8, mode="star"), plan) == near(1000 / 3.5)


def test_thin_client_by_hand():
    chain = Plan(stages(("s1", 3, "f"), ("s2", 1, "q")), ("f16", "i8"), "server", "chain")
    # s1 embeds: 1 + 3*1.5 + 0.25; s2 1; hop0 token ids up 1 + 12*0.01, the token back 2.24; hop1 i8 1.046
    assert decode_ms(INSTANCE, chain) == near(5.75 + 1.0 + (1.12 + 2.24) + (0.522 + 0.524))
    # prefill: s1 1 + 3*4*0.375 + 0.25; the prompt's ids 8 + 4*4 = 24 bytes: 1 + 0.24
    assert ttft_ms(INSTANCE, chain) == near(5.75 + 1.0 + (1.24 + 2.24) + (0.564 + 0.524))
    # the thin device holds only its base; the token hop carries no hidden state (no ppl)
    assert memory_bytes(INSTANCE, chain) == {"dev": 10, "s1": 20 + 600 + 100 + 600, "s2": 210}
    assert ppl_increase_pct(INSTANCE, chain) == near(0.5)
    star = Plan(chain.stages, ("i8", "f16"), "server", "star")
    # hop0: ids up 1.12, s1's hidden back in i8 2 + 22*0.02; hop1 dev<->s2 f16: up 3 + 2.8, the token back 3 + 1.2
    assert decode_ms(INSTANCE, star) == near(5.75 + 1.0 + (1.12 + 2.44) + (5.8 + 4.2))
    assert ppl_increase_pct(INSTANCE, star) == near(0.5 + 0.0)


def test_device_only_plan():
    plan = Plan(stages(("dev", 4, "q")), (), "device", "chain")
    assert decode_ms(INSTANCE, plan) == near(0.5 + 8.0 + 0.25 + (0.5 + 1.0))
    assert memory_bytes(INSTANCE, plan) == {"dev": 10 + 5 + 400 + 60 + 400}
    assert check(INSTANCE, plan) == []


def test_evaluate_matches_the_functions_and_cuts():
    cost = evaluate(INSTANCE, CHAIN_SERVER)
    assert cost.decode_ms == decode_ms(INSTANCE, CHAIN_SERVER)
    assert cost.ttft_ms == ttft_ms(INSTANCE, CHAIN_SERVER)
    assert cost.throughput_tok_s == throughput_tok_s(INSTANCE, CHAIN_SERVER)
    assert json.loads(json.dumps(cost.to_json()))["memory_bytes"] == {"dev": 265, "s1": 620, "s2": 210}
    assert CHAIN_SERVER.cuts == (1, 3)


def test_check_constraints():
    assert check(INSTANCE, CHAIN_SERVER) == []
    assert check(INSTANCE, CHAIN_SERVER, max_ppl_increase_pct=0.85) == ["ppl increase: +0.9% > max 0.85%"]
    heavy = Plan(stages(("dev", 1, "q"), ("s1", 1, "q"), ("s2", 2, "q")), ("f16", "i8"), "server", "chain")
    assert check(INSTANCE, heavy) == ["memory of 's2': 310 bytes > budget 300"]


@pytest.mark.parametrize(
    ("plan", "problem"),
    [
        (Plan(stages(("dev", 1, "q"), ("s9", 3, "q")), ("f16",), "server", "chain"), "unknown node 's9'"),
        (
            Plan(stages(("dev", 1, "q"), ("s1", 1, "q"), ("s1", 2, "q")), ("f16", "f16"), "server", "chain"),
            "node 's1' runs more than one stage",
        ),
        (
            Plan(stages(("dev", 1, "q"), ("s1", 2, "x")), ("f16",), "server", "chain"),
            "the stages cover layers [0, 3) but the model has 4",
        ),
        (Plan(stages(("dev", 1, "q"), ("s1", 3, "x")), ("f16",), "server", "chain"), "node 's1' has no scheme 'x'"),
        (Plan(stages(("dev", 1, "q"), ("s1", 3, "q")), ("zz",), "server", "chain"), "unknown codec 'zz'"),
        (
            Plan(stages(("dev", 1, "q"), ("s1", 3, "q")), ("f16", "f16"), "server", "chain"),
            "the plan has 1 hops but 2 codecs",
        ),
        (
            Plan(stages(("dev", 4, "q"), ("s1", 0, "q")), ("f16",), "server", "chain"),
            "server stage on 's1' holds no layer",
        ),
        (
            Plan(stages(("s1", 1, "q"), ("dev", 3, "q")), ("f16", "f16"), "server", "chain"),
            "the device 'dev' can only run the first stage",
        ),
        (Plan(stages(("dev", 4, "q")), (), "server", "chain"), "head='server' needs a server stage"),
        (Plan(stages(("s1", 4, "q")), ("f16",), "device", "chain"), "a thin-client device holds no head"),
    ],
)
def test_check_structure(plan: Plan, problem: str):
    found = check(INSTANCE, plan, device_first=False)
    assert any(p.startswith(problem) for p in found), found
    with pytest.raises(ConfigError, match="invalid plan"):
        evaluate(INSTANCE, plan)


def test_check_links_and_device_first():
    no_star_link = replace(INSTANCE, links=LINKS[:2])
    star = Plan(stages(("dev", 1, "q"), ("s1", 2, "q"), ("s2", 1, "q")), ("f16", "f16"), "server", "star")
    assert check(no_star_link, star) == ["no link between 'dev' and 's2'"]
    assert check(no_star_link, replace(star, mode="chain")) == []
    thin = Plan(stages(("s1", 4, "q")), ("f16",), "server", "chain")
    assert check(INSTANCE, thin, device_first=False) == []
    assert check(INSTANCE, thin) == ["stage 0 must run on the device 'dev' (device first: raw text stays local)"]


def test_plan_shape_is_checked_on_construction():
    with pytest.raises(ConfigError, match="starts at 2"):
        Plan((StageAssign("dev", 0, 1, "q"), StageAssign("s1", 2, 4, "q")), ("f16",), "server", "chain")
    with pytest.raises(ConfigError, match="codecs"):
        Plan(stages(("dev", 1, "q"), ("s1", 3, "q")), (), "server", "chain")
    with pytest.raises(ConfigError, match="head"):
        Plan(stages(("dev", 4, "q")), (), "left", "chain")
    with pytest.raises(ConfigError, match="end"):
        StageAssign("dev", 3, 2, "q")


def test_instance_validation():
    with pytest.raises(ConfigError, match="only node with role 'device'"):
        Instance(MODEL, (S1, DEV), LINKS, CODECS)
    with pytest.raises(ConfigError, match="unknown nodes"):
        Instance(MODEL, (DEV, S1), LINKS, CODECS)
    with pytest.raises(ConfigError, match="two links"):
        Instance(MODEL, (DEV, S1, S2), (*LINKS, LinkCaps("s1", "dev", 1, 1, 1, 1)), CODECS)
    with pytest.raises(ConfigError, match="must be >= 0"):
        SchemeCost("q", -1.0, 0.5, 100, 50, 60, 1.0)
    with pytest.raises(ConfigError, match="integer"):
        SchemeCost("q", 1.0, 0.5, 1.5, 50, 60, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="bytes_per_value"):
        CodecCost("x", 0.0)


def test_link_lookup_is_undirected_and_oriented():
    link = INSTANCE.link("s1", "dev")
    assert link is INSTANCE.link("dev", "s1") and link is not None
    assert link.send_ms("dev", 100) == 1.0 + 1.0 and link.send_ms("s1", 100) == 2.0 + 2.0
    assert INSTANCE.link("dev", "nowhere") is None
    with pytest.raises(ConfigError, match="not an end"):
        link.send_ms("s2", 1)


def test_json_round_trips():
    text = json.dumps(INSTANCE.to_json())
    assert Instance.from_json(json.loads(text)) == INSTANCE
    plan_text = json.dumps(CHAIN_SERVER.to_json())
    assert Plan.from_json(json.loads(plan_text)) == CHAIN_SERVER
    with pytest.raises(ConfigError, match="unknown plan fields"):
        Plan.from_json({**CHAIN_SERVER.to_json(), "extra": 1})
    with pytest.raises(ConfigError, match="needs fields"):
        Instance.from_json({"model": MODEL.to_json()})
    bad = INSTANCE.to_json()
    bad["nodes"][0]["schemes"][0]["layer_bytes"] = "100"
    with pytest.raises(ConfigError, match="layer_bytes"):
        Instance.from_json(bad)


def test_unlimited_throughput_when_free():
    free = SchemeCost("z", 0.0, 0.0, 0, 0, 0, 0.0)
    inst = Instance(MODEL, (NodeCaps("dev", "device", (free,), None, 0, 0.0),), (), CODECS)
    assert math.isinf(throughput_tok_s(inst, Plan(stages(("dev", 4, "z")), (), "device", "chain")))
