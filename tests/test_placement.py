"""Edge model caching (edgellm.placement, `edgellm cache simulate`): the TrimCaching greedy within 5% of the exact
MILP on 120 random small instances and never below independent caching, every algorithm within every server's
storage (the union of its blocks), the MILP equal to brute force and the DP exact on one server, routing, the
latency model's numbers, the JSON round trip, config errors, and the CLI."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgellm.cli.main import main
from edgellm.errors import ConfigError
from edgellm.placement import (
    Link,
    Model,
    Placement,
    PlacementInstance,
    Reach,
    Server,
    User,
    Workload,
    costs_from_scheme,
    eligibility,
    hit_ratio,
    inference_ms,
    migration,
    route,
    solve,
    stored_bytes,
    transmission_ms,
    zipf_demand,
)
from edgellm.placement.eligibility import Unsuitable
from edgellm.placement.holdings import overfull
from edgellm.placement.random_instances import Area, Catalog, Requests, Scenario, generate, small_instance
from edgellm.placement.sim_config import parse_config
from edgellm.placement.sweep import explicit, sweep
from edgellm.plan.instance import SchemeCost

ROOT = Path(__file__).resolve().parent.parent
SMALL_SEEDS = range(120)
ALL = ("independent", "trimcaching", "dp", "milp")
GB = 1_000_000_000


@pytest.fixture(scope="module")
def solved() -> list[tuple[PlacementInstance, dict]]:
    out = []
    for seed in SMALL_SEEDS:
        instance = small_instance(seed)
        arrays = eligibility(instance)
        out.append((instance, {name: solve(instance, name, arrays) for name in ALL}))
    return out


def test_greedy_within_5_percent_of_milp_optimum(solved):
    ratios = []
    for _, sol in solved:
        assert sol["milp"].optimal is True
        optimum = sol["milp"].hit_ratio
        for name in ("independent", "trimcaching", "dp"):
            assert sol[name].hit_ratio <= optimum + 1e-9, name  # nothing beats the optimum
        if optimum > 0:  # an instance where nothing can be a hit says nothing about the greedy
            ratios.append(sol["trimcaching"].hit_ratio / optimum)
    assert len(ratios) >= 100
    assert min(ratios) >= 0.95, f"worst greedy/optimum {min(ratios):.3f}"
    assert any(r < 1 for r in ratios)  # the MILP is really searching


def test_sharing_aware_never_below_independent(solved):
    gaps = [sol["trimcaching"].hit_ratio - sol["independent"].hit_ratio for _, sol in solved]
    assert min(gaps) >= -1e-12
    assert max(gaps) > 0.05  # sharing matters on some instances


def test_union_of_blocks_never_exceeds_storage(solved):
    for instance, sol in solved:
        for name, solution in sol.items():
            assert overfull(instance, solution.placement) == [], name
            for server in instance.servers:
                used = stored_bytes(instance, solution.placement, server.name)
                assert used == solution.stored_bytes[server.name] <= server.storage_bytes, (name, server.name)


def brute_force(instance: PlacementInstance) -> float:
    """The best hit ratio over every placement that fits."""
    pairs = [(s.name, m.name) for s in instance.servers for m in instance.models]
    best = 0.0
    for chosen in itertools.product((False, True), repeat=len(pairs)):
        models: dict[str, set[str]] = {s.name: set() for s in instance.servers}
        for (server, model), on in zip(pairs, chosen):
            if on:
                models[server].add(model)
        placement = Placement({s: frozenset(m) for s, m in models.items()})
        if not overfull(instance, placement):
            best = max(best, hit_ratio(instance, placement))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_milp_equals_brute_force(seed):
    r = np.random.default_rng(100 + seed)
    area = Area(servers=2, users=int(r.integers(3, 7)), side_m=300.0, bands=((150.0, "6g"), (300.0, "lte")),
                storage_gb=float(r.uniform(2, 5)))  # fmt: skip
    catalog = Catalog(models=int(r.integers(3, 6)), bases=2, shared_fraction=0.8)
    instance = generate(Scenario(area, catalog, Requests(latency_ms=(300.0, 1000.0))), seed)
    milp = solve(instance, "milp")
    assert milp.optimal is True
    assert milp.hit_ratio == pytest.approx(brute_force(instance), abs=1e-9)


def one_server_instance(seed: int) -> PlacementInstance:
    """One server, 5 models over 2 bases (shared blocks), sizes in whole 100 MB units so the DP's units are exact."""
    r = np.random.default_rng(seed)
    unit = 100_000_000
    blocks = {"base0": 12 * unit, "base1": 9 * unit}
    models = []
    for j in range(5):
        blocks[f"own{j}"] = int(r.integers(1, 6)) * unit
        models.append(Model(f"m{j}", (f"base{j % 2}", f"own{j}"), 0.5, 10.0))
    users = tuple(User(f"u{i}", 1000.0) for i in range(4))
    demand = r.uniform(0, 1, size=(4, 5))
    reach = tuple(Reach(u.name, "s0", "6g") for u in users)
    return PlacementInstance((Server("s0", int(r.integers(15, 35)) * unit),), users, tuple(models), blocks,
                             demand, reach)  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
