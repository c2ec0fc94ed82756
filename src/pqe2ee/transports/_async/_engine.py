"""The request orchestration every transport shares, behind a tiny network port.

Written once, as async code; ``scripts/unasync.py`` generates the blocking twin
(``_sync/_engine.py``). No HTTP library is imported here: a transport hands the engine an
:class:`AsyncPort` that can send one request and return an :class:`AsyncPortResponse`
(status, raw headers, a lazy body, close), and gets back an :data:`Outcome`:

* :class:`Opened` - the decrypted body of a non-stream answer (a 200, or an engine error sealed
  by the instance), with the engine's status;
* :class:`Streaming` - a 200 stream: an :class:`AsyncPlainStream` that yields the engine's own
  SSE bytes (or its events) and raises typed pqe2ee errors on any fault;
* :class:`RelayAnswer` - a plaintext relay answer that is not retried and not an error the
  engine raises itself (e.g. 401, 500), already read, with its classification.

What the engine does, for one request: resolve model -> chute (``/v1/models``, cached; a UUID is
a chute id), lease a nonce (one discovery per chute at a time, within the client's discovery
rate limit, prefetching when the pool runs low), seal the body to the instance with a fresh
one-use response key, ``POST /e2e/invoke``, classify the answer and retry a refused nonce / gone,
busy or key-exchange instance on a fresh lease up to ``max_attempts`` in all.

Network exceptions are the port's own and pass through unchanged, except mid-stream, where the
port's ``lost_errors`` (other than ``timeout_errors``) become ``StreamError(connection_lost)``.
Each transport maps exceptions to its library's types at its own boundary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

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
    INVOKE_PATH,
    MODELS_PATH,
    RETRYABLE,
    ClientState,
    classify_discovery_error,
    classify_invoke_error,
    discovery_path,
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
    MAX_BLOB,
    MAX_DOC,
    MAX_ERROR_BODY,
    OnUsage,
    RawHeaders,
    RetriesExhausted,
    Settings,
    header_value,
    remote_error,
)
from pqe2ee.transports._keypool import KeyPool
from pqe2ee.transports._primitives import AsyncLock, AsyncShieldCancellation, async_sleep

__all__ = [
    "AsyncEngine",
    "AsyncPlainStream",
    "AsyncPort",
    "AsyncPortResponse",
    "Opened",
    "Outcome",
    "RelayAnswer",
    "Streaming",
    "plaintext_refused",
]

log = logging.getLogger("pqe2ee.transports")


# -- the port --------------------------------------------------------------------------------------


class AsyncPortResponse(Protocol):
    """One answer from the network: status line and headers read, body not yet."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> RawHeaders: ...

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The (content-decoded) body, lazily; may be iterated once."""
        ...

    async def aclose(self) -> None:
        """Release the connection; idempotent."""
        ...


class AsyncPort(Protocol):
    """How the engine reaches the relay. ``control`` is True for the engine's own calls (model
    listing, discovery: bounded by the transport's ``timeout``) and False for the invoke (the
    caller's own timeouts, if the library has any)."""

    #: What :meth:`send` and reading a body may raise when the exchange fails (network,
    #: timeouts, the library's own errors): a failed prefetch or model refresh is forgiven.
    network_errors: tuple[type[BaseException], ...]
    #: Raised mid-stream when the connection broke: they become ``connection_lost``.
    lost_errors: tuple[type[BaseException], ...]
    #: Raised mid-stream on a timeout: they pass unchanged (a timeout is not a broken stream).
    timeout_errors: tuple[type[BaseException], ...]

    async def send(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        control: bool,
    ) -> AsyncPortResponse: ...


# -- outcomes --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Opened:
    """A decrypted non-stream answer: the engine's JSON bytes exactly as produced, with the
    engine's status (200, or the status of an engine error sealed by the instance)."""

    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Streaming:
    """A 200 stream: read it (and close it) through ``stream``."""

    stream: AsyncPlainStream


@dataclass(frozen=True, slots=True)
class RelayAnswer:
    """A plaintext relay answer handed over as it was (already read): ``error`` says what it
    means (``relay_error`` for statuses the engine does not know)."""

    status: int
    headers: RawHeaders
    body: bytes
    error: RelayError


Outcome = Opened | Streaming | RelayAnswer


def plaintext_refused(method: str, path: str) -> LocalProtocolError:
    return LocalProtocolError(
        f"strict mode: refusing to send {method} {path} in plaintext",
        code=ErrorCode.PLAINTEXT_REFUSED,
    )


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


async def _read_bounded(response: AsyncPortResponse, limit: int) -> bytes:
    """The whole body, refusing more than ``limit`` bytes; always closes."""
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > limit:
                raise LimitExceeded(f"relay answer is larger than {limit} bytes")
            chunks.append(chunk)
    finally:
        with AsyncShieldCancellation():
            await response.aclose()
    return b"".join(chunks)


# -- the decrypted stream --------------------------------------------------------------------------


