"""A request's deadline and the port its network steps go through: one object per request.

The engine makes an :class:`AsyncBoundedPort` for each request (and one for each background
job, :meth:`~AsyncBoundedPort.rebound`): it *is* the request's
:class:`~pqe2ee.transports._deadline.AsyncDeadline` (the engine's whole-request ``with``
block is a block of it; a background job runs in a block of its own) and it sends through
the transport's port, so that every send runs inside the deadline and every read of a body under it - :meth:`AsyncBoundedPort.aread` for a
whole body, the deadline's :meth:`~pqe2ee.transports._deadline.AsyncDeadline.reads` for a
streamed answer (async: one timer per body, see :mod:`pqe2ee.transports._deadline`). A relay
that trickles bytes cannot keep a request open past ``ClientOptions.deadline``. Past it, the
step raises :class:`~pqe2ee.errors.DeadlineExceeded`; mid-stream the transports hand it over
as their library's stream error, like any other stream failure.

Written once, as async code; ``scripts/unasync.py`` generates the blocking twin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from pqe2ee.errors import LimitExceeded
from pqe2ee.transports._async._stream import read_raw
from pqe2ee.transports._common import RequestHeaders
from pqe2ee.transports._deadline import AsyncDeadline

if TYPE_CHECKING:
    from pqe2ee.transports._async._stream import AsyncPort, AsyncPortResponse

__all__ = ["AsyncBoundedPort"]


class AsyncBoundedPort(AsyncDeadline):
    """A deadline of ``seconds`` from now on ``clock`` that is also :attr:`port`, each send and
    each whole-body read held to it (the port and the deadline of a request in one object:
    it used to be three - deadline, bounded port, bounded response - per request)."""

    __slots__ = ("port",)

    def __init__(self, port: AsyncPort, seconds: float, clock: Callable[[], float]) -> None:
        super().__init__(seconds, clock)
        #: The transport's port (its error classes too: ``port.network_errors`` ...).
        self.port = port

    async def send(
        self, method: str, url: str, headers: RequestHeaders, body: bytes, *, control: bool
    ) -> AsyncPortResponse:
        """The port's answer (body not read yet: :meth:`aread`, or the deadline's
        :meth:`reads` for a stream). Sent inside a block of the deadline (the request's, or a
        background job's own), whose cancel scope (async) ends the wait at the deadline: the
        deadline is checked here before the send starts, as a block's ``__enter__`` would."""
        self.check()
        return await self.port.send(method, url, headers, body, control=control)

    async def aread(self, response: AsyncPortResponse, limit: int) -> bytes:
        """The whole body of ``response``, refusing more than ``limit`` bytes, read over the
        port's raw body as a stream reads it (:func:`read_raw`: the deadline checked before
        each read); always closes it. Read inside a block of the deadline (the request's, or a
        background job's own), which cancels a read waiting at the deadline: a check per read
        is all it needs here (``per_read()`` of the deadline itself, asked once), no timer."""
        chunks: list[bytes] = []
        total = 0
        try:
            raw, failed = response.raw_bytes()
            window = self.per_read()  # (inside the block: the same for every read)
            while (chunk := await read_raw(raw, failed, self, window)) is not None:
                total += len(chunk)
                if total > limit:
                    raise LimitExceeded(f"relay answer is larger than {limit} bytes")
                chunks.append(chunk)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()
        return b"".join(chunks)

    def rebound(self, seconds: float) -> AsyncBoundedPort:
        """The same port held to a deadline of its own (a background job's)."""
        return AsyncBoundedPort(self.port, seconds, self._clock)
