"""The load generator of bench/serve.py: `edgellm serve` as a child process, streaming chat clients over HTTP, and
the adapters they ask for.

Clients speak the OpenAI API with the standard library (`http.client`), one connection each, so the generator adds
no framework of its own to what is measured. Per request: time to the first content chunk (TTFT), the mean time per
output token after it (TPOT = (last chunk - first chunk) / (completion tokens - 1), as vLLM's benchmark), and the
completion tokens the server's usage counts.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from edgellm.lora.config import LoraSpec
from edgellm.lora.peft_io import save_peft_adapter


def make_adapters(directory: Path, count: int, config: Any, rank: int, targets: Sequence[str], seed: int) -> list[str]:
    """`count` random LoRA adapters of rank `rank` on `targets` of every layer (non-zero A and B, so each changes
    the output), in peft's layout under `directory/NAME`; -> their names."""
    layers = int(config.num_hidden_layers)
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads) * head_dim
    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden)}
    names = []
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        name = f"adapter-{i:02d}"
        tensors = {}
        for layer in range(layers):
            for target in targets:
                fan_in, fan_out = dims[target]
                module = f"model.layers.{layer}.self_attn.{target}"
                tensors[f"{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
                tensors[f"{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.02
        save_peft_adapter(
            directory / name, LoraSpec(r=rank, alpha=2.0 * rank, target_modules=tuple(targets)), tensors, "bench"
        )
        names.append(name)
    return names


class Server:
    """`edgellm serve ARGS` as a child process on a free port, from its ready line to `stop()`."""

    def __init__(self, args: Sequence[str], timeout_s: float = 600.0) -> None:
        command = [sys.executable, "-m", "edgellm", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        for line in self.proc.stdout:
            if line.startswith("{") and json.loads(line).get("event") == "ready":
                ready = json.loads(line)
                self.url, self.model = ready["url"], ready["model"]
                return
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError(f"edgellm serve did not become ready (exit {self.proc.poll()})")

    def rss_mb(self) -> float:
        """The server process's resident memory now, MB (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        parts = urlparse(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
        try:
            conn.request(method, path, None if body is None else json.dumps(body),
                         {"Content-Type": "application/json"})  # fmt: skip
            reply = conn.getresponse()
            data = reply.read()
            if reply.status != 200:
                raise RuntimeError(f"{method} {path}: {reply.status} {data[:300]!r}")
            return json.loads(data)
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class RequestRecord:
    model: str
    ttft_ms: float
    tpot_ms: float | None
    tokens: int
    text: str


def stream_chat(url: str, model: str, prompt: str, max_tokens: int) -> RequestRecord:
    """One streaming chat completion, greedy; timed by the client."""
    parts = urlparse(url)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    start = time.perf_counter()
    first = last = None
    tokens, text = 0, []
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"chat completion: {reply.status} {reply.read()[:300]!r}")
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    text.append(piece)
    finally:
        conn.close()
    if first is None or last is None:
        raise RuntimeError(f"no content streamed for {model}")
    tpot = (last - first) * 1e3 / (tokens - 1) if tokens > 1 else None
    return RequestRecord(model, (first - start) * 1e3, tpot, tokens, "".join(text))


@dataclass
class LoadRun:
    """`requests` requests by `concurrency` clients: each client sends its next request when its last ends."""

    records: list[RequestRecord]
    wall_s: float

    @property
    def tok_per_s(self) -> float:
        return sum(r.tokens for r in self.records) / self.wall_s


def run_load(send: Callable[[int], RequestRecord], concurrency: int, requests: int) -> LoadRun:
    """Run requests 0..requests-1 through `send` from `concurrency` threads; -> every record and the wall time."""
    lock = threading.Lock()
    pending = iter(range(requests))
    records: list[RequestRecord | None] = [None] * requests
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            with lock:
                index = next(pending, None)
            if index is None or errors:
                return
            try:
                records[index] = send(index)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
                return

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return LoadRun([r for r in records if r is not None], wall)
