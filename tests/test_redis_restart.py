"""Issue 16 item 3, on a real redis-server restarted in place: spent relay nonces do not come
back to life when Redis restarts from a snapshot (its default persistence), nor does anything
issued before a restart without one; the store carries on with nonces issued after it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from pqe2ee.server.noncestore import NonceStoreError, RedisNonceStore
from test_relay_redis import _free_port, redis_server

pytestmark = pytest.mark.redis

T = TypeVar("T")


def snapshot(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.save()
        return int(client.dbsize())
    finally:
        client.close()


async def retrying(fn: Callable[[], Awaitable[T]]) -> T:
    """``fn()``, retried while the store's pooled connections notice the restart."""
    for _ in range(5):
        try:
            return await fn()
        except NonceStoreError:
            await anyio.sleep(0.05)
    return await fn()


N = 45


@pytest.mark.parametrize("with_snapshot", [True, False])
def test_spent_nonces_stay_spent_across_a_restart(tmp_path: Path, with_snapshot: bool) -> None:
    port = _free_port()
    nonces = [f"nonce-{i}" for i in range(N)]

    async def before(url: str) -> None:
        store = RedisNonceStore(url)
        await store.issue("key", "chute", "inst", nonces, 300)
        if with_snapshot:
            assert snapshot(url) == N  # all 45 unspent in the snapshot
        for n in nonces:
            assert await store.consume(n, "key", "chute", "inst")
        await store.aclose()

    async def after(url: str) -> tuple[int, int, bool]:
        import redis.asyncio as aioredis

        raw = aioredis.Redis.from_url(url)
        back = int(await raw.dbsize())  # what Redis restored
        await raw.aclose()
        store = RedisNonceStore(url)
        accepted = 0
        for n in nonces:
            accepted += await retrying(lambda n=n: store.consume(n, "key", "chute", "inst"))
        await store.issue("key", "chute", "inst", ["fresh"], 300)
        fresh = await store.consume("fresh", "key", "chute", "inst")
        await store.aclose()
        return back, accepted, fresh

    with redis_server(tmp_path, port) as url:
        anyio.run(before, url, backend="asyncio")
    with redis_server(tmp_path, port) as url:
        back, accepted, fresh = anyio.run(after, url, backend="asyncio")
    assert back == (N if with_snapshot else 0)  # the snapshot did bring the spent nonces back
    assert accepted == 0  # before the fix: 45 of 45 accepted a second time
    assert fresh


# -- issue 16 item 2: the instance's v2 replay cache ------------------------------------------

W = 120_000  # the ±W window, ms


@pytest.mark.parametrize("with_snapshot", [True, False])
def test_replayed_v2_request_is_refused_after_redis_loses_its_state(
    tmp_path: Path, with_snapshot: bool
) -> None:
    from pqe2ee.protocol.v2.replay import Admission
    from pqe2ee.server.replaycache import RedisReplayCache, ReplayCacheError

    port = _free_port()
    now = 1_800_000_000_000
    with redis_server(tmp_path, port) as url:
        cache = RedisReplayCache(url)
        cache.check(fresh_keys=True)  # a new key: open at once
        if with_snapshot:
            snapshot(url)  # the marker is in it, the id admitted below is not
        assert cache.admit(b"request-1", now + W, now) is Admission.FRESH
        assert cache.admit(b"request-1", now + W, now + 1) is Admission.REPLAY
        cache.close()
    with redis_server(tmp_path, port) as url:
        cache = RedisReplayCache(url)
        cache.check()  # a loaded key: the cache stays as the marker says
        # inside its window the replay must not get in (before the fix: FRESH, then 200)
        with pytest.raises(ReplayCacheError):
            cache.admit(b"request-1", now + W, now + 5_000)
        # a request created after the loss was seen + W passes again; its replay does not
        later = now + 5_000 + W + 1
        assert cache.admit(b"request-2", later + W, later) is Admission.FRESH
        assert cache.admit(b"request-2", later + W, later + 1) is Admission.REPLAY
        cache.close()