class AsyncPlainStream:
    """The body of a streamed E2EE answer: decrypts the relay's outer stream lazily.

    Iterate it for the engine's own SSE bytes (events reassembled from records, nothing
    re-serialised), or :meth:`aiter_events` for the inner events themselves (the last one is
    the authenticated :class:`~pqe2ee.protocol.stream.Done`). Plaintext usage events go to
    ``on_usage`` and never into the stream. Any failure - a bad record, a reported remote
    error, a connection lost, EOF before the inner ``[DONE]`` - raises a typed pqe2ee error
    (a timeout raises the port's own timeout error). One iteration only; closing (also done
    when iteration ends, however it ends) wipes the response key and releases the connection.
    """

    def __init__(
        self,
        upstream: AsyncPortResponse,
        key: KEMPrivateKey,
        settings: Settings,
        *,
        lost_errors: tuple[type[BaseException], ...] = (),
        timeout_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._upstream = upstream
        self._key = key
        self._decryptor = StreamDecryptor(key, aead=settings.aead)
        self._on_usage: OnUsage | None = settings.on_usage
        self._lost = lost_errors
        self._timeout = timeout_errors
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for batch in self._batches():
            out = b"".join(event.raw for event in batch)
            if out:
                yield out

    async def aiter_events(self) -> AsyncIterator[InnerEvent | Done]:
        """The inner events one by one, ending after the authenticated ``Done``."""
        async for batch in self._batches():
            for event in batch:
                yield event

    async def _batches(self) -> AsyncIterator[list[InnerEvent | Done]]:
        try:
            try:
                async for chunk in self._upstream.aiter_bytes():
                    self._decryptor.receive_data(chunk)
                    batch = self._drain()
                    if batch:
                        yield batch
                self._decryptor.receive_eof()
                batch = self._drain()
                if batch:
                    yield batch
            except self._timeout:
                raise
            except self._lost as exc:  # checked before pqe2ee errors: a port may raise ours
                raise StreamError(
                    "the connection to the relay broke mid-stream",
                    code=ErrorCode.CONNECTION_LOST,
                ) from exc
        finally:
            await self.aclose()

    def _drain(self) -> list[InnerEvent | Done]:
        out: list[InnerEvent | Done] = []
        while True:
            event = self._decryptor.next_event()
            if event is NEED_DATA or isinstance(event, EndOfStream):
                return out
            if isinstance(event, InnerEvent | Done):
                out.append(event)
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


# -- the engine ------------------------------------------------------------------------------------


class AsyncEngine:
    """Model map, nonce pools, key pool and the invoke loop of one transport (thread-safe for
    the sync twin; task-safe for this one)."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.state = ClientState(settings.limits)
        self.keys: KeyPool = settings.new_key_pool()
        self._guard = threading.Lock()  # only around the dict of per-chute locks
        self._chute_locks: dict[str, AsyncLock] = {}
        self._models_lock = AsyncLock()

    def close_keys(self) -> None:
        """Stop the key pool's thread and wipe the keys still pooled (no I/O)."""
        self.keys.close()

    # -- invoke ---------------------------------------------------------------------------------

    async def invoke(
        self, port: AsyncPort, *, path: str, body: bytes, model: str, auth: str | None
    ) -> Outcome:
        """Send ``body`` (a JSON object naming ``model``) for ``path`` end-to-end encrypted."""
        s = self.settings
        deadline = self.clock() + s.timeout
        chute = await self._resolve_chute(port, model, auth)
        last: RelayError | None = None
        for attempt in range(1, s.max_attempts + 1):
            try:
                lease = await self._lease(port, chute, auth, deadline)
            except RelayError as exc:
                if last is not None and exc.code is ErrorCode.NO_INSTANCES:
                    raise RetriesExhausted(last, attempt - 1) from last
                raise
            key = self.keys.take()
            try:
                sealed = seal_request(
                    body, lease.public_key, response_key=key, kem=s.kem, aead=s.aead
                )
                upstream = await port.send(
                    "POST",
                    s.api_base + INVOKE_PATH,
                    invoke_headers(auth, lease, sealed, path),
                    sealed.blob,
                    control=False,
                )
            except BaseException:
                key.wipe()
                raise
            status = upstream.status
            if status == 200 and sealed.stream:
                stream = AsyncPlainStream(
                    upstream,
                    key,
                    s,
                    lost_errors=port.lost_errors,
                    timeout_errors=port.timeout_errors,
                )
                return Streaming(stream)
            try:
                content_type = header_value(upstream.headers, b"content-type")
                maybe_sealed = (
                    status == 200 or _media_type(content_type) == "application/octet-stream"
                )
                data = await _read_bounded(upstream, MAX_BLOB if maybe_sealed else MAX_ERROR_BODY)
                if status == 200 or is_sealed_error(status, content_type, data):
                    return Opened(status, open_response(data, key, aead=s.aead))
            finally:
                key.wipe()
            error = classify_invoke_error(status, data)
            self.state.report(lease, error, self.clock())
            if error.code in RETRYABLE:
                last = error
                log.debug("relay answered %s (%s); attempt %d", status, error.code.value, attempt)
                continue
            if error.code is ErrorCode.PATH_FORBIDDEN:
                raise error
            return RelayAnswer(status, upstream.headers, data, error)
        assert last is not None
        raise RetriesExhausted(last, s.max_attempts) from last

    # -- models ---------------------------------------------------------------------------------

    async def _resolve_chute(self, port: AsyncPort, model: str, auth: str | None) -> str:
        if looks_like_uuid(model):
            return model
        now = self.clock()
        chute = self.state.resolve_chute(model, now)
        if chute is not None and not self.state.models_stale(now):
            return chute
        generation = self.state.models_generation
        forgiven: tuple[type[BaseException], ...] = (PQE2EEError, *port.network_errors)
        async with self._models_lock:
            # Whoever missed while another refresh ran shares that refresh.
            if self.state.models_generation == generation:
                try:
                    await self._fetch_models(port, auth)
                except forgiven:
                    if chute is None:
                        raise
                    log.debug("model listing refresh failed; using the cached mapping")
        chute = self.state.resolve_chute(model, self.clock())
        if chute is None:
            raise RelayError(
                f"model {model[:100]!r} is not listed at {self.settings.models_base}{MODELS_PATH}",
                code=ErrorCode.MODEL_NOT_FOUND,
                status=404,
            )
        return chute

    async def _fetch_models(self, port: AsyncPort, auth: str | None) -> None:
        status, data = await self._get(port, self.settings.models_base + MODELS_PATH, auth)
        if status != 200:
            raise RelayError(
                f"model listing answered {status}", code=ErrorCode.DISCOVERY_FAILED, status=status
            )
        self.state.update_models(data, self.clock())

    # -- leases and discovery -------------------------------------------------------------------

    def _chute_lock(self, chute: str) -> AsyncLock:
        with self._guard:
            lock = self._chute_locks.get(chute)
            if lock is None:
                lock = self._chute_locks[chute] = AsyncLock()
            return lock

    async def _lease(self, port: AsyncPort, chute: str, auth: str | None, deadline: float) -> Lease:
        now = self.clock()
        lease = self.state.lease(chute, now)
        if lease is not None:
            if self.state.needs_discovery(chute, now):
                await self._prefetch(port, chute, auth)
            return lease
        async with self._chute_lock(chute):
            # One discovery per chute at a time; whoever waited uses its result.
            lease = self.state.lease(chute, self.clock())
            if lease is None:
                await self._discover(port, chute, auth, deadline)
                lease = self.state.lease(chute, self.clock())
        if lease is None:
            raise RelayError(
                "no usable instance (all gone, busy or out of nonces)",
                code=ErrorCode.NO_INSTANCES,
            )
        return lease

    async def _prefetch(self, port: AsyncPort, chute: str, auth: str | None) -> None:
        """Refresh a pool that runs low or nears expiry - only if no discovery is in flight
        and the rate limit allows one right now (a prefetch never waits)."""
        lock = self._chute_lock(chute)
        if not lock.try_acquire():
            return
        try:
            now = self.clock()
            if not self.state.needs_discovery(chute, now):
                return
            if self.state.try_record_discovery(now) > 0:
                return
            forgiven: tuple[type[BaseException], ...] = (PQE2EEError, *port.network_errors)
            try:
                await self._discover_now(port, chute, auth)
            except forgiven as exc:
                log.debug("discovery prefetch failed: %s", type(exc).__name__)
        finally:
            lock.release()

    async def _discover(
        self, port: AsyncPort, chute: str, auth: str | None, deadline: float
    ) -> None:
        while True:
            now = self.clock()
            wait = self.state.try_record_discovery(now)
            if wait <= 0:
                break
            if now + wait > deadline:
                lim = self.settings.limits
                raise RelayError(
                    f"discovery limit of {lim.discovery_per_window} per "
                    f"{lim.discovery_window:g}s reached; the next slot is {wait:.1f}s away, "
                    f"past the {self.settings.timeout:g}s timeout",
                    code=ErrorCode.DISCOVERY_RATE_LIMITED,
                )
            await async_sleep(wait)
        await self._discover_now(port, chute, auth)

    async def _discover_now(self, port: AsyncPort, chute: str, auth: str | None) -> None:
        sent_at = self.clock()
        status, data = await self._get(port, self.settings.api_base + discovery_path(chute), auth)
        if status != 200:
            raise classify_discovery_error(status, data)
        if self.state.load_discovery(chute, data, sent_at) == 0:
            raise RelayError("discovery listed no usable instance", code=ErrorCode.NO_INSTANCES)

    async def _get(self, port: AsyncPort, url: str, auth: str | None) -> tuple[int, bytes]:
        headers = [("Accept", "application/json")]
        if auth:
            headers.append(("Authorization", f"Bearer {auth}"))
        response = await port.send("GET", url, headers, b"", control=True)
        status = response.status
        return status, await _read_bounded(response, MAX_DOC if status == 200 else MAX_ERROR_BODY)
