"""Streaming out: SSE answers relayed while the upstream response is open.

:class:`StreamResponse` is the ASGI side, on the shared
:class:`~pqe2ee.server._asgi.StreamedResponse` (start, body chunks, the end; the disconnect
watch; the shutdown ending; cleanup that closes the upstream and releases the key's transport). What
it sends comes from a body:

* :class:`PassthroughBody` — chat and completions streams, byte for byte as decrypted;
* :class:`TranslatedBody` — chat chunks parsed with :class:`~pqe2ee.protocol.sse.SSEParser`
  and re-emitted by a dialect's translator.

Either way a stream that breaks ends with the dialect's error event, never a clean end. The
body's chunks reach the client through a :class:`~pqe2ee.server._coalesce.Coalescer`: what
was decoded from one upstream read goes out as one body message (one write, one chunked frame).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from typing import Any, Final, Protocol

import anyio
import httpx2
import msgspec
from starlette.types import Send

from pqe2ee.errors import ErrorCode, PQE2EEError
from pqe2ee.protocol._codec import json_decode
from pqe2ee.protocol.sse import SSEParser
from pqe2ee.proxy.app._plumbing import ENCODER
from pqe2ee.proxy.app.failures import Dialect, Failure, fail_of
from pqe2ee.proxy.app.metrics import Metrics
from pqe2ee.proxy.translate.chat import ChatReply, StreamEvent, decode_chat_chunk
from pqe2ee.server._asgi import ClientGone, DisconnectWatch, StreamedResponse, StreamOutcome
from pqe2ee.server._coalesce import Coalescer

__all__ = [
    "SSE_HEADERS",
    "OpenStreams",
    "PassthroughBody",
    "StreamBody",
    "StreamResponse",
    "TranslatedBody",
    "Translator",
    "sse_event",
    "sse_events",
]

log = logging.getLogger("pqe2ee.proxy")

SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def sse_event(name: str, data: Any) -> bytes:
    """``event: <name>\\ndata: <compact JSON>\\n\\n`` (JSON never contains a raw newline)."""
    return sse_events(((name, data),))


def sse_events(events: Iterable[StreamEvent]) -> bytes:
    """The named events (see :func:`sse_event`), framed one after another: in the
    comprehension, without a call (or a generator step) per translated event."""
    return b"".join(
        [
            b"event: " + name.encode() + b"\ndata: " + ENCODER.encode(data) + b"\n\n"
            for name, data in events
        ]
    )


class Translator(Protocol):
    """A dialect's stream translator (:mod:`pqe2ee.proxy.translate`), as used here."""

    @property
    def closed(self) -> bool: ...
    def feed(self, chunk: dict[str, Any] | ChatReply) -> list[StreamEvent]: ...
    def finish(self) -> list[StreamEvent]: ...
    def error(self, status: int, type: str, message: str) -> list[StreamEvent]: ...


class StreamBody(Protocol):
    """What a streamed answer sends: ``chunks()`` while the upstream lasts, and ``abort()`` -
    the dialect's error ending - when the proxy itself has to cut the stream short."""

    def chunks(self) -> AsyncGenerator[bytes, None]: ...
    def abort(self, fail: Failure) -> bytes: ...


class OpenStreams:
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


SHUTTING_DOWN: Final = "shutting_down"


class StreamResponse(StreamedResponse):
    """An SSE answer produced by ``body`` while the upstream response is open.

    The body's chunks are sent through a :class:`~pqe2ee.server._coalesce.Coalescer` (those
    that are there together as one message; the last one carries the end when it can). The
    shared :class:`~pqe2ee.server._asgi.StreamedResponse` watches for the client's
    disconnect and cancels the copy at once (even while the upstream is silent); whatever
    happens, the upstream response is then closed - which cancels the call end to end - and
    the API key's transport is released. A shutdown ends the stream with the dialect's error
    event.
    """

    def __init__(
        self,
        body: StreamBody,
        *,
        upstream: httpx2.Response,
        release: Callable[[], Awaitable[None]],
        metrics: Metrics,
        streams: OpenStreams,
        route: str,
    ) -> None:
        super().__init__(200, SSE_HEADERS)
        self._body = body
        self._chunks = body.chunks()
        self._upstream = upstream
        self._release = release
        self._metrics = metrics
        self._streams = streams
        self._route = route
        self._scope: anyio.CancelScope | None = None
        self._coalescer = Coalescer()

    def watching(self, watch: DisconnectWatch) -> None:
        self._scope = watch.cancel_scope
        self._metrics.open_streams.inc()
        self._streams.add(watch.cancel_scope)

    async def write(self, send: Send) -> None:
        async def sink(data: bytes, more: bool) -> None:
            await self.send_body(send, data, more=more)

        try:
            await self.send_start(send)
            await self._coalescer.run(self._chunks, sink)
        except ClientGone:
            raise
        except Exception as exc:  # a bug: end the answer, no traceback, no clean end
            log.error("stream failed (%s)", type(exc).__name__)

    async def cancelled(self, send: Send) -> None:
        if not self._streams.closing:
            return
        fail = Failure(503, "server_error", "the proxy is shutting down", code=SHUTTING_DOWN)
        self._metrics.stream_faults.labels(self._route).inc()
        with contextlib.suppress(ClientGone):
            if not self.started:
                await self.send_start(send)
            # What the body produced before the cancellation still goes out, then the ending.
            pending = self._coalescer.pending()
            await self.send_body(send, pending + self._body.abort(fail), more=False)

    async def finish(self, outcome: StreamOutcome) -> None:
        if self._scope is not None:
            self._streams.discard(self._scope)
            self._metrics.open_streams.dec()
        if outcome is StreamOutcome.CLIENT_GONE:
            self._metrics.disconnects.labels(self._route).inc()
        with contextlib.suppress(Exception):
            await self._chunks.aclose()
        with contextlib.suppress(Exception):
            await self._upstream.aclose()
        await self._release()


