"""CPU-heavy work off the event loop, with a blocking twin (``scripts/unasync.py`` turns
``async_offload`` into ``offload``): attestation verifies a quote and 8 GPU signatures
(~25 ms), which an async client should not spend on its loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread

__all__ = ["async_offload", "offload"]

T = TypeVar("T")


async def async_offload(fn: Callable[[], T]) -> T:
    """``fn()`` in a worker thread (asyncio or trio); the loop keeps serving meanwhile."""
    return await anyio.to_thread.run_sync(fn)


def offload(fn: Callable[[], T]) -> T:
    """``fn()`` here: a blocking client has no loop to spare."""
    return fn()
