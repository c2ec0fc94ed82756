"""``pqe2ee proxy``: a local OpenAI / Responses / Anthropic endpoint that encrypts every call.

Point any OpenAI or Anthropic client (the SDKs, Codex, Claude Code, ...) at the proxy; it speaks
plain HTTP to them on loopback and end-to-end encrypted Chutes v1 or pqe2ee profile v2 (where
the chute offers it; see :class:`ProxyConfig` ``min_version`` / ``prefer_v2``) to the network::

    POST /v1/chat/completions       body forwarded byte for byte, encrypted; replies decrypted
    POST /v1/completions            the same (legacy completions)
    POST /v1/responses              OpenAI Responses  -> Chat Completions -> encrypted call
    POST /v1/messages               Anthropic Messages -> Chat Completions -> encrypted call
    POST /v1/messages/count_tokens  an *estimate* computed locally (nothing leaves the machine)
    GET  /v1/models                 plaintext passthrough of the model list (models_base)
    GET  /health                    {"status": "ok"}
    GET  /metrics                   Prometheus text: counts and latencies only

Every model call goes through one :class:`pqe2ee.AsyncE2EETransport` per API key (inside an
``httpx2.AsyncClient``), pooled LRU with an idle TTL and closed on shutdown. The caller's own key
(``Authorization: Bearer`` or ``x-api-key``) is used when present, else the configured key, else
the call is refused with a 401 in the dialect's shape.

Streams are passed on as they arrive: chat and completions streams byte for byte as the transport
decrypts them; Responses and Anthropic streams are parsed with
:class:`pqe2ee.protocol.sse.SSEParser` and re-emitted by the translators in
:mod:`pqe2ee.proxy.translate`. A stream that breaks mid-way
ends with the dialect's error event (``data: {"error": ...}`` for chat, ``response.failed`` for
Responses, ``event: error`` for Anthropic) and never with a clean end. A client that hangs up
cancels the upstream call at once.

Logs carry method, path, status, byte counts and durations: never bodies, prompts or keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import anyio
import httpx2
import msgspec
import uvicorn
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from pqe2ee.errors import (
    BackendError,
    ErrorCode,
    LocalProtocolError,
    PQE2EEError,
    RelayError,
    RemoteError,
)
from pqe2ee.protocol.sse import SSEParser
from pqe2ee.proxy.translate.anthropic import (
    chat_to_message,
    count_tokens_estimate,
    messages_to_chat,
)
from pqe2ee.proxy.translate.anthropic_stream import MessagesStreamTranslator
from pqe2ee.proxy.translate.chat import StreamEvent, parse_chat_reply
from pqe2ee.proxy.translate.errors import (
    TranslationError,
    anthropic_error_body,
    anthropic_error_type,
    openai_error_body,
)
from pqe2ee.proxy.translate.responses import chat_to_response, responses_to_chat
from pqe2ee.proxy.translate.responses_stream import ResponsesStreamTranslator

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_HOST",
    "DEFAULT_MODELS_BASE",
    "DEFAULT_PORT",
    "ProxyConfig",
    "ProxyServer",
    "create_app",
    "serve",
    "server_config",
]

log = logging.getLogger("pqe2ee.proxy")

MiB: Final = 1024 * 1024
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8787
DEFAULT_API_BASE: Final = "https://api.chutes.ai"
DEFAULT_MODELS_BASE: Final = "https://llm.chutes.ai"

CHAT_PATH: Final = "/v1/chat/completions"
COMPLETIONS_PATH: Final = "/v1/completions"

_JSON_TYPE: Final = "application/json"
_SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything the proxy needs. Sizes are bytes, durations seconds.

    ``api_key`` is used for callers that bring no key of their own. ``max_body`` bounds a
    request body (413 beyond it), ``max_response`` a non-streamed reply read whole, ``max_event``
    one SSE event of a translated stream. ``max_keys`` transports (one per API key) are kept,
    least recently used first out; one unused for ``key_idle_ttl`` is closed; each holds at
    most ``max_connections`` connections to the relay (calls beyond wait for one, at most
    ``connect_timeout``). ``read_timeout`` is the longest silence accepted from upstream
    mid-response. On shutdown, open streams get ``shutdown_grace`` seconds to finish, then end
    with their dialect's error event. ``transport_options`` are passed to :class:`pqe2ee.AsyncE2EETransport` as
    keywords (``max_attempts``, ``limits``, ``on_usage``, ...); the proxy always sets
    ``strict=True`` (a model call that cannot be encrypted is refused, never sent in plaintext).

    ``min_version`` / ``prefer_v2`` are the wire-profile policy (spec/v2.md §8.2) of every
    per-key transport, which share one set of per-chute v2 pins: by default v2 where a chute
    offers it, and a chute once seen with v2 is refused (``downgrade_suspected``) if it comes
    back without; ``min_version=2`` refuses v1 outright (``downgrade_refused``, before any
    nonce is spent) - the setting for instances you run yourself; ``prefer_v2=False`` speaks v1
    only.
    """

    api_base: str = DEFAULT_API_BASE
    models_base: str = DEFAULT_MODELS_BASE
    api_key: str | None = field(default=None, repr=False)
    backend: str = "auto"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_body: int = 32 * MiB
    max_response: int = 64 * MiB
    max_event: int = 16 * MiB
    max_keys: int = 64
    key_idle_ttl: float = 300.0
    max_connections: int = 256
    connect_timeout: float = 30.0
    read_timeout: float = 900.0
    write_timeout: float = 60.0
    shutdown_grace: float = 5.0
    transport_options: Mapping[str, Any] = field(default_factory=dict)
    min_version: int = 1
    prefer_v2: bool = True

    def __post_init__(self) -> None:
        for name in ("api_base", "models_base"):
            url = getattr(self, name)
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise LocalProtocolError(f"{name} must be an http:// or https:// URL")
            object.__setattr__(self, name, url.rstrip("/"))
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise LocalProtocolError("api_key must be non-empty, without surrounding spaces")
        for name in ("max_body", "max_response", "max_event", "max_keys", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LocalProtocolError(f"{name} must be a positive integer")
        for name in ("key_idle_ttl", "connect_timeout", "read_timeout", "write_timeout"):
            if not float(getattr(self, name)) > 0:
                raise LocalProtocolError(f"{name} must be positive")
        if not float(self.shutdown_grace) >= 0:
            raise LocalProtocolError("shutdown_grace must be >= 0")
        if not 0 <= self.port <= 65535:
            raise LocalProtocolError("port must be in 0..65535")
        if self.min_version not in (1, 2) or isinstance(self.min_version, bool):
            raise LocalProtocolError("min_version must be 1 or 2")
        if not isinstance(self.prefer_v2, bool):
            raise LocalProtocolError("prefer_v2 must be a bool")
        if self.min_version == 2 and not self.prefer_v2:
            raise LocalProtocolError("min_version=2 needs prefer_v2 (v2 is the only choice)")
        clash = {"min_version", "prefer_v2", "negotiator"} & set(self.transport_options)
        if clash:
            raise LocalProtocolError(
                f"set {', '.join(sorted(clash))} on ProxyConfig, not in transport_options"
            )
        object.__setattr__(self, "transport_options", dict(self.transport_options))


# --------------------------------------------------------------------------------------------
# dialects and errors


class Dialect(enum.Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


def _dialect_of(path: str) -> Dialect:
    return Dialect.ANTHROPIC if path.startswith("/v1/messages") else Dialect.OPENAI


class _Fail(Exception):
    """An error answer: HTTP status, OpenAI-vocabulary ``type``, message and machine code."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.code = code
        self.param = param

    def body(self, dialect: Dialect) -> dict[str, Any]:
        if dialect is Dialect.ANTHROPIC:
            kind = self.type
            if kind == "invalid_request_error" and self.status != 400:
                kind = anthropic_error_type(self.status)  # e.g. 404 -> not_found_error
            return anthropic_error_body(self.status, kind, self.message)
        return openai_error_body(self.type, self.message, param=self.param, code=self.code)

    def response(self, dialect: Dialect) -> Response:
        return _json(self.body(dialect), self.status)

    @classmethod
    def of_translation(cls, exc: TranslationError) -> _Fail:
        return cls(exc.status, exc.type, exc.message, code=exc.error_code, param=exc.param)


_TYPE_FOR_STATUS: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    504: "timeout_error",
}


def _kind(status: int) -> str:
    """Error ``type`` (OpenAI vocabulary) for a status. Anthropic rendering maps the generic
    ones onto its own types by status (503 -> ``overloaded_error``, ...)."""
    fixed = _TYPE_FOR_STATUS.get(status)
    if fixed is not None:
        return fixed
    return "server_error" if status >= 500 else "invalid_request_error"


#: pqe2ee error codes that mean "try again later": no instance could take the call.
_UNAVAILABLE: Final = frozenset(
    {
        ErrorCode.NO_INSTANCES,
        ErrorCode.INSTANCE_BUSY,
        ErrorCode.INSTANCE_GONE,
        ErrorCode.KEY_EXCHANGE_REQUIRED,
        ErrorCode.DISCOVERY_RATE_LIMITED,
        ErrorCode.RETRIES_EXHAUSTED,
    }
)


#: Relay refusals where the relay's own 401/402/403 is the caller's answer (a bad key).
_AUTH: Final = frozenset({ErrorCode.DISCOVERY_FAILED, ErrorCode.RELAY_ERROR})


def _fail_of_pqe2ee(exc: PQE2EEError) -> _Fail:
    """Status and type for a typed pqe2ee error; the stable code goes in ``code`` and message."""
    if exc.code is ErrorCode.MODEL_NOT_FOUND:
        status, kind = 404, "invalid_request_error"  # as OpenAI answers an unknown model
    elif isinstance(exc, RemoteError) and exc.status is not None and 400 <= exc.status <= 599:
        status = exc.status
        kind = _kind(status)
    elif isinstance(exc, RelayError) and exc.status in (401, 402, 403) and exc.code in _AUTH:
        status = exc.status  # the relay refused the key (discovery or model listing)
        kind = _kind(status)
    elif exc.code in _UNAVAILABLE:
        status, kind = 503, "server_error"
    elif isinstance(exc, LocalProtocolError):
        status, kind = 400, "invalid_request_error"
    elif isinstance(exc, BackendError):
        status, kind = 500, "server_error"
    else:
        status, kind = 502, "server_error"
    return _Fail(status, kind, f"{exc.code.value}: {exc.message}", code=exc.code.value)


def _fail_of(exc: Exception) -> _Fail:
    """An upstream failure (typed pqe2ee error or an httpx2 error) as an error answer."""
    if isinstance(exc, PQE2EEError):
        return _fail_of_pqe2ee(exc)
    if isinstance(exc, httpx2.TimeoutException):
        return _Fail(504, "timeout_error", "upstream timed out", code="upstream_timeout")
    return _Fail(
        502,
        "server_error",
        f"{ErrorCode.CONNECTION_LOST.value}: upstream unreachable ({type(exc).__name__})",
        code=ErrorCode.CONNECTION_LOST.value,
    )


def _fail_of_upstream_body(status: int, body: bytes) -> _Fail:
    """A non-200 upstream answer (engine or relay error) as an error in our vocabulary: the
    status is kept, the message is the one the upstream gave when it gave one."""
    kind = _kind(status)
    message = f"upstream answered {status}"
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError:
        obj = None
    if isinstance(obj, dict):
        detail = obj.get("detail")
        if isinstance(detail, str) and detail:
            message = detail
        else:
            try:
                parse_chat_reply(obj)
            except TranslationError as exc:
                if exc.error_code == "upstream_error":  # the body reported an error in-band
                    message = exc.message
    return _Fail(status, kind, message, code="upstream_error")


# --------------------------------------------------------------------------------------------
# small helpers


_ENCODER: Final = msgspec.json.Encoder()


def _json(obj: Any, status: int = 200) -> Response:
    return Response(_ENCODER.encode(obj), status_code=status, media_type=_JSON_TYPE)


def sse_event(name: str, data: Any) -> bytes:
    """``event: <name>\\ndata: <compact JSON>\\n\\n`` (JSON never contains a raw newline)."""
    return b"event: " + name.encode() + b"\ndata: " + _ENCODER.encode(data) + b"\n\n"


def _sse_events(events: Iterable[StreamEvent]) -> bytes:
    return b"".join(sse_event(name, data) for name, data in events)


def _caller_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
    key = request.headers.get("x-api-key", "").strip()
    return key or None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise _Fail(400, "invalid_request_error", "bad Content-Length header") from None
        if size > limit:
            raise _Fail(
                413,
                "invalid_request_error",
                f"request body larger than {limit} bytes",
                code=ErrorCode.OVERSIZE.value,
            )
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise _Fail(
                413,
                "invalid_request_error",
                f"request body larger than {limit} bytes",
                code=ErrorCode.OVERSIZE.value,
            )
    return bytes(buf)


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise _Fail(
            400, "invalid_request_error", "request body is not valid JSON", code="invalid_json"
        ) from None
    if not isinstance(obj, dict):
        raise _Fail(
            400, "invalid_request_error", "request body must be a JSON object", code="invalid_json"
        )
    return obj


async def _read_upstream(resp: httpx2.Response, limit: int) -> bytes:
    """The whole body of an upstream reply, bounded (``oversize`` beyond ``limit``)."""
    buf = bytearray()
    try:
        async for chunk in resp.aiter_bytes():
            buf += chunk
            if len(buf) > limit:
                raise _Fail(
                    502,
                    "server_error",
                    f"{ErrorCode.OVERSIZE.value}: upstream reply larger than {limit} bytes",
                    code=ErrorCode.OVERSIZE.value,
                )
    finally:
        with anyio.CancelScope(shield=True):
            await resp.aclose()
    return bytes(buf)


# --------------------------------------------------------------------------------------------
# transports, one per API key


@dataclass(slots=True, eq=False)
class _Entry:
    client: httpx2.AsyncClient
    users: int = 0
    last_used: float = 0.0
    retired: bool = False


class _ClientPool:
    """``httpx2.AsyncClient`` (each over its own E2EE transport) per API key, LRU + idle TTL.

    Keys are held only inside the transports; the pool indexes them by a SHA-256 digest. An
    entry evicted while calls still use it is closed when the last of them ends.
    """

    def __init__(
        self,
        factory: Callable[[str], httpx2.AsyncClient],
        *,
        max_size: int,
        idle_ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = factory
        self._max = max_size
        self._ttl = idle_ttl
        self._clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._closed = False

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _ident(key: str) -> bytes:
        return hashlib.sha256(key.encode()).digest()

    def _expired(self, now: float) -> list[_Entry]:
        """Remove idle entries past the TTL (oldest first); return the ones to close."""
        out: list[_Entry] = []
        for ident, entry in list(self._entries.items()):
            if entry.users or now - entry.last_used < self._ttl:
                break
            del self._entries[ident]
            entry.retired = True
            out.append(entry)
        return out

    async def acquire(self, key: str) -> _Entry:
        if self._closed:
            raise _Fail(503, "server_error", "the proxy is shutting down")
        now = self._clock()
        ident = self._ident(key)
        to_close = self._expired(now)
        entry = self._entries.get(ident)
        if entry is None:
            while len(self._entries) >= self._max:
                _, old = self._entries.popitem(last=False)
                old.retired = True
                if not old.users:
                    to_close.append(old)
            entry = _Entry(self._factory(key))
            self._entries[ident] = entry
        else:
            self._entries.move_to_end(ident)
        entry.users += 1
        entry.last_used = now
        await self._close_all(to_close)
        return entry

    async def release(self, entry: _Entry) -> None:
        entry.users -= 1
        entry.last_used = self._clock()
        if entry.retired and not entry.users:
            await self._close_all([entry])

    async def sweep(self) -> None:
        await self._close_all(self._expired(self._clock()))

    async def aclose(self) -> None:
        self._closed = True
        entries = list(self._entries.values())
        self._entries.clear()
        await self._close_all(entries)

    @staticmethod
    async def _close_all(entries: list[_Entry]) -> None:
        with anyio.CancelScope(shield=True):
            for entry in entries:
                try:
                    await entry.client.aclose()
                except Exception as exc:  # closing must not fail a request
                    log.warning("closing an upstream client failed (%s)", type(exc).__name__)


def _timeout(config: ProxyConfig) -> httpx2.Timeout:
    return httpx2.Timeout(
        connect=config.connect_timeout,
        read=config.read_timeout,
        write=config.write_timeout,
        pool=config.connect_timeout,
    )


def _client_factory(config: ProxyConfig) -> Callable[[str], httpx2.AsyncClient]:
    """One client per API key over a *strict* E2EE transport: a model call that cannot be
    encrypted is refused by the transport, never sent in plaintext. Every transport applies
    the proxy's version policy with one shared :class:`~pqe2ee.protocol.v2.Negotiator`, so a
    chute pinned to v2 through one key is pinned for all."""
    from pqe2ee.protocol.v2.negotiation import E2EPolicy, Negotiator
    from pqe2ee.transports.httpx2 import AsyncE2EETransport

    negotiator = Negotiator(E2EPolicy(min_version=config.min_version, prefer_v2=config.prefer_v2))
    options = {**config.transport_options, "strict": True, "negotiator": negotiator}
    timeout = _timeout(config)
    limits = httpx2.Limits(
        max_connections=config.max_connections,
        max_keepalive_connections=min(config.max_connections, 64),
    )

    def make(key: str) -> httpx2.AsyncClient:
        inner = httpx2.AsyncHTTPTransport(limits=limits)
        transport = AsyncE2EETransport(
            api_key=key,
            api_base=config.api_base,
            models_base=config.models_base,
            backend=config.backend,
            **{**options, "inner": inner},
        )
        return httpx2.AsyncClient(transport=transport, base_url=config.models_base, timeout=timeout)

    return make


# --------------------------------------------------------------------------------------------
# metrics and the access log


_ROUTES: Final = {
    CHAT_PATH: "chat",
    COMPLETIONS_PATH: "completions",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
    "/v1/models": "models",
    "/health": "health",
    "/metrics": "metrics",
}


class _Metrics:
    """Counts and latencies only: no keys, models, paths beyond the fixed route names, bodies."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "pqe2ee_proxy_"
        self.requests = Counter(
            p + "requests", "Requests by route and status", ["route", "status"], registry=r
        )
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.first_byte = Histogram(
            p + "first_byte_seconds",
            "Time from request to the first response byte",
            ["route"],
            registry=r,
            buckets=buckets,
        )
        self.duration = Histogram(
            p + "duration_seconds",
            "Time from request to the last response byte",
            ["route"],
            registry=r,
            buckets=buckets,
        )
        self.bytes_in = Counter(p + "request_bytes", "Request body bytes", ["route"], registry=r)
        self.bytes_out = Counter(p + "response_bytes", "Response body bytes", ["route"], registry=r)
        self.stream_faults = Counter(
            p + "stream_faults", "Streams ended by an upstream fault", ["route"], registry=r
        )
        self.disconnects = Counter(
            p + "client_disconnects",
            "Streams cancelled by the client hanging up",
            ["route"],
            registry=r,
        )
        self.open_streams = Gauge(p + "open_streams", "Streams being relayed now", registry=r)
        self.keys = Gauge(p + "pooled_keys", "API keys with a live upstream transport", registry=r)


@dataclass(slots=True)
class _Exchange:
    started: float
    status: int | None = None
    first: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    complete: bool = False


class _AccessLog:
    """ASGI middleware: one log line and the metrics per request, written when the body ends.

    The line holds method, route, status, byte counts and durations - nothing else."""

    def __init__(self, app: Any, metrics: _Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex = _Exchange(time.perf_counter())
        path: str = scope.get("path", "")
        route = _ROUTES.get(path, "other")

        async def receive_counting() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                ex.bytes_in += len(message.get("body", b""))
            return message

        async def send_counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.status = int(message["status"])
                ex.first = time.perf_counter() - ex.started
            elif message["type"] == "http.response.body":
                ex.bytes_out += len(message.get("body", b""))
                if not message.get("more_body", False):
                    ex.complete = True
            await send(message)

        try:
            await self.app(scope, receive_counting, send_counting)
        finally:
            elapsed = time.perf_counter() - ex.started
            m = self.metrics
            status = str(ex.status) if ex.status is not None else "499"
            m.requests.labels(route, status).inc()
            m.first_byte.labels(route).observe(ex.first if ex.first is not None else elapsed)
            m.duration.labels(route).observe(elapsed)
            m.bytes_in.labels(route).inc(ex.bytes_in)
            m.bytes_out.labels(route).inc(ex.bytes_out)
            log.info(
                "%s %s %s in=%dB out=%dB first=%.1fms total=%.1fms%s",
                scope.get("method", "-"),
                path if route != "other" else "(other path)",
                status,
                ex.bytes_in,
                ex.bytes_out,
                (ex.first or 0.0) * 1000,
                elapsed * 1000,
                "" if ex.complete else " incomplete",
            )


# --------------------------------------------------------------------------------------------
# streaming out


class _Translator(Protocol):
    @property
    def closed(self) -> bool: ...
    def feed(self, chunk: dict[str, Any]) -> list[StreamEvent]: ...
    def finish(self) -> list[StreamEvent]: ...
    def error(self, status: int, type: str, message: str) -> list[StreamEvent]: ...


class _Body(Protocol):
    """What a streamed answer sends: ``chunks()`` while the upstream lasts, and ``abort()`` -
    the dialect's error ending - when the proxy itself has to cut the stream short."""

    def chunks(self) -> AsyncGenerator[bytes, None]: ...
    def abort(self, fail: _Fail) -> bytes: ...


class _OpenStreams:
    """The streams being relayed, so a shutdown can end them with an error event (instead of
    the server cancelling them mid-write)."""

    def __init__(self) -> None:
        self._scopes: set[anyio.CancelScope] = set()
        self.closing = False

    def __len__(self) -> int:
        return len(self._scopes)

    def add(self, scope: anyio.CancelScope) -> None:
        self._scopes.add(scope)
        if self.closing:
            scope.cancel()

    def discard(self, scope: anyio.CancelScope) -> None:
        self._scopes.discard(scope)

    def close_all(self) -> None:
        """Call in the server's event loop: every open stream ends with its error event."""
        self.closing = True
        for scope in list(self._scopes):
            scope.cancel()


_SHUTTING_DOWN: Final = "shutting_down"


class _Stream(Response):
    """An SSE answer produced by ``body`` while the upstream response is open.

    A watcher listens for the client's disconnect and cancels the copy at once (even while the
    upstream is silent); whatever happens, the upstream response is then closed - which cancels
    the call end to end - and the API key's transport is released. A shutdown ends the stream
    with the dialect's error event.
    """

    def __init__(
        self,
        body: _Body,
        *,
        upstream: httpx2.Response,
        release: Callable[[], Awaitable[None]],
        metrics: _Metrics,
        streams: _OpenStreams,
        route: str,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_SSE_HEADERS)
        self._body = body
        self._upstream = upstream
        self._release = release
        self._metrics = metrics
        self._streams = streams
        self._route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self._metrics
        metrics.open_streams.inc()
        chunks = self._body.chunks()
        started = finished = broken = gone = False
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    nonlocal gone
                    while True:
                        if (await receive())["type"] == "http.disconnect":
                            gone = True
                            tg.cancel_scope.cancel()
                            return

                self._streams.add(tg.cancel_scope)
                tg.start_soon(watch)
                try:
                    await send(
                        {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                    )
                    started = True
                    async for chunk in chunks:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    finished = True
                except OSError:
                    gone = True  # ASGI 2.4 servers report a gone client this way
                except Exception as exc:  # a bug: end the answer, no traceback, no clean end
                    broken = True
                    log.error("stream failed (%s)", type(exc).__name__)
                tg.cancel_scope.cancel()
            self._streams.discard(tg.cancel_scope)
            if not finished and not broken and not gone and self._streams.closing:
                await self._end_for_shutdown(send, started)
            elif gone:
                metrics.disconnects.labels(self._route).inc()
        finally:
            metrics.open_streams.dec()
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await chunks.aclose()
                with contextlib.suppress(Exception):
                    await self._upstream.aclose()
                await self._release()

    async def _end_for_shutdown(self, send: Send, started: bool) -> None:
        fail = _Fail(503, "server_error", "the proxy is shutting down", code=_SHUTTING_DOWN)
        self._metrics.stream_faults.labels(self._route).inc()
        with contextlib.suppress(OSError):
            if not started:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
            await send({"type": "http.response.body", "body": self._body.abort(fail)})


def _chat_error_event(fail: _Fail) -> bytes:
    return b"data: " + _ENCODER.encode(fail.body(Dialect.OPENAI)) + b"\n\n"


class _PassthroughBody:
    """The decrypted SSE bytes as they come; an upstream fault ends with an error event
    (``data: {"error": {...}}``, never ``[DONE]``)."""

    def __init__(self, resp: httpx2.Response, metrics: _Metrics, route: str) -> None:
        self._resp = resp
        self._metrics = metrics
        self._route = route
        self._tail = b"\n\n"  # the last two bytes sent: is an event half-written?

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self._resp.aiter_bytes():
                if chunk:
                    self._tail = (self._tail + chunk)[-2:]
                    yield chunk
        except (PQE2EEError, httpx2.HTTPError, httpx2.StreamError) as exc:
            fail = _fail_of(exc)
            self._metrics.stream_faults.labels(self._route).inc()
            log.warning("%s stream broke: %s", self._route, fail.code)
            yield self.abort(fail)

    def abort(self, fail: _Fail) -> bytes:
        # Terminate a half-written event first so the error event stands on its own.
        return (b"" if self._tail == b"\n\n" else b"\n\n") + _chat_error_event(fail)


class _TranslatedBody:
    """Decrypted chat chunks in (parsed with :class:`SSEParser`), the dialect's events out;
    never a clean end after a fault."""

    def __init__(
        self,
        resp: httpx2.Response,
        translator: _Translator,
        *,
        max_event: int,
        metrics: _Metrics,
        route: str,
    ) -> None:
        self._resp = resp
        self._translator = translator
        self._max_event = max_event
        self._metrics = metrics
        self._route = route

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        translator = self._translator
        try:
            async for out in self._events():
                yield out
            if translator.closed:  # an upstream chunk reported an error or broke the rules
                self._metrics.stream_faults.labels(self._route).inc()
            else:
                yield _sse_events(translator.finish())
        except (_Fail, PQE2EEError, httpx2.HTTPError, httpx2.StreamError) as exc:
            fail = exc if isinstance(exc, _Fail) else _fail_of(exc)
            self._metrics.stream_faults.labels(self._route).inc()
            log.warning("%s stream broke: %s", self._route, fail.code)
            yield self.abort(fail)

    async def _events(self) -> AsyncGenerator[bytes, None]:
        """Translated events per upstream read; raises unless the upstream ended with [DONE]."""
        translator = self._translator
        parser = SSEParser(self._max_event)
        done = False
        async for chunk in self._resp.aiter_bytes():
            out: list[StreamEvent] = []
            for event in parser.feed(chunk):
                if event.data == "[DONE]":
                    done = True
                    continue
                if done:
                    raise _Fail(
                        502,
                        "server_error",
                        "upstream sent data after [DONE]",
                        code=ErrorCode.DATA_AFTER_DONE.value,
                    )
                out.extend(translator.feed(_chunk_object(event.data)))
                if translator.closed:
                    break
            if out:
                yield _sse_events(out)
            if translator.closed:
                return
        if not done and parser.partial_is("[DONE]"):
            done = True  # "data: [DONE]\n" cut before its blank line: still the end marker
        elif parser.has_partial:
            done = False  # bytes of an unfinished event after the end
        if not done:
            raise _Fail(
                502,
                "server_error",
                f"{ErrorCode.STREAM_TRUNCATED.value}: upstream stream ended early",
                code=ErrorCode.STREAM_TRUNCATED.value,
            )

    def abort(self, fail: _Fail) -> bytes:
        if self._translator.closed:
            return b""
        return _sse_events(self._translator.error(fail.status, fail.type, fail.message))


def _chunk_object(data: str) -> dict[str, Any]:
    try:
        obj = msgspec.json.decode(data)
    except msgspec.DecodeError:
        raise _Fail(
            502,
            "server_error",
            "upstream sent a chunk that is not JSON",
            code=ErrorCode.MALFORMED_EVENT.value,
        ) from None
    if not isinstance(obj, dict):
        raise _Fail(
            502,
            "server_error",
            "upstream sent a chunk that is not an object",
            code=ErrorCode.MALFORMED_EVENT.value,
        )
    return obj


# --------------------------------------------------------------------------------------------
# the proxy


def _require_model(obj: Mapping[str, Any]) -> None:
    """A model call must name its model: that is what routes (and encrypts) it."""
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise _Fail(
            400,
            "invalid_request_error",
            "model: a non-empty string is required",
            param="model",
            code="missing_model",
        )


class _Proxy:
    def __init__(
        self,
        config: ProxyConfig,
        pool: _ClientPool,
        plain: httpx2.AsyncClient,
        metrics: _Metrics,
    ) -> None:
        self.config = config
        self.pool = pool
        self.plain = plain  # the public model listing only; never a model call
        self.metrics = metrics
        self.streams = _OpenStreams()

    def _key(self, request: Request) -> str:
        key = _caller_key(request) or self.config.api_key
        if key is None:
            raise _Fail(
                401,
                "authentication_error",
                "no API key: send Authorization: Bearer <key> or x-api-key, or start the "
                "proxy with --api-key",
                code="missing_api_key",
            )
        return key

    @staticmethod
    async def _send(client: httpx2.AsyncClient, request: httpx2.Request) -> httpx2.Response:
        try:
            return await client.send(request, stream=True)
        except (PQE2EEError, httpx2.HTTPError, httpx2.StreamError) as exc:
            fail = _fail_of(exc)
            log.info("upstream call failed: %s", fail.code)
            raise fail from None

    @staticmethod
    def _post(entry: _Entry, path: str, body: bytes, *, stream: bool) -> httpx2.Request:
        headers = {
            "accept": "text/event-stream" if stream else _JSON_TYPE,
            "content-type": _JSON_TYPE,
        }
        return entry.client.build_request("POST", path, content=body, headers=headers)

    # -- OpenAI passthrough ------------------------------------------------------------------

    async def passthrough(self, request: Request) -> Response:
        """Chat Completions / Completions: the body goes through byte for byte."""
        path = request.url.path
        route = _ROUTES[path]
        key = self._key(request)
        raw = await _read_body(request, self.config.max_body)
        obj = _parse_object(raw)
        _require_model(obj)
        stream = obj.get("stream") is True
        entry = await self.pool.acquire(key)
        handed_over = False
        try:
            resp = await self._send(entry.client, self._post(entry, path, raw, stream=stream))
            if resp.status_code != 200 or not stream:
                # Upstream errors keep their status and body.
                body = await _read_upstream(resp, self.config.max_response)
                ctype = resp.headers.get("content-type", _JSON_TYPE)
                return Response(body, status_code=resp.status_code, media_type=ctype)
            handed_over = True
            return _Stream(
                _PassthroughBody(resp, self.metrics, route),
                upstream=resp,
                release=lambda: self.pool.release(entry),
                metrics=self.metrics,
                streams=self.streams,
                route=route,
            )
        finally:
            if not handed_over:
                await self.pool.release(entry)

    # -- translated dialects -----------------------------------------------------------------

    async def _translated_call(
        self,
        request: Request,
        *,
        route: str,
        to_chat: Callable[[dict[str, Any]], dict[str, Any]],
        from_chat: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]],
        translator: Callable[[dict[str, Any]], _Translator],
    ) -> Response:
        key = self._key(request)
        req = _parse_object(await _read_body(request, self.config.max_body))
        try:
            chat = to_chat(req)
        except TranslationError as exc:
            raise _Fail.of_translation(exc) from None
        _require_model(chat)
        stream = chat.get("stream") is True
        body = _ENCODER.encode(chat)
        entry = await self.pool.acquire(key)
        handed_over = False
        try:
            resp = await self._send(entry.client, self._post(entry, CHAT_PATH, body, stream=stream))
            if resp.status_code != 200:
                raw = await _read_upstream(resp, self.config.max_response)
                raise _fail_of_upstream_body(resp.status_code, raw)
            if not stream:
                raw = await _read_upstream(resp, self.config.max_response)
                try:
                    reply = msgspec.json.decode(raw)
                except msgspec.DecodeError:
                    raise _Fail(
                        502, "server_error", "upstream reply is not JSON", code="bad_upstream_reply"
                    ) from None
                try:
                    return _json(from_chat(reply, req))
                except TranslationError as exc:
                    raise _Fail.of_translation(exc) from None
            handed_over = True
            return _Stream(
                _TranslatedBody(
                    resp,
                    translator(req),
                    max_event=self.config.max_event,
                    metrics=self.metrics,
                    route=route,
                ),
                upstream=resp,
                release=lambda: self.pool.release(entry),
                metrics=self.metrics,
                streams=self.streams,
                route=route,
            )
        finally:
            if not handed_over:
                await self.pool.release(entry)

    async def responses(self, request: Request) -> Response:
        return await self._translated_call(
            request,
            route="responses",
            to_chat=responses_to_chat,
            from_chat=chat_to_response,
            translator=ResponsesStreamTranslator,
        )

    async def messages(self, request: Request) -> Response:
        return await self._translated_call(
            request,
            route="messages",
            to_chat=messages_to_chat,
            from_chat=chat_to_message,
            translator=MessagesStreamTranslator,
        )

    async def count_tokens(self, request: Request) -> Response:
        """A local estimate (see :func:`pqe2ee.proxy.anthropic.count_tokens_estimate`)."""
        self._key(request)
        req = _parse_object(await _read_body(request, self.config.max_body))
        try:
            return _json(count_tokens_estimate(req))
        except TranslationError as exc:
            raise _Fail.of_translation(exc) from None

    # -- plaintext and local -----------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        """The public model list, in plaintext from models_base (with the caller's key, if
        any, as Chutes clients send it; it works without one)."""
        key = _caller_key(request) or self.config.api_key
        headers = {"accept": _JSON_TYPE}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        params = request.url.query or None
        plain = self.plain.build_request("GET", "/v1/models", params=params, headers=headers)
        resp = await self._send(self.plain, plain)
        body = await _read_upstream(resp, self.config.max_response)
        ctype = resp.headers.get("content-type", _JSON_TYPE)
        return Response(body, status_code=resp.status_code, media_type=ctype)

    async def health(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def metrics_endpoint(self, request: Request) -> Response:
        self.metrics.keys.set(len(self.pool))
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


Endpoint = Callable[[Request], Awaitable[Response]]


def _guard(handler: Endpoint) -> Endpoint:
    """Every failure becomes an answer in the caller's dialect; nothing escapes as a 500 page."""

    async def wrapped(request: Request) -> Response:
        dialect = _dialect_of(request.url.path)
        try:
            return await handler(request)
        except _Fail as fail:
            return fail.response(dialect)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as exc:
            log.error("internal error (%s)", type(exc).__name__)
            return _Fail(500, "server_error", "internal proxy error", code="internal").response(
                dialect
            )

    return wrapped


def create_app(config: ProxyConfig | None = None) -> Starlette:
    """Build the proxy's Starlette app (see the module docstring for its endpoints)."""
    config = config or ProxyConfig()
    metrics = _Metrics()
    pool = _ClientPool(
        _client_factory(config), max_size=config.max_keys, idle_ttl=config.key_idle_ttl
    )
    plain = httpx2.AsyncClient(base_url=config.models_base, timeout=_timeout(config))
    proxy = _Proxy(config, pool, plain, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:

            async def sweeper() -> None:
                interval = max(1.0, min(60.0, config.key_idle_ttl / 4))
                while True:
                    await anyio.sleep(interval)
                    await pool.sweep()

            tg.start_soon(sweeper)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await pool.aclose()
                    await plain.aclose()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = _kind(exc.status_code)
        message = {404: "no such endpoint", 405: "method not allowed"}.get(
            exc.status_code, "request refused"
        )
        fail = _Fail(exc.status_code, kind, message)
        return fail.response(_dialect_of(request.url.path))

    app = Starlette(
        routes=[
            Route(CHAT_PATH, _guard(proxy.passthrough), methods=["POST"]),
            Route(COMPLETIONS_PATH, _guard(proxy.passthrough), methods=["POST"]),
            Route("/v1/responses", _guard(proxy.responses), methods=["POST"]),
            Route("/v1/messages", _guard(proxy.messages), methods=["POST"]),
            Route("/v1/messages/count_tokens", _guard(proxy.count_tokens), methods=["POST"]),
            Route("/v1/models", _guard(proxy.models), methods=["GET"]),
            Route("/health", proxy.health, methods=["GET"]),
            Route("/metrics", proxy.metrics_endpoint, methods=["GET"]),
        ],
        middleware=[Middleware(_AccessLog, metrics=metrics)],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.pool = pool
    app.state.metrics = metrics
    app.state.streams = proxy.streams
    return app


class ProxyServer(uvicorn.Server):
    """uvicorn's server, plus: on shutdown, streams still open after ``grace`` seconds are
    ended with their dialect's error event (rather than cancelled mid-write by uvicorn)."""

    def __init__(self, config: uvicorn.Config, *, grace: float) -> None:
        super().__init__(config)
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        streams = getattr(getattr(self.config.app, "state", None), "streams", None)

        async def end_streams() -> None:
            await asyncio.sleep(self.grace)
            if isinstance(streams, _OpenStreams) and len(streams):
                log.info("ending %d open stream(s) for shutdown", len(streams))
                streams.close_all()

        ender = asyncio.ensure_future(end_streams())
        try:
            await super().shutdown(sockets)
        finally:
            ender.cancel()


def server_config(app: Starlette, config: ProxyConfig, **kw: Any) -> uvicorn.Config:
    """The uvicorn settings the proxy runs with (access lines are the proxy's own)."""
    kw.setdefault("access_log", False)
    kw.setdefault("timeout_graceful_shutdown", int(config.shutdown_grace) + 5)
    return uvicorn.Config(app, host=config.host, port=config.port, **kw)


def serve(config: ProxyConfig, *, log_level: str = "info") -> None:
    """Run the proxy until interrupted (Ctrl-C / SIGTERM: see :class:`ProxyServer`)."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if log_level != "debug":
        # httpx2 logs each model call as "POST {models_base}/v1/chat/completions", the URL the
        # transport is handed, not where the encrypted call goes: misleading, and our access
        # line already says it.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    if config.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "listening on %s: callers reach the proxy over plain HTTP%s",
            config.host,
            " and may use the configured API key" if config.api_key else "",
        )
    log.info(
        "model calls end-to-end encrypted via %s; model list in plaintext from %s",
        config.api_base,
        config.models_base,
    )
    app = create_app(config)
    server = ProxyServer(
        server_config(app, config, log_level=log_level), grace=config.shutdown_grace
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
        server.run()
