"""`edgellm serve` as a real process (uvicorn on a free port) with the real default model, driven by the official
`openai` client: models, chat and completions, streamed and whole, the API key; then the same server as the device
of a split deployment whose two edge servers are `edgellm node` processes.

One server per module (loading the model takes seconds); answers are short and greedy, so the streamed text must
equal the whole one, and the split deployment's the one-process server's.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from edgellm.deploy.local_deployment import LocalDeployment, free_port

pytestmark = [pytest.mark.real_model, pytest.mark.multiprocess]

API_KEY = "test-key-5c2e"
QUESTION = "What is the capital of France?"
START_TIMEOUT_S = 180


def edgellm() -> list[str]:
    """The console script next to this interpreter, as users run it (else the module)."""
    script = Path(sys.executable).with_name("edgellm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "edgellm"]


class ServeProcess:
    """`edgellm serve ARGS` on a free port, ready once it printed its ready line; stderr goes to `log`."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str] | None = None, wait: bool = True) -> None:
        self.log = log
        self.url = ""
        command = [*edgellm(), "serve", "--port", str(free_port()), *args]
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(env or {})}, text=True)  # fmt: skip
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait for the ready line (and set `url`); stop the process if it does not come."""
        assert self.proc.stdout is not None
        try:
            readable, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT_S)
            line = self.proc.stdout.readline() if readable else ""
            if not line:
                self.proc.poll()
                raise RuntimeError(f"edgellm serve did not start (code {self.proc.returncode}): {self.log.read_text()}")
        except BaseException:
            self.stop()
            raise
        self.url = json.loads(line)["url"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def openai_client(url: str, key: str = API_KEY):
    import openai

    return openai.OpenAI(base_url=f"{url}v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def adapter(real_model_dir, tmp_path_factory) -> tuple[Path, str]:
    """A peft adapter of the real model with random non-zero A and B, in `<dir>/sea`, and peft's own greedy
    answer to QUESTION with it (8 new tokens)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from conftest import reference_model
    from edgellm.model.prompt import encode_messages
    from edgellm.store.weights import load_tokenizer

    directory = tmp_path_factory.mktemp("adapters")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(reference_model(real_model_dir), config).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.15)
        model.save_pretrained(directory / "sea")
        tokenizer = load_tokenizer(real_model_dir)
        ids = encode_messages(tokenizer, [{"role": "user", "content": QUESTION}])
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    return directory, tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def server(adapter, tmp_path_factory) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--max-concurrent", "4", "--threads", "2", "--adapters", str(adapter[0])]
    served = ServeProcess(args, log, env={"EDGELLM_API_KEY": API_KEY})
    yield served
    served.stop()
    assert served.proc.returncode == 0, log.read_text()


def ask(client, model: str, stream: bool, max_tokens: int = 12) -> tuple[str, str | None, Any]:
    """(text, finish_reason, usage) of a greedy chat answer to QUESTION."""
    messages = [{"role": "user", "content": QUESTION}]
    if not stream:
        done = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        return done.choices[0].message.content, done.choices[0].finish_reason, done.usage
    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):  # fmt: skip
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    return text, finish, usage


def test_models_chat_and_stream_through_the_openai_client(server):
    client = openai_client(server.url)
    assert [m.id for m in client.models.list().data] == ["smollm2-135m", "sea"]
    text, finish, usage = ask(client, "smollm2-135m", stream=False)
    assert "Paris" in text and finish == "stop"
    assert usage.completion_tokens <= 12 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    streamed, streamed_finish, streamed_usage = ask(client, "smollm2-135m", stream=True)
    assert (streamed, streamed_finish) == (text, finish)
    assert streamed_usage.model_dump() == usage.model_dump()


def test_concurrent_requests_answer_as_each_alone(server):
    from concurrent.futures import ThreadPoolExecutor

    client = openai_client(server.url)
    alone = ask(client, "smollm2-135m", stream=False, max_tokens=8)[0]
    with ThreadPoolExecutor(4) as pool:  # --max-concurrent 4: all run at once, batched by the stage host
        answers = list(pool.map(lambda i: ask(client, "smollm2-135m", stream=i % 2 == 0, max_tokens=8)[0], range(4)))
    assert answers == [alone] * 4