def chat_error_event(fail: Failure) -> bytes:
    """The error event that ends a broken chat stream: ``data: {"error": {...}}``."""
    return b"data: " + ENCODER.encode(fail.body(Dialect.OPENAI)) + b"\n\n"


class PassthroughBody:
    """The decrypted SSE bytes as they come; an upstream fault ends with an error event
    (``data: {"error": {...}}``, never ``[DONE]``)."""

    def __init__(self, resp: httpx2.Response, metrics: Metrics, route: str) -> None:
        self._resp = resp
        self._metrics = metrics
        self._route = route
        self._tail = b"\n\n"  # the last two bytes sent: is an event half-written?

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self._resp.aiter_bytes():
                if chunk:
                    # The last two bytes, without copying the chunk onto the old tail.
                    self._tail = chunk[-2:] if len(chunk) > 1 else self._tail[-1:] + chunk
                    yield chunk
        except (PQE2EEError, httpx2.HTTPError, httpx2.StreamError) as exc:
            fail = fail_of(exc)
            self._metrics.stream_faults.labels(self._route).inc()
            self._metrics.failed(fail.code or "unknown")
            log.warning("%s stream broke: %s", self._route, fail.code)
            yield self.abort(fail)

    def abort(self, fail: Failure) -> bytes:
        # Terminate a half-written event first so the error event stands on its own.
        return (b"" if self._tail == b"\n\n" else b"\n\n") + chat_error_event(fail)


class TranslatedBody:
    """Decrypted chat chunks in (parsed with :class:`SSEParser`), the dialect's events out;
    never a clean end after a fault."""

    def __init__(
        self,
        resp: httpx2.Response,
        translator: Translator,
        *,
        max_event: int,
        metrics: Metrics,
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
                yield sse_events(translator.finish())
        except (Failure, PQE2EEError, httpx2.HTTPError, httpx2.StreamError) as exc:
            fail = exc if isinstance(exc, Failure) else fail_of(exc)
            self._metrics.stream_faults.labels(self._route).inc()
            self._metrics.failed(fail.code or "unknown")
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
                    raise Failure(
                        502,
                        "server_error",
                        "upstream sent data after [DONE]",
                        code=ErrorCode.DATA_AFTER_DONE.value,
                    )
                reply = decode_chat_chunk(event.data)  # else as a dict, for the exact error
                out.extend(translator.feed(chunk_object(event.data) if reply is None else reply))
                if translator.closed:
                    break
            if out:
                yield sse_events(out)
            if translator.closed:
                return
        if not done and parser.partial_is("[DONE]"):
            done = True  # "data: [DONE]\n" cut before its blank line: still the end marker
        elif parser.has_partial:
            done = False  # bytes of an unfinished event after the end
        if not done:
            raise Failure(
                502,
                "server_error",
                f"{ErrorCode.STREAM_TRUNCATED.value}: upstream stream ended early",
                code=ErrorCode.STREAM_TRUNCATED.value,
            )

    def abort(self, fail: Failure) -> bytes:
        if self._translator.closed:
            return b""
        return sse_events(self._translator.error(fail.status, fail.type, fail.message))


def chunk_object(data: str) -> dict[str, Any]:
    """One upstream chunk's data as a JSON object (a 502 :class:`Failure` otherwise)."""
    try:
        obj = json_decode(data)
    except msgspec.DecodeError:
        raise Failure(
            502,
            "server_error",
            "upstream sent a chunk that is not JSON",
            code=ErrorCode.MALFORMED_EVENT.value,
        ) from None
    if not isinstance(obj, dict):
        raise Failure(
            502,
            "server_error",
            "upstream sent a chunk that is not an object",
            code=ErrorCode.MALFORMED_EVENT.value,
        )
    return obj