def test_dp_is_exact_on_one_server(seed):
    instance = one_server_instance(seed)
    assert solve(instance, "dp").hit_ratio == pytest.approx(brute_force(instance), abs=1e-12)


def test_dp_and_milp_refuse_what_they_cannot_take():
    many = Scenario(catalog=Catalog(models=40, bases=4, blocks_per_base=4))  # 16 shared blocks
    with pytest.raises(Unsuitable, match="dp handles instances with at most 12 shared blocks"):
        solve(generate(many, 0), "dp")
    large = Scenario(area=Area(servers=50, users=1000, side_m=2236.0), catalog=Catalog(models=100, bases=10))
    with pytest.raises(Unsuitable, match="variables > 20000; solve an instance this large with trimcaching"):
        solve(generate(large, 0), "milp")
    with pytest.raises(ConfigError, match=r"unknown placement algorithm 'greedy'; choose from \['dp', "):
        solve(generate(Scenario(), 0), "greedy")


def route_instance() -> PlacementInstance:
    servers = (Server("near", 10 * GB, speed=1.0), Server("far", 10 * GB, speed=1.0), Server("slow", 10 * GB, 0.25))
    users = (User("alice", latency_req_ms=300.0), User("bob", latency_req_ms=100.0))
    model = Model("m", ("base", "lora"), prefill_ms_per_token=1.0, decode_ms_per_token=10.0)
    reach = (Reach("alice", "near", "6g"), Reach("alice", "far", "lte"), Reach("alice", "slow", "6g"),
             Reach("bob", "far", "lte"))  # fmt: skip
    workload = Workload(prompt_tokens=10, output_tokens=10, request_bytes=1000, response_bytes=1000)
    return PlacementInstance(servers, users, (model,), {"base": GB, "lora": 10_000_000}, ((1.0,), (1.0,)), reach,
                             workload)  # fmt: skip


def test_route_picks_the_fastest_eligible_server_holding_the_model():
    instance = route_instance()
    everywhere = Placement({s.name: frozenset({"m"}) for s in instance.servers})
    # alice: near (6g) ~ 1.1 + 0.06 + 110 ms; far (lte) ~ 55 + 1.1 + 110 ms; slow 440 ms > 300 ms
    assert route(instance, everywhere, "alice", "m") == "near"
    assert route(instance, Placement({"far": frozenset({"m"})}), "alice", "m") == "far"
    assert route(instance, Placement({"slow": frozenset({"m"})}), "alice", "m") is None  # too slow: the cloud
    assert route(instance, everywhere, "bob", "m") is None  # lte + inference > 100 ms
    assert hit_ratio(instance, everywhere) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="unknown user 'carol'"):
        route(instance, everywhere, "carol", "m")


