"""Synchronisation twins for the generated transports (as httpcore's ``_synchronization``).

``scripts/unasync.py`` turns ``AsyncLock`` into ``Lock``, ``AsyncShieldCancellation`` into
``ShieldCancellation`` and ``async_sleep`` into ``sleep``: each async name here has a sync
twin with the same shape, so the sync transport is the async one with ``async``/``await``
removed.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

import anyio

__all__ = [
    "AsyncLock",
    "AsyncShieldCancellation",
    "Lock",
    "ShieldCancellation",
    "async_sleep",
    "sleep",
]


class AsyncLock:
    """An anyio lock (works under asyncio and trio)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = anyio.Lock()

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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


class Lock:
    """A threading lock with the same shape as :class:`AsyncLock`."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()

    def try_acquire(self) -> bool:
        return self._lock.acquire(blocking=False)

    def release(self) -> None:
        self._lock.release()


class AsyncShieldCancellation:
    """Shield a cleanup block from cancellation, so a cancelled task still closes its stream."""

    __slots__ = ("_scope",)

    def __init__(self) -> None:
        self._scope = anyio.CancelScope(shield=True)

    def __enter__(self) -> AsyncShieldCancellation:
        self._scope.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._scope.__exit__(exc_type, exc, tb)


class ShieldCancellation:
    """Threads are not cancelled: nothing to shield."""

    __slots__ = ()

    def __enter__(self) -> ShieldCancellation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


async def async_sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


def sleep(seconds: float) -> None:
    time.sleep(seconds)
