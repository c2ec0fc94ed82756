"""The E2EE transport for httpx2.

Written once, as async code; ``scripts/unasync.py`` generates the blocking twin and the
legacy-httpx pair from it. Edit only the async httpx2 source and run
``python scripts/unasync.py``. Public names live in :mod:`pqe2ee.transports.httpx2`.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Collection

import httpx2

from pqe2ee.backends.base import KEMPrivateKey
from pqe2ee.errors import (
    ErrorCode,
    LimitExceeded,
    LocalProtocolError,
    PQE2EEError,
    RelayError,
    StreamError,
)
from pqe2ee.protocol.client import (
    DEFAULT_E2E_PATHS,
    INVOKE_PATH,
    MODELS_PATH,
    RETRYABLE,
    ClientLimits,
    ClientState,
    classify_discovery_error,
    classify_invoke_error,
    discovery_path,
    e2e_model,
    invoke_headers,
    is_sealed_error,
)
from pqe2ee.protocol.discovery import Lease, looks_like_uuid
from pqe2ee.protocol.envelope import open_response, seal_request
from pqe2ee.protocol.stream import (
    NEED_DATA,
    Done,
    EndOfStream,
    InnerEvent,
    RemoteErrorEvent,
    StreamDecryptor,
    Usage,
)
from pqe2ee.transports._common import (
    DEFAULT_API_BASE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MODELS_BASE,
    DEFAULT_TIMEOUT,
    MAX_BLOB,
    MAX_DOC,
    MAX_ERROR_BODY,
    OnUsage,
    RetriesExhausted,
    Settings,
    bearer_token,
    make_settings,
    remote_error,
)
from pqe2ee.transports._httpx2_common import (
    as_stream_error,
    json_response,
    map_inner_exceptions,
    passthrough_response,
    stream_response_headers,
)
from pqe2ee.transports._keypool import DEFAULT_KEY_POOL_SIZE, KeyPool
from pqe2ee.transports._primitives import AsyncLock, AsyncShieldCancellation, async_sleep

__all__ = ["AsyncE2EETransport"]

log = logging.getLogger("pqe2ee.transports")


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


async def _read_bounded(response: httpx2.Response, limit: int) -> bytes:
    """The whole (decoded) body, refusing more than ``limit`` bytes; always closes."""
    chunks: list[bytes] = []
    total = 0
    try:
        with map_inner_exceptions("read"):
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > limit:
                    raise LimitExceeded(f"relay answer is larger than {limit} bytes")
                chunks.append(chunk)
    finally:
        with AsyncShieldCancellation():
            await response.aclose()
    return b"".join(chunks)


class AsyncDecryptingStream(httpx2.AsyncByteStream):
    """The body of a streamed E2EE answer: decrypts the relay's outer stream lazily and yields
    the engine's own SSE bytes (events reassembled from records, nothing re-serialised).

    Plaintext usage events go to ``on_usage`` and never into the stream. Any failure - a bad
    record, a reported remote error, a connection lost, EOF before the inner ``[DONE]`` - is
    raised as an :class:`~pqe2ee.transports.httpx2.E2EEStreamError`.
    """

    def __init__(
        self,
        upstream: httpx2.Response,
        key: KEMPrivateKey,
        settings: Settings,
        request: httpx2.Request,
    ) -> None:
        self._upstream = upstream
        self._key = key
        self._decryptor = StreamDecryptor(key, aead=settings.aead)
        self._on_usage = settings.on_usage
        self._request = request
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            try:
                with map_inner_exceptions("read"):
                    async for chunk in self._upstream.aiter_bytes():
                        self._decryptor.receive_data(chunk)
                        out = self._drain()
                        if out:
                            yield out
                self._decryptor.receive_eof()
                out = self._drain()
                if out:
                    yield out
            except PQE2EEError as exc:
                raise as_stream_error(exc, self._request) from exc
            except httpx2.TimeoutException:
                raise
            except httpx2.TransportError as exc:
                lost = StreamError(
                    "the connection to the relay broke mid-stream",
                    code=ErrorCode.CONNECTION_LOST,
                )
                raise as_stream_error(lost, self._request) from exc
        finally:
            await self.aclose()

    def _drain(self) -> bytes:
        out: list[bytes] = []
        while True:
            event = self._decryptor.next_event()
            if event is NEED_DATA or isinstance(event, EndOfStream):
                return b"".join(out)
            if isinstance(event, InnerEvent | Done):
                out.append(event.raw)
            elif isinstance(event, Usage):
                if self._on_usage is not None:
                    self._on_usage(event.usage)
            elif isinstance(event, RemoteErrorEvent):
                raise remote_error(event.error)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._key.wipe()
        with AsyncShieldCancellation():
            await self._upstream.aclose()


class AsyncE2EETransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport that end-to-end encrypts inference requests (Chutes E2EE v1).

    Use it as ``httpx2.AsyncClient(transport=AsyncE2EETransport(api_key=...))``, e.g. as the
    ``http_client`` of ``openai.AsyncOpenAI``.

    What is encrypted: a ``POST`` to one of ``e2e_paths`` (default ``/v1/chat/completions`` and
    ``/v1/completions``) whose JSON body has a string ``model``. It is sealed to an instance of
    the model's chute (found via ``{models_base}/v1/models`` and
    ``{api_base}/e2e/instances/{chute_id}``) and sent to ``{api_base}/e2e/invoke``; the answer
    is decrypted before the caller sees it. A model that is a chute UUID is used as is.

    Everything else - other paths, other methods, bodies without ``model`` - goes in
    **plaintext** to ``models_base`` (same path and query, the request's own headers), e.g.
    ``GET /v1/models``. With ``strict=True`` such requests are refused instead
    (``LocalProtocolError``, code ``plaintext_refused``) and nothing leaves in plaintext except
    the transport's own model listing and discovery calls (which carry no user data).

    Answers:

    * non-stream 200: the engine's JSON bytes exactly as produced (``application/json``);
    * an engine error sealed by the instance: the engine's status and decrypted body, so SDKs
      raise their usual status errors with the engine's message;
    * stream 200: a lazily decrypted ``text/event-stream`` of the engine's SSE bytes; usage
      events outside the encryption go to ``on_usage(usage)`` (unauthenticated: for display
      only), never into the stream; failures mid-stream raise ``E2EEStreamError``;
    * other relay answers: nonce rejected, instance gone (410), busy (429) or needing key
      exchange (502) are retried on a fresh nonce / another instance, up to ``max_attempts``
      in all (then ``RetriesExhausted``, code ``retries_exhausted``); a refused path (403)
      raises ``RelayError`` (``path_forbidden``); any other status is handed over unchanged.

    Errors before any byte reaches the caller are typed pqe2ee errors (``model_not_found``,
    ``no_instances``, ``discovery_rate_limited``, ``discovery_failed``, ...); connection
    problems with the relay are httpx2's own exceptions. Discovery keeps to ``limits`` (10 per
    minute by default), waiting for a slot at most ``timeout`` seconds, which also bounds each
    discovery call. Every request seals its answer to a fresh one-use ML-KEM-768 key.

    ``api_key`` authenticates discovery and invocation; ``None`` takes each request's own
    ``Authorization: Bearer`` token. ``inner`` is the transport used to reach the relay
    (default ``httpx2.AsyncHTTPTransport()``); it is closed with this one.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_base: str = DEFAULT_API_BASE,
        models_base: str = DEFAULT_MODELS_BASE,
        backend: str = "auto",
        e2e_paths: Collection[str] = DEFAULT_E2E_PATHS,
        strict: bool = False,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        timeout: float = DEFAULT_TIMEOUT,
        on_usage: OnUsage | None = None,
        inner: httpx2.AsyncBaseTransport | None = None,
        limits: ClientLimits | None = None,
        key_pool_size: int = DEFAULT_KEY_POOL_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = make_settings(
            api_key=api_key,
            api_base=api_base,
            models_base=models_base,
            backend=backend,
            e2e_paths=e2e_paths,
            strict=strict,
            max_attempts=max_attempts,
            timeout=timeout,
            on_usage=on_usage,
            limits=limits,
            key_pool_size=key_pool_size,
        )
        self._inner = inner if inner is not None else httpx2.AsyncHTTPTransport()
        self._clock = clock
        self.state = ClientState(self._settings.limits)
        self.keys: KeyPool = self._settings.new_key_pool()
        weakref.finalize(self, self.keys.close)
        self._guard = threading.Lock()  # only around the dict of per-chute locks
        self._chute_locks: dict[str, AsyncLock] = {}
        self._models_lock = AsyncLock()
        self._closed = False

    @property
    def settings(self) -> Settings:
        return self._settings

    # -- httpx2 transport API -------------------------------------------------------------------

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if self._closed:
            raise LocalProtocolError(
                "the E2EE transport is closed", code=ErrorCode.INVALID_ARGUMENT
            )
        model: str | None = None
        if request.method == "POST" and request.url.path in self._settings.e2e_paths:
            body = await request.aread()
            model = e2e_model(request.method, request.url.path, body, self._settings.e2e_paths)
            if model is not None:
                return await self._encrypted(request, model, body)
        return await self._plaintext(request)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.keys.close()
        await self._inner.aclose()

    # -- plaintext ------------------------------------------------------------------------------

    async def _plaintext(self, request: httpx2.Request) -> httpx2.Response:
        if self._settings.strict:
            raise LocalProtocolError(
                f"strict mode: refusing to send {request.method} {request.url.path} in plaintext",
                code=ErrorCode.PLAINTEXT_REFUSED,
            )
        url = httpx2.URL(self._settings.models_base + request.url.raw_path.decode("ascii"))
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"host"]
        headers.insert(0, (b"Host", url.netloc))
        forwarded = httpx2.Request(
            request.method,
            url,
            headers=headers,
            stream=request.stream,
            extensions=request.extensions,
        )
        with map_inner_exceptions("connect"):
            return await self._inner.handle_async_request(forwarded)

    # -- encrypted ------------------------------------------------------------------------------

    async def _encrypted(self, request: httpx2.Request, model: str, body: bytes) -> httpx2.Response:
        s = self._settings
        deadline = self._clock() + s.timeout
        auth = s.api_key or bearer_token(request.headers.get("authorization"))
        chute = await self._resolve_chute(model, auth)
        path = request.url.path
        last: RelayError | None = None
        for attempt in range(1, s.max_attempts + 1):
            try:
                lease = await self._lease(chute, auth, deadline)
            except RelayError as exc:
                if last is not None and exc.code is ErrorCode.NO_INSTANCES:
                    raise RetriesExhausted(last, attempt - 1) from last
                raise
            key = self.keys.take()
            try:
                sealed = seal_request(
                    body, lease.public_key, response_key=key, kem=s.kem, aead=s.aead
                )
                invoke = httpx2.Request(
                    "POST",
                    s.api_base + INVOKE_PATH,
                    headers=invoke_headers(auth, lease, sealed, path),
                    content=sealed.blob,
                    extensions=request.extensions,
                )
                with map_inner_exceptions("connect"):
                    upstream = await self._inner.handle_async_request(invoke)
            except BaseException:
                key.wipe()
                raise
            if upstream.status_code == 200 and sealed.stream:
                stream = AsyncDecryptingStream(upstream, key, s, request)
                return httpx2.Response(
                    200, headers=stream_response_headers(), stream=stream, request=request
                )
            try:
                status = upstream.status_code
                content_type = upstream.headers.get("content-type")
                maybe_sealed = (
                    status == 200 or _media_type(content_type) == "application/octet-stream"
                )
                data = await _read_bounded(upstream, MAX_BLOB if maybe_sealed else MAX_ERROR_BODY)
                if status == 200 or is_sealed_error(status, content_type, data):
                    return json_response(status, open_response(data, key, aead=s.aead), request)
            finally:
                key.wipe()
            error = classify_invoke_error(status, data)
            self.state.report(lease, error, self._clock())
            if error.code in RETRYABLE:
                last = error
                log.debug("relay answered %s (%s); attempt %d", status, error.code.value, attempt)
                continue
            if error.code is ErrorCode.PATH_FORBIDDEN:
                raise error
            return passthrough_response(upstream, data, request)
        assert last is not None
        raise RetriesExhausted(last, s.max_attempts) from last

    # -- models ---------------------------------------------------------------------------------

    async def _resolve_chute(self, model: str, auth: str | None) -> str:
        if looks_like_uuid(model):
            return model
        now = self._clock()
        chute = self.state.resolve_chute(model, now)
        if chute is not None and not self.state.models_stale(now):
            return chute
        generation = self.state.models_generation
        async with self._models_lock:
            # Whoever missed while another refresh ran shares that refresh.
            if self.state.models_generation == generation:
                try:
                    await self._fetch_models(auth)
                except (PQE2EEError, httpx2.HTTPError):
                    if chute is None:
                        raise
                    log.debug("model listing refresh failed; using the cached mapping")
        chute = self.state.resolve_chute(model, self._clock())
        if chute is None:
            raise RelayError(
                f"model {model[:100]!r} is not listed at {self._settings.models_base}{MODELS_PATH}",
                code=ErrorCode.MODEL_NOT_FOUND,
                status=404,
            )
        return chute

    async def _fetch_models(self, auth: str | None) -> None:
        status, data = await self._get(self._settings.models_base + MODELS_PATH, auth)
        if status != 200:
            raise RelayError(
                f"model listing answered {status}", code=ErrorCode.DISCOVERY_FAILED, status=status
            )
        self.state.update_models(data, self._clock())

    # -- leases and discovery -------------------------------------------------------------------

    def _chute_lock(self, chute: str) -> AsyncLock:
        with self._guard:
            lock = self._chute_locks.get(chute)
            if lock is None:
                lock = self._chute_locks[chute] = AsyncLock()
            return lock

    async def _lease(self, chute: str, auth: str | None, deadline: float) -> Lease:
        now = self._clock()
        lease = self.state.lease(chute, now)
        if lease is not None:
            if self.state.needs_discovery(chute, now):
                await self._prefetch(chute, auth)
            return lease
        async with self._chute_lock(chute):
            # One discovery per chute at a time; whoever waited uses its result.
            lease = self.state.lease(chute, self._clock())
            if lease is None:
                await self._discover(chute, auth, deadline)
                lease = self.state.lease(chute, self._clock())
        if lease is None:
            raise RelayError(
                "no usable instance (all gone, busy or out of nonces)",
                code=ErrorCode.NO_INSTANCES,
            )
        return lease

    async def _prefetch(self, chute: str, auth: str | None) -> None:
        """Refresh a pool that runs low or nears expiry - only if no discovery is in flight
        and the rate limit allows one right now (a prefetch never waits)."""
        lock = self._chute_lock(chute)
        if not lock.try_acquire():
            return
        try:
            now = self._clock()
            if not self.state.needs_discovery(chute, now):
                return
            if self.state.try_record_discovery(now) > 0:
                return
            try:
                await self._discover_now(chute, auth)
            except (PQE2EEError, httpx2.HTTPError) as exc:
                log.debug("discovery prefetch failed: %s", type(exc).__name__)
        finally:
            lock.release()

    async def _discover(self, chute: str, auth: str | None, deadline: float) -> None:
        while True:
            now = self._clock()
            wait = self.state.try_record_discovery(now)
            if wait <= 0:
                break
            if now + wait > deadline:
                lim = self._settings.limits
                raise RelayError(
                    f"discovery limit of {lim.discovery_per_window} per "
                    f"{lim.discovery_window:g}s reached; the next slot is {wait:.1f}s away, "
                    f"past the {self._settings.timeout:g}s timeout",
                    code=ErrorCode.DISCOVERY_RATE_LIMITED,
                )
            await async_sleep(wait)
        await self._discover_now(chute, auth)

    async def _discover_now(self, chute: str, auth: str | None) -> None:
        sent_at = self._clock()
        status, data = await self._get(self._settings.api_base + discovery_path(chute), auth)
        if status != 200:
            raise classify_discovery_error(status, data)
        if self.state.load_discovery(chute, data, sent_at) == 0:
            raise RelayError("discovery listed no usable instance", code=ErrorCode.NO_INSTANCES)

    async def _get(self, url: str, auth: str | None) -> tuple[int, bytes]:
        headers = [("Accept", "application/json")]
        if auth:
            headers.append(("Authorization", f"Bearer {auth}"))
        request = httpx2.Request(
            "GET", url, headers=headers, extensions={"timeout": self._settings.timeout_extension}
        )
        with map_inner_exceptions("connect"):
            response = await self._inner.handle_async_request(request)
        status = response.status_code
        return status, await _read_bounded(response, MAX_DOC if status == 200 else MAX_ERROR_BODY)
