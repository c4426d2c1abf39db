"""The control plane's files: profiles (fit, validity key, errors) and the topologies it writes from a plan."""

from __future__ import annotations

import json

import pytest

from edgellm.control.documents import planned_document, profiling_layout, read_document
from edgellm.control.profile_file import FORMAT, VERSION, fit_line, load_profile
from edgellm.deploy.topology import parse_topology
from edgellm.errors import ConfigError
from edgellm.plan import Plan, StageAssign

DOC = {
    "model": {"name": "smollm2-135m", "cuts": [10, 20], "head": "device", "quant": "int8"},
    "deployment": {"route": ["phone", "edge1", "edge2"], "mode": "chain", "token_file": "secret"},
    "nodes": [
        {"name": "phone", "role": "device", "address": "127.0.0.1:50060"},
        {"name": "edge1", "role": "edge", "address": "127.0.0.1:50061", "quant": "int4"},
        {"name": "edge2", "role": "edge", "address": "127.0.0.1:50062"},
    ],
    "links": [
        {"between": ["phone", "edge1"], "profile": "6g", "codec": "int8mu"},
        {"between": ["edge1", "edge2"], "profile": "metro", "codec": "int8mu"},
        {"between": ["phone", "edge2"], "profile": "6g"},
    ],
}


def test_fit_line_recovers_a_line_and_clamps_at_zero():
    a, b = fit_line([(0, 1.0), (100, 2.0), (200, 3.0)])
    assert a == pytest.approx(1.0) and b == pytest.approx(0.01)
    a, b = fit_line([(0, 5.0), (100, 4.0)])  # a falling line: no negative per-byte cost
    assert b == 0.0 and a == pytest.approx(4.5)
    with pytest.raises(ConfigError):
        fit_line([])


def test_load_profile_refuses_other_formats_versions_and_stale_keys(tmp_path):
    path = tmp_path / "p.json"
    with pytest.raises(ConfigError, match="profile not found"):
        load_profile(path)
    path.write_text("{")
    with pytest.raises(ConfigError, match="cannot read"):
        load_profile(path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="not an edgellm profile"):
        load_profile(path)
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION + 1}))
    with pytest.raises(ConfigError, match="format version"):
        load_profile(path)
    key = {"topology": "t1", "model": "m1", "code": "c1"}
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, "key": key}))
    assert load_profile(path, key)["key"] == key
    with pytest.raises(ConfigError, match="stale: its topology, code"):
        load_profile(path, {**key, "topology": "t2", "code": "c2"})


def test_read_document_makes_secret_paths_absolute(tmp_path):
    from edgellm.deploy.document import render_toml

    (tmp_path / "t.toml").write_text(render_toml(DOC))
    doc = read_document(tmp_path / "t.toml")
    assert doc["deployment"]["token_file"] == str(tmp_path / "secret")


def test_profiling_layout_gives_the_device_nothing_and_drops_quantization():
    doc = profiling_layout(DOC, 30)
    assert doc["model"]["cuts"] == [0, 15] and doc["model"]["head"] == "server"
    assert "quant" not in doc["model"] and all("quant" not in n for n in doc["nodes"])
    parse_topology(doc)


def test_planned_document_applies_route_cuts_schemes_codecs_and_head():
    plan = Plan(
        (StageAssign("phone", 0, 4, "int8"), StageAssign("edge2", 4, 18, "none"), StageAssign("edge1", 18, 30, "none")),
        ("fp16", "none"),
        "server",
        "chain",
    )
    doc = planned_document(DOC, plan)
    topology = parse_topology(doc)
    assert topology.route == ("phone", "edge2", "edge1")
    assert topology.model.cuts == (4, 18) and topology.model.head == "server"
    assert {n.name: n.quant for n in topology.nodes} == {"phone": "int8", "edge1": "none", "edge2": "none"}
    assert topology.link_between("phone", "edge2").codec.codec == "fp16"
    assert topology.link_between("edge2", "edge1").codec.codec == "none"
    assert [s.num_layers for _, s in topology.stage_assignment(30)] == [4, 14, 12]


def test_planned_document_drops_nodes_the_plan_leaves_out_and_handles_a_thin_device():
    plan = Plan((StageAssign("edge1", 0, 30, "none"),), ("none",), "server", "chain")
    doc = planned_document(DOC, plan)
    topology = parse_topology(doc)
    assert topology.route == ("phone", "edge1") and topology.model.cuts == (0,)
    assert [n.name for n in topology.nodes] == ["phone", "edge1"]
    assert [(owner, s.embed) for owner, s in topology.stage_assignment(30)] == [("edge1", True)]
