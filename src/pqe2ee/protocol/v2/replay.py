"""Replay cache for v2 request ids (sans-IO: ``now_ms`` is a parameter).

An instance accepts a request only when ``|now - ts| <= W`` (spec/v2.md §4.2) and its
``request_id`` is new. A request with client time ``ts`` can pass the window check until
``ts + W``, so its id must be remembered until then: ``expires_at_ms = ts_ms + window_ms``
(at most 2W after arrival). The cache is per instance key, shared by every worker of an instance
(the in-memory one serves one process; a Redis one comes with the server wiring:
``SET pqe2ee:v2:rid:<hex> 1 NX PX <expires_at - now + 1>`` with ``maxmemory-policy noeviction``).

:class:`MemoryReplayCache` is bounded. When it is full of live entries it evicts the one that
expires first and raises a *floor*: from then on any request whose ``expires_at`` is at or below
the floor is refused as too old. Evicted ids can therefore never be replayed; under overload the
acceptance window narrows (fails closed) instead of reopening replay.
"""

from __future__ import annotations

import enum
import heapq
from typing import Protocol

from pqe2ee.errors import ErrorCode, LocalProtocolError

__all__ = ["Admission", "MemoryReplayCache", "ReplayCache"]


class Admission(enum.Enum):
    FRESH = "fresh"  # new id, now remembered
    REPLAY = "replay"  # seen before and still live
    TOO_OLD = "too_old"  # below the eviction floor (cache was full): refuse as stale


class ReplayCache(Protocol):
    def admit(self, request_id: bytes, expires_at_ms: int, now_ms: int) -> Admission:
        """Atomically: remember ``request_id`` until ``expires_at_ms`` if it is new.

        Contract: one id always comes with the same ``expires_at_ms`` (``ts + W`` from its
        authenticated H; a different ts would be a different, unforgeable request).
        """
        ...


class MemoryReplayCache:
    """In-process :class:`ReplayCache` holding at most ``max_entries`` ids.

    Not thread-safe (the protocol layer has no locks): use it from one thread or event loop,
    or serialise :meth:`admit` (a server that opens requests in worker threads holds a lock
    around it)."""

    __slots__ = ("_floor", "_heap", "_ids", "max_entries")

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise LocalProtocolError("max_entries must be >= 1", code=ErrorCode.INVALID_ARGUMENT)
        self.max_entries = max_entries
        self._ids: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []
        self._floor = -1

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def floor_ms(self) -> int:
        """Requests expiring at or before this are refused (-1 until the cache overflowed)."""
        return self._floor

    def admit(self, request_id: bytes, expires_at_ms: int, now_ms: int) -> Admission:
        rid = bytes(request_id)
        heap = self._heap
        while heap and heap[0][0] < now_ms:
            _, old = heapq.heappop(heap)
            del self._ids[old]
        if rid in self._ids:
            return Admission.REPLAY
        if expires_at_ms <= self._floor or expires_at_ms < now_ms:
            return Admission.TOO_OLD
        if len(self._ids) >= self.max_entries:
            evicted_at, old = heapq.heappop(heap)
            del self._ids[old]
            self._floor = max(self._floor, evicted_at)
            if expires_at_ms <= self._floor:
                return Admission.TOO_OLD
        self._ids[rid] = expires_at_ms
        heapq.heappush(heap, (expires_at_ms, rid))
        return Admission.FRESH
