"""Two relays sharing one real ``redis-server``: nonces stay single use across relays, and the
discovery rate limit is shared. The server runs on a free loopback port in a temp dir, with
persistence off.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from pqe2ee.server import instance, relay
from pqe2ee.server.noncestore import RedisNonceStore, api_key_id
from pqe2ee.testing import dev_engine
from relay_support import (
    KEY_A,
    KEY_B,
    InvokeCounter,
    auth,
    chat_body,
    discover,
    open_blob,
    seal,
)
from servers import run_app

pytestmark = pytest.mark.redis

REDIS = shutil.which("redis-server")
ECHO = relay.chute_id_for("dev-echo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(tmp: Path, port: int | None = None) -> Iterator[str]:
    """A redis-server without persistence settings of its own (``--save ""``: it writes a
    snapshot only on SAVE, into ``tmp``, and loads one found there) on ``port`` (default: a
    free one)."""
    if REDIS is None:
        pytest.skip(
            "redis-server binary not found (`make test` installs it: apt-get install redis-server)"
        )
    import redis

    fixed = port
    for _attempt in range(3):
        port = fixed or _free_port()
        proc = subprocess.Popen(
            [
                REDIS,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(tmp),
                "--daemonize", "no",
                "--loglevel", "warning",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = bool(client.ping())
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
        client.close()
        if ready:
            try:
                yield url
            finally:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
                if proc.stdout is not None:
                    proc.stdout.close()
            return
        proc.kill()
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
    raise RuntimeError("redis-server did not start")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="module")
def two_relays(redis_url: str) -> Iterator[dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(run_app(dev_engine.create_app()))
        counter = InvokeCounter(instance.create_app(instance.InstanceConfig(upstream=engine)))
        inst = stack.enter_context(run_app(counter))
        cfg = relay.RelayConfig(
            instances=(inst,), api_keys=(KEY_A, KEY_B), redis_url=redis_url, rate_limit=6
        )
        urls = [stack.enter_context(run_app(relay.create_app(cfg))) for _ in range(2)]
        yield {"a": urls[0], "b": urls[1], "counter": counter}


async def _fire(urls: list[str], blob: bytes, headers: dict[str, str]) -> list[httpx2.Response]:
    limits = httpx2.Limits(max_connections=64)
    async with httpx2.AsyncClient(timeout=30, limits=limits) as client:
        return list(
            await asyncio.gather(
                *(client.post(u + "/e2e/invoke", content=blob, headers=headers) for u in urls)
            )
        )


def test_same_nonce_fired_at_both_relays_succeeds_exactly_once(two_relays: dict[str, Any]) -> None:
    a, b, counter = two_relays["a"], two_relays["b"], two_relays["counter"]
    with httpx2.Client(base_url=a, timeout=20) as c:
        inst = discover(c, ECHO)[0][0]
    before = counter.invokes
    rounds = 6
    for i in range(rounds):
        sealed = seal(inst, inst.nonces[i], ECHO, chat_body(f"race {i}"))
        targets = [a, b] * 12  # 24 simultaneous attempts, half on each relay
        responses = asyncio.run(_fire(targets, sealed.blob, sealed.headers))
        codes = sorted(r.status_code for r in responses)
        assert codes == [200] + [403] * 23, codes
        winner = next(r for r in responses if r.status_code == 200)
        assert (
            open_blob(sealed, winner.content)["choices"][0]["message"]["content"]
            == f"Echo: race {i}"
        )
        for r in responses:
            if r.status_code == 403:
                assert r.json() == {"detail": "Invalid, expired, or already-used nonce"}
    assert counter.invokes == before + rounds  # the losers never reached the instance


def test_nonce_issued_by_one_relay_is_honoured_by_the_other(two_relays: dict[str, Any]) -> None:
    a, b = two_relays["a"], two_relays["b"]
    with httpx2.Client(base_url=a, timeout=20) as c:
        inst = discover(c, ECHO, key=KEY_B)[0][0]
    with httpx2.Client(base_url=b, timeout=20) as c:
        sealed = seal(inst, inst.nonces[0], ECHO, chat_body("cross relay"), key=KEY_B)
        resp = c.post("/e2e/invoke", content=sealed.blob, headers=sealed.headers)
        assert resp.status_code == 200
        other_key = seal(inst, inst.nonces[1], ECHO, chat_body("x"), key=KEY_A)
        assert (
            c.post("/e2e/invoke", content=other_key.blob, headers=other_key.headers).status_code
            == 403
        )


def test_rate_limit_is_shared_between_relays(redis_url: str) -> None:
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(run_app(dev_engine.create_app()))
        inst = stack.enter_context(
            run_app(instance.create_app(instance.InstanceConfig(upstream=engine)))
        )
        key = "pk-rate-shared-" + str(time.time_ns())
        urls = [
            stack.enter_context(
                run_app(
                    relay.create_app(
                        relay.RelayConfig(
                            instances=(inst,), api_keys=(key,), redis_url=redis_url, rate_limit=4
                        )
                    )
                )
            )
            for _ in range(2)
        ]
        codes = [
            httpx2.get(f"{urls[i % 2]}/e2e/instances/{ECHO}", headers=auth(key)).status_code
            for i in range(6)
        ]
    assert codes == [200, 200, 200, 200, 429, 429]


def test_redis_store_layout(redis_url: str) -> None:
    import redis

    async def run() -> None:
        store = RedisNonceStore(redis_url, prefix="t-layout:")
        try:
            kid = api_key_id("some-secret-key")
            await store.issue(kid, "chute", "inst", ["n1", "n2"], ttl=75)
            assert await store.consume("n1", kid, "chute", "inst")
            assert not await store.consume("n1", kid, "chute", "inst")
            assert not await store.consume("n2", kid, "chute", "other")  # mismatch burns it
            assert not await store.consume("n2", kid, "chute", "inst")
            await store.issue(kid, "chute", "inst", ["n3"], ttl=75)
        finally:
            await store.aclose()

    asyncio.run(run())
    client = redis.Redis.from_url(redis_url)
    try:
        keys = client.keys("t-layout:*")
        assert keys == [b"t-layout:n:n3"]
        assert 70 <= client.ttl(keys[0]) <= 75
        value = client.get(keys[0])
        run_id = client.info("server")["run_id"].encode()  # the generation tag (issue 16)
        assert value == f"{api_key_id('some-secret-key')}|chute|inst|".encode() + run_id
        assert b"some-secret-key" not in value
    finally:
        client.close()


@contextlib.contextmanager
def relay_on_redis(url: str) -> Iterator[str]:
    """dev-engine -> one instance -> a relay keeping its nonces in the Redis at ``url``."""
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(run_app(dev_engine.create_app()))
        inst = stack.enter_context(
            run_app(instance.create_app(instance.InstanceConfig(upstream=engine)))
        )
        cfg = relay.RelayConfig(instances=(inst,), api_keys=(KEY_A,), redis_url=url)
        yield stack.enter_context(run_app(relay.create_app(cfg)))


def test_redis_down_fails_closed(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url, relay_on_redis(url) as relay_url:
        with httpx2.Client(base_url=relay_url, timeout=20) as c:
            info = discover(c, ECHO)[0][0]
            import redis

            redis.Redis.from_url(url).shutdown(nosave=True)
            resp = c.get(f"/e2e/instances/{ECHO}", headers=auth())
            assert resp.status_code == 503
            assert resp.json() == {"detail": "Nonce store unavailable, try again later"}
            sealed = seal(info, info.nonces[0], ECHO, chat_body("x"))
            resp = c.post("/e2e/invoke", content=sealed.blob, headers=sealed.headers)
            assert resp.status_code == 503
            assert c.get("/health").status_code == 200


def test_relay_refuses_to_start_when_redis_is_unreachable() -> None:
    port = _free_port()  # nothing listens there
    cfg = relay.RelayConfig(
        instances=("http://127.0.0.1:9",),
        api_keys=(KEY_A,),
        redis_url=f"redis://127.0.0.1:{port}/0",
        startup_wait=0,
    )
    with pytest.raises(RuntimeError, match="failed to start"), run_app(relay.create_app(cfg)):
        pass
