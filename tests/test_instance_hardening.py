"""Issue 16 on the instance: a hostile nesting depth is a typed 400 (item 1), and a gzip bomb
is inflated off the event loop (item 6) - /health stays answered meanwhile (the latency
figure: benchmarks/bench_bombs.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from pqe2ee.errors import ErrorCode, LocalProtocolError
from pqe2ee.protocol.v1 import envelope
from test_instance import AEAD, KEM, Running, hdrs, public_key, running_instance, seal


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
    with pytest.raises(LocalProtocolError) as info:
        seal(KEM.generate().public_key, {"model": "m", "x": deep})
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
        blob = envelope._seal(
            envelope._gzip(plaintext, 9), pk, envelope.INFO_REQUEST, KEM, AEAD, os.urandom
        )
        r = http.post(small_inst.url + "/e2e/invoke", content=blob, headers=hdrs(stream=False))
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "malformed_payload"


def test_bomb_is_inflated_off_the_event_loop(
    small_inst: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    real = envelope.gunzip_bounded

    def recording(*args: Any, **kw: Any) -> bytes:
        threads.append(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(envelope, "gunzip_bounded", recording)
    with httpx2.Client(timeout=30) as http:
        pk = public_key(http, small_inst)
        r = http.post(
            small_inst.url + "/e2e/invoke", content=bomb(pk, 3 << 20), headers=hdrs(stream=False)
        )
        assert r.status_code == 400 and r.json()["code"] == "oversize", r.text
        assert http.get(small_inst.url + "/health").status_code == 200
    assert threads and not any(name.startswith("uvicorn-") for name in threads), threads
