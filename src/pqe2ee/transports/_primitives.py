"""Synchronisation twins for the generated transports (as httpcore's ``_synchronization``),
the closing helpers of the async-only adapters (aiohttp, anyio), and :class:`AsyncReadTimer`,
one asyncio timer bounding every read of a body (the deadline, the anyio client's read timeout).

``scripts/unasync.py`` turns ``AsyncLock`` into ``Lock``, ``AsyncBackground`` into
``Background`` and ``async_sleep`` into ``sleep``:
each async name here has a sync twin with the same shape, so the sync transport is the async
one with ``async``/``await`` removed. A cleanup shielded from cancellation is written
``with anyio.CancelScope(shield=True):`` around one line; threads are not cancelled, so
unasync keeps the line alone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Self

import anyio

log = logging.getLogger("pqe2ee.transports")

__all__ = [
    "AsyncBackground",
    "AsyncLock",
    "AsyncReadTimer",
    "AsyncResource",
    "Background",
    "Lock",
    "aclose_shielded",
    "async_sleep",
    "read_timer",
    "sleep",
]


class AsyncLock:
    """An anyio lock (works under asyncio and trio)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = anyio.Lock()

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()

    def try_acquire(self) -> bool:
        """Take the lock if it is free right now; never waits."""
        try:
            self._lock.acquire_nowait()
        except anyio.WouldBlock:
            return False
        return True

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


class Lock:
    """A threading lock with the same shape as :class:`AsyncLock`."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()

    def try_acquire(self) -> bool:
        return self._lock.acquire(blocking=False)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


def _forgive(exc: BaseException) -> None:
    """A background job's failure: nobody waits for it. A job forgives the failures it
    expects itself (a prefetch: pqe2ee and network errors, at debug); what reaches here is
    unexpected, so it is a warning - its type only (no prompt, key or nonce logged)."""
    log.warning("background job failed: %s", type(exc).__name__)


class AsyncBackground:
    """Jobs run beside the task that starts them (a discovery prefetch): on asyncio a loop
    task, held here until it ends; elsewhere (trio, which has no task without a nursery) the
    job runs inline, as :meth:`start`'s own await. A job's failure is logged at debug and
    forgiven. :meth:`cancel` cancels the tasks still running (thread-safe, no I/O)."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, job: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            await self._run(job, args)  # (trio)
            return
        task = loop.create_task(self._run(job, args))
        self._tasks.add(task)  # a strong reference: the loop keeps only a weak one
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(job: Callable[..., Coroutine[Any, Any, None]], args: tuple[Any, ...]) -> None:
        try:
            await job(*args)
        except Exception as exc:  # (a cancellation passes: the task ends cancelled)
            _forgive(exc)

    def running(self) -> int:
        """How many jobs run now (tests, diagnostics)."""
        return len(self._tasks)

    def cancel(self) -> None:
        for task in list(self._tasks):
            loop = task.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(task.cancel)


