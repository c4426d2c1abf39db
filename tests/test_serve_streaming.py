"""Streaming in `edgellm serve`: stop strings cut across token boundaries, the stream's OpenAI chunk format with
its timing, usage and [DONE], and a client that goes away mid-stream (the real server, in this process), against
the scripted engine of tests/test_serve_http.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient
from test_serve_http import ANSWER, MODEL, FakeEngine, chat

from edgellm.serve.http.app import create_app
from edgellm.serve.http.config import ServeConfig
from edgellm.serve.http.streaming import StopText


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, ServeConfig()), raise_server_exceptions=False) as c:
        yield c


def chunks(response) -> list[dict[str, Any]]:
    """The JSON chunks of a stream (checking the SSE framing and the final [DONE])."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    return [json.loads(e[len("data: ") :]) for e in events[:-2]]


# -- stop strings --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stop, text",
    [(". B", "Hello world"), (["zzz", "lo w"], "Hel"), ("!", "Hello world. Bye"), ("o", "Hell"), ("Bye!x", None)],
)
def test_stop_strings_cut_before_the_stop_across_token_boundaries(client, stop, text):
    r = client.post("/v1/chat/completions", json=chat(stop=stop))
    choice = r.json()["choices"][0]
    if text is None:  # no stop string came: the whole answer, ended by the engine
        assert choice["message"]["content"] == "Hello world. Bye!" and choice["finish_reason"] == "stop"
    else:
        assert choice["message"]["content"] == text and choice["finish_reason"] == "stop"
    streamed = client.post("/v1/chat/completions", json=chat(stop=stop, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks(streamed)[:-1]) == (
        text or "Hello world. Bye!"
    )


@pytest.mark.parametrize("deltas", [["ab", "cS", "TOPd"], ["abcST", "OP"], ["a", "b", "c", "S", "T", "O", "P", "d"]])
def test_stop_text_never_emits_part_of_a_stop_string(deltas):
    cutter = StopText(["STOP", "cSx"])
    out = "".join(cutter.push(d) for d in deltas) + cutter.flush()
    assert out == "abc" and cutter.stopped


def test_stop_text_releases_a_held_back_prefix_that_did_not_become_a_stop():
    cutter = StopText(["STOP"])
    assert cutter.push("aST") == "a"
    assert cutter.push("x") == "STx"
    assert cutter.push("ST") == "" and cutter.flush() == "ST" and not cutter.stopped


# -- chunks ------------------------------------------------------------------------------------------------------


def test_stream_chunks_have_openai_format_timing_usage_and_done(client):
    r = client.post("/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True}))
    parts = chunks(r)
    assert len({p["id"] for p in parts}) == 1 and all(p["object"] == "chat.completion.chunk" for p in parts)
    assert parts[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = parts[1:-2]
    assert "".join(p["choices"][0]["delta"]["content"] for p in tokens) == "Hello world. Bye!"
    assert all(p["choices"][0]["finish_reason"] is None for p in tokens)
    assert tokens[0]["edgellm"]["timing"]["hops"][0]["link"] == "device->edge1"  # the page's breakdown
    assert parts[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert parts[-1]["choices"] == [] and parts[-1]["usage"]["completion_tokens"] == 9


def test_completion_stream_chunks(client):
    parts = chunks(
        client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True, "max_tokens": 2})
    )
    assert [p["choices"][0]["text"] for p in parts] == ["Hel", "lo", ""]
    assert parts[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in parts[-1]


# -- a client that goes away (the real server, in this process) ----------------------------------------------------


@pytest.fixture
def live(engine: FakeEngine) -> Iterator[str]:
    """The app under uvicorn in a thread of this process, on a free port: its chat completions URL."""
    import uvicorn

    from edgellm.cli.serve import _listen

    sock = _listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServeConfig()), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
    engine.let(len(ANSWER) + 1)
    server.should_exit = True
    thread.join(10)


def wait_closed(engine: FakeEngine, tokens: int = 3) -> None:
    """Let the engine make up to `tokens` more tokens, one at a time, until its generation was closed."""
    for _ in range(tokens):
        if engine.closed:
            return
        engine.let(1)
        time.sleep(0.6)


def test_a_client_that_disconnects_mid_stream_closes_the_generation(engine, live):
    import httpx2

    with httpx2.Client(timeout=10) as http:
        engine.let(1)  # the status (and the stream) come with the first token
        with http.stream("POST", live, json=chat("WAIT", stream=True)) as r:
            events = (line for line in r.iter_lines() if line)
            assert json.loads(next(events)[6:])["choices"][0]["delta"]["role"] == "assistant"
            assert json.loads(next(events)[6:])["choices"][0]["delta"]["content"] == "Hel"
    wait_closed(engine)  # the server finds the client gone when it sends the next token
    assert engine.closed == 1 and engine.completed == 0 and engine.active == 0
    assert len(engine.requests) == 1


def test_a_client_that_gives_up_on_a_whole_answer_closes_the_generation(engine, live):
    import httpx2

    engine.let(2)
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(live, json=chat("WAIT"), timeout=0.5)
    wait_closed(engine)  # the server looks for its client every half second
    assert engine.closed == 1 and engine.completed == 0 and engine.active == 0
