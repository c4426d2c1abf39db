"""`edgellm check` finds each fault of a deployment before the first prompt, one line naming the node; and
`edgellm run` names the downstream node that failed, not the device that relayed it.

The verdict is tested with literals (`edgellm.deploy.preflight.judge`); the relay of a failure through a chain of
nodes with in-process gRPC servers; the faults themselves against real node processes of a tiny chat model (a
device and two edge nodes, started once for the module; edge2 is restarted with another token, then stopped).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from edgellm.cli.main import main
from edgellm.deploy.local_deployment import LocalDeployment, free_port
from edgellm.deploy.preflight import Answer, Expected, Failure, MemoryPlan, Part, judge, render, verdict_json
from edgellm.deploy.topology import load_topology, write_topology
from edgellm.errors import ConfigError
from edgellm.net.rpc import ChannelConfig, RemoteHop, serve
from edgellm.net.rpc_status import AuthError, RemoteError
from edgellm.split.control import node_ops

TOKEN, OTHER_TOKEN = "check-token-1", "check-token-2"
NAMES = ["phone", "edge1", "edge2"]


# --- the verdict, from literals ----------------------------------------------------------------------------------


def expected(name: str, role: str = "edge", parts: tuple[Part, ...] = (Part(1, 3),), **kw: Any) -> Expected:
    fields = {"model": "m", "mode": "chain", "dtype": "fp32", "quant": "none"}
    return Expected(name, role, f"10.0.0.1:{len(name)}", parts, fields, **kw)


def info(name: str, role: str = "edge", layers: tuple[int, int] = (1, 3), **extra: Any) -> Answer:
    fields = {"model": "m", "mode": "chain", "dtype": "fp32", "quant": "none"}
    return Answer(
        {"name": name, "role": role, "layers": list(layers), "embed": False, "head": False, **fields, **extra}
    )


def test_a_healthy_deployment_passes_and_each_fault_is_one_line_naming_its_node():
    nodes = [expected("edge1", peers=("edge2",)), expected("edge2", parts=(Part(3, 4),))]
    healthy = {"edge1": info("edge1"), "edge2": info("edge2", layers=(3, 4))}
    ok = judge(nodes, healthy, {("edge1", "edge2"): Answer({"name": "edge2"}, ms=1.5)})
    assert ok.exit_code == 0 and ok.faults == ()
    table = render(ok, "t.toml").splitlines()
    assert table[-2:] == ["hop edge1 -> edge2: ok (1.5 ms)",
                          "check: ok: 2 nodes answer as t.toml says, and every hop accepts its peer's token"]  # fmt: skip
    cases = {  # answers of edge2 (and edge1's ping of it) -> (kind, exit code, text of the line)
        "down": (Answer(failure=Failure("down", "node edge2 at x is unreachable")), None, 3, "is unreachable"),
        "token": (Answer(failure=Failure("token", "refused")), None, 2, "refused this command's deployment token"),
        "name": (info("edge1"), None, 2, "says it is node 'edge1'"),
        "role": (info("edge2", role="cloud", layers=(3, 4)), None, 2, "serves as 'cloud'"),
        "layers": (info("edge2", layers=(2, 4)), None, 2, "serves layers 2-4; this topology gives it 3-4"),
        "topology": (info("edge2", layers=(3, 4), quant="int8"), None, 2, "runs quant 'int8'; this topology says"),
        "peer-token": (healthy["edge2"], Failure("token", "node edge2 refused", True), 2, "token of node edge1"),
        "unreachable": (healthy["edge2"], Failure("error", "edge2 is unreachable", True), 3, "cannot reach node"),
        "route": (healthy["edge2"], Failure("refused", "node edge1 has no link to 'edge2'"), 2, "no link to"),
    }
    for kind, (answer, ping_failure, code, text) in cases.items():
        ping = Answer({"name": "edge2"}) if ping_failure is None else Answer(failure=ping_failure)
        verdict = judge(nodes, {"edge1": healthy["edge1"], "edge2": answer}, {("edge1", "edge2"): ping})
        (fault,) = verdict.faults
        assert (fault.kind, verdict.exit_code) == (kind, code) and text in fault.message, (kind, fault)
        assert verdict_json(verdict, "t.toml")["faults"] == [
            {"node": fault.node, "kind": kind, "message": fault.message}
        ]


def test_config_faults_outrank_a_down_node_and_memory_is_predicted_against_the_budget():
    plan = MemoryPlan(330_000_000, 538_000_000, 94_000_000, 131_000_000, 2048)  # 1093 MB
    nodes = [expected("phone", "device", memory=plan, memory_mb=1000), expected("edge1")]
    down = Answer(failure=Failure("down", "node phone at x is unreachable"))
    verdict = judge(nodes, {"phone": down, "edge1": info("edge1", role="cloud")}, {})
    assert [(f.node, f.kind) for f in verdict.faults] == [("phone", "down"), ("phone", "memory"), ("edge1", "role")]
    assert "predicted to need 1093 MB, over its memory_mb of 1000" in verdict.faults[1].message
    assert verdict.exit_code == 2  # the configuration must be fixed, whatever the network does
    table = render(verdict, "t.toml")
    assert "    538     94    131       1093/1000" in table and "runtime assumed 330 MB" in table


def test_two_processes_claiming_one_node_are_named():
    nodes = [expected("edge1"), expected("edge2")]
    verdict = judge(nodes, {"edge1": info("edge2"), "edge2": info("edge2")}, {})
    (fault,) = verdict.faults
    assert fault.node == "edge1" and "two processes claim node edge2 (at 10.0.0.1:5 and 10.0.0.1:5)" in fault.message


# --- ping_peer and the relay of a failure through a chain ---------------------------------------------------------


class Relaying:
    """A node that answers Info with its next hop's Info (what a chained server does with Forward)."""

    def __init__(self, name: str, next_hop: RemoteHop | None) -> None:
        self.name, self.next_hop = name, next_hop

    def info(self) -> dict[str, Any]:
        return {"name": self.name} if self.next_hop is None else self.next_hop.info()


