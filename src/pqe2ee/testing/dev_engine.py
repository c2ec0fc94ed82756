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
* Scripted tool loop (for real agent CLIs, whose prompts bury the user's words): a user
  message holding a line ``__tool__ NAME {json arguments}`` with NAME among the request's
  function tools is answered with one call to NAME with exactly those arguments (finish reason
  ``"tool_calls"``); once a ``tool`` message follows that user message, the answer is
  ``"Tool said: " + <the last tool result>``, whatever the client added after it.
* Reasoning: model ``dev-reason``, ``"reasoning": true`` or a ``reasoning_effort`` other
  than ``"none"`` add ``reasoning_content`` (``"Thinking about: ..."``), streamed as
  ``reasoning_content`` deltas before the content deltas. ``create_app(reasoning_field=
  "reasoning")`` (``--reasoning-field reasoning``) names the field as vLLM >= 0.11 does.
* Reasoning in the history: an assistant message's ``reasoning`` (or ``reasoning_content``)
  counts as prompt words; a last user message holding a line ``__recall__`` is answered
  ``"Recalled: "`` + those texts joined with ``" | "`` (``"nothing"`` if none), so a test can
  see which earlier reasoning reached the engine.
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

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pqe2ee.protocol._codec import json_decode
from pqe2ee.server._asgi import json_response
from pqe2ee.testing._dev_replies import (
    DONE,
    MAX_MODEL_LEN,
    SLOW_CHUNK_DELAY,
    ApiError,
    Plan,
    bad_request,
    chat_body,
    chat_events,
    completion_body,
    completion_events,
    hex_id,
    plan_chat,
    plan_completion,
)

__all__ = [
    "DEFAULT_MODELS",
    "DESCRIPTION",
    "MAX_MODEL_LEN",
    "OWNED_BY",
    "REASONING_FIELDS",
    "SLOW_CHUNK_DELAY",
    "create_app",
    "serve",
]

DESCRIPTION = (
    "Run the dev engine: a deterministic OpenAI-compatible TEST STAND-IN (not a model; it "
    "echoes requests back on vLLM's wire shapes) for demos and tests of the encrypted servers."
)
DEFAULT_MODELS: tuple[str, ...] = ("dev-echo", "dev-tools", "dev-reason")
REASONING_FIELDS: tuple[str, ...] = ("reasoning_content", "reasoning")
_APP_KEYS = ("models", "delay", "max_model_len", "reasoning_field")
OWNED_BY = "pqe2ee-dev"


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
            if event == DONE:
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
        body = json_decode(raw)
    except msgspec.DecodeError as exc:
        raise bad_request(f"Invalid JSON in request body: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object")
    # The canonical (key-sorted) encoding, without the transport knobs, feeds the
    # deterministic ids: a request gets the same ids whether it streams or not.
    ident = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    return body, msgspec.json.encode(ident, order="sorted")


Endpoint = Callable[[Request], Awaitable[Response]]


def _error_response(status: int, message: str, err_type: str) -> Response:
    body = {"object": "error", "message": message, "type": err_type, "param": None, "code": status}
    return json_response(body, status)


def _api(handler: Endpoint) -> Endpoint:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return _error_response(exc.status, exc.message, exc.err_type)

    return wrapped


def create_app(
    *,
    models: list[str] | None = None,
    delay: float = 0.0,
    max_model_len: int = MAX_MODEL_LEN,
    reasoning_field: str = "reasoning_content",
) -> Starlette:
    """Build the dev engine's Starlette app (a deterministic test stand-in, not a model).

    ``max_model_len`` is the context (in words) a request's prompt plus ``max_tokens`` must fit.
    ``reasoning_field`` names the reply's reasoning: ``reasoning_content`` (vLLM 0.10) or
    ``reasoning`` (vLLM >= 0.11).
    """
    if reasoning_field not in REASONING_FIELDS:
        raise ValueError(f"reasoning_field must be one of {', '.join(REASONING_FIELDS)}")
    model_ids: list[str] = list(DEFAULT_MODELS) if models is None else list(models)
    if not model_ids:
        raise ValueError("the dev engine needs at least one model id")
    if delay < 0:
        raise ValueError("delay must be >= 0")
    if max_model_len < 1:
        raise ValueError("max_model_len must be >= 1")
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
                "max_model_len": max_model_len,
                "permission": [
                    {
                        "id": "modelperm-" + hex_id(b"perm", mid.encode()),
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
        return json_response({"object": "list", "data": data})

    async def generate(
        request: Request,
        planner: Callable[[dict[str, Any], Sequence[str], float, bytes, int], Plan],
        render: Callable[[Plan, int], dict[str, Any]],
        events: Callable[[Plan, int], AsyncIterator[bytes]],
    ) -> Response:
        stats["requests"] += 1
        body, canonical = await _read_json(request)
        plan = planner(body, model_ids, delay, canonical, max_model_len)
        plan.reasoning_field = reasoning_field
        created = int(time.time())
        if plan.stream:
            return _TrackedStream(events(plan, created), stats)
        total_delay = plan.chunk_delay * len(plan.pieces)
        if total_delay > 0:
            await anyio.sleep(total_delay)
        return json_response(render(plan, created))

    @_api
    async def chat_completions(request: Request) -> Response:
        return await generate(request, plan_chat, chat_body, chat_events)

    @_api
    async def completions(request: Request) -> Response:
        return await generate(request, plan_completion, completion_body, completion_events)

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def dev_stats(request: Request) -> Response:
        return json_response(stats)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return json_response({"detail": exc.detail}, exc.status_code)

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

    ``models``, ``delay``, ``max_model_len`` and ``reasoning_field`` go to :func:`create_app`; any other keyword goes to
    ``uvicorn.run`` (e.g. ``log_level``).
    """
    import uvicorn

    app_kw: dict[str, Any] = {k: kw.pop(k) for k in _APP_KEYS if k in kw}
    kw.setdefault("log_level", "info")
    uvicorn.run(create_app(**app_kw), host=host, port=port, **kw)
