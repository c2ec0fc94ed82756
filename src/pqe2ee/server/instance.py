"""``pqe2ee instance``: the decrypting front that runs inside the GPU machine (ideally a TEE).

It holds a long-lived ML-KEM-768 key (v1) and an X-Wing key (wire profile v2, spec/v2.md), opens
the request blobs that the relay forwards, sends the plaintext JSON to an OpenAI-compatible engine
(vLLM, llama.cpp, Ollama) on ``upstream`` and seals the engine's answer to the client's one-time
response key. Both versions arrive on the same ``POST /e2e/invoke``: a blob starting with
``"PQE2" 02`` (magic and version of the v2 context header) is v2, anything else v1. v1 wire
behaviour follows the Chutes runtime (see /work/shared/design/chutes-v1-notes.md) with three
deliberate differences, each one making a silent failure loud:

* an ``X-E2E-Stream`` header that disagrees with the body's ``stream`` flag is a 400
  (``stream_mismatch``) instead of a broken response;
* an engine error (non-2xx) is sealed and returned *with the engine's status*, so the client can
  read the engine's message;
* a stream whose engine connection breaks ends with an ``e2e_error`` event and an abrupt close
  (no final chunk), never with anything that looks like a clean end.

v2 (spec/v2.md §4.2-§5): the context header H is checked against what the relay delivered
(``X-E2E-Path``, ``X-E2E-Stream``, ``X-E2E-Nonce`` when forwarded, ``X-Chute-Id``) and the
instance's own ids, the client time against a ±120 s window, the request id against a replay
cache (in memory, or Redis shared by several processes). Refusals are plaintext hints
``{"detail":"e2e_v2:<code>"}`` (400; 409 replay; 413 oversize). Once a request opened the answer
is HTTP 200 and everything else - the engine's status, content type, body, usage, and any engine
failure - is inside authenticated records (HEAD ... END). ``--v2-only`` answers v1 blobs with
426 (``v1_disabled``); ``--no-v2`` serves v1 only. Generated v2 keys rotate (current + previous).

Endpoints::

    GET  /health       {"status": "ok"}
    GET  /e2e/info     instance_id, e2e_pubkey (std base64), models, paths, version, protocols,
                       e2e_v2 {v, kem_id, kdf_id, aead_id, pk, not_after} when v2 is served
    POST /e2e/invoke   body: the request blob; headers X-E2E-Path, X-E2E-Stream, X-Instance-Id
                       (v2 also reads X-Chute-Id and X-E2E-Nonce)

All crypto and SSE framing come from :mod:`pqe2ee.protocol`. Logs carry one line per request
(method, path, status, byte counts, duration, ids) and never bodies, keys or prompt text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
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
from pqe2ee.backends.xwing import XWING_KEM_ID, XWing, XWingPrivateKey, get_xwing
from pqe2ee.errors import (
    BackendError,
    ErrorCode,
    LimitExceeded,
    LocalProtocolError,
    PQE2EEError,
    RemoteProtocolError,
)
from pqe2ee.protocol import (
    OpenedRequest,
    StreamEncoder,
    StreamSealer,
    looks_like_uuid,
    open_request,
    seal_response,
)
from pqe2ee.protocol.codec import b64encode
from pqe2ee.protocol.v2 import (
    MAGIC,
    VERSION,
    InstanceV2,
    MemoryReplayCache,
    OpenedRequestV2,
    ParsedRequest,
    ReplayCache,
    ResponseSealer,
    StreamEncoderV2,
    UpstreamError,
    instance_error_response,
    seal_response_v2,
)
from pqe2ee.protocol.v2.hpke import AEAD_ID, KDF_ID
from pqe2ee.protocol.v2.request import DEFAULT_WINDOW_MS
from pqe2ee.server.keyfile import load_or_create_key, load_or_create_xwing_key, seed_kem
from pqe2ee.server.replaycache import FloorReplayCache, RedisReplayCache, ReplayCacheError

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

# Codes of the instance's plaintext JSON refusals (stable wire strings, listed in errors.py).
CODE_STREAM_MISMATCH: Final = ErrorCode.STREAM_MISMATCH.value
CODE_INSTANCE_MISMATCH: Final = ErrorCode.INSTANCE_MISMATCH.value
CODE_UPSTREAM_TIMEOUT: Final = ErrorCode.UPSTREAM_TIMEOUT.value
CODE_V1_DISABLED: Final = ErrorCode.V1_DISABLED.value  # 426: a v1 blob to a --v2-only instance
CODE_REPLAY_CACHE_DOWN: Final = ErrorCode.REPLAY_CACHE_UNAVAILABLE.value  # 503: fail closed

V2_PREFIX: Final = MAGIC + bytes((VERSION,))  # a blob starting with these 5 bytes is v2 (§8.2)
V2_KEY_LIFETIME: Final = 3600.0  # a generated v2 key is current this long, then previous as long
_V2_ERROR_MESSAGE_MAX: Final = 1024  # engine error message copied into END.error

_THREAD_THRESHOLD: Final = 256 * 1024  # open/seal bigger bodies off the event loop
_LINGER_MAX: Final = 64 * MiB  # see Instance._read_body
_MODELS_MAX: Final = 4 * MiB  # cap on the engine's /v1/models document
_MODELS_RETRY_EMPTY: Final = 1.0  # seconds between model refreshes while the list is empty
_SSE_HEADERS: Final = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)
_SSE_TEXT_HEADERS: Final = tuple((k.decode(), v.decode()) for k, v in _SSE_HEADERS)

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
    visible to the relay. Set it to False to leak only the final totals. (v2 streams never force
    ``continuous_usage_stats``: spec/v2.md §5.6.)

    v2: ``v2`` serves wire profile v2 next to v1 (default); ``v2_only`` refuses v1 blobs (426
    ``v1_disabled``; the v1 key is still made and published, because discovery rows need a
    valid ``e2e_pubkey`` and the attestation binding names both keys, but it never opens
    anything). ``v2_key_file`` keeps the X-Wing key on disk (same 0600 rules as ``key_file``,
    its own first line; such a key is not rotated); without it a fresh key is made at start and
    rotated every ``v2_key_lifetime`` seconds, the previous key staying valid one more period.
    ``chute_id`` is the chute this instance serves (a Chutes deployment); without it, as behind
    ``pqe2ee relay``, every model is its own chute (``uuid5(URL, "pqe2ee:model:" + model)``)
    and H's chute id must be the chute of a model the engine lists, or of H.model. ``redis_url`` keeps the v2 replay cache in Redis
    (several processes serving one key); default in memory (``replay_max_entries`` ids).
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
    v2: bool = True
    v2_only: bool = False
    v2_key_file: str | os.PathLike[str] | None = None
    v2_key_lifetime: float = V2_KEY_LIFETIME
    chute_id: str | None = None
    redis_url: str | None = field(default=None, repr=False)
    replay_max_entries: int = 100_000

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
        if not self.v2:
            for name, flag in (
                ("--v2-only", self.v2_only),
                ("--v2-key-file", self.v2_key_file is not None),
                ("--redis", self.redis_url is not None),
            ):
                if flag:
                    raise LocalProtocolError(f"{name} needs v2 (it excludes --no-v2)")
        if (
            self.v2_key_file is not None
            and self.key_file is not None
            and os.path.abspath(self.v2_key_file) == os.path.abspath(self.key_file)
        ):
            raise LocalProtocolError("the v1 and v2 keys need two different key files")
        if not 60.0 <= self.v2_key_lifetime <= 86400.0:
            raise LocalProtocolError("v2_key_lifetime must be between 60 and 86400 seconds")
        if self.chute_id is not None:
            if not looks_like_uuid(self.chute_id):
                raise LocalProtocolError("chute_id must be a UUID")
            object.__setattr__(self, "chute_id", self.chute_id.lower())
        if self.replay_max_entries < 1:
            raise LocalProtocolError("replay_max_entries must be at least 1")
        if self.v2 and self.instance_id is not None and not looks_like_uuid(self.instance_id):
            raise LocalProtocolError("instance_id must be a UUID to serve v2 (or pass --no-v2)")


def default_instance_id(public_key: bytes) -> str:
    """The instance id derived from the public key: a UUID (v4 layout) of its SHA-256."""
    return str(uuid.UUID(bytes=hashlib.sha256(public_key).digest()[:16], version=4))


def model_chute_id(model: str) -> str:
    """The chute id of a model behind ``pqe2ee relay`` (``relay.chute_id_for``; kept equal by a
    test): what H.chute_id must be when no ``chute_id`` is configured."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "pqe2ee:model:" + model))


