"""The network port the engine talks through, and the decrypted stream read through it.

Written once, as async code; ``scripts/unasync.py`` generates the blocking twin
(``_sync/_stream.py``). A transport hands the engine an :class:`AsyncPort` (send one request,
get an :class:`AsyncPortResponse`: status, raw headers, a lazy body, close); a 200 stream comes
back as an :class:`AsyncPlainStream`, which feeds the relay's bytes to the sans-IO
:class:`~pqe2ee.protocol.response.ResponseDecoder` and hands over the engine's own SSE bytes or
events. The request orchestration around it is :mod:`._engine`.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Sized
from typing import Final, NoReturn, Protocol, TypeVar

import anyio

from pqe2ee.backends.base import KEMPrivateKey
from pqe2ee.errors import ConnectionLost, ErrorCode, PQE2EEError
from pqe2ee.protocol._events import Done, InnerEvent
from pqe2ee.protocol.response import Opened, ResponseDecoder
from pqe2ee.protocol.v2.records import Head
from pqe2ee.protocol.v2.request import ResponseSecrets
from pqe2ee.transports._common import MAX_BLOB, RawHeaders, Settings
from pqe2ee.transports._deadline import AsyncBodyReads, AsyncDeadline, PerRead
from pqe2ee.transports._usage import UsageFilter

__all__ = [
    "DRAIN_LIMIT",
    "AsyncPlainStream",
    "AsyncPort",
    "AsyncPortResponse",
    "AsyncRawBody",
    "ReadFailed",
    "read_raw",
    "reraise",
]


# -- the port --------------------------------------------------------------------------------------

#: Called with what a read of a raw body raised (the deadline's error included): raises it
#: as the port maps its library's errors.
ReadFailed = Callable[[Exception], NoReturn]
#: A body as a reader with its own loop reads it (see AsyncPortResponse.raw_bytes).
AsyncRawBody = tuple[AsyncIterator[bytes], ReadFailed]


def reraise(exc: Exception) -> NoReturn:
    """The :data:`ReadFailed` of a port whose reads raise its own errors already."""
    raise exc


async def read_raw(
    chunks: AsyncIterator[bytes],
    failed: ReadFailed,
    reads: AsyncBodyReads | AsyncDeadline,
    window: PerRead,
) -> bytes | None:
    """The next chunk of a raw body (see :meth:`AsyncPortResponse.raw_bytes`), ``None`` at its
    end: the deadline checked before the read, the read in its guard, a failure raised as the
    port maps it. ``window`` is ``reads.per_read()``, asked by the caller (once per body where
    no block of the deadline opens or closes between its reads). (The stream's per-event loop,
    ``AsyncPlainStream._batches``, does this written out: a paced stream reads once per
    event.)"""
    clock, end, guard = window
    if clock() >= end:
        raise reads.error()
    try:
        with guard:
            return await anext(chunks, None)
    except Exception as exc:  # (no frames unless it raises)
        failed(exc)


class AsyncPortResponse(Protocol):
    """One answer from the network: status line and headers read, body not yet."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> RawHeaders: ...

    def raw_bytes(self) -> AsyncRawBody:
        """The (content-decoded) body, once, for a reader that makes the per-read work its own
        (:func:`read_raw`): the library's own iterator of it (no layer of the port's per
        chunk) and what to call with whatever a read of it raises. The deadline is the
        reader's (the request's: ``AsyncBoundedPort.aread``, ``AsyncPlainStream``'s ``reads``).
        ``aclose`` releases the connection."""
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


# -- the decrypted stream --------------------------------------------------------------------------

#: Bytes read past the inner ``[DONE]`` (v2: the END) before the last events are handed over.
DRAIN_LIMIT: Final = 64 * 1024

_Batch = list[InnerEvent | Done]
#: A pqe2ee error -> (the error to raise instead, its cause).
StreamErrorHook = Callable[[PQE2EEError], tuple[BaseException, BaseException | None]]
_Out = TypeVar("_Out", bound=Sized)