def test_route_matches_hits_on_random_instances(solved):
    for instance, sol in solved[:20]:
        arrays = eligibility(instance)
        placement = sol["trimcaching"].placement
        for u in instance.users:
            for m in instance.models:
                server = route(instance, placement, u.name, m.name, arrays)
                if server is None:
                    continue
                reach = next(r for r in instance.reach if r.user == u.name and r.server == server)
                latency = transmission_ms(reach.link, instance.workload) + inference_ms(
                    m, instance.servers[instance.server_index[server]], instance.workload
                )
                assert m.name in placement.on(server) and latency <= u.latency_req_ms + 1e-9


def test_latency_model_numbers():
    link = Link(up_mbps=8.0, down_mbps=16.0, rtt_ms=20.0)
    workload = Workload(prompt_tokens=100, output_tokens=10, request_bytes=1000, response_bytes=2000)
    assert transmission_ms(link, workload) == pytest.approx(20.0 + 1.0 + 1.0)  # 8 kbit at 8 Mb/s, 16 at 16
    model = Model("m", ("b",), prefill_ms_per_token=0.5, decode_ms_per_token=20.0)
    assert inference_ms(model, Server("s", GB, speed=2.0), workload) == pytest.approx((50 + 200) / 2)
    scheme = SchemeCost("int8", layer_decode_ms=2.0, layer_prefill_ms_per_token=0.1, layer_bytes=1, embed_bytes=1,
                        head_bytes=1, head_decode_ms=3.0, embed_decode_ms=0.5)  # fmt: skip
    assert costs_from_scheme(scheme, num_layers=10, stage_overhead_ms=1.0) == pytest.approx((1.0, 24.5))


def test_migration_counts_fetched_and_evicted_blocks():
    instance = route_instance()
    old = Placement({"near": frozenset({"m"})})
    new = Placement({"far": frozenset({"m"})})
    moves = migration(instance, old, new)
    assert (moves["far"].fetch_bytes, moves["far"].evict_bytes) == (GB + 10_000_000, 0)
    assert (moves["near"].fetch_bytes, moves["near"].evict_bytes) == (0, GB + 10_000_000)
    # the default backhaul is the wan profile: 50 Mb/s down, 80 + 5 ms
    assert moves["far"].fetch_s == pytest.approx(0.085 + 8 * 1.01e9 / 50e6)
    assert moves["slow"].fetch_s == 0.0


def test_instance_json_round_trip():
    instance = generate(Scenario(area=Area(servers=4, users=9)), seed=3)
    text = json.dumps(instance.to_json())
    again = PlacementInstance.from_json(json.loads(text))
    assert again.to_json() == instance.to_json()
    assert solve(again).hit_ratio == solve(instance).hit_ratio
    assert generate(Scenario(area=Area(servers=4, users=9)), seed=3).to_json() == instance.to_json()  # seeded


