"""``pqe2ee instance``: the decrypting front that runs inside the GPU machine (ideally a TEE).

It holds a long-lived ML-KEM-768 key, opens v1 request blobs that the relay forwards, sends the
plaintext JSON to an OpenAI-compatible engine (vLLM, llama.cpp, Ollama) on ``upstream`` and seals
the engine's answer to the client's one-time response key. Wire behaviour follows the Chutes
runtime (see /work/shared/design/chutes-v1-notes.md) with three deliberate differences, each one
making a silent failure loud:

* an ``X-E2E-Stream`` header that disagrees with the body's ``stream`` flag is a 400
  (``stream_mismatch``) instead of a broken response;
* an engine error (non-2xx) is sealed and returned *with the engine's status*, so the client can
  read the engine's message;
* a stream whose engine connection breaks ends with an ``e2e_error`` event and an abrupt close
  (no final chunk), never with anything that looks like a clean end.

Endpoints::

    GET  /health       {"status": "ok"}
    GET  /e2e/info     instance_id, e2e_pubkey (std base64), models, paths, version, protocols
    POST /e2e/invoke   body: the request blob; headers X-E2E-Path, X-E2E-Stream, X-Instance-Id

All crypto and SSE framing come from :mod:`pqe2ee.protocol`. Logs carry one line per request
(method, path, status, byte counts, duration, ids) and never bodies, keys or prompt text.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import anyio
import anyio.to_thread
import httpx2
import msgspec
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pqe2ee import __version__
from pqe2ee.backends import get_aead, get_kem
from pqe2ee.backends.base import AEAD, KEM, KEMPrivateKey, check_mlkem768_public_key
from pqe2ee.errors import BackendError, ErrorCode, LimitExceeded, LocalProtocolError, PQE2EEError
from pqe2ee.protocol import (
    OpenedRequest,
    StreamEncoder,
    StreamSealer,
    looks_like_uuid,
    open_request,
    seal_response,
)
from pqe2ee.protocol.codec import b64encode
from pqe2ee.server.keyfile import load_or_create_key, seed_kem

__all__ = [
    "DEFAULT_ALLOW_PATHS",
    "Instance",
    "InstanceConfig",
    "create_app",
    "default_instance_id",
    "serve",
]

logger = logging.getLogger("pqe2ee.instance")

DEFAULT_ALLOW_PATHS: Final = ("/v1/chat/completions", "/v1/completions")
MiB: Final = 1024 * 1024

# Codes used in JSON error bodies that ErrorCode does not (yet) name.
CODE_STREAM_MISMATCH: Final = "stream_mismatch"
CODE_INSTANCE_MISMATCH: Final = "instance_mismatch"
CODE_UPSTREAM_TIMEOUT: Final = "upstream_timeout"

_THREAD_THRESHOLD: Final = 256 * 1024  # open/seal bigger bodies off the event loop
_LINGER_MAX: Final = 64 * MiB  # see Instance._read_body
_MODELS_MAX: Final = 4 * MiB  # cap on the engine's /v1/models document
_MODELS_RETRY_EMPTY: Final = 1.0  # seconds between model refreshes while the list is empty
_SSE_HEADERS: Final = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    """Configuration of one instance.

    ``upstream`` is the engine's base URL *without* ``/v1`` (``http://127.0.0.1:8000``); a
    request for ``X-E2E-Path: /v1/chat/completions`` goes to ``{upstream}/v1/chat/completions``.

    ``continuous_usage``: for streams the instance forces ``stream_options.include_usage`` and,
    when this is True (the default, as the Chutes runtime does), ``continuous_usage_stats``. With
    continuous stats the engine puts ``usage`` in every chunk, and every such chunk is preceded by
    a *plaintext* usage event on the outer stream: per-chunk token counts and timing are then
    visible to the relay. Set it to False to leak only the final totals.
    """

    upstream: str
    host: str = "127.0.0.1"
    port: int = 8002
    key_file: str | os.PathLike[str] | None = None
    allow_paths: tuple[str, ...] = DEFAULT_ALLOW_PATHS
    max_body: int = 16 * MiB
    max_plaintext: int = 64 * MiB
    max_response: int = 64 * MiB
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 600.0
    max_concurrency: int = 64
    backend: str = "auto"
    instance_id: str | None = None
    continuous_usage: bool = True
    upstream_api_key: str | None = field(default=None, repr=False)
    models_ttl: float = 60.0
    models_timeout: float = 5.0

    def __post_init__(self) -> None:
        up = self.upstream.strip()
        try:
            url = httpx2.URL(up)
        except httpx2.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise LocalProtocolError("upstream must be an http:// or https:// URL")
        object.__setattr__(self, "upstream", up.rstrip("/"))
        paths = tuple(self.allow_paths)
        for p in paths:
            if not isinstance(p, str) or not p.startswith("/") or "?" in p or "#" in p:
                raise LocalProtocolError(
                    f"allowed path must start with '/' and have no query: {p!r}"
                )
        object.__setattr__(self, "allow_paths", paths)
        for name in ("max_body", "max_plaintext", "max_response", "max_concurrency"):
            if getattr(self, name) < 1:
                raise LocalProtocolError(f"{name} must be at least 1")
        for name in (
            "upstream_connect_timeout",
            "upstream_read_timeout",
            "models_ttl",
            "models_timeout",
        ):
            if not getattr(self, name) > 0:
                raise LocalProtocolError(f"{name} must be positive")
        if not 0 <= self.port <= 65535:
            raise LocalProtocolError("port must be in 0..65535")


def default_instance_id(public_key: bytes) -> str:
    """The instance id derived from the public key: a UUID (v4 layout) of its SHA-256."""
    return str(uuid.UUID(bytes=hashlib.sha256(public_key).digest()[:16], version=4))


# --------------------------------------------------------------------------------------------
# Small helpers


def _error(
    status: int, detail: str, code: str | None = None, *, close: bool = False
) -> JSONResponse:
    body: dict[str, str] = {"detail": detail}
    if code is not None:
        body["code"] = code
    headers = {"connection": "close"} if close else None
    return JSONResponse(body, status_code=status, headers=headers)


class _Reject(Exception):
    """Ends request handling early with ``response``."""

    def __init__(self, response: Response, code: str) -> None:
        super().__init__(code)
        self.response = response
        self.code = code


class _TooLarge(Exception):
    pass


def _timeout() -> _Reject:
    return _Reject(
        _error(504, "Upstream engine timed out", CODE_UPSTREAM_TIMEOUT), CODE_UPSTREAM_TIMEOUT
    )


def _unreachable(detail: str) -> _Reject:
    code = ErrorCode.UPSTREAM_ERROR.value
    return _Reject(_error(502, detail, code), code)


async def _read_limited(response: httpx2.Response, limit: int) -> bytes:
    buf = bytearray()
    async for chunk in response.aiter_bytes():
        if len(buf) + len(chunk) > limit:
            raise _TooLarge
        buf += chunk
    return bytes(buf)


@dataclass(slots=True)
class _Buffered:
    status: int
    body: bytes


@dataclass(slots=True)
class _Streaming:
    response: httpx2.Response


@dataclass(slots=True)
class _Log:
    """What the one log line of a request says. No bodies, no header values other than ids."""

    method: str
    route: str
    started: float = field(default_factory=time.perf_counter)
    path: str = "-"
    stream: bool | None = None
    chute: str = "-"
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_status: int | None = None

    def emit(self, status: int, code: str | None = None, level: int = logging.INFO) -> None:
        if not logger.isEnabledFor(level):
            return
        ms = (time.perf_counter() - self.started) * 1000.0
        logger.log(
            level,
            "%s %s path=%s stream=%s chute=%s status=%d upstream=%s in=%d out=%d ms=%.1f code=%s",
            self.method,
            self.route,
            self.path,
            "-" if self.stream is None else str(self.stream).lower(),
            self.chute,
            status,
            "-" if self.upstream_status is None else self.upstream_status,
            self.bytes_in,
            self.bytes_out,
            ms,
            code or "-",
        )


class _Slot:
    """One unit of the concurrency budget; ``release`` is idempotent."""

    __slots__ = ("_held", "_instance")

    def __init__(self, instance: Instance) -> None:
        self._instance = instance
        self._held = True
        instance._inflight += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._instance._inflight -= 1


async def _until_disconnect(receive: Receive, fn: Callable[[], Awaitable[T]]) -> T | None:
    """Run ``fn``; cancel it and return None if the peer hangs up first."""
    result: T | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        result = await fn()
        tg.cancel_scope.cancel()
    return result


# --------------------------------------------------------------------------------------------
# The streaming response


class _ClientGone(Exception):
    pass


class _SealedStream(Response):
    """Engine SSE in, outer v1 SSE out, one record per engine line, nothing buffered.

    Owns the upstream response and the concurrency slot: both are released whatever happens
    (clean end, engine break, client hang-up - which also cancels the engine request).
    """

    def __init__(
        self,
        upstream: httpx2.Response,
        encoder: StreamEncoder,
        *,
        slot: _Slot,
        log: _Log,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_SSE_HEADERS)
        self._upstream = upstream
        self._encoder = encoder
        self._slot = slot
        self._log = log

    async def _send(self, send: Send, data: bytes, *, more: bool = True) -> None:
        try:
            await send({"type": "http.response.body", "body": data, "more_body": more})
        except OSError:  # ASGI spec 2.4 servers report a gone client this way
            raise _ClientGone from None
        self._log.bytes_out += len(data)

    async def _pump(self, send: Send) -> str | None:
        """Stream until the engine ends; returns an error code, or None for a clean end."""
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        except OSError:
            raise _ClientGone from None
        await self._send(send, self._encoder.start())
        try:
            async for chunk in self._upstream.aiter_bytes():
                self._log.bytes_in += len(chunk)
                out = self._encoder.feed(chunk)
                if out:
                    await self._send(send, out)
            tail = self._encoder.finish()
        except (httpx2.HTTPError, httpx2.StreamError):
            code = ErrorCode.UPSTREAM_ERROR.value
            message = "the engine's stream broke"
        except LimitExceeded:
            code = ErrorCode.OVERSIZE.value
            message = "the engine sent a line longer than the record limit"
        else:
            await self._send(send, tail, more=False)
            return None
        # No final empty chunk: returning now makes the server drop the connection, so no
        # client can mistake this for a clean end.
        await self._send(send, StreamSealer.error_event({"code": code, "message": message}))
        return code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, code, finished = 200, None, False
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while True:
                        if (await receive())["type"] == "http.disconnect":
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch)
                try:
                    code = await self._pump(send)
                    finished = True
                except _ClientGone:
                    pass
                tg.cancel_scope.cancel()
            if not finished:
                # The client (relay) hung up: leaving the task group cancelled the engine read;
                # closing the upstream response below drops the engine connection.
                status, code = 499, ErrorCode.CONNECTION_LOST.value
        finally:
            self._slot.release()
            self._log.emit(status, code)
            with anyio.CancelScope(shield=True):
                await self._upstream.aclose()


# --------------------------------------------------------------------------------------------
# The instance


class Instance:
    """State of one running instance: key, engine client, model cache, concurrency count."""

    def __init__(self, config: InstanceConfig, *, private_key: KEMPrivateKey | None = None) -> None:
        self.config = config
        self.kem: KEM = get_kem(config.backend)
        self.aead: AEAD = _aead_for(config.backend)
        if private_key is not None:
            self.key_source = "given"
        elif config.key_file is not None:
            private_key, created = load_or_create_key(config.key_file, seed_kem(config.backend))
            self.key_source = "created" if created else "loaded"
        else:
            private_key = self.kem.generate()
            self.key_source = "ephemeral"
        self._key = private_key
        self.public_key: bytes = private_key.public_key
        self.instance_id: str = config.instance_id or default_instance_id(self.public_key)
        self._pubkey_b64 = b64encode(self.public_key).decode("ascii")
        self._allowed = frozenset(config.allow_paths)
        self._inflight = 0
        self._client: httpx2.AsyncClient | None = None
        self._models: list[str] = []
        self._models_checked: float | None = None
        self._models_lock = anyio.Lock()
        self._auth: dict[str, str] = (
            {"authorization": f"Bearer {config.upstream_api_key}"}
            if config.upstream_api_key
            else {}
        )

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def models(self) -> list[str]:
        return list(self._models)

    def client(self) -> httpx2.AsyncClient:
        if self._client is None:
            cfg = self.config
            self._client = httpx2.AsyncClient(
                timeout=httpx2.Timeout(
                    connect=cfg.upstream_connect_timeout,
                    read=cfg.upstream_read_timeout,
                    write=cfg.upstream_read_timeout,
                    pool=cfg.upstream_connect_timeout,
                ),
                limits=httpx2.Limits(
                    max_connections=cfg.max_concurrency + 4,
                    max_keepalive_connections=cfg.max_concurrency,
                    # Below uvicorn's 5 s keep-alive: never reuse a connection the engine is
                    # closing (seen as a stray 502 under load).
                    keepalive_expiry=2.0,
                ),
                follow_redirects=False,
                trust_env=False,  # proxies from the environment must not reroute engine traffic
            )
        return self._client

    async def startup(self) -> None:
        self.client()
        await self.refresh_models(force=True)
        logger.info(
            "instance %s ready: key %s (sha256:%s), upstream %s, paths %s, backend %s",
            self.instance_id,
            self.key_source,
            hashlib.sha256(self.public_key).hexdigest()[:16],
            _safe_url(self.config.upstream),
            ",".join(self.config.allow_paths),
            self.kem.name,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- models -------------------------------------------------------------------------------

    def _models_due(self, now: float) -> bool:
        if self._models_checked is None:
            return True
        age = now - self._models_checked
        return age >= (self.config.models_ttl if self._models else _MODELS_RETRY_EMPTY)

    async def refresh_models(self, *, force: bool = False) -> list[str]:
        """Re-read the engine's ``GET /v1/models`` when due; keeps the last good list on failure."""
        if not force and not self._models_due(time.monotonic()):
            return self.models
        async with self._models_lock:
            if not force and not self._models_due(time.monotonic()):
                return self.models  # refreshed while we waited for the lock
            models = None
            with anyio.move_on_after(self.config.models_timeout):
                models = await self._fetch_models()
            self._models_checked = time.monotonic()
            if models is not None:
                self._models = models
        return self.models

    async def _fetch_models(self) -> list[str] | None:
        try:
            async with self.client().stream(
                "GET", self.config.upstream + "/v1/models", headers=self._auth
            ) as resp:
                if resp.status_code != 200:
                    return None
                doc = await _read_limited(resp, _MODELS_MAX)
        except (httpx2.HTTPError, _TooLarge):
            return None
        try:
            listing = msgspec.json.decode(doc)
        except msgspec.DecodeError:
            return None
        rows = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(rows, list):
            return None
        return [r["id"] for r in rows if isinstance(r, dict) and isinstance(r.get("id"), str)]

    # -- endpoints ----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        _Log("GET", "/health").emit(200, level=logging.DEBUG)
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        log = _Log("GET", "/e2e/info")
        models = await self.refresh_models()
        log.emit(200, level=logging.DEBUG)
        return JSONResponse(
            {
                "instance_id": self.instance_id,
                "e2e_pubkey": self._pubkey_b64,
                "models": models,
                "paths": list(self.config.allow_paths),
                "version": f"pqe2ee/{__version__}",
                "protocols": ["v1"],
            }
        )

    async def invoke(self, request: Request) -> Response:
        log = _Log("POST", "/e2e/invoke")
        slot: _Slot | None = None
        try:
            path = request.headers.get("x-e2e-path", "/")
            if path not in self._allowed:
                # Refused before the body is read or decrypted, as the Chutes runtime does.
                raise _Reject(
                    _error(403, "Path not available via E2E", ErrorCode.PATH_FORBIDDEN.value),
                    ErrorCode.PATH_FORBIDDEN.value,
                )
            log.path = path
            chute = request.headers.get("x-chute-id")
            if chute is not None and looks_like_uuid(chute):
                log.chute = chute.lower()
            wanted = request.headers.get("x-instance-id")
            if wanted is not None and wanted.strip().lower() != self.instance_id.lower():
                raise _Reject(
                    _error(400, "X-Instance-Id names a different instance", CODE_INSTANCE_MISMATCH),
                    CODE_INSTANCE_MISMATCH,
                )
            if self._inflight >= self.config.max_concurrency:
                raise _Reject(
                    JSONResponse(
                        {"error": "RateLimitExceeded", "detail": "Instance is at maximum capacity"},
                        status_code=429,
                    ),
                    ErrorCode.INSTANCE_BUSY.value,
                )
            slot = _Slot(self)
            blob = await self._read_body(request, log)
            opened = await self._open(blob)
            log.stream = opened.stream
            header_stream = request.headers.get("x-e2e-stream", "false").strip().lower() == "true"
            if header_stream != opened.stream:
                raise _Reject(
                    _error(
                        400,
                        "X-E2E-Stream does not match the request body's stream flag",
                        CODE_STREAM_MISMATCH,
                    ),
                    CODE_STREAM_MISMATCH,
                )
            if opened.stream:
                response = await self._stream(request, path, opened, slot, log)
                if isinstance(response, _SealedStream):
                    slot = None  # the stream response owns it now and releases it at its end
                return response
            return await self._unary(request, path, opened, log)
        except _Reject as rej:
            log.emit(rej.response.status_code, rej.code)
            return rej.response
        finally:
            if slot is not None:
                slot.release()

    # -- invoke steps -------------------------------------------------------------------------

    async def _read_body(self, request: Request, log: _Log) -> bytes:
        """The body, never holding more than ``max_body`` bytes of it.

        Over the limit: 413. When the declared Content-Length is over the limit but modest
        (up to ``_LINGER_MAX``), the server discards the rest of the upload without storing it
        so the sender reliably reads the 413 (closing with unread data makes the kernel send a
        reset that can destroy the response). Otherwise - a larger declared size, or a chunked
        body that crosses the limit - reading stops at once and the connection is closed.
        """
        limit = self.config.max_body

        def too_big(*, close: bool) -> _Reject:
            code = ErrorCode.OVERSIZE.value
            return _Reject(
                _error(413, f"Request body exceeds {limit} bytes", code, close=close), code
            )

        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                raise _Reject(
                    _error(400, "Invalid Content-Length", ErrorCode.INVALID_BODY.value, close=True),
                    ErrorCode.INVALID_BODY.value,
                )
            if size > limit:
                log.bytes_in = 0
                raise too_big(close=size > _LINGER_MAX)
        buf = bytearray()
        try:
            async for chunk in request.stream():
                if len(buf) + len(chunk) > limit:
                    log.bytes_in = len(buf) + len(chunk)
                    raise too_big(close=True)
                buf += chunk
        except ClientDisconnect:
            raise _Reject(
                _error(400, "Client disconnected", ErrorCode.CONNECTION_LOST.value),
                ErrorCode.CONNECTION_LOST.value,
            ) from None
        log.bytes_in = len(buf)
        return bytes(buf)

    def _open_sync(self, blob: bytes) -> OpenedRequest:
        opened = open_request(
            blob, self._key, aead=self.aead, max_plaintext=self.config.max_plaintext
        )
        check_mlkem768_public_key(opened.response_public_key)
        return opened

    async def _open(self, blob: bytes) -> OpenedRequest:
        try:
            if len(blob) > _THREAD_THRESHOLD:
                return await anyio.to_thread.run_sync(self._open_sync, blob)
            return self._open_sync(blob)
        except PQE2EEError as exc:
            # Never echo anything of the body; the code says which rule failed.
            raise _Reject(
                _error(400, "E2E decryption failed", exc.code.value), exc.code.value
            ) from None

    def _upstream_request(self, path: str, opened: OpenedRequest) -> httpx2.Request:
        if opened.stream:
            body = dict(opened.body)
            options = body.get("stream_options")
            merged: dict[str, Any] = dict(options) if isinstance(options, Mapping) else {}
            merged["include_usage"] = True
            if self.config.continuous_usage:
                # Compatibility with the Chutes runtime. Per-chunk usage then travels as plaintext
                # events in front of the records (see InstanceConfig.continuous_usage).
                merged["continuous_usage_stats"] = True
            body["stream_options"] = merged
            payload = msgspec.json.encode(body)
            accept = "text/event-stream"
        else:
            payload = opened.json
            accept = "application/json"
        headers = {
            "content-type": "application/json",
            "accept": accept,
            "accept-encoding": "identity",
            **self._auth,
        }
        return self.client().build_request(
            "POST", self.config.upstream + path, content=payload, headers=headers
        )

    async def _call_upstream(
        self, request: Request, upstream_request: httpx2.Request, *, stream: bool
    ) -> _Buffered | _Streaming:
        """Send to the engine, cancelled if the client hangs up. Errors become ``_Reject``."""
        failure: list[_Reject] = []

        async def call() -> _Buffered | _Streaming | None:
            try:
                resp = await self.client().send(upstream_request, stream=True)
            except httpx2.TimeoutException:
                failure.append(_timeout())
                return None
            except httpx2.HTTPError:
                failure.append(_unreachable("Upstream engine unreachable"))
                return None
            if stream and 200 <= resp.status_code < 300:
                return _Streaming(resp)
            try:
                body = await _read_limited(resp, self.config.max_response)
            except _TooLarge:
                failure.append(
                    _Reject(
                        _error(502, "Upstream response too large", ErrorCode.OVERSIZE.value),
                        ErrorCode.OVERSIZE.value,
                    )
                )
                return None
            except httpx2.TimeoutException:
                failure.append(_timeout())
                return None
            except httpx2.HTTPError:
                failure.append(_unreachable("Upstream engine failed mid-response"))
                return None
            finally:
                with anyio.CancelScope(shield=True):
                    await resp.aclose()
            return _Buffered(resp.status_code, body)

        result = await _until_disconnect(request.receive, call)
        if failure:
            raise failure[0]
        if result is None:
            # The client hung up while the engine worked; the engine request is cancelled.
            raise _Reject(Response(status_code=499), ErrorCode.CONNECTION_LOST.value)
        return result

    async def _sealed(self, status: int, body: bytes, opened: OpenedRequest, log: _Log) -> Response:
        def seal() -> bytes:
            return seal_response(body, opened.response_public_key, kem=self.kem, aead=self.aead)

        try:
            blob = await anyio.to_thread.run_sync(seal) if len(body) > _THREAD_THRESHOLD else seal()
        except PQE2EEError as exc:
            raise _Reject(
                _error(400, "E2E encryption failed", exc.code.value), exc.code.value
            ) from None
        log.bytes_out = len(blob)
        code = None if 200 <= status < 300 else ErrorCode.UPSTREAM_ERROR.value
        log.emit(status, code)
        # Engine errors keep the engine's status; the body is sealed either way, so only the
        # client can read the engine's message.
        return Response(blob, status_code=status, media_type="application/octet-stream")

    async def _unary(
        self, request: Request, path: str, opened: OpenedRequest, log: _Log
    ) -> Response:
        result = await self._call_upstream(
            request, self._upstream_request(path, opened), stream=False
        )
        assert isinstance(result, _Buffered)
        log.upstream_status = result.status
        status = result.status if not 200 <= result.status < 300 else 200
        return await self._sealed(status, result.body, opened, log)

    async def _stream(
        self, request: Request, path: str, opened: OpenedRequest, slot: _Slot, log: _Log
    ) -> Response:
        try:
            sealer = StreamSealer(opened.response_public_key, kem=self.kem, aead=self.aead)
        except PQE2EEError as exc:
            raise _Reject(
                _error(400, "E2E encryption failed", exc.code.value), exc.code.value
            ) from None
        result = await self._call_upstream(
            request, self._upstream_request(path, opened), stream=True
        )
        if isinstance(result, _Buffered):  # engine error: sealed like a non-stream reply
            log.upstream_status = result.status
            return await self._sealed(result.status, result.body, opened, log)
        log.upstream_status = result.response.status_code
        return _SealedStream(result.response, StreamEncoder(sealer), slot=slot, log=log)