def test_completion_whole_and_streamed_and_a_stop_string(server):
    client = openai_client(server.url)
    args = dict(model="smollm2-135m", prompt="The capital of France is", max_tokens=6, temperature=0)
    done = client.completions.create(**args)
    text = done.choices[0].text
    assert text.strip() and done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 6
    assert "".join(c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices) == text
    word = text.split()[1]  # cut before the second word
    cut = client.completions.create(**args, stop=[word])
    assert cut.choices[0].text == text[: text.index(word)] and cut.choices[0].finish_reason == "stop"


def test_an_adapter_is_a_model_that_answers_as_peft_does_and_can_be_unloaded(server, adapter):
    import httpx2

    client = openai_client(server.url)
    base = ask(client, "smollm2-135m", stream=False, max_tokens=8)[0]
    with_adapter = ask(client, "sea", stream=False, max_tokens=8)[0]
    assert with_adapter == adapter[1] and with_adapter != base  # the adapter changes the answer, as in peft
    admin = f"{server.url}admin/adapters"
    key = {"Authorization": f"Bearer {API_KEY}"}
    assert [(a["name"], a["loaded"]) for a in httpx2.get(admin, headers=key).json()["data"]] == [("sea", True)]
    assert httpx2.delete(f"{admin}/sea", headers=key).json()["loaded"] is False
    assert [m.loaded for m in client.models.list().data] == [True, False]
    assert httpx2.post(admin, json={"name": "sea"}, headers=key).json()["loaded"] is True
    assert ask(client, "sea", stream=True, max_tokens=8)[0] == with_adapter


def test_errors_reach_the_client_as_openai_errors(server):
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai_client(server.url, key="wrong").models.list()
    client = openai_client(server.url)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="smollm2-135m", prompt="hello", max_tokens=10**6)
    assert too_long.value.code == "context_length_exceeded"
    import httpx2

    metrics = httpx2.get(f"{server.url}metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert 'edgellm_requests_total{endpoint="/v1/chat/completions",status="404"}' in metrics
    assert httpx2.get(f"{server.url}health").json()["status"] == "ok"  # open without the key


# -- the same server as the device of a split deployment ---------------------------------------------------------


@pytest.mark.slow
def test_a_split_deployment_serves_the_same_answer(server, tmp_path):
    from edgellm.deploy.topology import write_topology

    names = ["device", "edge1", "edge2"]
    path = tmp_path / "split.toml"
    topology = write_topology(path, {
        "model": {"name": "smollm2-135m", "cuts": [10, 20], "head": "device"},
        "deployment": {"route": names, "mode": "chain", "token": "serve-test-77", "deadline_s": 60.0},
        "nodes": [{"name": n, "role": "device" if n == "device" else "edge", "address": f"127.0.0.1:{free_port()}",
                   "threads": 1} for n in names],
        "links": [{"between": [a, b], "profile": "6g", "codec": "none"} for a, b in zip(names, names[1:])],
    })  # fmt: skip
    # The device starts with its servers (it reaches them at its first request): three processes load at once.
    split = ServeProcess(
        ["--topology", str(path)], tmp_path / "serve.log", env={"EDGELLM_API_KEY": API_KEY}, wait=False
    )
    try:
        with LocalDeployment(topology, path, tmp_path, names=["edge1", "edge2"]):
            split.wait_ready()
            client = openai_client(split.url)
            expected = ask(openai_client(server.url), "smollm2-135m", stream=False, max_tokens=8)[0]
            assert ask(client, "smollm2-135m", stream=False, max_tokens=8)[0] == expected
            chunks = _raw_stream(split.url)
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == expected
            hops = [h for c in chunks for h in (c.get("edgellm") or {}).get("timing", {}).get("hops", [])]
            assert {(h["node"], h["link"]) for h in hops} == {("edge1", "device->edge1"), ("edge2", "edge1->edge2")}
            assert all(h["bytes_up"] > 0 and h["wire_ms"] > 0 for h in hops)
            import httpx2

            deployment = httpx2.get(f"{split.url}v1/deployment", headers={"Authorization": f"Bearer {API_KEY}"}).json()
            assert [row["node"] for row in deployment["info"]["layout"]][:3] == names
    finally:
        split.stop()


def _raw_stream(url: str) -> list[dict[str, Any]]:
    import httpx2

    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8,
            "temperature": 0, "stream": True}  # fmt: skip
    started = time.monotonic()
    response = httpx2.post(f"{url}v1/chat/completions", json=body, timeout=120,
                           headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 120
    events = [e[len("data: ") :] for e in response.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]