def test_instance_from_json_builds_zipf_demand_and_reach_by_distance():
    data = {
        "servers": [{"name": "s0", "storage_bytes": 3 * GB, "x_m": 0.0}, {"name": "s1", "storage_bytes": GB,
                                                                          "x_m": 500.0, "backhaul": "metro"}],
        "users": [{"name": "u0", "latency_req_ms": 500.0, "x_m": 50.0}, {"name": "u1", "latency_req_ms": 500.0,
                                                                         "x_m": 260.0}],
        "models": [{"name": "a", "blocks": ["base", "a"], "prefill_ms_per_token": 1, "decode_ms_per_token": 10},
                   {"name": "b", "blocks": ["base", "b"], "prefill_ms_per_token": 1, "decode_ms_per_token": 10}],
        "block_bytes": {"base": 2 * GB, "a": 10**7, "b": 10**7},
        "demand": {"zipf": 1.0},
        "reach": {"bands": [[100, "6g"], [300, {"up_mbps": 10, "down_mbps": 20, "rtt_ms": 40}]]},
    }  # fmt: skip
    instance = PlacementInstance.from_json(data)
    assert instance.demand[0] == pytest.approx((2 / 3, 1 / 3))
    assert {(r.user, r.server, r.link.profile) for r in instance.reach} == {
        ("u0", "s0", "6g"), ("u1", "s0", None), ("u1", "s1", None)}  # fmt: skip
    assert instance.servers[1].backhaul.profile == "metro"
    assert zipf_demand(2, 3, 0.0) == ((1 / 3,) * 3,) * 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["models"][0].update(blocks=["nope"]), r"model 'a' names blocks \['nope'\]"),
        (lambda d: d.update(demand=[[1.0, 0.0]]), r"demand must be \[users\]\[models\] = \[2, 2\], got \[1, 2\]"),
        (lambda d: d["reach"].append(dict(d["reach"][0])), "reach lists user 'u0' -> server 's0' twice"),
        (lambda d: d["reach"][0].update(link="7g"), "unknown link profile '7g'; choose from"),
        (lambda d: d["servers"][0].update(disk=1), r"unknown server fields \['disk'\]"),
        (lambda d: d["users"][0].update(latency_req_ms=-1), "user 'u0' latency_req_ms must be >= 0"),
        (lambda d: d.update(demand=[[1.0, -1.0], [0, 0]]), "demand entries must be finite and >= 0"),
    ],
)
def test_instance_errors_name_the_field(change, message):
    data = route_like_json()
    change(data)
    with pytest.raises(ConfigError, match=message):
        PlacementInstance.from_json(data)


def route_like_json() -> dict:
    return {
        "servers": [{"name": "s0", "storage_bytes": GB}],
        "users": [{"name": "u0", "latency_req_ms": 500.0}, {"name": "u1", "latency_req_ms": 500.0}],
        "models": [{"name": "a", "blocks": ["base", "a"], "prefill_ms_per_token": 1, "decode_ms_per_token": 10},
                   {"name": "b", "blocks": ["base", "b"], "prefill_ms_per_token": 1, "decode_ms_per_token": 10}],
        "block_bytes": {"base": GB // 2, "a": 10**7, "b": 10**7},
        "demand": [[0.5, 0.5], [1.0, 0.0]],
        "reach": [{"user": "u0", "server": "s0", "link": "5g"}],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sweep": {"families": {"disk": [1]}}}, r"unknown sweep.families fields \['disk'\]"),
        ({"sweep": {"algorithms": ["greedy"]}}, r"unknown placement algorithm 'greedy'; choose from"),
        ({"scenario": {"area": {"servers": "ten"}}}, "area servers must be an integer"),
        ({"scenario": {"area": {"cores": 2}}}, r"unknown scenario.area fields \['cores'\]"),
        ({"scenario": {"catalog": {"shared_fraction": 1.0}}}, r"shared_fraction must be in \[0, 1\)"),
        ({"scenario": {"area": {"bands": [[100, "7g"]]}}}, "unknown link profile '7g'"),
        ({"sweep": {"seeds": [1, 1]}}, "seeds must not repeat"),
        ({"scenario": {}, "instance": route_like_json()}, "give either"),
        ({"instance": route_like_json(), "sweep": {"families": {"users": [1]}}}, "sweep family 'users' needs a"),
        ({"instance": "x.json"}, "read it first"),
    ],
)
def test_config_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_explicit_instance_sweeps_storage_and_latency():
    config = parse_config({"instance": route_like_json(), "sweep": {"families": {"storage": [0.1, 1.0],
                                                                                   "latency": [10, 500]}}})  # fmt: skip
    results = sweep(explicit(config.instance), config.sweeps, ("independent", "trimcaching"), (0,))
    storage, latency = results
    assert storage.hit_ratio["trimcaching"][0] == 0.0  # 0.1 GB holds no model
    # 1 GB: base + a + b; u0 (5g) is served both, u1 reaches nothing: 1 of 2 users' demand
    assert storage.hit_ratio["trimcaching"][1] == pytest.approx(0.5)
    assert storage.hit_ratio["independent"][1] == pytest.approx(0.25)  # one model whole: u0's half of a or b
    assert latency.hit_ratio["trimcaching"] == [0.0, pytest.approx(0.5)]


