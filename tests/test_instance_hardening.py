"""Issue 16 on the instance: a hostile nesting depth is a typed 400 (item 1), and a gzip bomb
is inflated off the event loop (item 6) - /health stays answered meanwhile (the latency
figure: benchmarks/bench_bombs.py)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx2
import msgspec
import pytest

from pqe2ee.errors import ErrorCode, LocalProtocolError
from pqe2ee.protocol import open_response
from pqe2ee.protocol.v1 import envelope
from pqe2ee.server.instance.exchange import OPEN_ON_LOOP_MAX
from test_instance import AEAD, KEM, Running, chat, hdrs, public_key, running_instance, seal


@pytest.fixture(scope="module")
def small_inst(engine: str) -> Iterator[Running]:
    with running_instance(engine, max_plaintext=2 * 1024 * 1024) as r:
        yield r


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    from pqe2ee.testing.dev_engine import create_app
    from servers import run_app

    with run_app(create_app()) as url:
        yield url


def test_sealers_refuse_an_unencodable_depth() -> None:
    """The client side too: a mapping nested past msgspec's limit is a LocalProtocolError."""
    deep: Any = 0
    for _ in range(5000):
        deep = [deep]
    # msgspec's encoder stops at the interpreter's recursion limit, which a test run before
    # this one may have left raised: CPython's default for the length of this test.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        with pytest.raises(LocalProtocolError) as info:
            seal(KEM.generate().public_key, {"model": "m", "x": deep})
    finally:
        sys.setrecursionlimit(limit)
    assert info.value.code is ErrorCode.INVALID_BODY


def bomb(pk: bytes, size: int) -> bytes:
    body = {"model": "dev-echo", "messages": [], "pad": "a" * size}
    blob = seal(pk, body).blob
    assert len(blob) < 64 * 1024  # small on the wire, huge inflated
    return blob


def test_deeply_nested_request_is_a_typed_400(small_inst: Running) -> None:
    with httpx2.Client(timeout=30) as http:
        pk = public_key(http, small_inst)
        # A hostile client's plaintext (sealed by hand: our own sealer refuses such a body).
        deep = b"[" * 5000 + b"]" * 5000
        plaintext = b'{"model":"dev-echo","x":' + deep + b',"e2e_response_pk":"AAAA"}'
        blob = envelope._seal(plaintext, 9, pk, envelope.INFO_REQUEST, KEM, AEAD, os.urandom)
        r = http.post(small_inst.url + "/e2e/invoke", content=blob, headers=hdrs(stream=False))
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "malformed_payload"


def test_bomb_is_inflated_off_the_event_loop(
    small_inst: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int]] = []  # (thread, inflation bound) of every gunzip
    real = envelope.gunzip_bounded

    def recording(*args: Any, **kw: Any) -> bytes:
        calls.append((threading.current_thread().name, kw["limit"]))
        return real(*args, **kw)

    monkeypatch.setattr(envelope, "gunzip_bounded", recording)
    with httpx2.Client(timeout=30) as http:
        pk = public_key(http, small_inst)
        r = http.post(
            small_inst.url + "/e2e/invoke", content=bomb(pk, 3 << 20), headers=hdrs(stream=False)
        )
        assert r.status_code == 400 and r.json()["code"] == "oversize", r.text
        assert http.get(small_inst.url + "/health").status_code == 200
    on_loop = [limit for name, limit in calls if name.startswith("uvicorn-")]
    off_loop = [limit for name, limit in calls if not name.startswith("uvicorn-")]
    # The event loop inflates at most OPEN_ON_LOOP_MAX bytes (its bounded first try); the
    # inflation up to max_plaintext runs in a worker thread.
    assert all(limit <= OPEN_ON_LOOP_MAX for limit in on_loop), calls
    assert off_loop == [2 * 1024 * 1024], calls


def test_request_inflating_past_the_loop_bound_opens_in_a_thread(
    small_inst: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A legitimate request whose small blob inflates past OPEN_ON_LOOP_MAX (but within
    # max_plaintext): the bounded try on the event loop gives up and a worker thread opens it.
    calls: list[tuple[str, int]] = []
    real = envelope.gunzip_bounded

    def recording(*args: Any, **kw: Any) -> bytes:
        calls.append((threading.current_thread().name, kw["limit"]))
        return real(*args, **kw)

    monkeypatch.setattr(envelope, "gunzip_bounded", recording)
    text = "word " * (OPEN_ON_LOOP_MAX // 4)
    with httpx2.Client(timeout=30) as http:
        pk = public_key(http, small_inst)
        sealed = seal(pk, {"model": "dev-echo", "messages": [{"role": "user", "content": text}]})
        assert len(sealed.blob) < OPEN_ON_LOOP_MAX
        r = http.post(
            small_inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(stream=False)
        )
        assert r.status_code == 200, r.text
        opened = calls[:]  # the instance's; then the response is opened here
        answer = msgspec.json.decode(open_response(r.content, sealed.response_key, aead=AEAD))
    assert answer["choices"][0]["message"]["content"].startswith("Echo: word word")
    assert [(name.startswith("uvicorn-"), limit) for name, limit in opened] == [
        (True, OPEN_ON_LOOP_MAX),
        (False, 2 * 1024 * 1024),
    ], opened


def test_small_request_opens_on_the_event_loop(
    small_inst: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    real = envelope.gunzip_bounded

    def recording(*args: Any, **kw: Any) -> bytes:
        threads.append(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(envelope, "gunzip_bounded", recording)
    with httpx2.Client(timeout=30) as http:
        sealed = seal(public_key(http, small_inst), chat("hello"))
        r = http.post(
            small_inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(stream=False)
        )
        assert r.status_code == 200, r.text
    assert len(threads) == 1 and threads[0].startswith("uvicorn-"), threads
