"""The server benchmark's floor E2EE path (benchmarks/_floor_instance.py behind the bench's
forwarder, and bench_server.py's ``FloorClient``) stays a correct v1 peer: pqe2ee.protocol opens
its answers, its outer stream is the real instance's line for line (usage events byte for byte,
records opening to the same plaintexts), its nonces are single-use, and the floor client reads
both it and the real instance. It is a measuring instrument; this keeps it honest."""

from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import msgspec
import pytest

from pqe2ee import protocol
from pqe2ee.backends import get_aead, get_kem
from pqe2ee.protocol.kdf import INFO_STREAM, derive_key
from pqe2ee.server.relay import chute_id_for
from pqe2ee.testing import dev_engine
from servers import run_app, serve_chain

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import _floor_instance as floor_instance  # noqa: E402
import _server_clients as clients  # noqa: E402
import bench_server as bench  # noqa: E402

PROMPT = " ".join(f"word{i}" for i in range(30))


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    with run_app(dev_engine.create_app()) as url:
        yield url


@pytest.fixture(scope="module")
def forwarder(engine: str) -> Iterator[str]:
    """The bench's floor path: forwarder -> floor instance -> dev-engine."""
    with (
        run_app(bench._floor_instance_app(engine)) as instance,
        run_app(bench._proxy_app(instance)) as url,
    ):
        yield url


@pytest.fixture(scope="module")
def real_relay() -> Iterator[str]:
    with serve_chain(1, api_keys=(bench.KEY,), rate_limit=10_000, nonces_per_instance=10) as chain:
        yield chain.relay


def _body(stream: bool, **extra: Any) -> bytes:
    body = {"model": clients.MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    return msgspec.json.encode({**body, "stream": stream, **extra})


def _invoke(url: str, blob: bytes, instance_id: str, nonce: str, stream: bool) -> httpx2.Response:
    headers = bench.E2EClient(url, None).headers(instance_id, nonce, stream)
    return httpx2.post(url + "/e2e/invoke", content=blob, headers=headers, timeout=30)


def _lease(url: str) -> tuple[Any, list[str]]:
    """One discovery through the forwarder, parsed by pqe2ee.protocol."""
    doc = httpx2.get(f"{url}/e2e/instances/{chute_id_for(clients.MODEL)}", timeout=30)
    assert doc.status_code == 200
    (inst,) = protocol.parse_discovery(doc.content, 0.0).instances
    assert len(inst.nonces) == 10
    return inst, list(inst.nonces)


@pytest.mark.parametrize("options", [None, {"include_usage": False, "extra": 1}])
def test_the_protocol_opens_its_answers(forwarder: str, options: Any) -> None:
    kem, aead = get_kem(), get_aead()
    inst, nonces = _lease(forwarder)
    extra = {} if options is None else {"stream_options": options}

    sealed = protocol.seal_request(
        _body(False), inst.public_key, response_key=kem.generate(), kem=kem, aead=aead
    )
    answer = _invoke(forwarder, sealed.blob, inst.instance_id, nonces.pop(), False)
    assert answer.status_code == 200
    reply = msgspec.json.decode(
        protocol.open_response(answer.content, sealed.response_key, aead=aead)
    )
    assert reply["choices"][0]["message"]["content"] == "Echo: " + PROMPT

    sealed = protocol.seal_request(
        _body(True, **extra), inst.public_key, response_key=kem.generate(), kem=kem, aead=aead
    )
    answer = _invoke(forwarder, sealed.blob, inst.instance_id, nonces.pop(), True)
    assert answer.status_code == 200
    assert b"word7" not in answer.content  # (sealed)
    dec = protocol.StreamDecryptor(sealed.response_key, aead=aead)
    dec.receive_data(answer.content)
    dec.receive_eof()
    events = dec.events()
    assert dec.complete and sum(isinstance(e, protocol.Done) for e in events) == 1
    datas = [e.event.data for e in events if isinstance(e, protocol.InnerEvent)]  # ([DONE] is Done)
    inner = [msgspec.json.decode(data) for data in datas]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in inner if c["choices"])
    assert text == "Echo: " + PROMPT
    # usage forced on, continuous, over the client's own options: one plaintext usage event
    # before each inner chunk that carries usage (every one of them)
    usages = [e.usage for e in events if isinstance(e, protocol.Usage)]
    assert len(usages) == len(inner) > 30
    assert usages == [c["usage"] for c in inner]