def test_a_failure_deep_in_a_chain_names_the_failing_node_and_the_nodes_that_relayed_it():
    a, b, c = (f"127.0.0.1:{free_port()}" for _ in range(3))
    channel = ChannelConfig(token=TOKEN, deadline_s=5)
    c_server, _ = serve(Relaying("c", None), c, ChannelConfig(token=OTHER_TOKEN))  # type: ignore[arg-type]
    b_server, _ = serve(Relaying("b", RemoteHop("c", c, channel)), b, channel)  # type: ignore[arg-type]
    a_server, _ = serve(Relaying("a", RemoteHop("b", b, channel)), a, channel)  # type: ignore[arg-type]
    try:
        with pytest.raises(AuthError) as refused:
            RemoteHop("a", a, channel).info()
        assert str(refused.value) == (f"node c at {c} refused the deployment token: missing or wrong deployment token "
                                      f"(relayed by node b at {b}, then node a at {a})")  # fmt: skip
        assert refused.value.relays == (f"node b at {b}", f"node a at {a}") and refused.value.exit_code == 2
        c_server.stop(grace=None)
        with pytest.raises(RemoteError, match=rf"^node c at {c} is unreachable .*\(relayed by node b at {b}, then "):
            RemoteHop("a", a, channel).info()
    finally:
        for server in (a_server, b_server, c_server):
            server.stop(grace=None)


def test_ping_peer_answers_the_peers_info_as_the_node_reaches_it():
    class Hop:
        name = "edge2"

        def info(self, timeout_s: float | None = None) -> dict[str, Any]:
            return {"name": "edge2", "layers": [3, 4]}

    ops = node_ops("edge1", dict, lambda: {"edge2": Hop()})
    answer = ops.dispatch({"op": "ping_peer", "to": "edge2"})
    assert answer["from"] == "edge1" and answer["to"] == "edge2" and answer["info"]["name"] == "edge2"
    with pytest.raises(ConfigError, match=r"no link to 'edge3'; it has links to \['edge2'\]"):
        ops.dispatch({"op": "ping_peer", "to": "edge3"})


