"""``pqe2ee dev-engine``: a deterministic OpenAI-compatible **test stand-in** engine.

This is NOT a model and runs no inference. It exists so the demo and the test suite can put
the encrypted servers in front of *some* OpenAI-compatible engine without a GPU. Every reply is
derived mechanically from the request, on vLLM's wire shapes (vLLM 0.10-era field names, with
``reasoning_content``):

* ``GET /v1/models`` lists the configured model ids (default ``dev-echo``, ``dev-tools``,
  ``dev-reason``), ``owned_by`` ``"pqe2ee-dev"``.
* ``POST /v1/chat/completions`` answers ``"Echo: " + <text of the last user message>``
  (string content, or the ``{"type": "text"}`` parts joined with newlines; other parts such
  as ``image_url`` count one prompt token each and are not echoed). If the last message has
  ``role: "tool"`` the answer is ``"Tool said: " + <its content>``.
* ``POST /v1/completions`` answers ``"Echo: " + prompt`` (``max_tokens`` defaults to 16
  there, as in vLLM and OpenAI).
* A "token" is a whitespace-separated word. ``max_tokens`` / ``max_completion_tokens``
  truncate (``finish_reason`` ``"length"``), ``stop`` strings cut the text
  (``finish_reason`` ``"stop"``, ``stop_reason`` = the matched string), ``n`` must be 1,
  ``temperature`` and other sampling knobs are ignored. ``usage`` counts words: the prompt
  (every message's text) and the completion (reasoning words + answer words, or one token
  for a tool name plus one per argument fragment).
* Tool calls: with ``tools`` and either the word "weather" in the last user message
  (``tool_choice`` absent or ``"auto"``), ``tool_choice: "required"``, or a named function,
  the reply is one call to the first (or the named) tool, id ``call_<hex>``, arguments a JSON
  string such as ``{"city": "Paris"}`` with the value taken from the message. The finish
  reason is ``"tool_calls"``, or ``"stop"`` for a named ``tool_choice`` (as vLLM does).
* Reasoning: model ``dev-reason``, ``"reasoning": true`` or a ``reasoning_effort`` other
  than ``"none"`` add ``reasoning_content`` (``"Thinking about: ..."``), streamed as
  ``reasoning_content`` deltas before the content deltas.
* Streaming follows vLLM: ``data: <compact JSON>\\n\\n`` events, a first chunk with
  ``delta: {"role": "assistant", "content": ""}``, one chunk per word, a final chunk with
  ``finish_reason`` (and ``stop_reason``), then, with ``stream_options.include_usage``, a
  chunk with ``choices: []`` and ``usage``; with ``continuous_usage_stats`` as well, every
  chunk carries the usage so far; then ``data: [DONE]\\n\\n``.
* Errors use vLLM's flat shape ``{"object": "error", "message", "type", "param", "code"}``:
  400 ``BadRequestError`` for a malformed body, 404 ``NotFoundError`` for an unknown model.
* Test triggers: a last user message (or prompt) of exactly ``__error_500__`` answers 500;
  ``__slow__`` streams a long answer with 0.2 s between chunks so a test can disconnect
  mid-stream. ``delay`` adds latency before every generated chunk.
* ``GET /health`` answers 200; ``GET /dev/stats`` returns ``app.state.stats``
  (``streams_started``, ``streams_completed``, ``streams_cancelled``, ``streams_in_flight``,
  ``requests``), so a test can check that a client disconnect cancelled a generation.

Everything except ``created`` (wall clock) is deterministic: ids are hashes of the request.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = [
    "DEFAULT_MODELS",
    "DESCRIPTION",
    "MAX_MODEL_LEN",
    "OWNED_BY",
    "SLOW_CHUNK_DELAY",
    "create_app",
    "serve",
]

DESCRIPTION = (
    "Run the dev engine: a deterministic OpenAI-compatible TEST STAND-IN (not a model; it "
    "echoes requests back on vLLM's wire shapes) for demos and tests of the encrypted servers."
)
DEFAULT_MODELS: tuple[str, ...] = ("dev-echo", "dev-tools", "dev-reason")
REASONING_MODELS: frozenset[str] = frozenset({"dev-reason"})
OWNED_BY = "pqe2ee-dev"
MAX_MODEL_LEN = 32768
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
SLOW_CHUNK_DELAY = 0.2
SLOW_WORDS = 50
TRIGGER_ERROR_500 = "__error_500__"
TRIGGER_SLOW = "__slow__"

_WORD_RE = re.compile(r"\s*\S+")
_WEATHER_RE = re.compile(r"\bweather\b", re.IGNORECASE)
_PLACE_RE = re.compile(r"\b(?:in|for|at)\s+([A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)*)")
_CAPITAL_RE = re.compile(r"\b[A-Z][\w'-]*")

_JSON = msgspec.json.Encoder()


# --------------------------------------------------------------------------------------------
# errors


class _ApiError(Exception):
    def __init__(self, status: int, message: str, err_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type


def _bad_request(message: str) -> _ApiError:
    return _ApiError(400, message, "BadRequestError")


def _error_response(status: int, message: str, err_type: str) -> Response:
    body = {"object": "error", "message": message, "type": err_type, "param": None, "code": status}
    return Response(_JSON.encode(body), status_code=status, media_type="application/json")


def _json_response(obj: Any, status: int = 200) -> Response:
    return Response(_JSON.encode(obj), status_code=status, media_type="application/json")


# --------------------------------------------------------------------------------------------
# text helpers


def _pieces(text: str) -> list[str]:
    """Split ``text`` into word tokens whose concatenation is exactly ``text``."""
    pieces = _WORD_RE.findall(text)
    tail = text[sum(len(p) for p in pieces) :]
    if tail and pieces:
        pieces[-1] += tail
    return pieces


def _count_words(text: str) -> int:
    return len(text.split())


def _hex(*parts: bytes, n: int = 32) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:n]


def _content_text(content: Any, where: str) -> tuple[str, int]:
    """Return (text, number of non-text parts) of a message ``content`` value."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    if isinstance(content, list):
        texts: list[str] = []
        others = 0
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad_request(f"{where}: each content part must be an object with a 'type'")
            if part["type"] == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise _bad_request(f"{where}: a text content part needs a string 'text'")
                texts.append(text)
            else:
                others += 1
        return "\n".join(texts), others
    raise _bad_request(f"{where}: content must be a string, a list of parts or null")


