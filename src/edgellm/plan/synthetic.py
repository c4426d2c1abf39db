"""Seeded synthetic instances: small random ones for tests, and the 64-layer benchmark instance.

The numbers are plausible, not measured: a phone, edge servers and clouds running a 64-layer model at five
weight schemes, over a phone-edge uplink, an edge LAN and an edge-cloud WAN. Every value is visible here.
"""

from __future__ import annotations

import random

from edgellm.plan.instance import CodecCost, Instance, LinkCaps, ModelDims, NodeCaps, SchemeCost

# name: (layer bytes / fp16 layer bytes, decode speed-up over fp16, ppl increase %)
_SCHEMES = {
    "fp16": (1.0, 1.0, 0.0),
    "int8": (0.53, 1.6, 0.05),
    "int4-g32": (0.31, 2.4, 0.8),
    "int4-g128": (0.28, 2.6, 1.2),
    "nf4": (0.29, 2.2, 0.6),
}
_CODECS = (
    CodecCost("none", 4.0),
    CodecCost("fp16", 2.0, 0, 0.001),
    CodecCost("int8", 1.0, 4, 0.05),
    CodecCost("int8mu", 1.0, 4, 0.03),
)
_MS_PER_BYTE_50MBIT = 8 / 50e6 * 1000


def _schemes(rng: random.Random, slowdown: float) -> tuple[SchemeCost, ...]:
    fp16_layer_bytes, fp16_layer_ms = 400_000_000, 0.8 * slowdown * rng.uniform(0.8, 1.2)
    out = []
    for name, (size, speedup, ppl) in _SCHEMES.items():
        ms = fp16_layer_ms / speedup
        embed = int(1_050_000_000 * size)
        out.append(SchemeCost(name, ms, ms / 8, int(fp16_layer_bytes * size), embed, embed, 6 * ms, 0.05 * ms, ppl))
    return tuple(out)


def _link(rng: random.Random, a: str, b: str, fixed_ms: float, ms_per_byte: float) -> LinkCaps:
    up, down = fixed_ms * rng.uniform(0.8, 1.2), ms_per_byte * rng.uniform(0.8, 1.2)
    return LinkCaps(a, b, up, down, up * rng.uniform(0.9, 1.1), down * rng.uniform(0.4, 0.6))


def benchmark_instance(seed: int = 0, fully_connected: bool = False) -> Instance:
    """64 layers x 8 nodes (a phone, 4 edges, 3 clouds) x 5 schemes x 4 codecs.

    Links: the phone reaches each edge, the edges form a chain, each cloud reaches every edge; with
    `fully_connected` every pair of nodes is linked (phone-cloud over a slow WAN).
    """
    rng = random.Random(seed)
    model = ModelDims(num_layers=64, hidden_size=4096, max_context=4096)
    kv = 4096  # 8 KV heads x 128 x 2 (K, V) x 2 bytes
    nodes = [NodeCaps("phone", "device", _schemes(rng, 12.0), 6_000_000_000, 400_000_000, 0.5, 200_000_000, kv)]
    for i in range(4):
        budget = rng.choice((8, 12, 16, 24)) * 1_000_000_000
        nodes.append(
            NodeCaps(
                f"edge{i}", "edge", _schemes(rng, rng.uniform(2.0, 4.0)), budget, 1_000_000_000, 1.0, 500_000_000, kv
            )
        )
    for i in range(3):
        budget = rng.choice((40, 80)) * 1_000_000_000
        nodes.append(
            NodeCaps(
                f"cloud{i}",
                "cloud",
                _schemes(rng, rng.uniform(0.8, 1.2)),
                budget,
                2_000_000_000,
                1.5,
                1_000_000_000,
                kv,
            )
        )
    edges, clouds = [n.name for n in nodes[1:5]], [n.name for n in nodes[5:]]
    links = [_link(rng, "phone", e, 8.0, _MS_PER_BYTE_50MBIT) for e in edges]
    links += [_link(rng, a, b, 1.0, _MS_PER_BYTE_50MBIT / 20) for a, b in zip(edges, edges[1:])]
    links += [_link(rng, e, c, 15.0, _MS_PER_BYTE_50MBIT / 4) for e in edges for c in clouds]
    if fully_connected:
        links += [_link(rng, "phone", c, 40.0, _MS_PER_BYTE_50MBIT) for c in clouds]
        links += [_link(rng, a, b, 1.0, _MS_PER_BYTE_50MBIT / 20) for i, a in enumerate(edges) for b in edges[i + 2 :]]
        links += [
            _link(rng, a, b, 2.0, _MS_PER_BYTE_50MBIT / 40) for i, a in enumerate(clouds) for b in clouds[i + 1 :]
        ]
    return Instance(model, tuple(nodes), tuple(links), _CODECS, prompt_tokens=128, sessions=2)