class _ServerInstanceV2(InstanceV2):
    """:class:`InstanceV2` whose own chute id is fixed, or - without one - any chute of a model
    it serves (``own_chutes()``) or the chute of H.model (the model list may lag the engine).

    Derived: a header naming one of those chutes is compared as if it named a random, never
    published placeholder id (H must hold a UUID, so the placeholder is one); any other chute id
    in H then mismatches the placeholder. (A request may name a chute and use its UUID as the
    model, as Chutes clients do: the engine then answers, as with v1.)
    """

    def __init__(
        self,
        *,
        chute_id: str | None,
        own_chutes: Callable[[], Collection[str]],
        **kw: Any,
    ) -> None:
        super().__init__(chute_id=chute_id or str(uuid.uuid4()), **kw)
        self._derived = chute_id is None
        self._own_chutes = own_chutes

    def check(
        self,
        parsed: ParsedRequest,
        *,
        path: str,
        stream: bool,
        now_ms: int,
        relay_nonce: str | None = None,
    ) -> XWingPrivateKey:
        h = parsed.header
        if self._derived and (
            h.chute_id in self._own_chutes() or h.chute_id == model_chute_id(h.model)
        ):
            # The chute this request names is one of ours: compare it as our own.
            parsed = dataclasses.replace(
                parsed, header=dataclasses.replace(h, chute_id=self.chute_id)
            )
        return super().check(
            parsed, path=path, stream=stream, now_ms=now_ms, relay_nonce=relay_nonce
        )


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


