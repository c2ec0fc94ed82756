"""A port (and its responses) held to a request's total deadline.

The engine wraps the transport's port in :class:`AsyncBoundedPort` for each request: every
send then runs inside the deadline's scope, and every read of a body, the streamed answer's
included, under the body's :meth:`~pqe2ee.transports._deadline.AsyncDeadline.reads` (async:
one timer per body, see :mod:`pqe2ee.transports._deadline`), so a relay that trickles bytes cannot
keep a request open past ``ClientOptions.deadline``. Past it, the step raises
:class:`~pqe2ee.errors.DeadlineExceeded`; mid-stream the transports hand it over as their
library's stream error, like any other stream failure.

:meth:`AsyncBoundedResponse.aread` reads a whole body, bounded in size as well. Written once,
as async code; ``scripts/unasync.py`` generates the blocking twin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from pqe2ee.errors import LimitExceeded
from pqe2ee.transports._async._stream import read_raw
from pqe2ee.transports._common import RawHeaders, RequestHeaders
from pqe2ee.transports._deadline import AsyncDeadline

if TYPE_CHECKING:
    from pqe2ee.transports._async._stream import AsyncPort, AsyncPortResponse, AsyncRawBody

__all__ = ["AsyncBoundedPort", "AsyncBoundedResponse"]


class AsyncBoundedResponse:
    """A port response whose body reads end at the deadline."""

    __slots__ = ("_reads", "_response", "headers", "status")

    def __init__(self, response: AsyncPortResponse, deadline: AsyncDeadline) -> None:
        self._response = response
        self._reads = deadline.reads()
        self.status: int = response.status
        self.headers: RawHeaders = response.headers

    async def aread(self, limit: int) -> bytes:
        """The whole body, refusing more than ``limit`` bytes, read over the port's raw body as
        a stream reads it (:func:`read_raw`); always closes."""
        chunks: list[bytes] = []
        total = 0
        reads = self._reads
        try:
            raw, failed, _ = self._response.raw_bytes()
            while (chunk := await read_raw(raw, failed, reads)) is not None:
                total += len(chunk)
                if total > limit:
                    raise LimitExceeded(f"relay answer is larger than {limit} bytes")
                chunks.append(chunk)
        finally:
            reads.release()
            with anyio.CancelScope(shield=True):
                await self._response.aclose()
        return b"".join(chunks)

    def raw_bytes(self) -> AsyncRawBody:
        chunks, failed, _ = self._response.raw_bytes()
        return chunks, failed, self._reads

    async def aclose(self) -> None:
        self._reads.release()
        await self._response.aclose()


class AsyncBoundedPort:
    """``port`` with each send (and each body read of what it returns) held to ``deadline``."""

    __slots__ = ("_deadline", "_port", "lost_errors", "network_errors", "timeout_errors")

    def __init__(self, port: AsyncPort, deadline: AsyncDeadline) -> None:
        self._port = port
        self._deadline = deadline
        self.network_errors = port.network_errors
        self.lost_errors = port.lost_errors
        self.timeout_errors = port.timeout_errors

    async def send(
        self, method: str, url: str, headers: RequestHeaders, body: bytes, *, control: bool
    ) -> AsyncBoundedResponse:
        with self._deadline:
            response = await self._port.send(method, url, headers, body, control=control)
        return AsyncBoundedResponse(response, self._deadline)

    def rebound(self, deadline: AsyncDeadline) -> AsyncBoundedPort:
        """The same port held to ``deadline`` instead (a background job's own)."""
        return AsyncBoundedPort(self._port, deadline)
