"""The chat page of `edgellm serve` in a real browser: headless Chromium loads it from a running server, asks for the
API key, then sends a question from the URL (`?prompt=...&send=1`) and streams the answer; the answer in the DOM
must be the API's greedy answer, and the deployment view and the per-token breakdown must be drawn.

Chromium is driven over its DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ending in NUL
on file descriptors 3 and 4), so no driver package is needed. `--dump-dom` alone cannot wait for a streamed
answer: its virtual time runs out while the fetch is still streaming. `make test` installs Chromium
(`apt-get install chromium`); without it these tests are skipped, saying so.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from test_serve_real import API_KEY, QUESTION, ServeProcess, ask, openai_client

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = [
    pytest.mark.real_model,
    pytest.mark.multiprocess,
    pytest.mark.skipif(
        CHROMIUM is None, reason="no chromium on PATH (`make test` installs it: apt-get install chromium)"
    ),
]
ANSWER_TIMEOUT_S = 90


class Browser:
    """Headless Chromium, spoken to over the DevTools protocol on a pipe; one page (`Target`) at a time."""

    def __init__(self, profile: Path, log: Path) -> None:
        assert CHROMIUM is not None
        commands_r, self._commands = os.pipe()  # we write, Chromium reads on its fd 3
        self._replies, replies_w = os.pipe()  # Chromium writes on its fd 4, we read

        def pipes_on_3_and_4() -> None:  # in the child: move our ends out of the way, then onto 3 and 4
            high_r = fcntl.fcntl(commands_r, fcntl.F_DUPFD, 100)
            high_w = fcntl.fcntl(replies_w, fcntl.F_DUPFD, 100)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                   "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}", "about:blank"]  # fmt: skip
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         pass_fds=(3, 4), preexec_fn=pipes_on_3_and_4)  # fmt: skip
        os.close(commands_r)
        os.close(replies_w)
        self._next_id = 0
        self._buffer = b""
        self.session = ""

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = True) -> dict[str, Any]:
        """Send one command (to the attached page when `session`) and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._replies], [], [], max(deadline - time.monotonic(), 0))
            data = os.read(self._replies, 1 << 16) if ready else b""
            if not data:
                raise RuntimeError("chromium did not answer (timed out, or it exited)")
            self._buffer += data
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": url}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)[
            "sessionId"
        ]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float) -> Any:
        """Poll `expression` until it is truthy; return its value. (Until the document has a body it is not
        evaluated: a navigation just started has none.)"""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.evaluate(f"document.body && ({expression})")
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(
            f"{expression} stayed false for {timeout_s} s; page: {self.evaluate('document.body.outerHTML')}"
        )

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False)
            self.proc.wait(timeout=10)
        except (RuntimeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._commands)
            os.close(self._replies)


@pytest.fixture(scope="module")
def server(real_model_dir, tmp_path_factory) -> Iterator[ServeProcess]:
    served = ServeProcess(["--threads", "2"], tmp_path_factory.mktemp("page") / "serve.log",
                          env={"EDGELLM_API_KEY": API_KEY})  # fmt: skip
    yield served
    served.stop()


@pytest.fixture
def browser(tmp_path) -> Iterator[Browser]:
    started = Browser(tmp_path / "profile", tmp_path / "chromium.log")
    yield started
    started.close()


def test_the_page_asks_for_the_key_then_streams_the_greedy_answer_and_draws_the_deployment(server, browser):
    expected = ask(openai_client(server.url), "smollm2-135m", stream=False, max_tokens=12)[0]
    browser.open(server.url)
    browser.wait_for("document.body.dataset.state === 'error' && !document.getElementById('key-form').hidden", 30)
    browser.evaluate(f"localStorage.setItem('edgellm.apiKey', {json.dumps(API_KEY)})")
    query = urlencode({"prompt": QUESTION, "send": "1", "temperature": "0", "max_tokens": "12"})
    browser.call("Page.navigate", {"url": f"{server.url}?{query}"})
    state = browser.wait_for(
        "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state", ANSWER_TIMEOUT_S
    )
    html = browser.evaluate("document.documentElement.outerHTML")
    assert state == "done", html
    answer = browser.evaluate("document.querySelector('.message.assistant .content').textContent")
    assert answer == expected and "Paris" in answer
    assert QUESTION in html and expected in html
    nodes = browser.evaluate("[...document.querySelectorAll('#nodes tbody td')].map(td => td.textContent)")
    assert nodes[:2] == ["device", "0-30 +embed+head"]
    parts = browser.evaluate("[...document.querySelectorAll('#breakdown tbody tr')].map(tr => tr.cells[0].textContent)")
    assert "compute device" in parts
    assert browser.evaluate("document.getElementById('token-stats').textContent").startswith("token ")
    assert "tokens" in browser.evaluate("document.querySelector('.message.assistant .meta').textContent")
