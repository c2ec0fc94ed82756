"""The instance's in-memory v2 replay cache is reached from worker threads too (bodies over the
thread threshold are opened off the event loop) while the protocol layer's caches hold no
locks: the instance serialises admission with :class:`LockedReplayCache`."""

from __future__ import annotations

import threading
import time

from pqe2ee.protocol.v2 import MemoryReplayCache
from pqe2ee.protocol.v2.replay import Admission
from pqe2ee.server import instance
from pqe2ee.server.replaycache import LockedReplayCache


class _SlowCache:
    """An unlocked check-then-insert with a thread switch in between: racy on its own."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def admit(self, request_id: bytes, expires_at_ms: int, now_ms: int) -> Admission:
        if request_id in self.seen:
            return Admission.REPLAY
        time.sleep(0.001)
        self.seen.add(request_id)
        return Admission.FRESH


def _race(cache: object, threads: int = 8) -> list[Admission]:
    results: list[Admission] = []
    barrier = threading.Barrier(threads)

    def worker() -> None:
        barrier.wait()
        results.append(cache.admit(b"rid", 10_000, 0))  # type: ignore[attr-defined]

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return results


def test_unlocked_cache_double_admits_and_the_lock_prevents_it() -> None:
    assert _race(_SlowCache()).count(Admission.FRESH) > 1  # the hazard is real
    assert _race(LockedReplayCache(_SlowCache())).count(Admission.FRESH) == 1


def test_instance_wraps_its_in_memory_cache() -> None:
    for cache in (None, MemoryReplayCache()):
        inst = instance.Instance(
            instance.InstanceConfig(upstream="http://127.0.0.1:9"), replay_cache=cache
        )
        assert inst.v2 is not None
        assert isinstance(inst.v2.replay_cache, LockedReplayCache)
        assert not inst.keys.v2_threaded