def _json_object_text(obj: dict[str, str]) -> str:
    """``{"k": "v"}`` with a space after ':' and ',' (the way models usually write it)."""
    items = ", ".join(
        f"{_JSON.encode(k).decode()}: {_JSON.encode(v).decode()}" for k, v in obj.items()
    )
    return "{" + items + "}"


def _tool_arguments(tool: dict[str, Any], text: str) -> str:
    function = tool.get("function")
    params = function.get("parameters") if isinstance(function, dict) else None
    key = "city"
    if isinstance(params, dict):
        required = params.get("required")
        props = params.get("properties")
        if isinstance(required, list) and required and isinstance(required[0], str):
            key = required[0]
        elif isinstance(props, dict) and props:
            key = str(next(iter(props)))
    value = "Paris"
    m = _PLACE_RE.search(text)
    if m:
        value = m.group(1)
    else:
        capitals = [w for w in _CAPITAL_RE.findall(text)[1:] if w.lower() != "weather"]
        if capitals:
            value = capitals[-1]
    return _json_object_text({key: value.strip("?!.,;:")})


# --------------------------------------------------------------------------------------------
# generation plan


@dataclass
class _Piece:
    kind: str  # "reasoning" | "content" | "tool_name" | "tool_args"
    text: str


@dataclass
class _Plan:
    model: str
    request_id: str
    prompt_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    chunk_delay: float
    pieces: list[_Piece] = field(default_factory=list)
    finish_reason: str = "stop"
    stop_reason: str | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)

    def usage(self, completion_tokens: int | None = None) -> dict[str, int]:
        done = self.completion_tokens if completion_tokens is None else completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + done,
            "completion_tokens": done,
        }

    def text_of(self, kind: str) -> str:
        return "".join(p.text for p in self.pieces if p.kind == kind)


