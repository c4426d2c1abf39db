"""Serving completions from a `DeviceEngine`: which model a request names, its prompt's tokens within the context,
the limit on generations in flight, and the answer, whole or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from edgellm.errors import ConfigError
from edgellm.model.arch import max_positions
from edgellm.model.prompt import encode_messages, encode_prompt, stop_ids
from edgellm.model.sampling import MIN_TEMPERATURE
from edgellm.serve.http.config import ServeConfig
from edgellm.serve.http.metrics import ServeMetrics
from edgellm.serve.http.openai_schema import (
    ApiError,
    CompletionRequest,
    api_error_from,
    bad_request,
    chunk,
    response,
    usage,
    usage_chunk,
)
from edgellm.serve.http.streaming import Finish, GenerationRun, Piece, RunSpec, sse

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a whole (non-streamed) answer checks that its client is still there
REPORT_LISTS = ("prompt_tokens", "new_tokens", "text")  # report fields the HTTP answer carries otherwise


@dataclass(frozen=True)
class Prepared:
    """A request ready for the engine: the adapter it names (None: the base model), its prompt's tokens, how many
    new tokens it may take, and the engine's request."""

    req: CompletionRequest
    adapter: str | None
    prompt_ids: tuple[int, ...]
    max_tokens: int
    data: dict[str, Any]


