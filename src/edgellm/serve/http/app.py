"""The FastAPI app: OpenAI's /v1 endpoints, the deployment view and adapter admin, /metrics, and the chat page.

`create_app(engine, config)` serves any engine with `DeviceEngine`'s contract (`edgellm.serve.device`). Every
error is answered as OpenAI's `{"error": {message, type, param, code}}`; a bug answers 500 without its
traceback (which goes to the log) and the server goes on serving.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgellm.serve.http.completions import Completions, engine_adapters, engine_stats
from edgellm.serve.http.config import ServeConfig
from edgellm.serve.http.metrics import CONTENT_TYPE, ServeMetrics
from edgellm.serve.http.openai_schema import ApiError, Kind, api_error_from, bad_request, parse_request

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
COUNTED_PREFIXES = ("/v1/", "/admin/")  # the endpoints /metrics counts requests of


def create_app(engine: Any, config: ServeConfig = ServeConfig()) -> FastAPI:
    """An ASGI app serving `engine` (a `DeviceEngine`, or anything with its contract) as `config` says."""
    metrics = ServeMetrics(str(engine.name), lambda: engine_stats(engine), lambda: engine_adapters(engine))
    service = Completions(engine, config, metrics)
    app = FastAPI(title="edgellm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.metrics = metrics
    _add_error_handlers(app)
    app.add_middleware(_CountRequests, metrics=metrics)
    keyed = [Depends(_key_check(config.api_key))]

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_id, "in_flight": service.in_flight,
                "auth": config.api_key is not None}  # fmt: skip

    @app.get("/v1/models", dependencies=keyed)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": await run_in_threadpool(service.models)}

    @app.get("/v1/models/{model:path}", dependencies=keyed)
    async def model(model: str) -> dict[str, Any]:
        found = [m for m in await run_in_threadpool(service.models) if m["id"] == model]
        if not found:
            await run_in_threadpool(service.resolve, model)  # raises the 404
        return found[0]

    async def complete(request: Request, kind: Kind) -> Response:
        req = parse_request(await _json_body(request), kind)
        adapter = await run_in_threadpool(service.resolve, req.model)
        prepared = await run_in_threadpool(service.prepare, req, adapter)
        return await service.answer(prepared, request)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(request: Request) -> Response:
        return await complete(request, "chat")

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request) -> Response:
        return await complete(request, "completion")

    @app.get("/v1/deployment", dependencies=keyed)
    async def deployment() -> dict[str, Any]:
        return await run_in_threadpool(_deployment, service)

    _add_admin_routes(app, service, keyed)

    @app.get("/metrics", dependencies=keyed)
    async def prometheus() -> Response:
        return Response(await run_in_threadpool(metrics.render), media_type=CONTENT_TYPE)

    return app


def _add_admin_routes(app: FastAPI, service: Completions, keyed: list[Any]) -> None:
    @app.get("/admin/adapters", dependencies=keyed)
    async def list_adapters() -> dict[str, Any]:
        return {"object": "list", "data": await run_in_threadpool(service.adapters)}

    @app.post("/admin/adapters", dependencies=keyed)
    async def load_adapter(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
            raise bad_request('the body must be {"name": ADAPTER, "path": DIR (optional)}', "name")
        path = body.get("path")
        if path is not None and not isinstance(path, str):
            raise bad_request("'path' must be a string: the adapter's directory on the server", "path")
        return await _engine_call(service, "load_adapter", body["name"], path)

    @app.delete("/admin/adapters/{name}", dependencies=keyed)
    async def unload_adapter(name: str) -> dict[str, Any]:
        return await _engine_call(service, "unload_adapter", name)


async def _engine_call(service: Completions, method: str, *args: Any) -> dict[str, Any]:
    """An admin call to the engine, its errors answered as the API's."""
    call = getattr(service.engine, method, None)
    if call is None:
        raise bad_request("this engine serves no adapters")
    try:
        result = await run_in_threadpool(call, *args)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an HTTP status
        error = api_error_from(exc, service.config.retry_after_s)
        if error.code == "internal_error":
            log.error("%s failed (a bug)", method, exc_info=exc)
        raise error from exc
    return result if isinstance(result, dict) else {"result": result}


def _deployment(service: Completions) -> dict[str, Any]:
    """What the page draws: the engine's info (layout, links, memory) and stats, and the server's limits."""
    stats = engine_stats(service.engine)
    return {"model": service.model_id, "context_tokens": service.context_tokens, "info": service.engine.info(),
            "stats": stats, "in_flight": service.in_flight, "max_concurrent": service.config.max_concurrent}  # fmt: skip


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from exc


def _key_check(api_key: str | None) -> Any:
    """A dependency refusing requests without `Authorization: Bearer <api_key>` (none when no key is set)."""
    expected = None if api_key is None else api_key.encode()

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           param=None, code="invalid_api_key")  # fmt: skip

    return check


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        headers = exc.headers()
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                         code="not_found" if exc.status_code == 404 else None)  # fmt: skip
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse(bad_request(f"invalid request: {exc.errors()}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed (a bug)", request.method, request.url.path, exc_info=exc)
        error = ApiError(500, "internal server error (logged on the server)", "server_error", code="internal_error")
        return JSONResponse(error.body(), status_code=500)


class _CountRequests:
    """ASGI middleware counting API requests by endpoint and status for /metrics (streams unaffected)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(COUNTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        endpoint = "/admin/adapters" if path.startswith("/admin/adapters") else path
        endpoint = endpoint if endpoint in _ENDPOINTS else ("/v1/models" if path.startswith("/v1/models") else "other")
        status = [500]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.metrics.observe_request(endpoint, status[0])


_ENDPOINTS = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/deployment", "/admin/adapters"})
