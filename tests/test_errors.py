"""Errors say whose fault they are: each kind crosses gRPC as one status and comes back as the same kind, and
the CLI exits with one code per kind (0 ok, 1 a bug, 2 bad input, 3 a peer failed, 4 busy).

A stub node raises the error its request names, so the transport's mapping is tested without a model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

import edgellm.cli.run
from edgellm.cli.main import main
from edgellm.deploy.local_deployment import LaunchError, free_port
from edgellm.deploy.topology import write_topology
from edgellm.errors import BusyError, ConfigError, InputError, PeerError, ProcessFailed, SessionError
from edgellm.net.messages import ForwardRequest, SyncReply, WireError, decode, encode
from edgellm.net.rpc import SERVICE, TOKEN_HEADER, ChannelConfig, RemoteHop, serve
from edgellm.net.rpc_status import AuthError, NodeUnreachable, RemoteError
from edgellm.train.coordinator import TrainingFailed

TOKEN = "errors-token"
Status = grpc.StatusCode
DEAD = f"127.0.0.1:{free_port()}"  # nothing listens here

# what the node raises -> (status on the wire, what the caller raises, text the caller's message must hold)
RAISED = {
    "input": (lambda: ConfigError("cuts must be increasing"), Status.INVALID_ARGUMENT, ConfigError, "cuts must"),
    "wire": (lambda: WireError("message ends inside field"), Status.INVALID_ARGUMENT, ConfigError, "ends inside"),
    "session": (lambda: SessionError("unknown session 'x'"), Status.NOT_FOUND, SessionError, "unknown session"),
    "busy": (lambda: BusyError("serving its maximum of 2 sessions"), Status.RESOURCE_EXHAUSTED, BusyError, "maximum"),
    "bug": (lambda: KeyError("oops"), Status.INTERNAL, RemoteError, "internal error (a bug"),
    "relay": (lambda: downstream_failure(), Status.UNAVAILABLE, RemoteError, f"edge2 at {DEAD} is unreachable"),
}


def downstream_failure() -> Exception:
    """What a middle node meets when the next node is down: the error of its own RemoteHop."""
    hop = RemoteHop("edge2", DEAD, ChannelConfig(token=TOKEN, deadline_s=2))
    try:
        hop.info()
    except NodeUnreachable as exc:
        return exc
    finally:
        hop.shutdown()
    raise AssertionError("nothing should listen at DEAD")


class StubNode:
    """A NodeHandler that raises what its request names: a forward's session, a generate's prompt."""

    def forward(self, frame: bytes) -> bytes:
        session = decode(frame).session
        if session == "garbage":
            return b"not an edgellm frame"
        if session == "wrong-type":
            return encode(SyncReply())
        if session == "big":
            return b"x" * (2 << 20)
        raise RAISED[session][0]()

    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield {"text": "partial "}
        raise RAISED[request["prompt"]][0]()

    def info(self) -> dict[str, Any]:
        return {"name": "stub"}

    def close(self, frame: bytes) -> None:
        pass

    def train(self, frame: bytes) -> bytes:
        raise RAISED[decode(frame).session][0]()


@pytest.fixture(scope="module")
def stub_address() -> Iterator[str]:
    address = f"127.0.0.1:{free_port()}"
    server, _ = serve(StubNode(), address, ChannelConfig(token=TOKEN), workers=4)
    yield address
    server.stop(grace=None)


def request(session: str) -> ForwardRequest:
    return ForwardRequest(session, torch.zeros(1, 1, 4), torch.tensor([[0]]), new_session=True)


def hop(address: str, token: str = TOKEN, max_bytes: int = 64 << 20) -> RemoteHop:
    return RemoteHop("edge1", address, ChannelConfig(token=token, deadline_s=5, max_message_bytes=max_bytes))


def status_of(address: str, session: str) -> Status:
    channel = grpc.insecure_channel(address)
    try:
        call = channel.unary_unary(f"/{SERVICE}/Forward")
        call(encode(request(session)), timeout=5, metadata=((TOKEN_HEADER, TOKEN),))
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()
    raise AssertionError(f"{session}: the call succeeded")


@pytest.mark.parametrize("kind", RAISED)
def test_each_kind_crosses_grpc_as_one_status_and_comes_back_as_itself(stub_address, kind):
    _, status, caught, text = RAISED[kind]
    assert status_of(stub_address, kind) == status
    with pytest.raises(caught, match=r"node edge1 at .*") as info:
        hop(stub_address).forward(request(kind))
    assert text in str(info.value)


@pytest.mark.parametrize("kind", RAISED)
def test_the_generate_stream_ends_with_the_same_kinds(stub_address, kind):
    _, _, caught, text = RAISED[kind]
    events = []
    with pytest.raises(caught) as info:
        for event in hop(stub_address).generate({"prompt": kind}):
            events.append(event)
    assert events == [{"text": "partial "}] and text in str(info.value)


def test_a_bug_is_logged_with_its_traceback_on_the_node(stub_address, caplog):
    with caplog.at_level(logging.ERROR, logger="edgellm"), pytest.raises(RemoteError):
        hop(stub_address).forward(request("bug"))
    (record,) = [r for r in caplog.records if r.exc_info]
    assert isinstance(record.exc_info[1], KeyError)


def test_the_kinds_the_caller_meets_without_the_node_raising(stub_address):
    with pytest.raises(AuthError, match="refused the deployment token") as auth:
        hop(stub_address, token="wrong").forward(request("input"))
    assert isinstance(auth.value, InputError)  # the user fixes the token; retrying cannot help
    with pytest.raises(NodeUnreachable, match=f"edge1 at {DEAD} is unreachable"):
        hop(DEAD).forward(request("input"))
    with pytest.raises(ConfigError, match="size limit"):  # gRPC's own RESOURCE_EXHAUSTED is not "busy"
        hop(stub_address, max_bytes=1 << 20).forward(request("big"))


@pytest.mark.parametrize("session, text", [("garbage", "does not decode"), ("wrong-type", "answered Forward with")])
def test_a_wrong_reply_is_the_peers_fault(stub_address, session, text):
    with pytest.raises(RemoteError, match=text) as info:
        hop(stub_address).forward(request(session))
    assert isinstance(info.value, PeerError)


@pytest.mark.parametrize(
    "error, code",
    [(LaunchError("node exited", 2), 2), (LaunchError("not ready in time"), 3), (TrainingFailed("killed", -9), 3),
     (TrainingFailed("busy", 4), 4), (TrainingFailed("crashed", 1), 1)],
)  # fmt: skip
def test_a_failed_child_process_exits_with_the_childs_kind(error, code):
    assert isinstance(error, ProcessFailed) and error.exit_code == code


def topology(tmp_path: Path, device_address: str) -> Path:
    path, edge_address = tmp_path / "topology.toml", f"127.0.0.1:{free_port()}"  # the CLI never calls edge1
    write_topology(path, {
        "model": {"name": "tiny", "cuts": [1], "head": "device"},
        "deployment": {"route": ["device", "edge1"], "token": TOKEN, "deadline_s": 2.0},
        "nodes": [{"name": "device", "role": "device", "address": device_address},
                  {"name": "edge1", "role": "edge", "address": edge_address}],
        "links": [{"between": ["device", "edge1"], "profile": "none"}],
    })  # fmt: skip
    return path


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("prompt, code", [("input", 2), ("relay", 3), ("bug", 3), ("busy", 4)])
def test_cli_exit_code_says_whose_fault(stub_address, tmp_path, capsys, prompt, code):
    """`run` against a stub device node: the node's error kind decides the exit code (its bug is a failed peer)."""
    got, err = run_cli(["run", prompt, "--topology", str(topology(tmp_path, stub_address))], capsys)
    failing = "edge2" if prompt == "relay" else "device"  # a relayed failure names the node where it began
    assert got == code and len(err) == 1 and err[0].startswith(f"edgellm: error: node {failing} at "), err
    assert prompt != "relay" or err[0].endswith(f"(relayed by node device at {stub_address})"), err


def test_cli_exits_2_on_bad_input_and_3_when_the_device_is_down(tmp_path, capsys):
    got, err = run_cli(["run", "hi", "--topology", str(tmp_path / "missing.toml")], capsys)
    assert got == 2 and err == [f"edgellm: error: {tmp_path / 'missing.toml'}: topology file not found"]
    got, err = run_cli(["run", "hi", "--topology", str(topology(tmp_path, DEAD))], capsys)
    assert got == 3 and len(err) == 1 and f"device at {DEAD} is unreachable" in err[0], err


def test_cli_exits_1_with_a_traceback_on_a_bug(tmp_path, capsys, monkeypatch):
    def broken(args: object) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(edgellm.cli.run, "run", broken)  # the subcommand `main` dispatches to
    got, err = run_cli(["run", "hi", "--topology", str(tmp_path / "t.toml")], capsys)
    assert got == 1 and err[0] == "Traceback (most recent call last):"
    assert err[-1].startswith("edgellm: internal error (a bug") and "ZeroDivisionError('a bug')" in err[-1]
