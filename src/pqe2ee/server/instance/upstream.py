"""The instance's side of the engine: one HTTP client, the engine requests it sends, the model
list it caches, and the base of the streamed answers that hold an engine response open.

:meth:`Engine.call` sends a request and is cancelled when the client (the relay) hangs up, so
an abandoned generation does not keep running on the GPU. An engine that cannot be used is an
:class:`~pqe2ee.server.instance.exchange.EngineFailure`; what each protocol version makes of it
is its business.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import anyio
import httpx2
import msgspec
from starlette.responses import Response
from starlette.types import Receive, Send

from pqe2ee.errors import ErrorCode
from pqe2ee.protocol._codec import json_decode
from pqe2ee.server._asgi import (
    BodyTooLarge,
    StreamedResponse,
    StreamOutcome,
    read_bounded,
    watch_disconnect,
)
from pqe2ee.server._client import PostTarget, backend_client
from pqe2ee.server._coalesce import Coalescer
from pqe2ee.server.instance.config import InstanceConfig, model_chute_id
from pqe2ee.server.instance.exchange import (
    SSE_HEADERS,
    EngineFailure,
    Reject,
    RequestLog,
    Slot,
    timed_out,
    unreachable,
)

__all__ = ["Buffered", "Engine", "EngineStream", "Streaming", "safe_url"]

_MODELS_MAX: Final = 4 * 1024 * 1024  # cap on the engine's /v1/models document
_MODELS_RETRY_EMPTY: Final = 1.0  # seconds between model refreshes while the list is empty

E = TypeVar("E")


@dataclass(slots=True)
class Buffered:
    """A whole engine answer (any non-stream answer, and a stream request's error)."""

    status: int
    body: bytes
    content_type: str | None = None


@dataclass(slots=True)
class Streaming:
    """A 2xx engine stream, still open: the caller owns ``response`` and must close it."""

    response: httpx2.Response


class Engine:
    """The OpenAI-compatible engine at ``config.upstream``."""

    def __init__(self, config: InstanceConfig) -> None:
        self.config = config
        self._client: httpx2.AsyncClient | None = None
        self._auth: dict[str, str] = (
            {"authorization": f"Bearer {config.upstream_api_key}"}
            if config.upstream_api_key
            else {}
        )
        self._models: list[str] = []
        self.model_chutes: frozenset[str] = frozenset()  # v2: the chutes of those models
        self.models_checked: float | None = None
        self._models_lock = anyio.Lock()
        # (path, stream) -> the engine target client.build_request would work out each time
        self._targets: dict[tuple[str, bool], PostTarget] = {}

    def client(self) -> httpx2.AsyncClient:
        if self._client is None:
            cfg = self.config
            self._client = backend_client(
                connect=cfg.upstream_connect_timeout,
                read=cfg.upstream_read_timeout,
                write=cfg.upstream_read_timeout,
                max_connections=cfg.max_concurrency + 4,
                max_keepalive=cfg.max_concurrency,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
            self._targets.clear()

    # -- models -------------------------------------------------------------------------------

    @property
    def auth(self) -> dict[str, str]:
        """The headers that authenticate to the engine (its bearer token, if any)."""
        return dict(self._auth)

    @property
    def models(self) -> list[str]:
        return list(self._models)

    def _models_due(self, now: float) -> bool:
        if self.models_checked is None:
            return True
        age = now - self.models_checked
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
            self.models_checked = time.monotonic()
            if models is not None:
                self._models = models
                self.model_chutes = frozenset(model_chute_id(m) for m in models)
        return self.models

    async def _fetch_models(self) -> list[str] | None:
        try:
            async with self.client().stream(
                "GET", self.config.upstream + "/v1/models", headers=self._auth
            ) as resp:
                if resp.status_code != 200:
                    return None
                doc = await read_bounded(resp.aiter_bytes(), _MODELS_MAX)
        except (httpx2.HTTPError, BodyTooLarge):
            return None
        try:
            listing = json_decode(doc)
        except msgspec.DecodeError:
            return None
        rows = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(rows, list):
            return None
        return [r["id"] for r in rows if isinstance(r, dict) and isinstance(r.get("id"), str)]

    def own_chutes(self) -> Collection[str]:
        return self.model_chutes

    # -- requests -----------------------------------------------------------------------------

    def request(
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
        else:
            payload = raw
        client = self.client()
        return self._target(client, path, stream).request(client, content=payload)

    def _target(self, client: httpx2.AsyncClient, path: str, stream: bool) -> PostTarget:
        target = self._targets.get((path, stream))
        if target is None:
            headers = {
                "content-type": "application/json",
                "accept": "text/event-stream" if stream else "application/json",
                "accept-encoding": "identity",
                **self._auth,
            }
            target = PostTarget.of(client, self.config.upstream + path, headers)
            if path in self.config.allow_paths:  # a bounded set: the only paths served
                self._targets[(path, stream)] = target
        return target

    async def call(
        self, receive: Receive, upstream_request: httpx2.Request, *, stream: bool
    ) -> Buffered | Streaming:
        """Send to the engine, cancelled if the client hangs up (``Reject`` 499). An engine that
        cannot be used raises :class:`EngineFailure`."""
        result: Buffered | Streaming | None = None
        async with watch_disconnect(receive):
            result = await self._send(upstream_request, stream=stream)
        if result is None:
            # The client hung up while the engine worked; the engine request is cancelled.
            raise Reject(Response(status_code=499), ErrorCode.CONNECTION_LOST.value)
        return result

    async def _send(
        self, upstream_request: httpx2.Request, *, stream: bool
    ) -> Buffered | Streaming:
        try:
            resp = await self.client().send(upstream_request, stream=True)
        except httpx2.TimeoutException:
            raise timed_out() from None
        except httpx2.HTTPError:
            raise unreachable("Upstream engine unreachable") from None
        if stream and 200 <= resp.status_code < 300:
            return Streaming(resp)
        try:
            body = await read_bounded(engine_body(resp), self.config.max_response)
        except BodyTooLarge:
            raise EngineFailure(
                502, "Upstream response too large", ErrorCode.OVERSIZE.value
            ) from None
        except httpx2.TimeoutException:
            raise timed_out() from None
        except httpx2.HTTPError:
            raise unreachable("Upstream engine failed mid-response") from None
        finally:
            with anyio.CancelScope(shield=True):
                await resp.aclose()
        return Buffered(resp.status_code, body, resp.headers.get("content-type"))


def engine_body(upstream: httpx2.Response) -> AsyncIterator[bytes]:
    """An engine answer's body as it arrives; the caller closes ``upstream``. The instance asks
    for ``identity``, so it is normally the response's own byte stream, as the transport hands
    it over (its failures already httpx2's errors): ``aiter_raw`` would add a generator layer,
    a chunker's list and a byte count per chunk, and ``aiter_bytes`` a decoder call too (a
    stream pays them per event). Only a response with a content coding is decoded."""
    if "content-encoding" in upstream.headers:
        return upstream.aiter_bytes()
    stream = upstream.stream
    assert isinstance(stream, httpx2.AsyncByteStream)  # a response of the async client
    return stream.__aiter__()


def safe_url(url: str) -> str:
    """Scheme, host and port only (no credentials, no path) for logs."""
    try:
        u = httpx2.URL(url)
    except httpx2.InvalidURL:
        return "<invalid url>"
    port = f":{u.port}" if u.port is not None else ""
    return f"{u.scheme}://{u.host}{port}"


class EngineStream(StreamedResponse, Generic[E]):
    """A streamed answer that owns the engine response and the concurrency slot: both are
    released whatever happens (clean end, engine break, client hang-up - which also cancels the
    engine request). Subclasses write the body in :meth:`pump` with ``encoder``, the outer
    stream through :meth:`send_records`."""

    def __init__(
        self, upstream: httpx2.Response, encoder: E, *, slot: Slot, log: RequestLog
    ) -> None:
        super().__init__(200, SSE_HEADERS)
        self._upstream = upstream
        self._encoder = encoder
        self._slot = slot
        self._log = log
        self._code: str | None = None
        self._records: AsyncGenerator[bytes, None] | None = None

    def engine_chunks(self) -> AsyncIterator[bytes]:
        """The engine's body as it arrives (:func:`engine_body`)."""
        return engine_body(self._upstream)

    async def send_records(self, send: Send, records: AsyncGenerator[bytes, None]) -> None:
        """Send the outer stream ``records`` gives (its last part ends the body) with as few
        body messages as the engine's data allows: the parts of engine chunks that arrived
        together go out as one (:class:`~pqe2ee.server._coalesce.Coalescer`; the first part
        on its own, at once; nothing held back). If ``records`` raises, what it gave before
        is sent (the body not ended) and its exception raised."""
        self._records = records

        async def sink(data: bytes, more: bool) -> None:
            await self.send_body(send, data, more=more)

        await Coalescer(first_alone=True).run(records, sink)

    async def pump(self, send: Send) -> str | None:
        """Stream until the engine ends; returns an error code, or None for a clean end. The
        start goes out with the first body message (:meth:`start_due`)."""
        raise NotImplementedError

    def start_due(self) -> bool:
        return True  # the engine answered: the start goes out whatever follows

    async def write(self, send: Send) -> None:
        self._code = await self.pump(send)

    async def finish(self, outcome: StreamOutcome) -> None:
        status, code = 200, self._code
        if outcome is StreamOutcome.CLIENT_GONE or outcome is StreamOutcome.CANCELLED:
            # The client (relay) hung up: leaving the watch cancelled the engine read;
            # closing the upstream response below drops the engine connection.
            status, code = 499, ErrorCode.CONNECTION_LOST.value
        self._slot.release()
        self._log.bytes_out += self.bytes_sent
        self._log.emit(status, code)
        try:
            if self._records is not None:
                await self._records.aclose()  # (left suspended when the client hung up)
        finally:
            await self._upstream.aclose()
