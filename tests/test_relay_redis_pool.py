"""Issue 16 item 4, on a real redis-server: the nonce store's connection pool is sized and
blocking (a command waits for a connection instead of failing past redis-py's 100), waits are
metered, and every 503 is logged with its reason."""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import anyio
import httpx2
import pytest

from pqe2ee.server.noncestore import NonceStoreError, RedisNonceStore
from relay_support import auth, discover
from test_relay_redis import ECHO, redis_server, relay_on_redis

pytestmark = pytest.mark.redis


def test_2000_concurrent_store_calls_with_redis_healthy_all_succeed(tmp_path: Path) -> None:
    waits: list[float] = []

    async def main(url: str) -> collections.Counter[str]:
        store = RedisNonceStore(url, max_connections=16, on_pool_wait=waits.append)
        errors: collections.Counter[str] = collections.Counter()
        await store.issue("key", "chute", "inst", [f"n{i}" for i in range(1000)], 60)

        async def one(i: int) -> None:
            try:
                if i % 2:
                    assert await store.consume(f"n{i // 2}", "key", "chute", "inst")
                else:
                    assert await store.hit("rate", 60, 10**9)
            except NonceStoreError as exc:
                errors[exc.message] += 1

        async with anyio.create_task_group() as tg:
            for i in range(2000):
                tg.start_soon(one, i)
        await store.aclose()
        return errors

    with redis_server(tmp_path) as url:
        errors = anyio.run(main, url, backend="asyncio")
    assert errors == collections.Counter(), errors  # redis-py's default pool: 1,900 failures
    assert waits  # 2,000 callers on 16 connections: hand-outs waited, and were metered


def test_every_503_is_logged_with_its_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with redis_server(tmp_path) as url, relay_on_redis(url) as relay_url:
        with httpx2.Client(base_url=relay_url, timeout=20) as c:
            discover(c, ECHO)
            import redis

            redis.Redis.from_url(url).shutdown(nosave=True)
            with caplog.at_level(logging.WARNING, logger="pqe2ee.relay"):
                for _ in range(2):
                    assert c.get(f"/e2e/instances/{ECHO}", headers=auth()).status_code == 503
            metrics = c.get("/metrics").text
    lines = [r.getMessage() for r in caplog.records if "answering 503" in r.getMessage()]
    assert len(lines) == 2, caplog.text
    assert "nonce store unavailable (redis: ConnectionError)" in lines[0]
    assert "pqe2ee_relay_store_unavailable_total 2.0" in metrics
