"""The HTTP layer of `edgellm serve` against a scripted engine: answers and usage, OpenAI-style errors and their
statuses, the concurrency limit, the API key, the deployment view, adapter admin and metrics (streaming:
tests/test_serve_streaming.py).

The engine here is a fake with `DeviceEngine`'s contract (a character-level tokenizer, a fixed answer); the real
model behind the real server is tests/test_serve_real.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.testclient import TestClient

from edgellm.errors import BusyError, ConfigError
from edgellm.net.rpc_status import NodeUnreachable
from edgellm.serve.http.app import create_app
from edgellm.serve.http.config import ServeConfig

EOS = 3
CONTEXT = 200
ANSWER = ["Hel", "lo", " wor", "ld", ".", " By", "e", "!"]  # then EOS
MODEL = "tiny-fake"


class CharTokenizer:
    """One token per character (id = code point + 10); a ChatML-like template."""

    chat_template = "fake"
    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) + 10 for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt: bool, tokenize: bool) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 10) for i in ids if i >= 10)


class FakeEngine:
    """Answers ANSWER token by token; the prompt's last user text chooses a failure: BUSY, DOWN, BAD, CRASH,
    CRASH-LATE (after two tokens), or WAIT (each token waits for a `let` of it)."""

    name = "device"

    def __init__(self) -> None:
        self.tokenizer = CharTokenizer()
        self.model_config = SimpleNamespace(max_position_embeddings=CONTEXT, vocab_size=2000, eos_token_id=EOS)
        self.requests: list[dict[str, Any]] = []
        self.closed = 0  # generations ended, however
        self.completed = 0  # generations that reached their report
        self.active = 0
        self._allowed = threading.Semaphore(0)
        self.loaded: dict[str, bool] = {"dates": False}

    def let(self, tokens: int) -> None:
        """Let WAIT generations make this many more tokens."""
        for _ in range(tokens):
            self._allowed.release()

    def info(self) -> dict[str, Any]:
        return {"model": MODEL, "name": self.name, "max_context": 4096, "mode": "chain",
                "layout": [{"node": "device", "layers": [0, 2], "embed": True, "head": True},
                           {"node": "edge1", "layers": [2, 4], "embed": False, "head": False}],
                "link_emulation": [{"to": "edge1", "profile": {"up_mbps": 300, "down_mbps": 500, "rtt_ms": 1}}]}  # fmt: skip

    def stats(self) -> dict[str, Any]:
        return {"active_generations": self.active, "nodes": {"edge1": {"sessions": self.active,
                "batch_sizes": {"1": 7, "2": 3}}}}  # fmt: skip

    def adapters(self) -> list[dict[str, Any]]:
        return [{"name": n, "loaded": on, "bytes": 4096, "source": f"/a/{n}"} for n, on in self.loaded.items()]

    def load_adapter(self, name: str, path: str | None = None) -> dict[str, Any]:
        if name not in self.loaded and path is None:
            raise ConfigError(f"unknown adapter {name!r}")
        self.loaded[name] = True
        return {"name": name, "loaded": True}

    def unload_adapter(self, name: str) -> dict[str, Any]:
        if name not in self.loaded:
            raise ConfigError(f"unknown adapter {name!r}")
        self.loaded[name] = False
        return {"name": name, "loaded": False}

    def generate(self, data: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self.requests.append(data)
        prompt = self.tokenizer.decode(data["prompt_ids"])
        self.active += 1
        try:
            for word, error in (("BUSY", BusyError("session table full")), ("DOWN", NodeUnreachable("edge1 down")),
                                ("BAD", ConfigError("no such thing")), ("CRASH\n", RuntimeError("secret detail"))):  # fmt: skip
                if word in prompt:
                    raise error
            for i, text in enumerate([*ANSWER, ""][: data["max_new_tokens"]]):
                if "WAIT" in prompt:
                    assert self._allowed.acquire(timeout=10)
                if "CRASH-LATE" in prompt and i == 2:
                    raise RuntimeError("secret detail")
                timing = {"ms": 5.0, "hops": [{"node": "edge1", "link": "device->edge1", "compute_ms": 2.0,
                          "wire_ms": 1.5, "bytes_up": 100, "bytes_down": 40}], "local": [{"stage": "s0", "compute_ms": 1}]}  # fmt: skip
                yield {"token": EOS if i == len(ANSWER) else 100 + i, "text": text, "timing": timing}
            yield {"report": {"prompt_tokens": data["prompt_ids"], "new_tokens": [], "ttft_ms": 5.0,
                              "decode_tok_per_s": 200.0, "nodes": [], "links": []}}  # fmt: skip
            self.completed += 1
        finally:
            self.active -= 1
            self.closed += 1


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, ServeConfig(max_concurrent=1)), raise_server_exceptions=False) as c:
        yield c


def chat(content: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def assert_error(response, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"] and "secret detail" not in error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


# -- answers -----------------------------------------------------------------------------------------------------


def test_chat_answers_with_usage_finish_reason_and_the_engine_request(client, engine):
    r = client.post("/v1/chat/completions", json=chat("hi", temperature=0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello world. Bye!"}
    assert body["choices"][0]["finish_reason"] == "stop"  # the engine stopped at EOS
    prompt_ids = CharTokenizer()("<user>hi\n<assistant>")["input_ids"]
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 9,
        "total_tokens": len(prompt_ids) + 9,
    }
    room = CONTEXT - len(prompt_ids)  # under the default max_tokens (256): what the context leaves
    assert engine.requests == [{"prompt_ids": prompt_ids, "max_new_tokens": room, "greedy": True, "temperature": 1.0,
                                "top_p": 1.0, "seed": 0}]  # fmt: skip
    assert engine.closed == 1


def test_completion_of_raw_text_stops_at_length_and_passes_sampling(client, engine):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["abc"], "max_tokens": 3, "temperature": 0.5,
                                             "top_p": 0.9, "seed": 7})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Hello wor" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert engine.requests[0] == {"prompt_ids": [107, 108, 109], "max_new_tokens": 3, "greedy": False,
                                  "temperature": 0.5, "top_p": 0.9, "seed": 7}  # fmt: skip


# -- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"n": 2}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -5}, "max_completion_tokens"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 1]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "messages"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": 1}, "presence_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"model": None}, "model"),
        ({"top_p": 1.5}, "top_p"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_bad_chat_requests_get_400_naming_the_field(client, engine, fields, param):
    error = assert_error(client.post("/v1/chat/completions", json={**chat(), **fields}), 400, param=param)
    assert error["type"] == "invalid_request_error"
    assert engine.requests == []


def test_bad_completion_requests_and_bodies(client):
    assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]}), 400, param="prompt")
    assert_error(client.post("/v1/completions", json={"model": MODEL}), 400, param="prompt")
    assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "echo": True}), 400, param="echo")
    assert_error(
        client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    assert_error(client.post("/v1/completions", json=[1, 2]), 400)
    lone = b'{"model": "%s", "prompt": "a\\ud800b"}' % MODEL.encode()  # valid JSON, not valid Unicode
    error = assert_error(client.post("/v1/completions", content=lone, headers={"content-type": "application/json"}),
                         400, param="prompt")  # fmt: skip
    assert "lone surrogate" in error["message"]
    lone = b'{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}]}' % MODEL.encode()
    error = assert_error(client.post("/v1/chat/completions", content=lone,
                                     headers={"content-type": "application/json"}), 400, param="messages")  # fmt: skip
    assert "lone surrogate" in error["message"]
    assert_error(client.get("/v1/nothing"), 404, code="not_found")


def test_unknown_model_is_404_and_adapters_are_models(client, engine):
    assert_error(
        client.post("/v1/chat/completions", json={**chat(), "model": "gpt-4"}), 404, "model_not_found", "model"
    )
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["owned_by"], m["loaded"]) for m in models["data"]] == [
        (MODEL, "edgellm", True), ("dates", "edgellm-adapter", False)]  # fmt: skip
    assert client.post("/v1/chat/completions", json={**chat(), "model": "dates"}).status_code == 200
    assert engine.requests[-1]["adapter"] == "dates"
    assert "adapter" not in client.post("/v1/chat/completions", json=chat()).json()  # base model: no adapter field
    assert "adapter" not in engine.requests[-1]


def test_a_prompt_over_the_context_is_400_context_length_exceeded(client):
    long = "x" * CONTEXT
    assert_error(client.post("/v1/chat/completions", json=chat(long)), 400, "context_length_exceeded", "messages")
    assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 150, "max_tokens": 51}),
                 400, "context_length_exceeded", "max_tokens")  # fmt: skip
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 150, "max_tokens": 50})
    assert ok.status_code == 200
    fit = client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 196})  # no max_tokens: what is left
    assert fit.json()["usage"]["completion_tokens"] == 4 and fit.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "word, status, code",
    [
        ("BUSY", 503, "overloaded"),
        ("DOWN", 503, "node_unreachable"),
        ("BAD", 400, None),
        ("CRASH\n", 500, "internal_error"),
    ],
)
def test_engine_errors_map_to_statuses_and_the_server_goes_on(client, engine, word, status, code):
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json=chat(word, stream=stream))
        error = assert_error(r, status, code)
        if status == 503:
            assert r.headers["Retry-After"] == "1" and error["type"] == "server_error"
    assert client.post("/v1/chat/completions", json=chat()).status_code == 200
    assert engine.active == 0


def test_an_engine_crash_mid_stream_ends_the_stream_with_an_error_event(client, engine):
    r = client.post("/v1/chat/completions", json=chat("CRASH-LATE", stream=True))
    assert r.status_code == 200
    events = r.text.split("\n\n")
    assert events[-2] == "data: [DONE]"
    error = json.loads(events[-3][len("data: ") :])["error"]
    assert error["code"] == "internal_error" and "secret" not in error["message"]
    assert client.post("/v1/chat/completions", json=chat()).status_code == 200


def test_over_max_concurrent_is_429_with_retry_after(client, engine):
    first: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: first.update(r=client.post("/v1/chat/completions", json=chat("WAIT"))))
    thread.start()
    deadline = time.monotonic() + 10
    while engine.active == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        r = client.post("/v1/chat/completions", json=chat())
        error = assert_error(r, 429, "rate_limit_exceeded")
        assert r.headers["Retry-After"] == "1" and "max-concurrent" in error["message"]
        metrics = client.get("/metrics").text
        assert "edgellm_requests_in_flight 1.0" in metrics and "edgellm_active_generations 1.0" in metrics
    finally:
        engine.let(len(ANSWER) + 1)
        thread.join(10)
    assert first["r"].status_code == 200
    assert client.post("/v1/chat/completions", json=chat()).status_code == 200  # the slot was given back


# -- the API key -------------------------------------------------------------------------------------------------


def test_the_api_key_guards_v1_admin_and_metrics_not_the_page_or_health(engine):
    app = create_app(engine, ServeConfig(api_key="sekret"))
    with TestClient(app) as c:
        for method, path in [("get", "/v1/models"), ("post", "/v1/chat/completions"), ("get", "/metrics"),
                             ("get", "/admin/adapters"), ("get", "/v1/deployment")]:  # fmt: skip
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                r = getattr(c, method)(path, headers=headers, **({"json": chat()} if method == "post" else {}))
                assert assert_error(r, 401, "invalid_api_key")
                assert r.headers["WWW-Authenticate"] == "Bearer"
        good = {"Authorization": "Bearer sekret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.post("/v1/chat/completions", json=chat(), headers=good).status_code == 200
        assert c.get("/health").json()["auth"] is True
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
    assert engine.requests and len(engine.requests) == 1


# -- the extras ----------------------------------------------------------------------------------------------------


def test_deployment_admin_and_metrics(client, engine):
    dep = client.get("/v1/deployment").json()
    assert dep["model"] == MODEL and dep["info"]["layout"][1]["node"] == "edge1" and dep["context_tokens"] == CONTEXT
    assert dep["stats"]["nodes"]["edge1"]["batch_sizes"] == {"1": 7, "2": 3}
    assert client.post("/admin/adapters", json={"name": "dates"}).json() == {"name": "dates", "loaded": True}
    assert_error(client.post("/admin/adapters", json={"name": "nope"}), 400)
    assert_error(client.post("/admin/adapters", json={"path": "/x"}), 400, param="name")
    assert client.get("/admin/adapters").json()["data"][0]["loaded"] is True
    client.post("/v1/chat/completions", json=chat(stream=True))
    client.post("/v1/chat/completions", json=chat(max_tokens=4))
    metrics = client.get("/metrics").text
    for line in [
        'edgellm_requests_total{endpoint="/v1/chat/completions",status="200"} 2.0',
        'edgellm_requests_total{endpoint="/admin/adapters",status="400"} 2.0',
        "edgellm_completion_tokens_total 13.0",
        "edgellm_adapters_loaded 1.0",
        "edgellm_decode_tokens_per_second 200.0",
        'edgellm_node_batch_steps{batch_size="2",node="edge1"} 3.0',
        'edgellm_link_bytes_total{direction="up",link="device->edge1"} 1300.0',
        "edgellm_ttft_seconds_count 2.0",
        "edgellm_token_latency_seconds_count 11.0",
        'edgellm_node_compute_seconds_count{node="edge1"} 13.0',
        'edgellm_node_compute_seconds_count{node="device"} 13.0',
        'edgellm_link_wire_seconds_count{link="device->edge1"} 13.0',
    ]:
        assert line in metrics, line
    assert client.delete("/admin/adapters/dates").json()["loaded"] is False
    assert "edgellm_adapters_loaded 0.0" in client.get("/metrics").text


# -- the command -------------------------------------------------------------------------------------------------


def test_the_command_refuses_model_flags_with_a_topology_bad_limits_and_a_taken_port(capsys):
    import socket

    from edgellm.cli.main import main

    assert main(["serve", "--topology", "t.toml", "--model", "m", "--quant", "int8"]) == 2
    assert "--model, --quant cannot be combined with --topology" in capsys.readouterr().err
    assert main(["serve", "--max-concurrent", "0"]) == 2
    assert "max concurrent generations must be >= 1" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2  # before any model loads
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