class AsyncPlainStream:
    """The body of a streamed E2EE answer: decrypts the relay's outer stream lazily.

    Iterate it for the engine's own SSE bytes (events reassembled from records, nothing
    re-serialised), or :meth:`aiter_events` for the inner events themselves (the last one is
    the authenticated :class:`~pqe2ee.protocol.Done`). Plaintext usage events go to
    ``on_usage`` and never into the stream (v2: once, at the authenticated END, after the
    cross-check). Any failure - a bad record, a reported remote error, a connection lost, EOF
    before the inner ``[DONE]`` (v2: before the authenticated END) - raises a typed pqe2ee
    error (a timeout raises the port's own timeout error). One iteration only; closing (also
    done when iteration ends, however it ends) wipes the response key and releases the
    connection.

    ``key`` opens the answer: a v1 response key (:class:`KEMPrivateKey`) or the
    :class:`~pqe2ee.protocol.v2.ResponseSecrets` of a v2 request.
    """

    def __init__(
        self,
        upstream: AsyncPortResponse,
        key: KEMPrivateKey | ResponseSecrets,
        settings: Settings,
        *,
        lost_errors: tuple[type[BaseException], ...] = (),
        timeout_errors: tuple[type[BaseException], ...] = (),
        reads: AsyncBodyReads | None = None,
    ) -> None:
        self._upstream = upstream
        self._reads = reads  # the request's deadline over the body's reads (None: no deadline)
        self._decoder = ResponseDecoder(
            key, aead=settings.aead, stream=True, on_usage=settings.on_usage, max_body=MAX_BLOB
        )
        self._lost = lost_errors
        self._timeout = timeout_errors
        self._raw: tuple[AsyncIterator[bytes], ReadFailed, AsyncBodyReads] | None = None
        #: Removes the usage the caller did not ask for (set by the engine for a stream).
        self.usage_filter: UsageFilter | None = None
        #: What iterating raises instead of a pqe2ee error, and from what (set by a transport
        #: adapter whose library has its own stream error).
        self.stream_error: StreamErrorHook | None = None
        self._pending: list[InnerEvent | Done] = []
        self._deferred: PQE2EEError | None = None
        self._closed = False

    @property
    def version(self) -> int:
        """The wire profile of this stream (1 or 2)."""
        return self._decoder.version

    def __aiter__(self) -> AsyncIterator[bytes]:
        # The events of each read go out as one chunk (the generator is _batches itself: no
        # layer per chunk of its own).
        return self._batches(self._joined)

    async def aiter_events(self) -> AsyncIterator[InnerEvent | Done]:
        """The inner events one by one, ending after the authenticated ``Done``."""
        async for batch in self._batches(self._filtered):
            for event in batch:
                yield event

    def _filtered(self, batch: _Batch) -> _Batch:
        return batch if self.usage_filter is None else self.usage_filter.apply(batch)

    def _joined(self, batch: _Batch) -> bytes:
        if self.usage_filter is not None:
            return self.usage_filter.joined(batch)
        return batch[0].raw if len(batch) == 1 else b"".join([event.raw for event in batch])

    def _body(self) -> tuple[AsyncIterator[bytes], ReadFailed, AsyncBodyReads]:
        if self._raw is None:
            chunks, failed = self._upstream.raw_bytes()
            reads = self._reads
            if reads is None:  # a stream held to no deadline
                reads = AsyncDeadline(math.inf, time.monotonic).reads()
            self._raw = chunks, failed, reads
        return self._raw

    async def _read(self) -> bytes | None:
        """The next chunk of the body, ``None`` at its end."""
        chunks, failed, reads = self._body()
        return await read_raw(chunks, failed, reads, reads.per_read())

    async def _batches(self, out: Callable[[_Batch], _Out]) -> AsyncIterator[_Out]:
        """The decoded events, a list per read, as ``out`` makes them (empty ones skipped)."""
        decoder = self._decoder
        try:
            try:
                try:
                    # The batch ending in Done is held until the relay's last bytes are read
                    # (at most DRAIN_LIMIT more): a caller that stops at the inner [DONE] then
                    # leaves a finished response behind, and its connection goes back to the
                    # pool. A fault after Done still comes after the answer Done vouched for.
                    held: _Batch = []
                    drained = 0
                    if self._pending:  # read on the way to a v2 HEAD (the whole answer, maybe)
                        batch, self._pending = self._pending, []
                        if isinstance(batch[-1], Done) and self._deferred is None:
                            held = batch
                        elif made := out(batch):
                            yield made
                    if self._deferred is not None:
                        raise self._deferred
                    chunks, failed, reads = self._body()
                    clock, end, guard = reads.per_read()  # (read after the request's block)
                    try:
                        # One generator from the socket to the caller: the port's raw chunks
                        # read here as _read reads them (the deadline checked before each
                        # read, async: each read in its guard; the port's error mapping), not
                        # through a generator of the port's and one of the deadline's.
                        while True:
                            if clock() >= end:
                                raise reads.error()
                            try:
                                with guard:
                                    chunk = await anext(chunks, None)
                            except Exception as exc:  # (no frames unless it raises)
                                failed(exc)
                            if chunk is None:
                                held += decoder.eof()
                                await self.aclose()  # read out: its connection back to the pool
                                break
                            if held:
                                held += decoder.feed(chunk)
                                drained += len(chunk)
                                if drained > DRAIN_LIMIT:
                                    break
                                continue
                            batch = decoder.feed(chunk)
                            if batch and isinstance(batch[-1], Done):
                                held = batch
                            elif batch and (made := out(batch)):
                                yield made
                    except PQE2EEError:
                        if held and (made := out(held)):
                            yield made
                        raise
                    if held and (made := out(held)):
                        yield made
                except self._timeout:
                    raise
                except self._lost as exc:  # checked before pqe2ee errors: a port may raise ours
                    raise ConnectionLost(
                        "the connection to the relay broke mid-stream",
                        code=ErrorCode.CONNECTION_LOST,
                    ) from exc
            except PQE2EEError as exc:
                if self.stream_error is None:
                    raise
                error, cause = self.stream_error(exc)
                raise error from cause
        finally:
            await self.aclose()

    async def _head(self) -> Head | None:
        """v2: read until the authenticated HEAD (the events read on the way are kept for the
        iteration). An integrity failure on the way is kept for the iteration too (``None``
        when it came before HEAD): as in v1, a 200 stream fails while it is read, as the HTTP
        library's transport error. Network errors pass unchanged: nothing was handed over."""
        decoder = self._decoder
        try:
            while (chunk := await self._read()) is not None:
                self._pending += decoder.feed(chunk)
                if decoder.head is not None:
                    return decoder.head
            decoder.eof()  # raises stream_truncated: no HEAD
        except PQE2EEError as exc:
            self._pending += decoder.events()
            self._deferred = exc
        return decoder.head

    async def _rest(self) -> Opened:
        """v2 after a non-2xx HEAD: the engine's error answer, read to the authenticated END."""
        decoder = self._decoder
        try:
            while (chunk := await self._read()) is not None:
                decoder.feed(chunk)
            decoder.eof()
            assert decoder.answer is not None  # a non-2xx HEAD makes a whole answer
            return decoder.answer
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._decoder.wipe()
        if self._raw is not None:
            self._raw[2].release()  # (async: the body's timer)
        with anyio.CancelScope(shield=True):
            await self._upstream.aclose()
