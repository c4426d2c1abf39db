"""The deployment topology file: parsing, validation messages, stage assignment, TOML round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edgellm.deploy.document import render_toml
from edgellm.deploy.presets import PRESETS
from edgellm.deploy.specs import parse_address
from edgellm.deploy.topology import Topology, load_topology, parse_topology, topology_toml, write_topology
from edgellm.errors import ConfigError
from edgellm.model.stage import StageSpec
from edgellm.net.codec import CodecSpec
from edgellm.net.link import profile

SOURCE = "deploy.toml"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "local-3node.toml"


def chain_doc() -> dict:
    return {
        "model": {"name": "smollm2-135m", "dtype": "fp32", "cuts": [10, 20], "head": "device"},
        "deployment": {"route": ["phone", "edge1", "edge2"], "mode": "chain", "token": "test-secret"},
        "nodes": [
            {"name": "phone", "role": "device"},
            {"name": "edge1", "role": "edge", "address": "127.0.0.1:50061"},
            {"name": "edge2", "role": "cloud", "address": "[::1]:50062", "threads": 2, "memory_mb": 2048},
        ],
        "links": [
            {"between": ["phone", "edge1"], "profile": "6g", "codec": "int8+zstd"},
            {"between": ["edge2", "edge1"], "profile": "wan", "up_mbps": 100, "rtt_ms": 12.5},
        ],
    }


def star_doc() -> dict:
    doc = chain_doc()
    doc["deployment"]["mode"] = "star"
    doc["links"][1]["between"] = ["phone", "edge2"]
    return doc


def parse(doc: dict) -> Topology:
    return parse_topology(doc, source=SOURCE)


def test_chain_parses_with_defaults_and_overrides():
    topo = parse(chain_doc())
    assert topo.route == ("phone", "edge1", "edge2") and topo.mode == "chain"
    assert topo.model.cuts == (10, 20) and topo.model.head == "device"
    assert topo.device.name == "phone" and topo.device.address is None
    assert [s.name for s in topo.servers] == ["edge1", "edge2"]
    assert topo.node("edge1").threads == 1 and topo.node("edge1").memory_mb is None
    assert topo.node("edge2").host_port == ("::1", 50062)
    assert topo.limits.deadline_s == 30.0 and topo.limits.max_sessions == 64
    first, second = topo.links
    assert first.profile == profile("6g") and first.codec == CodecSpec("int8", "zstd")
    assert second.profile_name == "wan" and second.profile.up_mbps == 100.0 and second.profile.rtt_ms == 12.5
    assert second.profile.down_mbps == profile("wan").down_mbps  # fields not given keep the profile's value
    assert second.codec == CodecSpec()


def test_chain_accessors():
    topo = parse(chain_doc())
    assert topo.link_between("edge1", "edge2") is topo.link_between("edge2", "edge1")
    assert [topo.direction(*pair) for pair in [("phone", "edge1"), ("edge1", "edge2"), ("edge2", "edge1")]] == [
        "up",
        "up",
        "down",
    ]
    assert topo.next_hop("phone").name == "edge1"
    assert topo.next_hop("edge1").name == "edge2"
    assert topo.next_hop("edge2") is None
    with pytest.raises(ConfigError, match=r"no link between 'phone' and 'edge2'"):
        topo.link_between("phone", "edge2")
    with pytest.raises(ConfigError, match=r"no node 'edge9'; choose from \['edge1', 'edge2', 'phone'\]"):
        topo.node("edge9")


def test_star_parses_and_routes_through_the_device():
    topo = parse(star_doc())
    assert topo.mode == "star"
    assert topo.link_between("edge2", "phone").profile_name == "wan"
    assert topo.direction("phone", "edge2") == "up" and topo.direction("edge2", "phone") == "down"
    assert topo.next_hop("phone").name == "edge1"
    assert topo.next_hop("edge1") is None and topo.next_hop("edge2") is None


@pytest.mark.parametrize("head", ["device", "server"])
def test_stage_assignment(head):
    doc = chain_doc()
    doc["model"]["head"] = head
    got = parse(doc).stage_assignment(30)
    expected = [
        ("phone", StageSpec(0, 10, embed=True)),
        ("edge1", StageSpec(10, 20)),
        ("edge2", StageSpec(20, 30, head=head == "server")),
    ]
    if head == "device":
        expected.append(("phone", StageSpec(30, 30, head=True)))
    assert got == expected
    assert parse(doc).stages_for("phone", 30) == [spec for name, spec in expected if name == "phone"]


@pytest.mark.parametrize("head", ["device", "server"])
def test_stage_assignment_first_cut_zero_leaves_the_device_no_layers(head):
    doc = chain_doc()
    doc["model"].update(cuts=[0, 20], head=head)
    got = parse(doc).stage_assignment(30)
    expected = [("edge1", StageSpec(0, 20, embed=True)), ("edge2", StageSpec(20, 30, head=head == "server"))]
    assert got == expected + ([("phone", StageSpec(30, 30, head=True))] if head == "device" else [])
    doc = chain_doc()  # one server runs everything: the cloud baseline
    doc.update(links=doc["links"][:1], nodes=doc["nodes"][:2])
    doc["model"].update(cuts=[0], head=head)
    doc["deployment"]["route"] = ["phone", "edge1"]
    got = parse(doc).stage_assignment(30)
    if head == "server":
        assert got == [("edge1", StageSpec(0, 30, embed=True, head=True))]
    else:
        assert got == [("edge1", StageSpec(0, 30, embed=True)), ("phone", StageSpec(30, 30, head=True))]


def test_stage_assignment_rejects_cuts_beyond_the_model():
    with pytest.raises(ConfigError, match=r"^deploy\.toml: model\.cuts: cut 20 is out of range"):
        parse(chain_doc()).stage_assignment(20)


def _set(path: str, value):
    """A mutation that sets `a.b[1].c` (value None deletes the key)."""

    def mutate(doc: dict) -> None:
        *parents, last = path.replace("[", ".").replace("]", "").split(".")
        target = doc
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is None:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value

    return mutate


BROKEN = {
    "unknown key": (_set("nodes[1].adress", "x"), "nodes[1].adress", "unknown key"),
    "unknown top-level key": (_set("modle", {}), "modle", "valid keys are ['control', 'deployment', 'links'"),
    "unknown role": (_set("nodes[1].role", "edgee"), "nodes[1].role", "unknown role 'edgee'; choose from"),
    "duplicate node": (_set("nodes[2].name", "edge1"), "nodes[2].name", "duplicate node 'edge1'"),
    "route names missing node": (_set("deployment.route[2]", "edge3"), "deployment.route[2]", "unknown node"),
    "device not first": (
        _set("deployment.route", ["edge1", "phone", "edge2"]),
        "deployment.route[0]",
        "starts at the device",
    ),
    "node off the route": (
        _set("deployment.route", ["phone", "edge1"]),
        "nodes[2].name",
        "not on deployment.route",
    ),
    "missing link": (_set("links[1]", None), "links", "no link between 'edge1' and 'edge2'"),
    "link to an unknown node": (
        lambda d: d["links"].append({"between": ["phone", "edge3"]}),
        "links[2].between",
        "unknown node 'edge3'",
    ),
    "duplicate link": (
        lambda d: d["links"].append({"between": ["edge1", "phone"]}),
        "links[2].between",
        "also links[0]",
    ),
    "bad address": (_set("nodes[1].address", "localhost"), "nodes[1].address", "expected host:port"),
    "bad port": (
        _set("nodes[1].address", "127.0.0.1:70000"),
        "nodes[1].address",
        "port 70000 is out of range",
    ),
    "server without address": (_set("nodes[1].address", None), "nodes[1].address", "needs a host:port"),
    "device port 0": (_set("nodes[0].address", "127.0.0.1:0"), "nodes[0].address", "port 0 is out of range"),
    "shared address": (_set("nodes[2].address", "127.0.0.1:50061"), "nodes[2].address", "also nodes[1]"),
    "threads zero": (_set("nodes[2].threads", 0), "nodes[2].threads", "must be >= 1"),
    "threads wrong type": (_set("nodes[2].threads", "2"), "nodes[2].threads", "must be an integer"),
    "unknown preset": (
        _set("nodes[0].preset", "tablet"),
        "nodes[0].preset",
        "unknown preset 'tablet'; choose from ['cloud', 'edge-server', 'laptop', 'phone']",
    ),
    "compute_scale below 1": (_set("nodes[0].compute_scale", 0.5), "nodes[0].compute_scale", "must be a number >= 1.0"),
    "compute_scale not a number": (_set("nodes[0].compute_scale", "4x"), "nodes[0].compute_scale", "must be a number"),
    "memory_mb zero": (_set("nodes[0].memory_mb", 0), "nodes[0].memory_mb", "must be >= 1"),
    "max_context zero": (_set("deployment.max_context", 0), "deployment.max_context", "must be >= 1"),
    "cuts not increasing": (_set("model.cuts", [20, 10]), "model.cuts", "strictly increasing"),
    "negative cut": (_set("model.cuts", [-1, 10]), "model.cuts", "must be >= 0"),
    "cut 0 not first": (_set("model.cuts", [0, 0]), "model.cuts", "strictly increasing"),
    "wrong number of cuts": (_set("model.cuts", [10]), "model.cuts", "need 2"),
    "unknown dtype": (_set("model.dtype", "fp8"), "model.dtype", "choose from ['bf16', 'fp16', 'fp32']"),
    "unknown mode": (_set("deployment.mode", "ring"), "deployment.mode", "choose from ['chain', 'star']"),
    "unknown profile": (_set("links[0].profile", "7g"), "links[0].profile", "7g"),
    "unknown codec": (_set("links[0].codec", "int4"), "links[0].codec", "unknown codec 'int4'"),
    "negative bandwidth": (_set("links[1].up_mbps", -5), "links[1].up_mbps", "must be > 0"),
    "self link": (_set("links[0].between", ["phone", "phone"]), "links[0].between", "two different nodes"),
    "two token sources": (_set("deployment.token_env", "EDGELLM_TOKEN"), "deployment.token", "choose one"),
    "tls cert missing": (_set("deployment.tls", {"key": "k.pem"}), "deployment.tls.cert", "missing"),
    "client auth without ca": (
        _set("deployment.tls", {"cert": "c.pem", "key": "k.pem", "client_auth": True}),
        "deployment.tls.ca",
        "needs a CA",
    ),
    "public address without token": (
        lambda d: (d["deployment"].pop("token"), d["nodes"][1].update(address="10.0.0.5:50061")),
        "nodes[1].address",
        "needs a shared secret",
    ),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_topology_names_file_and_field(name):
    mutate, path, problem = BROKEN[name]
    doc = chain_doc()
    mutate(doc)
    with pytest.raises(ConfigError) as info:
        parse(doc)
    assert str(info.value).startswith(f"{SOURCE}: {path}"), str(info.value)
    assert problem in str(info.value)


def test_links_beyond_the_mode_are_allowed_and_up_is_away_from_the_device():
    doc = chain_doc()
    doc["links"].append({"between": ["edge2", "phone"], "profile": "lte"})  # unused by chain: another order may
    topo = parse(doc)
    assert topo.link_between("phone", "edge2").profile_name == "lte"
    assert topo.direction("phone", "edge2") == "up" and topo.direction("edge2", "phone") == "down"
    star = star_doc()
    star["links"].append({"between": ["edge1", "edge2"]})
    assert parse(star).direction("edge2", "edge1") == "down"


def test_presets_give_defaults_and_explicit_keys_win():
    doc = chain_doc()
    doc["nodes"][0].update(preset="phone")
    doc["nodes"][1].update(preset="laptop", compute_scale=1.5, threads=3)
    doc["nodes"][2].update(preset="edge-server")  # its own memory_mb = 2048 overrides "no limit"
    topo = parse(doc)
    phone, laptop, edge2 = (topo.node(n) for n in ("phone", "edge1", "edge2"))
    assert (phone.compute_scale, phone.memory_mb, phone.threads) == (
        PRESETS["phone"].compute_scale, PRESETS["phone"].memory_mb, PRESETS["phone"].threads
    )  # fmt: skip
    assert phone.emulation.to_json() == {"compute_scale": 4.0, "memory_mb": 1100, "preset": "phone"}
    assert (laptop.compute_scale, laptop.threads, laptop.memory_mb) == (1.5, 3, PRESETS["laptop"].memory_mb)
    assert (edge2.compute_scale, edge2.memory_mb, edge2.threads, edge2.preset) == (1.0, 2048, 2, "edge-server")
    assert topo.limits.max_context == 2048
    doc["deployment"]["max_context"] = 512
    assert parse(doc).limits.max_context == 512


def test_every_preset_documents_its_numbers():
    for name, preset in PRESETS.items():
        assert preset.compute_scale >= 1.0 and preset.threads >= 1, name
        assert preset.memory_mb is None or preset.memory_mb > 0, name
        assert "compute_scale" in preset.source and len(preset.source) > 80, name


def test_parse_address():
    assert parse_address("edge.example.org:443") == ("edge.example.org", 443)
    assert parse_address("[::1]:50061") == ("::1", 50061)
    with pytest.raises(ConfigError, match="IPv6"):
        parse_address("::1:50061")
    with pytest.raises(ConfigError, match="not an IPv6 address"):
        parse_address("[nope]:1")


def test_resolve_token(tmp_path, monkeypatch):
    assert parse(chain_doc()).resolve_token() == "test-secret"
    doc = chain_doc()
    del doc["deployment"]["token"]
    assert parse(doc).resolve_token() is None  # loopback only: no secret configured
    doc["deployment"]["token_env"] = "EDGELLM_TEST_TOKEN"
    monkeypatch.delenv("EDGELLM_TEST_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"deploy\.toml: deployment\.token_env: .*EDGELLM_TEST_TOKEN is not set"):
        parse(doc).resolve_token()
    monkeypatch.setenv("EDGELLM_TEST_TOKEN", "s3cret\n")
    assert parse(doc).resolve_token() == "s3cret"
    del doc["deployment"]["token_env"]
    doc["deployment"]["token_file"] = "secret.txt"
    topo = parse_topology(doc, source=SOURCE, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"deployment\.token_file: cannot read"):
        topo.resolve_token()
    (tmp_path / "secret.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        topo.resolve_token()
    (tmp_path / "secret.txt").write_text("from-file\n")
    assert topo.resolve_token() == "from-file"
    assert "test-secret" not in repr(parse(chain_doc()))


def test_toml_round_trip(tmp_path):
    doc = chain_doc()
    doc["deployment"]["tls"] = {
        "cert": "server.pem",
        "key": "server.key",
        "ca": "ca.pem",
        "client_auth": True,
    }
    text = topology_toml(doc)
    assert tomllib.loads(text) == doc
    assert parse(tomllib.loads(text)) == parse(doc)
    path = tmp_path / "deploy.toml"
    written = write_topology(path, doc)
    for name in ("server.pem", "server.key", "ca.pem"):
        (tmp_path / name).write_text("pem")
    assert load_topology(path) == written
    assert written.security.tls.cert == tmp_path / "server.pem"


def test_render_escapes_and_skips_none():
    doc = {"a": 'quote " and \\ and \n', "b": None, "c": 1.5e-7, "t": {"x": [1, 2]}, "arr": [{"k": True}]}
    assert tomllib.loads(render_toml(doc)) == {k: v for k, v in doc.items() if v is not None}


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: topology file not found"):
        load_topology(tmp_path / "nope.toml")


def test_load_bad_syntax_names_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nname = "x"\ncuts = = [10, 20]\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML: .*line 3"):
        load_topology(path)


def test_load_checks_tls_files_exist(tmp_path):
    doc = chain_doc()
    doc["deployment"]["tls"] = {"cert": "missing.pem", "key": "missing.key"}
    path = tmp_path / "deploy.toml"
    write_topology(path, doc)
    with pytest.raises(ConfigError, match=r"deploy\.toml: deployment\.tls\.cert: file .*missing\.pem.* not found"):
        load_topology(path)


def test_example_file_is_valid():
    topo = load_topology(EXAMPLE)
    assert topo.route == ("phone", "edge1", "edge2")
    assert [n.address for n in topo.nodes] == ["127.0.0.1:50060", "127.0.0.1:50061", "127.0.0.1:50062"]
    assert topo.security.token is not None and topo.security.token.key == "token_env"
    assert all(link.codec.codec == "int8mu" and link.profile_name == "6g" for link in topo.links)
    assert topo.stage_assignment(30)[-1] == ("phone", StageSpec(30, 30, head=True))
    phone = topo.node("phone")
    assert (phone.preset, phone.compute_scale, phone.memory_mb) == ("phone", 4.0, PRESETS["phone"].memory_mb)
    assert [(n.preset, n.threads) for n in topo.servers] == [("edge-server", 1), ("edge-server", 1)]
    assert topo.limits.max_context == 2048