class Completions:
    """The generation half of the API around one engine (`edgellm.serve.device.DeviceEngine`'s contract)."""

    def __init__(self, engine: Any, config: ServeConfig, metrics: ServeMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        info = engine.info()
        name = str(info.get("model") or engine.name)
        self.model_aliases = {name, Path(name).name}  # a model directory answers to its full path and its name
        self.model_id = config.model_id or Path(name).name
        self.model_aliases.add(self.model_id)
        limits = [max_positions(engine.model_config), info.get("max_context")]
        self.context_tokens = min(int(n) for n in limits if isinstance(n, int) and n > 0)
        self.stop_token_ids = stop_ids(engine.tokenizer, engine.model_config)
        self.in_flight = 0
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer must not be borrowed by two threads at once

    # -- models ----------------------------------------------------------------------------------------------------

    def adapters(self) -> list[dict[str, Any]]:
        """The engine's adapters (none for an engine without them)."""
        return engine_adapters(self.engine)

    def models(self) -> list[dict[str, Any]]:
        """/v1/models' data: the base model, then every adapter."""
        base = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "edgellm", "loaded": True,
                "bytes": None}  # fmt: skip
        rows = [base]
        for a in self.adapters():
            rows.append({"id": a["name"], "object": "model", "created": 0, "owned_by": "edgellm-adapter",
                         "parent": self.model_id, "loaded": bool(a.get("loaded")), "bytes": a.get("bytes")})  # fmt: skip
        return rows

    def resolve(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base model). Raises ApiError 404 for an unknown one."""
        if model in self.model_aliases:
            return None
        if any(a["name"] == model for a in self.adapters()):
            return model
        raise ApiError(404, f"the model {model!r} does not exist; GET /v1/models lists the base model "
                       f"{self.model_id!r} and its adapters", param="model", code="model_not_found")  # fmt: skip

    # -- preparing ---------------------------------------------------------------------------------------------------

    def prepare(self, req: CompletionRequest, adapter: str | None) -> Prepared:
        """Tokenize the prompt and size the answer to the context (blocking: call it in a worker thread).

        Raises:
            ApiError: 400, an empty or malformed prompt, or prompt + max_tokens over the context.
        """
        ids = self._prompt_ids(req)
        room = self.context_tokens - len(ids)
        if req.max_tokens is not None and req.max_tokens > room:
            raise bad_request(f"this model's context is {self.context_tokens} tokens; the prompt takes {len(ids)} "
                              f"and max_tokens asks for {req.max_tokens} more", "max_tokens",
                              "context_length_exceeded")  # fmt: skip
        if room < 1:
            raise bad_request(f"this model's context is {self.context_tokens} tokens and the prompt takes "
                              f"{len(ids)}: no room to answer", "messages" if req.kind == "chat" else "prompt",
                              "context_length_exceeded")  # fmt: skip
        max_tokens = req.max_tokens if req.max_tokens is not None else min(self.config.max_tokens_default, room)
        greedy = req.greedy or req.temperature < MIN_TEMPERATURE
        data: dict[str, Any] = {
            "prompt_ids": list(ids),
            "max_new_tokens": max_tokens,
            "greedy": greedy,
            "temperature": 1.0 if greedy else req.temperature,
            "top_p": 1.0 if greedy else req.top_p,
            "seed": req.seed if req.seed is not None else (0 if greedy else secrets.randbits(62)),
        }
        if adapter is not None:  # an engine without adapters never sees the field
            data["adapter"] = adapter
        if self.config.speculative:
            data.update(self.config.speculative)
        return Prepared(req, adapter, ids, max_tokens, data)

    def _prompt_ids(self, req: CompletionRequest) -> tuple[int, ...]:
        param = "messages" if req.kind == "chat" else "prompt"
        if req.prompt_ids is not None:
            vocab = int(getattr(self.engine.model_config, "vocab_size", 0) or 0)
            if vocab and any(not 0 <= t < vocab for t in req.prompt_ids):
                raise bad_request(f"prompt token ids must be in [0, {vocab})", param)
            return req.prompt_ids
        try:
            with self._tokenizer_lock:
                if req.messages is not None:
                    ids = encode_messages(self.engine.tokenizer, list(req.messages))
                else:
                    assert req.prompt is not None
                    ids = encode_prompt(self.engine.tokenizer, req.prompt, chat=False)
        except ConfigError as exc:
            raise bad_request(str(exc), param) from exc
        return tuple(ids)

    # -- running -----------------------------------------------------------------------------------------------------

    def start(self, prepared: Prepared) -> GenerationRun:
        """Start a generation in its own thread. Raises ApiError 429 when `max_concurrent` are in flight."""
        if self.in_flight >= self.config.max_concurrent:
            raise ApiError(429, f"{self.in_flight} generations are in flight, the server's limit "
                           f"(--max-concurrent {self.config.max_concurrent}); retry shortly", "rate_limit_error",
                           code="rate_limit_exceeded", retry_after_s=self.config.retry_after_s)  # fmt: skip
        self.in_flight += 1
        self.metrics.in_flight.inc()

        def done() -> None:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

        spec = RunSpec(prepared.req.stop, prepared.max_tokens, self.stop_token_ids)
        run = GenerationRun(lambda: iter(self.engine.generate(prepared.data)), spec, done)
        run.start()
        return run

    async def answer(self, prepared: Prepared, request: Request) -> Response:
        """Run the request and answer it: a JSON object, or a stream once the first token (or error) is in."""
        run = self.start(prepared)
        started = time.time()
        try:
            first = await self._next_or_gone(run, request)
        except BaseException:
            run.cancel()  # a refusal ended it already; a client gone, or a server stopping, ends it here
            raise
        if prepared.req.stream:
            events = self._stream(prepared, run, first, int(started))
            return _EventStream(events, run.cancel)
        try:
            return JSONResponse(await self._collect(prepared, run, first, int(started), request))
        finally:
            run.cancel()

    def _failure(self, exc: BaseException) -> ApiError:
        error = api_error_from(exc, self.config.retry_after_s)
        if error.status >= 500 and error.code == "internal_error":
            log.error("generation failed (a bug)", exc_info=exc)
        else:
            log.info("generation refused: %s", exc)
        return error

    async def _collect(self, prepared: Prepared, run: GenerationRun, item: Piece | Finish, created: int,
                       request: Request) -> dict[str, Any]:  # fmt: skip
        parts: list[str] = []
        timed, index = False, 0
        while isinstance(item, Piece):
            parts.append(item.text)
            timed = timed or item.timing is not None
            self._observe(item, index)
            index += 1 if item.token is not None else 0
            item = await self._next_or_gone(run, request)
        counts = self._finish(prepared, item, timed)
        rid = _request_id(prepared.req)
        return response(prepared.req, rid, created, "".join(parts), item.finish_reason, counts, _summary(item))

    async def _next_or_gone(self, run: GenerationRun, request: Request) -> Piece | Finish:
        """The run's next item; cancels it and raises when the client disconnected meanwhile."""
        getter = asyncio.ensure_future(run.next())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                if done:
                    try:
                        return getter.result()
                    except Exception as exc:  # noqa: BLE001 - mapped to a status
                        raise self._failure(exc) from exc
                if await request.is_disconnected():
                    run.cancel()
                    raise ApiError(499, "the client closed the connection", code="client_closed")
        finally:
            if not getter.done():
                getter.cancel()

    async def _stream(self, prepared: Prepared, run: GenerationRun, item: Piece | Finish,
                      created: int) -> AsyncIterator[bytes]:  # fmt: skip
        req, rid = prepared.req, _request_id(prepared.req)
        if req.kind == "chat":
            yield sse(chunk(req, rid, created, "", first=True))
        timed, index = False, 0
        try:
            while isinstance(item, Piece):
                timed = timed or item.timing is not None
                self._observe(item, index)
                index += 1 if item.token is not None else 0
                extra = {"timing": item.timing, "token_ms": round(item.gap_ms, 3)} if item.token is not None else None
                yield sse(chunk(req, rid, created, item.text, extra=extra))
                item = await run.next()
        except Exception as exc:  # noqa: BLE001 - the status is sent already: the error goes in the stream
            yield sse(self._failure(exc).body())
            yield sse("[DONE]")
            return
        counts = self._finish(prepared, item, timed)
        yield sse(chunk(req, rid, created, None, item.finish_reason, extra=_summary(item)))
        if req.include_usage:
            yield sse(usage_chunk(req, rid, created, counts))
        yield sse("[DONE]")

    def _observe(self, piece: Piece, index: int) -> None:
        if piece.token is not None:
            self.metrics.observe_token(piece.gap_ms, piece.timing, first=index == 0)

    def _finish(self, prepared: Prepared, finish: Finish, timed: bool) -> dict[str, int]:
        self.metrics.observe_finish(len(prepared.prompt_ids), finish.completion_tokens, finish.report, timed)
        return usage(len(prepared.prompt_ids), finish.completion_tokens)