def random_instance(
    rng: random.Random, max_nodes: int = 5, max_layers: int = 12, max_schemes: int = 3, max_codecs: int = 3
) -> Instance:
    """A small random instance: random costs, memory budgets (some tight, some unlimited), a random sparse link
    graph, tied or untied embeddings, random mode, prompt length and sessions."""
    num_layers = rng.randint(1, max_layers)
    model = ModelDims(
        num_layers, rng.randint(1, 64), rng.randint(1, 32), rng.randint(0, 16), rng.randint(1, 8), rng.random() < 0.5
    )
    names = ["dev"] + [f"s{i}" for i in range(1, rng.randint(1, max_nodes))]
    roles = ["device"] + [rng.choice(("edge", "cloud")) for _ in names[1:]]
    nodes = tuple(_random_node(rng, name, role, max_schemes) for name, role in zip(names, roles))
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    density = rng.uniform(0.3, 1.0)
    links = [_random_link(rng, a, b) for a, b in pairs if rng.random() < density]
    codecs = []
    for i in range(rng.randint(1, max_codecs)):
        codecs.append(
            CodecCost(
                f"c{i}", rng.choice((0.5, 1.0, 2.0, 4.0)) * rng.uniform(0.9, 1.1), rng.choice((0, 0, 4)), _ppl(rng)
            )
        )
    mode = rng.choice(("chain", "star"))
    return Instance(model, nodes, tuple(links), tuple(codecs), mode, rng.randint(1, 16), rng.randint(1, 3))


def _ppl(rng: random.Random) -> float:
    return rng.choice((0.0, rng.uniform(0.0, 2.0)))


def _random_node(rng: random.Random, name: str, role: str, max_schemes: int) -> NodeCaps:
    schemes = []
    for i in range(rng.randint(1, max_schemes)):
        ms = rng.uniform(0.1, 5.0)
        size = rng.randint(10, 1000)
        schemes.append(
            SchemeCost(
                f"q{i}",
                ms,
                ms * rng.uniform(0.05, 1.0),
                size,
                rng.randint(0, 2000),
                rng.randint(0, 2000),
                rng.uniform(0, 5),
                rng.uniform(0, 1),
                _ppl(rng),
            )
        )
    kv = rng.choice((0, rng.randint(1, 20)))
    base = rng.randint(0, 500)
    # Budgets: unlimited, loose, or tight enough that a few layers (or nothing) fit.
    budget = rng.choice(
        (None, base + rng.randint(0, 20_000), base + rng.randint(0, 20_000), base + rng.randint(0, 4000))
    )
    return NodeCaps(name, role, tuple(schemes), budget, base, rng.uniform(0, 3), rng.randint(0, 200), kv)


def _random_link(rng: random.Random, a: str, b: str) -> LinkCaps:
    return LinkCaps(a, b, rng.uniform(0, 20), rng.uniform(0, 0.05), rng.uniform(0, 20), rng.uniform(0, 0.05))
