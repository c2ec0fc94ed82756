"""Synchronisation twins for the generated transports (as httpcore's ``_synchronization``),
and the closing helpers of the async-only adapters (aiohttp, anyio).

``scripts/unasync.py`` turns ``AsyncLock`` into ``Lock``, ``AsyncShieldCancellation`` into
``ShieldCancellation`` and ``async_sleep`` into ``sleep``: each async name here has a sync
twin with the same shape, so the sync transport is the async one with ``async``/``await``
removed.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Self

import anyio

__all__ = [
    "AsyncLock",
    "AsyncResource",
    "AsyncShieldCancellation",
    "Lock",
    "ShieldCancellation",
    "aclose_shielded",
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

    def __exit__(self, *exc_info: object) -> None:
        return None


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
    with AsyncShieldCancellation():
        for resource in resources:
            aclose = getattr(resource, "aclose", None)
            if aclose is not None:
                await aclose()