class _EventStream(StreamingResponse):
    """A server-sent event stream whose generation is cancelled however the response ends (finished, failed, or
    its client gone: starlette then stops iterating without closing the iterator)."""

    def __init__(self, events: AsyncIterator[bytes], cancel: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._events = events
        self._cancel = cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cancel()
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()


def engine_adapters(engine: Any) -> list[dict[str, Any]]:
    """The adapters an engine lists, as `[{"name", "loaded", "bytes", "source"}]`; [] for one without adapters."""
    for method in ("adapters", "adapter_listing"):
        call = getattr(engine, method, None)
        if callable(call):
            listing = call()
            return [a for a in listing or [] if isinstance(a, dict) and isinstance(a.get("name"), str)]
    return []


def engine_stats(engine: Any) -> dict[str, Any]:
    """The engine's `stats()`; {} for one without them."""
    call = getattr(engine, "stats", None)
    stats = call() if callable(call) else {}
    return stats if isinstance(stats, dict) else {}


def _request_id(req: CompletionRequest) -> str:
    return f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def _summary(finish: Finish) -> dict[str, Any]:
    """The engine's report for the answer's `edgellm` field, without the token lists (the answer has them)."""
    return {"report": {k: v for k, v in finish.report.items() if k not in REPORT_LISTS}}