def _build_pieces(
    plan: _Plan,
    *,
    reasoning: str | None,
    content: str,
    tool: tuple[str, str, str, bool] | None,
    max_tokens: int,
    stops: Sequence[str],
) -> None:
    """Fill ``plan.pieces`` / finish fields. ``tool`` is (id, name, arguments, named)."""
    seq: list[_Piece] = []
    if reasoning is not None:
        seq += [_Piece("reasoning", p) for p in _pieces(reasoning)]
    natural_finish = "stop"
    stop_hit: str | None = None
    if tool is not None:
        call_id, name, arguments, named = tool
        plan.tool_call_id, plan.tool_name = call_id, name
        seq.append(_Piece("tool_name", name))
        seq += [_Piece("tool_args", p) for p in _pieces(arguments)]
        natural_finish = "stop" if named else "tool_calls"
    else:
        cut = len(content)
        for stop in stops:
            idx = content.find(stop)
            if idx != -1 and idx < cut:
                cut, stop_hit = idx, stop
        seq += [_Piece("content", p) for p in _pieces(content[:cut])]
    if len(seq) > max_tokens:
        plan.pieces = seq[:max_tokens]
        plan.finish_reason = "length"
    else:
        plan.pieces = seq
        plan.finish_reason = natural_finish
        plan.stop_reason = stop_hit


def _check_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad_request("Field 'model' is required and must be a non-empty string")
    return model


def _check_model_known(model: str, models: Sequence[str]) -> None:
    if model not in models:
        raise _ApiError(404, f"The model `{model}` does not exist.", "NotFoundError")


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad_request(f"Field '{name}' must be a positive integer")
    return value


def _common_options(body: dict[str, Any]) -> tuple[bool, bool, bool, list[str]]:
    """Validate the shared knobs; return (stream, include_usage, continuous, stops)."""
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _bad_request("The dev engine only supports n=1")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad_request("Field 'stream' must be a boolean")
    opts = body.get("stream_options")
    include_usage = continuous = False
    if opts is not None:
        if not stream:
            raise _bad_request("Stream options can only be defined when `stream=True`.")
        if not isinstance(opts, dict):
            raise _bad_request("Field 'stream_options' must be an object")
        include_usage = bool(opts.get("include_usage"))
        # As in vLLM: continuous usage only applies when include_usage is on.
        continuous = include_usage and bool(opts.get("continuous_usage_stats"))
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _bad_request("Field 'stop' must be a string or a list of strings")
    return stream, include_usage, continuous, [s for s in stops if s]


def _check_context(prompt_tokens: int, max_tokens: int | None) -> int:
    wanted = prompt_tokens + (max_tokens or 0)
    if prompt_tokens >= MAX_MODEL_LEN or wanted > MAX_MODEL_LEN:
        raise _bad_request(
            f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you "
            f"requested {wanted} tokens ({prompt_tokens} in the messages, {max_tokens or 0} "
            "in the completion). Please reduce the length of the messages or completion."
        )
    return max_tokens if max_tokens is not None else MAX_MODEL_LEN - prompt_tokens


def _slow_text(text: str) -> str:
    return "Echo: " + text + "".join(f" tick{i}" for i in range(1, SLOW_WORDS + 1))