class Background:
    """The blocking twin of :class:`AsyncBackground`: one daemon worker thread, started with
    the first job and kept for the next ones (a thread start costs ~60 us of CPU; a prefetch
    comes every few requests), runs the jobs in turn. Threads are not cancelled: :meth:`cancel`
    lets the worker end after the job in hand, which finishes or fails and is forgiven.
    :meth:`cancel` takes no lock (it may run in a finalizer, on any thread)."""

    __slots__ = ("_jobs", "_lock", "_running", "_worker")

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._running = 0  # jobs queued or running
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def start(self, job: Callable[..., None], *args: Any) -> None:
        with self._lock:  # (a job that races cancel() may be dropped: the client closes)
            jobs = self._jobs
            if self._worker is None:
                worker = threading.Thread(
                    target=self._work, args=(jobs,), name="pqe2ee-prefetch", daemon=True
                )
                try:
                    worker.start()
                except RuntimeError:  # (at interpreter shutdown): the job is skipped
                    log.debug("background job skipped: no thread can start")
                    return
                self._worker = worker
            self._running += 1
            jobs.put((job, args))

    def _work(
        self, jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None]
    ) -> None:
        while (item := jobs.get()) is not None:
            job, args = item
            try:
                job(*args)
            except Exception as exc:
                _forgive(exc)
            finally:
                with self._lock:
                    self._running -= 1

    def running(self) -> int:
        """How many jobs are queued or run now (tests, diagnostics)."""
        return self._running

    def cancel(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            # The worker ends after the jobs queued so far; a later job gets a worker and a
            # queue of its own. (SimpleQueue.put: safe in a finalizer.)
            jobs, self._jobs = self._jobs, queue.SimpleQueue()
            jobs.put(None)


class AsyncReadTimer:
    """The reads of one body, each cut short at a moment, with one asyncio timer per body.

    An anyio cancel scope per read costs 5-9 us on asyncio (several ``getpid`` syscalls among
    them, on Python 3.11); a body is read a chunk at a time, between yields to its reader, so
    no single scope can span it. Instead one ``loop.call_at`` timer watches all its reads:
    ``with timer.at(moment):`` (or ``timer.after(seconds)``) around each read; when the timer
    fires during a read it cancels the reading task (as ``asyncio.timeout`` does), and the
    ``with`` turns that cancellation into ``error()``. A moment that moves later from read to
    read (an idle timeout) moves the timer only when it fires: at most one timer per period.
    A cancellation of the task by anyone else passes through unchanged. :meth:`close` (when
    the body ends, however) stops the timer. :func:`read_timer` makes one (asyncio only).
    """

    __slots__ = ("_cancelling", "_cut", "_error", "_handle", "_loop", "_task", "_until", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, error: Callable[[], BaseException]) -> None:
        self._loop = loop
        self._error = error
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0  # when the handle fires (TimerHandle.when() is a Python call)
        self._until = 0.0  # the current read's end, on the loop's clock
        self._task: asyncio.Task[object] | None = None  # the task inside a read, if any
        self._cut: asyncio.Task[object] | None = None  # the task this timer cancelled
        self._cancelling = 0  # the reading task's cancellation requests when the read began

    def now(self) -> float:
        """The loop's clock."""
        return self._loop.time()

    def at(self, moment: float) -> Self:
        """The next read ends at ``moment`` (the loop's clock)."""
        self._until = moment
        return self

    def after(self, seconds: float) -> Self:
        """The next read ends ``seconds`` after it starts."""
        self._until = self._loop.time() + seconds
        return self

    def __enter__(self) -> None:
        task = self._task = asyncio.current_task(self._loop)  # given the loop: no syscall
        # Counted at the start (as asyncio.timeout does): a cancellation requested before the
        # timer fires, in the same loop iteration, is not taken for ours.
        self._cancelling = 0 if task is None else task.cancelling()
        handle = self._handle
        if handle is None or self._when > self._until:
            if handle is not None:
                handle.cancel()
            self._arm()

    def _arm(self) -> None:
        self._when = self._until
        self._handle = self._loop.call_at(self._until, self._fire)

    def __exit__(self, *exc_info: object) -> None:
        self._task = None
        task = self._cut
        if task is None:
            return
        self._cut = None
        # Ours unless someone else asked for the task's cancellation too: theirs goes on.
        if task.uncancel() <= self._cancelling:
            raise self._error() from None

    def _fire(self) -> None:
        self._handle = None
        task = self._task
        if task is None:
            return  # between reads: the next one sets the timer again
        if self._loop.time() < self._until:  # the moment moved: wait on
            self._arm()
            return
        self._cut = task
        task.cancel()

    def close(self) -> None:
        """No more reads: stop the timer (idempotent)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def read_timer(error: Callable[[], BaseException]) -> AsyncReadTimer | None:
    """An :class:`AsyncReadTimer` raising ``error()`` when running on asyncio; ``None``
    elsewhere (trio: a cancel scope per read stays the way to cut one short)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return AsyncReadTimer(loop, error)


async def async_sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


def sleep(seconds: float) -> None:
    time.sleep(seconds)


class AsyncResource:
    """Something with ``aclose()`` that ``async with`` closes on the way out."""

    __slots__ = ()

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def aclose_shielded(*resources: object) -> None:
    """Close each of ``resources`` that has an ``aclose`` (an async generator, a stream), in
    order, even if the calling task is being cancelled."""
    with anyio.CancelScope(shield=True):
        for resource in resources:
            aclose = getattr(resource, "aclose", None)
            if aclose is not None:
                await aclose()