# --- real node processes ------------------------------------------------------------------------------------------


class Nodes:
    """phone and edge1 with TOKEN, and edge2 started, restarted with another token, or stopped as a test needs."""

    def __init__(self, model_dir: Path, tmp: Path) -> None:
        self.tmp = tmp
        self.doc = {
            "model": {"name": str(model_dir), "cuts": [1, 3], "head": "device"},
            "deployment": {"route": NAMES, "token": TOKEN, "deadline_s": 10.0, "max_context": 128},
            "nodes": [
                {"name": n, "role": "device" if i == 0 else "edge", "address": f"127.0.0.1:{free_port()}"}
                for i, n in enumerate(NAMES)
            ],
            "links": [{"between": [a, b], "profile": "none"} for a, b in zip(NAMES, NAMES[1:])],
        }
        self.path = self.variant("t", lambda doc: None)
        self.front = LocalDeployment(load_topology(self.path), self.path, tmp, names=NAMES[:2])
        self.edge2: LocalDeployment | None = None
        self.edge2_token: str | None = None
        try:
            with ThreadPoolExecutor(2) as pool:  # start all three at once
                started = [pool.submit(self.front.start, 120), pool.submit(self.serve_edge2, TOKEN)]
                for future in started:
                    future.result()
        except BaseException:
            self.stop()
            raise

    def variant(self, name: str, change: Callable[[dict], Any]) -> Path:
        """A copy of the topology, changed by `change(doc)`."""
        doc = json.loads(json.dumps(self.doc))
        change(doc)
        write_topology(self.tmp / f"{name}.toml", doc)
        return self.tmp / f"{name}.toml"

    def serve_edge2(self, token: str | None) -> None:
        """Have edge2 run with `token` (None: stopped)."""
        if token == self.edge2_token:
            return
        if self.edge2 is not None:
            self.edge2.stop()
            self.edge2 = None
        self.edge2_token = token
        if token is not None:
            path = self.variant(f"edge2-{token}", lambda doc: doc["deployment"].update(token=token))
            self.edge2 = LocalDeployment(load_topology(path), path, self.tmp, names=["edge2"])
            self.edge2.start(timeout_s=120)

    def stop(self) -> None:
        self.serve_edge2(None)
        self.front.stop()


@pytest.fixture(scope="module")
def nodes(tiny_chat_dir, tmp_path_factory):
    deployed = Nodes(tiny_chat_dir, tmp_path_factory.mktemp("check"))
    yield deployed
    deployed.stop()