def _plan_chat(body: dict[str, Any], models: Sequence[str], delay: float, raw: bytes) -> _Plan:
    model = _check_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad_request("Field 'messages' is required and must be a non-empty list")
    stream, include_usage, continuous, stops = _common_options(body)
    max_tokens = _int_field(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens")
    tools = body.get("tools")
    if tools is not None and (
        not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
    ):
        raise _bad_request("Field 'tools' must be a list of objects")
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "none", "auto") and not tools:
        raise _bad_request("When using `tool_choice`, `tools` must be set.")

    prompt_tokens = 0
    last_user_text = ""
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise _bad_request(f"messages[{i}] must be an object with a string 'role'")
        text, others = _content_text(msg.get("content"), f"messages[{i}]")
        prompt_tokens += _count_words(text) + others
        if msg["role"] == "user":
            last_user_text = text
    last = messages[-1]
    _check_model_known(model, models)
    limit = _check_context(prompt_tokens, max_tokens)

    if last_user_text == TRIGGER_ERROR_500:
        raise _ApiError(
            500,
            "Simulated engine failure (dev engine trigger __error_500__)",
            "InternalServerError",
        )
    slow = last_user_text == TRIGGER_SLOW

    effort = body.get("reasoning_effort")
    want_reasoning = (
        model in REASONING_MODELS
        or body.get("reasoning") is True
        or (effort is not None and effort != "none")
    )

    tool: tuple[str, str, str, bool] | None = None
    if last.get("role") == "tool":
        source, _ = _content_text(last.get("content"), f"messages[{len(messages) - 1}]")
        content = "Tool said: " + source
    else:
        source = last_user_text
        content = _slow_text(source) if slow else "Echo: " + source
        if tools and tool_choice != "none":
            chosen: dict[str, Any] | None = None
            named = False
            if isinstance(tool_choice, dict):
                fn = tool_choice.get("function")
                name = fn.get("name") if isinstance(fn, dict) else None
                chosen = next(
                    (
                        t
                        for t in tools
                        if isinstance(t.get("function"), dict) and t["function"].get("name") == name
                    ),
                    None,
                )
                if chosen is None:
                    raise _bad_request(f"tool_choice names a function not in 'tools': {name!r}")
                named = True
            elif tool_choice == "required" or _WEATHER_RE.search(last_user_text):
                chosen = tools[0]
            if chosen is not None:
                fn = chosen.get("function")
                name = fn.get("name") if isinstance(fn, dict) else None
                if not isinstance(name, str) or not name:
                    raise _bad_request("Each tool needs a 'function' with a string 'name'")
                call_id = "call_" + _hex(b"tool-call", raw, n=24)
                tool = (call_id, name, _tool_arguments(chosen, source), named)

    plan = _Plan(
        model=model,
        request_id="chatcmpl-" + _hex(b"chat", raw),
        prompt_tokens=prompt_tokens,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        chunk_delay=delay + (SLOW_CHUNK_DELAY if slow else 0.0),
    )
    _build_pieces(
        plan,
        reasoning=("Thinking about: " + source) if want_reasoning else None,
        content=content,
        tool=tool,
        max_tokens=limit,
        stops=stops,
    )
    return plan


def _plan_completion(
    body: dict[str, Any], models: Sequence[str], delay: float, raw: bytes
) -> _Plan:
    model = _check_model(body)
    if "prompt" not in body or body["prompt"] is None:
        raise _bad_request("Field 'prompt' is required")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        prompt = " ".join(str(t) for t in prompt)
    if not isinstance(prompt, str):
        raise _bad_request("The dev engine supports one prompt: a string or a list of token ids")
    stream, include_usage, continuous, stops = _common_options(body)
    max_tokens = _int_field(body, "max_tokens")
    if max_tokens is None:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    prompt_tokens = _count_words(prompt)
    _check_model_known(model, models)
    limit = _check_context(prompt_tokens, max_tokens)
    if prompt == TRIGGER_ERROR_500:
        raise _ApiError(
            500,
            "Simulated engine failure (dev engine trigger __error_500__)",
            "InternalServerError",
        )
    slow = prompt == TRIGGER_SLOW
    plan = _Plan(
        model=model,
        request_id="cmpl-" + _hex(b"completion", raw),
        prompt_tokens=prompt_tokens,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        chunk_delay=delay + (SLOW_CHUNK_DELAY if slow else 0.0),
    )
    content = _slow_text(prompt) if slow else "Echo: " + prompt
    _build_pieces(plan, reasoning=None, content=content, tool=None, max_tokens=limit, stops=stops)
    return plan


# --------------------------------------------------------------------------------------------
# responses


def _chat_body(plan: _Plan, created: int) -> dict[str, Any]:
    reasoning = (
        plan.text_of("reasoning") if any(p.kind == "reasoning" for p in plan.pieces) else None
    )
    tool_calls: list[dict[str, Any]] = []
    content: str | None
    if plan.tool_call_id is not None:
        content = None
        if any(p.kind == "tool_name" for p in plan.pieces):
            tool_calls.append(
                {
                    "id": plan.tool_call_id,
                    "type": "function",
                    "function": {"name": plan.tool_name, "arguments": plan.text_of("tool_args")},
                }
            )
    else:
        content = plan.text_of("content")
        if reasoning is not None and not content and plan.finish_reason == "length":
            content = None
    message = {
        "role": "assistant",
        "content": content,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": tool_calls,
        "reasoning_content": reasoning,
    }
    return {
        "id": plan.request_id,
        "object": "chat.completion",
        "created": created,
        "model": plan.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": plan.finish_reason,
                "stop_reason": plan.stop_reason,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {**plan.usage(), "prompt_tokens_details": None},
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "kv_transfer_params": None,
    }