def _stream_key(init: bytes, key: Any) -> bytes:
    assert init.startswith(b'data: {"e2e_init":"') and init.endswith(b'"}\n\n')
    ct = base64.b64decode(init[19:-4], validate=True)
    return derive_key(key.decapsulate(ct), ct, INFO_STREAM)


def _items(outer: bytes, stream_key: bytes) -> list[tuple[str, bytes]]:
    """An outer stream's events in order: records opened, usage events as their exact bytes."""
    events = outer.split(b"\n\n")
    assert events.pop() == b""
    items = []
    for event in events:
        assert event.startswith(b"data: ") and b"\n" not in event
        ((name, value),) = msgspec.json.decode(event[6:]).items()
        if name == "e2e":
            raw = base64.b64decode(value, validate=True)
            items.append((name, get_aead().open(stream_key, raw[:12], raw[12:])))
        else:
            assert name == "usage"
            items.append((name, event))
    return items


def test_its_outer_stream_is_the_real_instance_s(engine: str) -> None:
    """Fed the same engine chunks, the floor's records and the real StreamEncoder's carry the
    same plaintexts, in the same events, with the same usage events byte for byte."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    sse = httpx2.post(
        engine + bench.CHAT, content=_body(True, stream_options=opts), timeout=30
    ).content
    extra = (
        b'data: {"choices":[],"usage":null}\n\n: a comment with "usage"\n'
        b'event: x\ndata: {"usage": {"total_tokens": 3, "n": [1, {"a": "\\u00e9"}]}}\n\n'
        b'data: {"id":1,"usage":{"b":2}}'  # no LF: finish() seals it
    )
    data = sse + extra
    chunks = [sse] + [data[i : i + 37] for i in range(0, len(data), 37)]  # lines across chunks
    kem, aead = get_kem(), get_aead()
    key = kem.generate()
    real = protocol.StreamEncoder(protocol.StreamSealer(key.public_key, kem=kem, aead=aead))
    floor = floor_instance.StreamRecords(key.public_key, kem, aead)
    real_key, floor_key = _stream_key(real.start(), key), _stream_key(floor.init, key)
    usage_events, outer = 0, []
    for chunk in chunks:
        expected = _items(real.feed(chunk), real_key)
        outer.append(floor.feed(chunk))
        assert _items(outer[-1], floor_key) == expected
        usage_events += sum(name == "usage" for name, _ in expected)
    outer.append(floor.finish())
    assert _items(outer[-1], floor_key) == _items(real.finish(), real_key) != []
    assert usage_events > 60  # (both runs of the engine's stream, and the extra lines)
    records = [e for e in b"".join(outer).split(b"\n\n") if e.startswith(b'data: {"e2e":')]
    nonces = {base64.b64decode(e[14:-2])[:12] for e in records}
    assert len(nonces) == len(records) > 100  # (no nonce twice across pool refills)


def test_nonces_are_issued_and_single_use(forwarder: str) -> None:
    kem, aead = get_kem(), get_aead()
    inst, nonces = _lease(forwarder)
    _, others = _lease(forwarder)
    assert not set(nonces) & set(others)

    def call(nonce: str) -> httpx2.Response:
        sealed = protocol.seal_request(
            _body(False), inst.public_key, response_key=kem.generate(), kem=kem, aead=aead
        )
        return _invoke(forwarder, sealed.blob, inst.instance_id, nonce, False)

    for refused in ("never-issued", ""):
        answer = call(refused)
        assert answer.status_code == 403 and b"nonce" in answer.content
    assert call(nonces[0]).status_code == 200
    answer = call(nonces[0])
    assert answer.status_code == 403 and b"nonce" in answer.content
    assert call(others[0]).status_code == 200


def test_the_bench_clients_read_both_paths(forwarder: str, real_relay: str) -> None:
    async def run() -> None:
        async with httpx2.AsyncClient(timeout=30, trust_env=False) as client:
            await bench.self_check(client, real_relay, forwarder)  # both ways, both modes
            for url in (forwarder, real_relay):
                floor = bench.FloorClient(url, client)
                for stream in (False, True):
                    cell = await bench.run_cell(floor, stream, 3, 0.05, 0.3, {})
                    assert cell.errors == 0 and cell.requests > 3
                assert floor.total("discoveries") >= 3 and len(floor.workers) == 3
                for w in floor.workers.values():
                    assert isinstance(w, bench.FloorClient)
                    if w.refill is not None:
                        await w.refill

    asyncio.run(run())


def test_the_self_check_fails_loudly_on_a_path_that_is_not_v1(engine: str) -> None:
    async def run() -> None:
        async with httpx2.AsyncClient(timeout=30, trust_env=False) as client:
            with run_app(bench._proxy_app(engine)) as plain:  # /e2e/... reaches the engine: 404
                with pytest.raises(httpx2.HTTPStatusError):
                    await bench.self_check(client, plain, plain)

    asyncio.run(run())


def test_the_floor_client_checks_what_the_plaintext_client_checks(forwarder: str) -> None:
    """The status, and the stream's end: an engine stream without [DONE] is refused."""

    class Elsewhere(bench.FloorClient):
        def headers(self, instance_id: str, nonce: str, stream: bool) -> dict[str, str]:
            return {**super().headers(instance_id, nonce, stream), "x-e2e-path": "/nowhere"}

    async def no_done(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        sse = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": sse})
        chunk = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        await send({"type": "http.response.body", "body": chunk})

    async def run(cut: str) -> None:
        async with httpx2.AsyncClient(timeout=30, trust_env=False) as client:
            with pytest.raises(RuntimeError, match="floor call failed: 404"):
                await Elsewhere(forwarder, client).call(False)
            with pytest.raises(RuntimeError, match="floor stream incomplete"):
                await bench.FloorClient(cut, client).call(True)

    with (
        run_app(no_done, lifespan="off") as engine,
        run_app(bench._floor_instance_app(engine)) as instance,
        run_app(bench._proxy_app(instance)) as cut,
    ):
        asyncio.run(run(cut))


def _cell(rps: float) -> bench.Cell:
    return bench.Cell(int(rps), 1.0, [0.001], 0, {})


@pytest.mark.parametrize(
    ("plain", "ours", "floor", "verdict"),
    [
        (100, 80, 70, "met"),
        (100, 79, 79, "floor-bound"),  # the floor misses too
        (100, 70, 95, "missed"),
        (100, 77, 80, "floor-bound"),  # ours within 5 % of a floor that meets the target
        (100, 75, 80, "missed"),  # ... and just outside
    ],
)
def test_each_cell_gets_its_verdict(plain: int, ours: int, floor: int, verdict: str) -> None:
    assert bench.verdict(_cell(plain), _cell(ours), _cell(floor)) == verdict


def test_the_call_counter_snapshots_a_served_process(
    engine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench_server_calls.py: a server started with BENCH_PROFILE writes its counts on each
    SIGUSR1; the calls between two snapshots are the requests' (here a forwarder's)."""
    import bench_server_calls as calls

    monkeypatch.setenv("BENCH_PROFILE", str(tmp_path))
    taken: dict[int, int] = {}
    with bench.start("proxy", engine) as proxy:
        first = calls._snapshot(str(tmp_path), [proxy], taken)
        for _ in range(5):
            httpx2.post(proxy.url + bench.CHAT, content=_body(False), timeout=30)
        second = calls._snapshot(str(tmp_path), [proxy], taken)
    pid = proxy.popen.pid
    assert taken == {pid: 2}
    per_request = (second[pid][0] - first[pid][0]) / 5
    assert 500 < per_request < 20_000
    per_function = calls._per_function(first[pid][1], second[pid][1], 5)
    # (pstats' rows lose the counts of generated methods that share a key: at most a few)
    assert 0.9 * per_request <= sum(per_function.values()) <= per_request
    assert per_function["bench_server.py:_forward"] >= 1  # (a coroutine: once per resumption)


def test_the_call_total_counts_generated_methods_apart() -> None:
    """Two dataclasses' ``__eq__`` are both ``<string>:2(__eq__)`` to pstats, which keeps one
    row; ``total_calls`` counts every call."""
    import cProfile
    import dataclasses
    import pstats

    import bench_server_calls as calls

    @dataclasses.dataclass
    class A:
        x: int = 0

    @dataclasses.dataclass
    class B:
        y: int = 0

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(10):
        _ = A() == A()
    for _ in range(3):
        _ = B() == B()
    profile.disable()
    eq = [e for e in profile.getstats() if getattr(e.code, "co_name", "") == "__eq__"]
    assert sum(e.callcount for e in eq) == 13
    assert calls.total_calls(profile) - pstats.Stats(profile).total_calls >= 3