def check(path: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    code = main(["check", "--topology", str(path), *extra])
    return code, capsys.readouterr().out.strip().splitlines()


def run(path: Path, capsys) -> tuple[int, list[str]]:
    code = main(["run", "--topology", str(path), "--max-new-tokens", "2", "hi"])
    return code, capsys.readouterr().err.strip().splitlines()


def address(nodes: Nodes, name: str) -> str:
    return next(n["address"] for n in nodes.doc["nodes"] if n["name"] == name)


@pytest.mark.multiprocess
def test_check_passes_a_healthy_deployment(nodes, capsys):
    nodes.serve_edge2(TOKEN)
    code, out = check(nodes.path, capsys)
    assert code == 0 and out[-1].startswith("check: ok: 3 nodes answer"), out
    rows = {line.split()[0]: line for line in out[1:4]}
    assert "0-1+embed, head" in rows["phone"] and "1-3" in rows["edge1"] and rows["edge2"].endswith("ok")
    assert "hop phone -> edge1: ok" in "\n".join(out) and "hop edge1 -> edge2: ok" in "\n".join(out)
    code, out = check(nodes.path, capsys, "--json")
    report = json.loads(out[0])
    assert code == 0 and report["ok"] and [h["ok"] for h in report["hops"]] == [True, True]
    assert report["nodes"][0]["memory"]["max_context"] == 128 and report["nodes"][1]["layers"] == [[1, 3, False, False]]
    assert all(n["info"]["memory"]["rss_mb"] > 10 for n in report["nodes"])  # the device reports its RSS too


@pytest.mark.multiprocess
def test_check_finds_faults_of_this_commands_topology(nodes, capsys):
    nodes.serve_edge2(TOKEN)

    def swap(doc: dict) -> None:
        doc["nodes"][1]["address"], doc["nodes"][2]["address"] = address(nodes, "edge2"), address(nodes, "edge1")

    def other_cuts_and_role(doc: dict) -> None:
        doc["model"]["cuts"], doc["nodes"][1]["role"] = [2, 3], "cloud"

    def dead_edge2(doc: dict) -> None:
        doc["nodes"][2]["address"] = f"127.0.0.1:{free_port()}"

    cases = {  # topology variant -> (exit code, lines that must be printed)
        "token": (lambda d: d["deployment"].update(token="not-the-token"), 2,
                  [f"{n}: token: node {n} at {address(nodes, n)} refused this command's deployment token" for n in NAMES]),
        "swap": (swap, 2, [f"edge1: name: the process at {address(nodes, 'edge2')} (node edge1's address here) says "
                           "it is node 'edge2'", "edge2: name: "]),
        "layers": (other_cuts_and_role, 2,
                   ["phone: layers: node phone serves layers 0-1+embed, head; this topology gives it 0-2+embed, head",
                    "edge1: role: node edge1 serves as 'edge'; this topology says 'cloud'",
                    "edge1: layers: node edge1 serves layers 1-3; this topology gives it 2-3"]),
        "down": (dead_edge2, 3, ["edge2: down: node edge2 at 127.0.0.1:"]),
    }  # fmt: skip
    for name, (change, code, lines) in cases.items():
        got, out = check(nodes.variant(name, change), capsys)
        assert got == code and out[-1].startswith(f"check: FAILED (exit {code})"), (name, out)
        for line in lines:
            assert any(o.startswith(line) for o in out), (name, line, out)
    assert "yet node edge1 reaches it" in out[-2]  # the "down" variant's: edge1 reaches edge2 at its real address


@pytest.mark.multiprocess
def test_a_token_mismatch_between_nodes_is_found_by_check_and_named_by_run(nodes, capsys):
    nodes.serve_edge2(OTHER_TOKEN)
    code, out = check(nodes.path, capsys)
    assert code == 2 and "hop edge1 -> edge2: FAILED" in out, out
    assert "edge2: peer-token: node edge2 refuses the deployment token of node edge1, which dials it" in "\n".join(out)
    code, err = run(nodes.path, capsys)
    edge1, phone = address(nodes, "edge1"), address(nodes, "phone")
    assert code == 2 and err == [
        f"edgellm: error: node edge2 at {address(nodes, 'edge2')} refused the deployment token: missing or wrong "
        f"deployment token (relayed by node edge1 at {edge1}, then node phone at {phone})"
    ]


@pytest.mark.multiprocess
def test_a_downstream_node_that_is_down_is_named_by_check_and_by_run(nodes, capsys):
    nodes.serve_edge2(None)
    code, out = check(nodes.path, capsys)
    assert code == 3 and out[-1] == "check: FAILED (exit 3): 1 problem(s) at edge2", out
    code, err = run(nodes.path, capsys)
    assert code == 3 and len(err) == 1, err
    assert err[0].startswith(f"edgellm: error: node edge2 at {address(nodes, 'edge2')} is unreachable"), err
    assert err[0].endswith(f"(relayed by node edge1 at {address(nodes, 'edge1')}, then node phone at "
                           f"{address(nodes, 'phone')})")  # fmt: skip