def _completion_body(plan: _Plan, created: int) -> dict[str, Any]:
    return {
        "id": plan.request_id,
        "object": "text_completion",
        "created": created,
        "model": plan.model,
        "choices": [
            {
                "index": 0,
                "text": plan.text_of("content"),
                "logprobs": None,
                "finish_reason": plan.finish_reason,
                "stop_reason": plan.stop_reason,
                "prompt_logprobs": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {**plan.usage(), "prompt_tokens_details": None},
        "kv_transfer_params": None,
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + _JSON.encode(obj) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


async def _chat_events(plan: _Plan, created: int) -> AsyncIterator[bytes]:
    def chunk(choice: dict[str, Any], done: int) -> bytes:
        obj: dict[str, Any] = {
            "id": plan.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": plan.model,
            "choices": [choice],
        }
        if plan.continuous_usage:
            obj["usage"] = plan.usage(done)
        return _sse(obj)

    def choice(delta: dict[str, Any]) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}

    yield chunk(choice({"role": "assistant", "content": ""}), 0)
    for done, piece in enumerate(plan.pieces, start=1):
        if plan.chunk_delay > 0:
            await anyio.sleep(plan.chunk_delay)
        delta: dict[str, Any]
        if piece.kind == "reasoning":
            delta = {"reasoning_content": piece.text}
        elif piece.kind == "content":
            delta = {"content": piece.text}
        elif piece.kind == "tool_name":
            delta = {
                "tool_calls": [
                    {
                        "id": plan.tool_call_id,
                        "type": "function",
                        "index": 0,
                        "function": {"name": piece.text},
                    }
                ]
            }
        else:
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece.text}}]}
        yield chunk(choice(delta), done)
    final = {
        "index": 0,
        "delta": {} if plan.tool_call_id is not None else {"content": ""},
        "logprobs": None,
        "finish_reason": plan.finish_reason,
        "stop_reason": plan.stop_reason,
    }
    yield chunk(final, plan.completion_tokens)
    if plan.include_usage:
        yield _sse(
            {
                "id": plan.request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": plan.model,
                "choices": [],
                "usage": plan.usage(),
            }
        )
    yield _DONE


async def _completion_events(plan: _Plan, created: int) -> AsyncIterator[bytes]:
    def chunk(text: str, finish: str | None, stop: str | None, done: int) -> bytes:
        return _sse(
            {
                "id": plan.request_id,
                "object": "text_completion",
                "created": created,
                "model": plan.model,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": stop,
                    }
                ],
                "usage": plan.usage(done) if plan.continuous_usage else None,
            }
        )

    for done, piece in enumerate(plan.pieces, start=1):
        if plan.chunk_delay > 0:
            await anyio.sleep(plan.chunk_delay)
        yield chunk(piece.text, None, None, done)
    yield chunk("", plan.finish_reason, plan.stop_reason, plan.completion_tokens)
    if plan.include_usage:
        yield _sse(
            {
                "id": plan.request_id,
                "object": "text_completion",
                "created": created,
                "model": plan.model,
                "choices": [],
                "usage": plan.usage(),
            }
        )
    yield _DONE


