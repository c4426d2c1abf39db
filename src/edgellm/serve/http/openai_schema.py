"""The OpenAI request and response shapes: validating a chat or completion request into a frozen
`CompletionRequest`, the JSON of responses and stream chunks, and errors as OpenAI's `{"error": {...}}`.

Unknown request fields are ignored, as OpenAI does; a field we know but cannot honour (n > 1, logprobs, a
penalty other than 0, tools) is refused with 400 naming it, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from edgellm.errors import BusyError, ConfigError, InputError, PeerError
from edgellm.serve.conversation import check_text, parse_messages

Kind = Literal["chat", "completion"]
MAX_STOPS = 4
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


class ApiError(Exception):
    """An error answered as OpenAI does: an HTTP status and `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def api_error_from(exc: BaseException, retry_after_s: int) -> ApiError:
    """The HTTP answer to an error the engine raised: bad input 400, busy 503, a failed node 502 (503 when it
    does not answer), a refused deployment token 502, anything else (a bug) 500 without its details."""
    if isinstance(exc, ApiError):
        return exc
    from edgellm.net.rpc_status import AuthError, NodeUnreachable  # grpc is loaded anyway where nodes are

    if isinstance(exc, AuthError):
        return ApiError(502, f"a node of the deployment refused it: {exc}", "server_error", code="node_failed")
    if isinstance(exc, InputError):
        return bad_request(str(exc))
    if isinstance(exc, BusyError):
        return ApiError(503, f"busy: {exc}", "server_error", code="overloaded", retry_after_s=retry_after_s)
    if isinstance(exc, NodeUnreachable):
        return ApiError(503, f"a node is unreachable: {exc}", "server_error", code="node_unreachable",
                        retry_after_s=retry_after_s)  # fmt: skip
    if isinstance(exc, PeerError):
        return ApiError(502, f"a node failed: {exc}", "server_error", code="node_failed")
    return ApiError(
        500, "internal error while generating (logged on the server)", "server_error", code="internal_error"
    )


@dataclass(frozen=True)
class CompletionRequest:
    """A validated /v1/chat/completions or /v1/completions request.

    Exactly one of `messages` (chat), `prompt` (text) and `prompt_ids` (token ids) is set. `temperature` 0 (or
    `top_p` 0) means greedy decoding; `max_tokens` None means the server's default, within the context.
    """

    kind: Kind
    model: str
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p == 0


def parse_request(body: Any, kind: Kind) -> CompletionRequest:
    """Validate a request body.

    Raises:
        ApiError: 400 naming the field (`param`) and what is wrong.
    """
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: the base model's id or an adapter's name (GET /v1/models)", "model")
    _refuse_unsupported(body, kind)
    prompt: dict[str, Any] = _chat_prompt(body) if kind == "chat" else _text_prompt(body)
    max_tokens = _optional_int(body, "max_completion_tokens", low=1)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", low=1)
    stream = _optional_bool(body, "stream") or False
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return CompletionRequest(
        kind=kind,
        model=model,
        max_tokens=max_tokens,
        temperature=_optional_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_optional_number(body, "top_p", 0.0, 1.0, 1.0),
        seed=_optional_int(body, "seed"),
        stop=_stops(body.get("stop")),
        stream=stream,
        include_usage=include_usage,
        **prompt,
    )


def _refuse_unsupported(body: dict[str, Any], kind: Kind) -> None:
    n = _optional_int(body, "n")
    if n is not None and n != 1:
        raise bad_request(f"'n' must be 1 (one choice per request), got {n}", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        value = _optional_number(body, name, -2.0, 2.0, 0.0)
        if value != 0:
            raise bad_request(f"'{name}' is not supported; only 0 is accepted, got {value}", name)
    logprobs = body.get("logprobs")
    if logprobs not in (None, False) or body.get("top_logprobs") is not None:
        raise bad_request("'logprobs' is not supported", "logprobs")
    if body.get("logit_bias"):
        raise bad_request("'logit_bias' is not supported", "logit_bias")
    if kind == "chat":
        for name in ("tools", "functions", "tool_choice", "function_call"):
            if body.get(name) not in (None, [], "none"):
                raise bad_request(f"'{name}' is not supported: this server answers with text only", name)
        response_format = body.get("response_format")
        if response_format is not None and response_format != {"type": "text"}:
            raise bad_request('\'response_format\' is not supported other than {"type": "text"}', "response_format")
    else:
        if body.get("echo"):
            raise bad_request("'echo' is not supported", "echo")
        if body.get("suffix"):
            raise bad_request("'suffix' is not supported", "suffix")
        best_of = _optional_int(body, "best_of")
        if best_of not in (None, 1):
            raise bad_request(f"'best_of' must be 1, got {best_of}", "best_of")


def _chat_prompt(body: dict[str, Any]) -> dict[str, Any]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' is required: a non-empty list of {role, content} objects", "messages")
    messages = [_message(i, m) for i, m in enumerate(raw)]
    try:
        parse_messages(messages)  # order: a system message first at most, the user's last
    except ConfigError as exc:
        raise bad_request(str(exc), "messages") from exc
    return {"messages": tuple(messages)}


def _message(index: int, item: Any) -> dict[str, str]:
    if not isinstance(item, dict):
        raise bad_request(f"messages[{index}] must be an object with 'role' and 'content'", "messages")
    role = ROLE_ALIASES.get(item.get("role"), item.get("role"))  # type: ignore[arg-type]
    if role not in ("system", "user", "assistant"):
        raise bad_request(f"messages[{index}]: role must be system, developer, user or assistant, got "
                          f"{item.get('role')!r}", "messages")  # fmt: skip
    content = item.get("content")
    if isinstance(content, list):  # content parts: text ones only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise bad_request(f"messages[{index}]: only text content parts are supported", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad_request(f"messages[{index}]: content must be a string or a list of text parts", "messages")
    return {"role": role, "content": content}


def _text_prompt(body: dict[str, Any]) -> dict[str, Any]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise bad_request(f"'prompt' must be one prompt; got a list of {len(prompt)}", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        try:
            return {"prompt": check_text("'prompt'", prompt)}
        except ConfigError as exc:
            raise bad_request(str(exc), "prompt") from exc
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return {"prompt_ids": tuple(prompt)}
    raise bad_request("'prompt' is required: a string (or one list of token ids)", "prompt")


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad_request(f"'stop' takes up to {MAX_STOPS} strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad_request("'stop' strings must not be empty", "stop")
    return tuple(stops)


def _optional_int(body: dict[str, Any], name: str, low: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_request(f"'{name}' must be an integer, got {value!r}", name)
    if low is not None and value < low:
        raise bad_request(f"'{name}' must be >= {low}, got {value}", name)
    return value


def _optional_number(body: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise bad_request(f"'{name}' must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be in [{low:g}, {high:g}], got {value}", name)
    return float(value)


def _optional_bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false, got {value!r}", name)
    return value


# -- responses ---------------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def response(req: CompletionRequest, rid: str, created: int, text: str, finish_reason: str,
             counts: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """A whole (non-streamed) answer, with our `extra` fields under `edgellm`."""
    if req.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        obj = "chat.completion"
    else:
        choice, obj = {"index": 0, "text": text}, "text_completion"
    choice.update(logprobs=None, finish_reason=finish_reason)
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice],
            "usage": counts, "edgellm": extra}  # fmt: skip


def chunk(req: CompletionRequest, rid: str, created: int, text: str | None, finish_reason: str | None = None,
          extra: dict[str, Any] | None = None, first: bool = False) -> dict[str, Any]:  # fmt: skip
    """One stream chunk: a text delta (None: none) and/or the finish reason; `first` adds the chat's role."""
    if req.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta}
        obj = "chat.completion.chunk"
    else:
        choice, obj = {"index": 0, "text": text or ""}, "text_completion"
    choice.update(logprobs=None, finish_reason=finish_reason)
    out = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice]}
    if extra:
        out["edgellm"] = extra
    return out


def usage_chunk(req: CompletionRequest, rid: str, created: int, counts: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [], "usage": counts}