class _EngineFailure(Exception):
    """The engine could not be used after the request opened. v1 answers it in plaintext
    (:meth:`reject`); v2 seals it into the response (HEAD status + END error)."""

    def __init__(self, status: int, detail: str, code: str) -> None:
        super().__init__(code)
        self.status = status
        self.detail = detail
        self.code = code

    def reject(self) -> _Reject:
        return _Reject(_error(self.status, self.detail, self.code), self.code)

    def upstream_error(self) -> UpstreamError:
        return UpstreamError(self.code, self.detail, self.status)


def _timeout() -> _EngineFailure:
    return _EngineFailure(504, "Upstream engine timed out", CODE_UPSTREAM_TIMEOUT)


def _unreachable(detail: str) -> _EngineFailure:
    return _EngineFailure(502, detail, ErrorCode.UPSTREAM_ERROR.value)


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
    content_type: str | None = None


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
    proto: str = "-"

    def emit(self, status: int, code: str | None = None, level: int = logging.INFO) -> None:
        if not logger.isEnabledFor(level):
            return
        ms = (time.perf_counter() - self.started) * 1000.0
        logger.log(
            level,
            "%s %s proto=%s path=%s stream=%s chute=%s status=%d upstream=%s in=%d out=%d "
            "ms=%.1f code=%s",
            self.method,
            self.route,
            self.proto,
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


class _OwnedStream(Response):
    """A streamed answer that owns the upstream response and the concurrency slot: both are
    released whatever happens (clean end, engine break, client hang-up - which also cancels the
    engine request). Subclasses write the body in :meth:`_pump`."""

    def __init__(self, upstream: httpx2.Response, *, slot: _Slot, log: _Log) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_SSE_HEADERS)
        self._upstream = upstream
        self._slot = slot
        self._log = log

    async def _start(self, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        except OSError:
            raise _ClientGone from None

    async def _send(self, send: Send, data: bytes, *, more: bool = True) -> None:
        try:
            await send({"type": "http.response.body", "body": data, "more_body": more})
        except OSError:  # ASGI spec 2.4 servers report a gone client this way
            raise _ClientGone from None
        self._log.bytes_out += len(data)

    async def _pump(self, send: Send) -> str | None:
        """Stream until the engine ends; returns an error code, or None for a clean end."""
        raise NotImplementedError

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


class _SealedStream(_OwnedStream):
    """Engine SSE in, outer v1 SSE out, one record per engine line, nothing buffered."""

    def __init__(
        self,
        upstream: httpx2.Response,
        encoder: StreamEncoder,
        *,
        slot: _Slot,
        log: _Log,
    ) -> None:
        super().__init__(upstream, slot=slot, log=log)
        self._encoder = encoder

    async def _pump(self, send: Send) -> str | None:
        await self._start(send)
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


class _SealedStreamV2(_OwnedStream):
    """Engine SSE in, outer v2 SSE out (spec/v2.md §5.5): init and HEAD, one DATA record per
    engine chunk, then the usage copy and END - with ``error`` when the engine broke off or
    timed out, so the client gets an authenticated failure, never a clean-looking end. If a
    record cannot be sealed the response is aborted (no final chunk: the connection drops and
    the client reports truncation); a record is never skipped."""

    def __init__(
        self,
        upstream: httpx2.Response,
        encoder: StreamEncoderV2,
        *,
        slot: _Slot,
        log: _Log,
    ) -> None:
        super().__init__(upstream, slot=slot, log=log)
        self._encoder = encoder

    async def _pump(self, send: Send) -> str | None:
        await self._start(send)
        upstream = self._upstream
        error: UpstreamError | None = None
        try:
            await self._send(
                send,
                self._encoder.start(upstream.status_code, upstream.headers.get("content-type")),
            )
            try:
                async for chunk in upstream.aiter_bytes():
                    self._log.bytes_in += len(chunk)
                    out = self._encoder.feed(chunk)
                    if out:
                        await self._send(send, out)
            except httpx2.TimeoutException:
                error = _timeout().upstream_error()
            except (httpx2.HTTPError, httpx2.StreamError):
                error = _unreachable("the engine's stream broke").upstream_error()
            tail = self._encoder.finish(error=error)
        except PQE2EEError as exc:
            logger.error("v2 stream aborted: a record could not be sealed (%s)", exc.code.value)
            return exc.code.value
        await self._send(send, tail, more=False)
        return None if error is None else error.type


# --------------------------------------------------------------------------------------------
# The instance


class Instance:
    """State of one running instance: keys, engine client, model cache, concurrency count.

    ``v2_key`` and ``replay_cache`` override the v2 key and the replay cache (tests); a cache
    passed in is neither checked at start nor closed.
    """

    def __init__(
        self,
        config: InstanceConfig,
        *,
        private_key: KEMPrivateKey | None = None,
        v2_key: XWingPrivateKey | None = None,
        replay_cache: ReplayCache | None = None,
    ) -> None:
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
        self._model_chutes: frozenset[str] = frozenset()  # v2: the chutes of those models
        self._models_checked: float | None = None
        self._models_lock = anyio.Lock()
        self._auth: dict[str, str] = (
            {"authorization": f"Bearer {config.upstream_api_key}"}
            if config.upstream_api_key
            else {}
        )
        self.v2: InstanceV2 | None = None
        self.v2_key_source = "off"
        self._owned_cache: RedisReplayCache | None = None
        self._v2_threaded = False
        self._v2_since = time.time()
        if config.v2:
            self._setup_v2(v2_key, replay_cache)

    def _setup_v2(self, key: XWingPrivateKey | None, cache: ReplayCache | None) -> None:
        cfg = self.config
        self.xwing: XWing = _xwing_for(cfg.backend)
        if key is not None:
            self.v2_key_source = "given"
        elif cfg.v2_key_file is not None:
            key, created = load_or_create_xwing_key(cfg.v2_key_file, self.xwing)
            self.v2_key_source = "created" if created else "loaded"
        else:
            key = self.xwing.generate()
            self.v2_key_source = "ephemeral"
        if cache is None:
            if cfg.redis_url:
                cache = self._owned_cache = RedisReplayCache(cfg.redis_url)
            else:
                cache = MemoryReplayCache(cfg.replay_max_entries)
                if self.v2_key_source != "ephemeral":
                    # The key outlives this process but the cache does not: refuse what a
                    # previous process with this key may have admitted (spec/v2.md §4.3).
                    start_ms = int(time.time() * 1000)
                    cache = FloorReplayCache(cache, start_ms + DEFAULT_WINDOW_MS)
        # Anything but the in-memory cache may block (network): open v2 requests off the loop.
        self._v2_threaded = not isinstance(cache, MemoryReplayCache | FloorReplayCache)
        self.v2 = _ServerInstanceV2(
            chute_id=cfg.chute_id,
            own_chutes=lambda: self._model_chutes,
            instance_id=self.instance_id,
            keys=[key],
            aead=self.aead,
            replay_cache=cache,
            max_body=cfg.max_plaintext,
        )
        self._v2_since = time.time()

    @property
    def rotates_v2(self) -> bool:
        """True when the v2 key is generated here (not from a file or given) and so rotates."""
        return self.v2 is not None and self.v2_key_source == "ephemeral"

    def rotate_v2(self) -> None:
        """Make a fresh v2 key current; the current one becomes previous, the previous one is
        erased (its requests now get ``unknown_key``)."""
        if self.v2 is None:
            raise LocalProtocolError("this instance does not serve v2")
        self.v2.rotate(self.xwing.generate())
        self._v2_since = time.time()
        logger.info("v2 key rotated: now sha256:%s", self._v2_fingerprint())

    def _v2_fingerprint(self) -> str:
        assert self.v2 is not None
        return hashlib.sha256(self.v2.public_key).hexdigest()[:16]

    def v2_offer(self, now: float | None = None) -> dict[str, Any] | None:
        """The ``e2e_v2`` discovery object (spec/v2.md §8.1), or None without v2.

        ``not_after`` is when the key is erased: a generated key is current for one lifetime
        and previous for one more. A key from a file is never rotated or erased while the
        process runs; its ``not_after`` rolls forward (now + two lifetimes).
        """
        if self.v2 is None:
            return None
        lifetime = self.config.v2_key_lifetime
        base = self._v2_since if self.rotates_v2 else (time.time() if now is None else now)
        return {
            "v": VERSION,
            "kem_id": XWING_KEM_ID,
            "kdf_id": KDF_ID,
            "aead_id": AEAD_ID,
            "pk": b64encode(self.v2.public_key).decode("ascii"),
            "not_after": int(base + 2 * lifetime),
        }

    async def rotation_loop(self) -> None:
        """Rotate the generated v2 key every ``v2_key_lifetime`` seconds (run in the lifespan)."""
        while True:
            due = self._v2_since + self.config.v2_key_lifetime
            await anyio.sleep(max(0.0, due - time.time()))
            if time.time() >= self._v2_since + self.config.v2_key_lifetime:
                self.rotate_v2()

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
        if self._owned_cache is not None:
            try:
                await anyio.to_thread.run_sync(self._owned_cache.check)
            except ReplayCacheError as exc:
                raise RuntimeError(f"v2 replay cache unavailable: {exc}") from None
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
        if self.v2 is not None:
            logger.info(
                "v2 %s: key %s (sha256:%s), %s, replay cache %s, chute %s",
                "only (v1 refused)" if self.config.v2_only else "on",
                self.v2_key_source,
                self._v2_fingerprint(),
                f"rotated every {self.config.v2_key_lifetime:g} s"
                if self.rotates_v2
                else "not rotated",
                "redis" if self._owned_cache is not None else type(self.v2.replay_cache).__name__,
                self.config.chute_id or "per model",
            )
        else:
            logger.info("v2 off: v1 only")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._owned_cache is not None:
            await anyio.to_thread.run_sync(self._owned_cache.close)

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
                self._model_chutes = frozenset(model_chute_id(m) for m in models)
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
        doc: dict[str, Any] = {
            "instance_id": self.instance_id,
            "e2e_pubkey": self._pubkey_b64,
            "models": models,
            "paths": list(self.config.allow_paths),
            "version": f"pqe2ee/{__version__}",
            "protocols": self.protocols,
        }
        offer = self.v2_offer()
        if offer is not None:
            doc["e2e_v2"] = offer
        return JSONResponse(doc)

    @property
    def protocols(self) -> list[str]:
        if self.v2 is None:
            return ["v1"]
        return ["v2"] if self.config.v2_only else ["v1", "v2"]

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
            if blob[: len(V2_PREFIX)] == V2_PREFIX:
                log.proto = "v2"
                response = await self._invoke_v2(request, path, blob, slot, log)
                if isinstance(response, _OwnedStream):
                    slot = None  # the stream response owns it now and releases it at its end
                return response
            log.proto = "v1"
            if self.config.v2_only:
                raise _Reject(
                    JSONResponse(
                        {
                            "detail": "E2E v1 is disabled on this instance: seal the request "
                            "with wire profile v2 (the e2e_v2 key in discovery)",
                            "code": CODE_V1_DISABLED,
                        },
                        status_code=426,
                        headers={"upgrade": "pqe2ee-v2"},
                    ),
                    CODE_V1_DISABLED,
                )
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
        return self._engine_request(
            path,
            stream=opened.stream,
            obj=opened.body,
            raw=opened.json,
            continuous_usage=self.config.continuous_usage,
        )

    def _engine_request(
        self,
        path: str,
        *,
        stream: bool,
        obj: Mapping[str, Any],
        raw: bytes,
        continuous_usage: bool,
    ) -> httpx2.Request:
        """The engine request: ``raw`` as is, or for streams ``obj`` with usage forced."""
        if stream:
            body = dict(obj)
            options = body.get("stream_options")
            merged: dict[str, Any] = dict(options) if isinstance(options, Mapping) else {}
            merged["include_usage"] = True
            if continuous_usage:
                # Compatibility with the Chutes runtime. Per-chunk usage then travels as plaintext
                # events in front of the records (see InstanceConfig.continuous_usage).
                merged["continuous_usage_stats"] = True
            body["stream_options"] = merged
            payload = msgspec.json.encode(body)
            accept = "text/event-stream"
        else:
            payload = raw
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
        """Send to the engine, cancelled if the client hangs up (``_Reject`` 499). An engine that
        cannot be used raises ``_EngineFailure``."""
        failure: list[_EngineFailure] = []

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
                    _EngineFailure(502, "Upstream response too large", ErrorCode.OVERSIZE.value)
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
            return _Buffered(resp.status_code, body, resp.headers.get("content-type"))

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
        try:
            result = await self._call_upstream(
                request, self._upstream_request(path, opened), stream=False
            )
        except _EngineFailure as failure:
            raise failure.reject() from None
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
        try:
            result = await self._call_upstream(
                request, self._upstream_request(path, opened), stream=True
            )
        except _EngineFailure as failure:
            raise failure.reject() from None
        if isinstance(result, _Buffered):  # engine error: sealed like a non-stream reply
            log.upstream_status = result.status
            return await self._sealed(result.status, result.body, opened, log)
        log.upstream_status = result.response.status_code
        return _SealedStream(result.response, StreamEncoder(sealer), slot=slot, log=log)

    # -- v2 -----------------------------------------------------------------------------------

    def _v2_refusal(self, exc: PQE2EEError) -> _Reject:
        status, body = instance_error_response(exc)
        return _Reject(
            Response(body, status_code=status, media_type="application/json"), exc.code.value
        )

    def _open_v2_sync(
        self, blob: bytes, path: str, stream: bool, relay_nonce: str | None
    ) -> OpenedRequestV2:
        assert self.v2 is not None
        return self.v2.open(
            blob,
            path=path,
            stream=stream,
            now_ms=int(time.time() * 1000),
            relay_nonce=relay_nonce,
        )

    async def _invoke_v2(
        self, request: Request, path: str, blob: bytes, slot: _Slot, log: _Log
    ) -> Response:
        if self.v2 is None:
            # No v2 key here (--no-v2): the client's offer is stale; it rediscovers.
            raise self._v2_refusal(
                RemoteProtocolError("this instance does not serve v2", code=ErrorCode.UNKNOWN_KEY)
            )
        headers = request.headers
        stream = headers.get("x-e2e-stream", "false").strip().lower() == "true"
        log.stream = stream
        nonce = headers.get("x-e2e-nonce")
        try:
            if self._v2_threaded or len(blob) > _THREAD_THRESHOLD:
                opened = await anyio.to_thread.run_sync(
                    self._open_v2_sync, blob, path, stream, nonce
                )
            else:
                opened = self._open_v2_sync(blob, path, stream, nonce)
        except PQE2EEError as exc:
            raise self._v2_refusal(exc) from None
        except ReplayCacheError:
            raise _Reject(
                _error(503, "Replay cache unavailable, try again later", CODE_REPLAY_CACHE_DOWN),
                CODE_REPLAY_CACHE_DOWN,
            ) from None
        h = opened.header
        log.chute = h.chute_id
        delivered = headers.get("x-chute-id")
        if delivered is not None and delivered.strip().lower() != h.chute_id:
            # The relay routed (and spent its nonce) for another chute than the client sealed.
            raise self._v2_refusal(
                RemoteProtocolError("X-Chute-Id does not match", code=ErrorCode.CONTEXT_MISMATCH)
            )
        try:
            sealer = ResponseSealer.for_request(opened, xwing=self.xwing, aead=self.aead)
        except PQE2EEError as exc:  # the client's response key cannot be encapsulated to
            raise self._v2_refusal(exc) from None
        upstream_request = self._engine_request(
            h.path, stream=h.stream, obj=opened.json, raw=opened.body, continuous_usage=False
        )
        if h.stream:
            return await self._stream_v2(request, upstream_request, sealer, slot, log)
        return await self._unary_v2(request, upstream_request, sealer, log)

    async def _unary_v2(
        self,
        request: Request,
        upstream_request: httpx2.Request,
        sealer: ResponseSealer,
        log: _Log,
    ) -> Response:
        failed: UpstreamError | None = None
        try:
            result = await self._call_upstream(request, upstream_request, stream=False)
        except _EngineFailure as failure:
            status, body, ctype, failed = failure.status, b"", None, failure.upstream_error()
            code: str | None = failure.code
        else:
            assert isinstance(result, _Buffered)
            status, body, ctype = result.status, result.body, result.content_type
            log.upstream_status = status
            code = None if 200 <= status < 300 else ErrorCode.UPSTREAM_ERROR.value

        def seal() -> bytes:
            usage, error = (None, failed) if failed is not None else _engine_outcome(status, body)
            return seal_response_v2(
                sealer, status=status, body=body, content_type=ctype, usage=usage, error=error
            )

        try:
            blob = await anyio.to_thread.run_sync(seal) if len(body) > _THREAD_THRESHOLD else seal()
        except PQE2EEError as exc:
            raise _Reject(
                _error(500, "E2E encryption failed", exc.code.value), exc.code.value
            ) from None
        log.bytes_out = len(blob)
        log.emit(200, code)
        # HTTP 200 whatever the engine said: its status is in the authenticated HEAD record.
        return Response(blob, status_code=200, media_type="application/octet-stream")

    async def _stream_v2(
        self,
        request: Request,
        upstream_request: httpx2.Request,
        sealer: ResponseSealer,
        slot: _Slot,
        log: _Log,
    ) -> Response:
        encoder = StreamEncoderV2(sealer)
        big = False
        try:
            result = await self._call_upstream(request, upstream_request, stream=True)
        except _EngineFailure as failure:
            code, failed = failure.code, failure.upstream_error()

            def events() -> bytes:
                return encoder.start(failed.status or 502, None) + encoder.finish(error=failed)

        else:
            if isinstance(result, _Streaming):
                log.upstream_status = result.response.status_code
                return _SealedStreamV2(result.response, encoder, slot=slot, log=log)
            # The engine refused with a (buffered) error body: HEAD with its status, the body
            # as DATA, END with the error.
            buffered = result
            log.upstream_status = buffered.status
            code = ErrorCode.UPSTREAM_ERROR.value
            big = len(buffered.body) > _THREAD_THRESHOLD

            def events() -> bytes:
                _, error = _engine_outcome(buffered.status, buffered.body)
                return b"".join(
                    (
                        encoder.start(buffered.status, buffered.content_type),
                        encoder.feed(buffered.body),
                        encoder.finish(error=error),
                    )
                )

        try:
            content = await anyio.to_thread.run_sync(events) if big else events()
        except PQE2EEError as exc:
            raise _Reject(
                _error(500, "E2E encryption failed", exc.code.value), exc.code.value
            ) from None
        log.bytes_out = len(content)
        log.emit(200, code)
        return Response(content, status_code=200, headers=dict(_SSE_TEXT_HEADERS))


def _engine_outcome(status: int, body: bytes) -> tuple[dict[str, Any] | None, UpstreamError | None]:
    """``(usage, error)`` for END from a buffered engine answer.

    usage: the body's ``usage`` object (2xx). error (non-2xx): type and message from the
    OpenAI shape ``{"error": {"type", "message"}}`` or vLLM's flat ``{"object": "error",
    "type", "message"}``, else ``upstream_error``; the whole body is in DATA either way.
    """
    try:
        doc = msgspec.json.decode(body) if body[:1] == b"{" else None
    except (msgspec.DecodeError, UnicodeDecodeError):
        doc = None
    if 200 <= status < 300:
        usage = doc.get("usage") if isinstance(doc, dict) else None
        return (usage if isinstance(usage, dict) else None), None
    err_type, message = ErrorCode.UPSTREAM_ERROR.value, f"the engine answered {status}"
    if isinstance(doc, dict):
        inner = doc.get("error")
        source = inner if isinstance(inner, dict) else doc
        if isinstance(source.get("type"), str) and source["type"]:
            err_type = source["type"][:128]
        if isinstance(source.get("message"), str) and source["message"]:
            message = source["message"][:_V2_ERROR_MESSAGE_MAX]
    return None, UpstreamError(err_type, message, status)


def _xwing_for(backend: str) -> XWing:
    """The X-Wing backend named like the KEM backend when there is one, else the default."""
    try:
        return get_xwing(backend)
    except BackendError:
        return get_xwing("auto")


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


def create_app(
    config: InstanceConfig,
    *,
    private_key: KEMPrivateKey | None = None,
    v2_key: XWingPrivateKey | None = None,
    replay_cache: ReplayCache | None = None,
) -> Starlette:
    """The instance as an ASGI app. The keys are loaded (or created) here, before serving.

    ``private_key`` / ``v2_key`` override the v1 / v2 key (tests); otherwise ``config.key_file``
    / ``config.v2_key_file`` or fresh keys. ``replay_cache`` overrides the v2 replay cache.
    Raises :class:`~pqe2ee.server.keyfile.KeyFileError` / :class:`~pqe2ee.errors.BackendError`
    for a bad key file or backend. The lifespan checks a Redis replay cache (start-up fails
    when it does not answer) and rotates a generated v2 key. ``app.state.instance`` is the
    :class:`Instance`.
    """
    instance = Instance(config, private_key=private_key, v2_key=v2_key, replay_cache=replay_cache)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await instance.startup()
        try:
            async with anyio.create_task_group() as tg:
                if instance.rotates_v2:
                    tg.start_soon(instance.rotation_loop)
                yield
                tg.cancel_scope.cancel()
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