def _aead_for(backend: str) -> AEAD:
    try:
        return get_aead(backend)
    except BackendError:
        return get_aead("auto")  # KEM-only backends (liboqs, pqcrypto) pair with pyca's AEAD


def _safe_url(url: str) -> str:
    """Scheme, host and port only (no credentials, no path) for logs."""
    try:
        u = httpx2.URL(url)
    except httpx2.InvalidURL:
        return "<invalid url>"
    port = f":{u.port}" if u.port is not None else ""
    return f"{u.scheme}://{u.host}{port}"


def create_app(config: InstanceConfig, *, private_key: KEMPrivateKey | None = None) -> Starlette:
    """The instance as an ASGI app. The key is loaded (or created) here, before serving.

    ``private_key`` overrides the key (tests); otherwise ``config.key_file`` or a fresh key.
    Raises :class:`~pqe2ee.server.keyfile.KeyFileError` / :class:`~pqe2ee.errors.BackendError`
    for a bad key file or backend. ``app.state.instance`` is the :class:`Instance`.
    """
    instance = Instance(config, private_key=private_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await instance.startup()
        try:
            yield
        finally:
            await instance.aclose()

    routes: Sequence[Route] = [
        Route("/health", instance.health, methods=["GET"]),
        Route("/e2e/info", instance.info, methods=["GET"]),
        Route("/e2e/invoke", instance.invoke, methods=["POST"]),
    ]
    app = Starlette(routes=list(routes), lifespan=lifespan)
    app.state.instance = instance
    return app


def serve(config: InstanceConfig, *, log_level: str = "info") -> None:
    """Run the instance with uvicorn until interrupted (key errors raise before binding)."""
    import uvicorn

    app = create_app(config)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    # uvicorn's access log is off: the instance writes its own line per request.
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        access_log=False,
        server_header=False,
    )