class _TrackedStream(StreamingResponse):
    """An SSE response that records in ``stats`` whether it completed or was cut off.

    A stream counts as completed just before its ``data: [DONE]`` event goes out, so a client
    that has read ``[DONE]`` already sees it in ``/dev/stats``; any other end (client
    disconnect, server shutdown, error) counts as cancelled.
    """

    def __init__(self, events: AsyncIterator[bytes], stats: dict[str, int]) -> None:
        self._events = events
        self._stats = stats
        self._settled = False
        super().__init__(self._run(), media_type="text/event-stream")

    def _settle(self, *, completed: bool) -> None:
        if self._settled:
            return
        self._settled = True
        self._stats["streams_in_flight"] -= 1
        self._stats["streams_completed" if completed else "streams_cancelled"] += 1

    async def _run(self) -> AsyncIterator[bytes]:
        async for event in self._events:
            if event == _DONE:
                self._settle(completed=True)
            yield event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._stats["streams_started"] += 1
        self._stats["streams_in_flight"] += 1
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._settle(completed=False)
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()


# --------------------------------------------------------------------------------------------
# app


async def _read_json(request: Request) -> tuple[dict[str, Any], bytes]:
    raw = await request.body()
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise _bad_request(f"Invalid JSON in request body: {exc}") from None
    if not isinstance(body, dict):
        raise _bad_request("The request body must be a JSON object")
    # The canonical (key-sorted) encoding, without the transport knobs, feeds the
    # deterministic ids: a request gets the same ids whether it streams or not.
    ident = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    return body, msgspec.json.encode(ident, order="sorted")


Endpoint = Callable[[Request], Awaitable[Response]]


def _api(handler: Endpoint) -> Endpoint:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except _ApiError as exc:
            return _error_response(exc.status, exc.message, exc.err_type)

    return wrapped


def create_app(*, models: list[str] | None = None, delay: float = 0.0) -> Starlette:
    """Build the dev engine's Starlette app (a deterministic test stand-in, not a model)."""
    model_ids: list[str] = list(DEFAULT_MODELS) if models is None else list(models)
    if not model_ids:
        raise ValueError("the dev engine needs at least one model id")
    if delay < 0:
        raise ValueError("delay must be >= 0")
    started = int(time.time())
    stats: dict[str, int] = {
        "requests": 0,
        "streams_started": 0,
        "streams_completed": 0,
        "streams_cancelled": 0,
        "streams_in_flight": 0,
    }

    async def list_models(request: Request) -> Response:
        data = [
            {
                "id": mid,
                "object": "model",
                "created": started,
                "owned_by": OWNED_BY,
                "root": mid,
                "parent": None,
                "max_model_len": MAX_MODEL_LEN,
                "permission": [
                    {
                        "id": "modelperm-" + _hex(b"perm", mid.encode()),
                        "object": "model_permission",
                        "created": started,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for mid in model_ids
        ]
        return _json_response({"object": "list", "data": data})

    async def generate(
        request: Request,
        planner: Callable[[dict[str, Any], Sequence[str], float, bytes], _Plan],
        render: Callable[[_Plan, int], dict[str, Any]],
        events: Callable[[_Plan, int], AsyncIterator[bytes]],
    ) -> Response:
        stats["requests"] += 1
        body, canonical = await _read_json(request)
        plan = planner(body, model_ids, delay, canonical)
        created = int(time.time())
        if plan.stream:
            return _TrackedStream(events(plan, created), stats)
        total_delay = plan.chunk_delay * len(plan.pieces)
        if total_delay > 0:
            await anyio.sleep(total_delay)
        return _json_response(render(plan, created))

    @_api
    async def chat_completions(request: Request) -> Response:
        return await generate(request, _plan_chat, _chat_body, _chat_events)

    @_api
    async def completions(request: Request) -> Response:
        return await generate(request, _plan_completion, _completion_body, _completion_events)

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def dev_stats(request: Request) -> Response:
        return _json_response(stats)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _json_response({"detail": exc.detail}, exc.status_code)

    app = Starlette(
        routes=[
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/dev/stats", dev_stats, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.stats = stats
    app.state.models = model_ids
    return app


def serve(host: str, port: int, **kw: Any) -> None:
    """Run the dev engine (a test stand-in, not a model) with uvicorn until interrupted.

    ``models`` and ``delay`` go to :func:`create_app`; any other keyword goes to
    ``uvicorn.run`` (e.g. ``log_level``).
    """
    import uvicorn

    app_kw: dict[str, Any] = {k: kw.pop(k) for k in ("models", "delay") if k in kw}
    kw.setdefault("log_level", "info")
    uvicorn.run(create_app(**app_kw), host=host, port=port, **kw)