def test_greedy_at_scale_is_fast():
    large = Scenario(area=Area(servers=50, users=1000, side_m=2236.0), catalog=Catalog(models=100, bases=10))
    instance = generate(large, 0)
    start = time.perf_counter()
    arrays = eligibility(instance)
    solution = solve(instance, "trimcaching", arrays)
    assert time.perf_counter() - start < 10.0
    assert solution.hit_ratio > solve(instance, "independent", arrays).hit_ratio


def test_cli_simulate_json(capsys):
    config = ROOT / "examples" / "caching" / "simulate.toml"
    assert main(["cache", "simulate", "--config", str(config), "--json", "--seeds", "1", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [f["family"] for f in report["families"]] == ["storage", "latency", "shared"]
    assert report["emulated"]["links"][0]["profile"] == "6g" and report["emulated"]["backhaul"]["profile"] == "wan"
    for family in report["families"]:
        for sharing, alone in zip(family["hit_ratio"]["trimcaching"], family["hit_ratio"]["independent"]):
            assert sharing >= alone - 1e-12


def test_cli_simulate_table_and_plot(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('[scenario.area]\nservers = 3\nusers = 10\n[sweep]\nalgorithms = ["independent", "milp"]\n'
                      '[sweep.families]\nstorage = [4, 8]\n')  # fmt: skip
    png = tmp_path / "out.png"
    assert main(["cache", "simulate", "--config", str(config), "--plot", str(png), "--algorithms", "trimcaching"]) == 0
    out = capsys.readouterr().out
    assert "hit ratio vs storage per server (GB)" in out and "trimcaching" in out and "milp" not in out
    pytest.importorskip("matplotlib")
    assert png.stat().st_size > 1000


def test_cli_bad_config_names_the_file(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("[scenario.area]\nsrevers = 3\n")
    assert main(["cache", "simulate", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}: unknown scenario.area fields ['srevers']" in err


def test_cli_simulate_given_instance(capsys):
    config = ROOT / "examples" / "caching" / "instance.toml"
    assert main(["cache", "simulate", "--config", str(config), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["instance"] == {"servers": 3, "users": 4, "models": 4, "blocks": 5}
    assert {link["profile"] for link in report["emulated"]["links"]} == {"5g", "6g", "lte", "wan", "wifi6"}
    for family in report["families"]:
        for greedy, best in zip(family["hit_ratio"]["trimcaching"], family["hit_ratio"]["milp"]):
            assert 0.95 * best <= greedy <= best + 1e-9


def test_cli_names_the_library_algorithms_and_stays_light():
    from edgellm.cli import cache_simulate
    from edgellm.placement import ALGORITHMS

    assert tuple(ALGORITHMS) == cache_simulate._ALGORITHMS
    code = "import sys, edgellm.cli.main as m; m.build_parser(); assert 'edgellm.placement' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_cli_plot_without_matplotlib_is_skipped_and_said(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    config = tmp_path / "c.toml"
    config.write_text("[scenario.area]\nservers = 2\nusers = 5\n")
    png = tmp_path / "out.png"
    assert main(["cache", "simulate", "--config", str(config), "--plot", str(png), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plot"] is None and "matplotlib is not installed" in report["plot_skipped"]
    assert not png.exists()
    assert [f["family"] for f in report["families"]] == ["base"]
