"""The total deadline of one client request, in an async and a blocking flavour (twins, as in
:mod:`pqe2ee.transports._primitives`: ``scripts/unasync.py`` turns ``AsyncDeadline`` into
``Deadline``).

A deadline starts when a request starts and covers all of it: model lookup, discovery,
retries, the invoke, and every read of the answer, a streamed body included, until that body is
closed. Each network step runs in a ``with`` block of the deadline itself; each read of a body
is checked and guarded as :meth:`Deadline.reads`' ``per_read()`` says:

* async: an anyio cancel scope that ends at the deadline; the wait is cancelled there and
  :class:`~pqe2ee.errors.DeadlineExceeded` raised in its place (works under asyncio and trio).
  The reads of a body streamed after the request's own scope has closed share one asyncio
  timer instead (:class:`~pqe2ee.transports._primitives.AsyncReadTimer`; a cancel scope per
  read under trio);
* blocking: threads cannot be interrupted, so the deadline is checked when each step starts; a
  step already running ends by the HTTP library's own (per-read) timeout, and the next one
  raises. A relay trickling a byte every few seconds is cut off a few seconds after the
  deadline.

Times are on the engine's monotonic ``clock`` (a test hook); the async scope converts the time
left into anyio's clock.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import anyio

from pqe2ee.errors import DeadlineExceeded, ErrorCode
from pqe2ee.transports._primitives import AsyncReadTimer, read_timer

__all__ = ["AsyncBodyReads", "AsyncDeadline", "BodyReads", "Deadline", "PerRead"]

#: What a reader with a loop of its own needs per read (see Deadline.per_read).
PerRead = tuple[Callable[[], float], float, AbstractContextManager[None]]
#: The read guard where there is nothing to guard (blocking reads, no deadline).
_NO_GUARD: AbstractContextManager[None] = contextlib.nullcontext()


class Deadline:
    """A blocking request's deadline: ``seconds`` from now on ``clock``."""

    __slots__ = ("_clock", "end", "seconds", "start")

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self._clock = clock
        self.start = clock()  # when the request started, on ``clock``
        self.end = self.start + seconds

    def remaining(self) -> float:
        """Seconds left (negative once past)."""
        return self.end - self._clock()

    def error(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the request took longer than its {self.seconds:g}s deadline",
            code=ErrorCode.DEADLINE_EXCEEDED,
        )

    def check(self) -> None:
        """Raise :meth:`error` once past the deadline."""
        if self._clock() >= self.end:
            raise self.error()

    def __enter__(self) -> None:
        """A ``with`` block of the deadline is one network step, checked when it starts (no
        object per step)."""
        self.check()

    def __exit__(self, *exc_info: object) -> None:
        return None

    def reads(self) -> Deadline:
        """What the reads of one body are held to (:meth:`per_read`), and :meth:`release`
        once the body is done: the deadline itself."""
        return self

    def per_read(self) -> PerRead:
        """How to read: check ``clock() >= end`` before each read (and raise :meth:`error`),
        then read inside a ``with`` block of the guard (see ``_stream.read_raw``). Blocking:
        nothing to guard (unasync drops the block)."""
        return self._clock, self.end, _NO_GUARD

    def release(self) -> None:
        return None


class AsyncDeadline(Deadline):
    """An async request's deadline: a ``with`` block of it is an anyio cancel scope ending at
    the deadline, whose timeout raises DeadlineExceeded (a sync context manager, so the same
    ``with`` serves both flavours of the engine).

    A block opened while another of the same deadline is open (the engine's whole-request
    block around its sends and reads) only checks the deadline: the enclosing one cancels
    at the same moment, and raises DeadlineExceeded for it. anyio cancel scopes cost a few
    microseconds each; a non-stream request used to open four. Blocks of one deadline nest
    (one request: one task)."""

    __slots__ = ("_open", "_scope")

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        super().__init__(seconds, clock)
        self._open = 0  # blocks of this deadline open now
        self._scope: anyio.CancelScope | None = None  # the outermost one's cancel scope

    def __enter__(self) -> None:
        self.check()
        if self._open:
            self._open += 1  # inside a block of this deadline: it cancels at the same moment
            return
        scope = anyio.move_on_after(self.end - self._clock())  # remaining(), inlined
        scope.__enter__()
        self._scope = scope
        self._open = 1

    def __exit__(self, *exc_info: Any) -> None:
        self._open -= 1
        if self._open:
            return
        scope, self._scope = self._scope, None
        assert scope is not None
        # The scope swallows only its own cancellation, which becomes DeadlineExceeded.
        scope.__exit__(*exc_info)
        if scope.cancelled_caught:
            raise self.error() from None

    def reads(self) -> AsyncBodyReads:  # type: ignore[override]
        return AsyncBodyReads(self)


#: The blocking twin of :class:`AsyncBodyReads`: the deadline itself (see Deadline.reads).
BodyReads = Deadline


class AsyncBodyReads:
    """The reads of one body (:meth:`per_read`): inside a block of the deadline (a body read
    before the request returns) a check only; after it (a streamed answer) cut short at the
    deadline by one timer for the whole body (asyncio), else by the deadline's cancel scope
    per read. :meth:`release` stops the timer."""

    __slots__ = ("_deadline", "_started", "_timer")

    def __init__(self, deadline: AsyncDeadline) -> None:
        self._deadline = deadline
        self._started = False  # the first read outside the request's scope has begun
        self._timer: AsyncReadTimer | None = None

    def error(self) -> DeadlineExceeded:
        return self._deadline.error()

    def per_read(self) -> PerRead:
        """As :meth:`Deadline.per_read`; the guard holds as long as no block of the deadline
        opens or closes (a stream is read after the request's block: asking once for the whole
        stream is enough)."""
        deadline = self._deadline
        guard: AbstractContextManager[None]
        if deadline._open:
            guard = deadline  # the enclosing scope cancels at the same moment
        elif deadline.end == math.inf:
            guard = _NO_GUARD  # (no deadline)
        else:
            if not self._started:
                self._start()
            guard = self._timer if self._timer is not None else deadline
        return deadline._clock, deadline.end, guard

    def _start(self) -> None:
        self._started = True
        deadline = self._deadline
        timer = read_timer(deadline.error)
        if timer is not None:
            self._timer = timer.at(timer.now() + deadline.remaining())

    def release(self) -> None:
        if self._timer is not None:
            self._timer.close()
