"""The client's total deadline (issue 16 item 8, client side): a relay that trickles an answer
one byte at a time - never silent long enough for a read timeout - cannot keep a request open
past ``ClientOptions.deadline``; every transport and the proxy end it with a typed
``deadline_exceeded``.

The relay is the real one (dev-engine -> real instances -> real relay) behind
:class:`faults.FaultyRelay`, whose ``TRICKLE`` fault sends the answer's headers at once and its
body one byte per ``trickle_interval`` seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import httpx2
import pytest

import pqe2ee
from faults import Fault, FaultyStack
from pqe2ee.errors import DeadlineExceeded, ErrorCode, LimitExceeded, LocalProtocolError
from pqe2ee.proxy.app import ProxyConfig, create_app
from pqe2ee.transports import aiohttp as e2ee_aiohttp
from pqe2ee.transports import httpx as e2ee_httpx
from pqe2ee.transports import httpx2 as e2ee_httpx2
from pqe2ee.transports.anyio import E2EEClient
from pqe2ee.transports.options import DEFAULT_DEADLINE, ClientOptions
from servers import run_app
from transport_support import KEY, messages

CHAT = "/v1/chat/completions"
#: Fast trickle for most tests: a byte every 0.2 s, cut off after 1 s.
INTERVAL, DEADLINE = 0.2, 1.0
#: Generous upper bound on how long a cut-off request may take in all (startup included).
LIMIT = DEADLINE + 10.0


def body(stream: bool = True) -> dict[str, Any]:
    return {"model": "dev-echo", "messages": messages("a long answer " * 20), "stream": stream}


@pytest.fixture
def trickling(stack: FaultyStack) -> Iterator[FaultyStack]:
    stack.faults.trickle_interval = INTERVAL
    stack.faults.inject(Fault.TRICKLE, times=1)
    yield stack
    stack.faults.trickle_interval = 2.0


def bases(stack: FaultyStack) -> dict[str, Any]:
    return {"api_key": KEY, "api_base": stack.relay, "models_base": stack.relay}


def assert_deadline(exc: BaseException) -> None:
    assert isinstance(exc, DeadlineExceeded) and isinstance(exc, LimitExceeded)
    assert exc.code is ErrorCode.DEADLINE_EXCEEDED
    assert str(exc).startswith("deadline_exceeded: ")


# -- options ---------------------------------------------------------------------------------


def test_deadline_option_default_and_validation() -> None:
    assert ClientOptions().deadline == DEFAULT_DEADLINE == 600.0
    assert ClientOptions(deadline=5).deadline == 5.0
    for bad in (0, -1, math.inf, math.nan, "10"):
        with pytest.raises(LocalProtocolError) as info:
            ClientOptions(deadline=bad)  # type: ignore[arg-type]
        assert info.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(LocalProtocolError):
        ProxyConfig(deadline=math.inf)


# -- httpx2 / httpx, async and sync ----------------------------------------------------------


@pytest.mark.anyio
async def test_httpx2_async_relay_trickling_every_2s_is_cut_off(stack: FaultyStack) -> None:
    """The case of the issue: one byte every 2 s. Without a deadline this stream would run
    for hours (each read returns within httpx's 5 s read timeout)."""
    stack.faults.trickle_interval = 2.0
    stack.faults.inject(Fault.TRICKLE, times=1)
    transport = pqe2ee.AsyncE2EETransport(**bases(stack), deadline=3.0)
    started = time.monotonic()
    async with httpx2.AsyncClient(transport=transport, timeout=5.0) as http:
        async with http.stream("POST", "http://sdk.invalid" + CHAT, json=body()) as resp:
            assert resp.status_code == 200
            with pytest.raises(e2ee_httpx2.E2EEStreamDeadlineExceeded) as info:
                async for _ in resp.aiter_raw():
                    pass
    elapsed = time.monotonic() - started
    assert_deadline(info.value)
    assert isinstance(info.value, httpx2.ReadTimeout)  # SDKs report a timeout
    assert 3.0 <= elapsed < 3.0 + 10.0
    assert stack.faults.injected == [Fault.TRICKLE]


@pytest.mark.anyio
async def test_httpx_async_stream_cut_off(trickling: FaultyStack) -> None:
    transport = e2ee_httpx.AsyncE2EETransport(**bases(trickling), deadline=DEADLINE)
    started = time.monotonic()
    async with httpx.AsyncClient(transport=transport) as http:
        async with http.stream("POST", "http://sdk.invalid" + CHAT, json=body()) as resp:
            with pytest.raises(e2ee_httpx.E2EEStreamDeadlineExceeded) as info:
                async for _ in resp.aiter_raw():
                    pass
    assert_deadline(info.value)
    assert isinstance(info.value, httpx.ReadTimeout)
    assert time.monotonic() - started < LIMIT


@pytest.mark.parametrize("flavour", ["httpx2", "httpx"])
def test_sync_stream_cut_off(trickling: FaultyStack, flavour: str) -> None:
    """The blocking transports check the deadline at every read: the next byte after it
    ends the stream."""
    module: Any = e2ee_httpx2 if flavour == "httpx2" else e2ee_httpx
    client_cls: Any = httpx2.Client if flavour == "httpx2" else httpx.Client
    transport = module.E2EETransport(**bases(trickling), deadline=DEADLINE)
    started = time.monotonic()
    with client_cls(transport=transport) as http:
        with http.stream("POST", "http://sdk.invalid" + CHAT, json=body()) as resp:
            assert resp.status_code == 200
            with pytest.raises(module.E2EEStreamDeadlineExceeded) as info:
                for _ in resp.iter_raw():
                    pass
    assert_deadline(info.value)
    assert DEADLINE <= time.monotonic() - started < LIMIT


def test_sync_non_stream_answer_cut_off_before_handover(trickling: FaultyStack) -> None:
    """A single (non-stream) answer is read whole before it is handed over: the deadline
    raises the pqe2ee error itself."""
    transport = pqe2ee.E2EETransport(**bases(trickling), deadline=DEADLINE)
    with httpx2.Client(transport=transport) as http:
        with pytest.raises(DeadlineExceeded) as info:
            http.post("http://sdk.invalid" + CHAT, json=body(stream=False))
    assert_deadline(info.value)


@pytest.mark.anyio
async def test_async_non_stream_answer_cut_off_before_handover(trickling: FaultyStack) -> None:
    transport = pqe2ee.AsyncE2EETransport(**bases(trickling), deadline=DEADLINE)
    started = time.monotonic()
    async with httpx2.AsyncClient(transport=transport) as http:
        with pytest.raises(DeadlineExceeded) as info:
            await http.post("http://sdk.invalid" + CHAT, json=body(stream=False))
    assert_deadline(info.value)
    assert time.monotonic() - started < LIMIT


# -- aiohttp and anyio ------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # aiohttp runs on asyncio only
async def test_aiohttp_stream_cut_off(trickling: FaultyStack, anyio_backend: str) -> None:
    started = time.monotonic()
    async with e2ee_aiohttp.E2EEClientSession(**bases(trickling), deadline=DEADLINE) as session:
        async with session.post(CHAT, json=body()) as resp:
            assert resp.status == 200
            with pytest.raises(e2ee_aiohttp.E2EEStreamDeadlineExceeded) as info:
                await resp.read()
    assert_deadline(info.value)
    assert isinstance(info.value, aiohttp.ClientPayloadError)
    assert time.monotonic() - started < LIMIT


@pytest.mark.anyio
async def test_anyio_stream_cut_off(trickling: FaultyStack) -> None:
    started = time.monotonic()
    async with E2EEClient(**bases(trickling), deadline=DEADLINE) as client:
        with pytest.raises(DeadlineExceeded) as info:
            async with client.stream_chat(model="dev-echo", messages=messages("x " * 40)) as ev:
                async for _ in ev:
                    pass
    assert_deadline(info.value)
    assert time.monotonic() - started < LIMIT


@pytest.mark.anyio
async def test_stream_within_the_deadline_is_untouched(stack: FaultyStack) -> None:
    """A normal stream well inside a short deadline is read whole (the bound costs nothing)."""
    transport = pqe2ee.AsyncE2EETransport(**bases(stack), deadline=30.0)
    async with httpx2.AsyncClient(transport=transport) as http:
        resp = await http.post("http://sdk.invalid" + CHAT, json=body())
    assert resp.status_code == 200
    assert resp.text.rstrip().endswith("data: [DONE]")


# -- the proxy ---------------------------------------------------------------------------------


def test_proxy_deadline(stack: FaultyStack) -> None:
    """``--deadline`` reaches every per-key transport: a trickled stream ends with an error
    event, a trickled single answer is a 504 ``deadline_exceeded``."""
    stack.faults.trickle_interval = INTERVAL
    config = ProxyConfig(api_base=stack.relay, models_base=stack.relay, deadline=DEADLINE)
    try:
        with run_app(create_app(config)) as url, httpx2.Client(base_url=url, timeout=30) as http:
            headers = {"authorization": f"Bearer {KEY}"}
            stack.faults.inject(Fault.TRICKLE, times=1)
            started = time.monotonic()
            resp = http.post("/v1/chat/completions", json=body(stream=False), headers=headers)
            assert resp.status_code == 504, resp.text
            assert resp.json()["error"]["code"] == "deadline_exceeded"
            assert time.monotonic() - started < LIMIT
            stack.faults.inject(Fault.TRICKLE, times=1)
            with http.stream("POST", "/v1/chat/completions", json=body(), headers=headers) as s:
                assert s.status_code == 200
                raw = s.read()
            assert b"deadline_exceeded" in raw
            assert not raw.rstrip().endswith(b"data: [DONE]")
    finally:
        stack.faults.trickle_interval = 2.0


# -- keep-alive: idle connections are dropped before a 5 s server keep-alive -----------------


async def _peer_port_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers every request with the client's port: one port, one connection."""
    if scope["type"] != "http":
        return
    body = str(scope["client"][1]).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


IDLE = 2.5  # past the transports' 2 s, short of uvicorn's (and httpx's own) 5 s


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # aiohttp runs on asyncio only
async def test_default_pools_do_not_reuse_a_connection_idle_past_2s(anyio_backend: str) -> None:
    """bench_redis_streams.py found ~1 in 250 streams failing with ReadError when the
    client's pool kept idle connections 5 s, as long as uvicorn's keep-alive: the relay closed
    a connection as the next request went out on it. The transports' default pools now drop
    them after 2 s (a 5 s pool would reuse this connection)."""
    import anyio

    with run_app(_peer_port_app, timeout_keep_alive=30) as url:
        transport = pqe2ee.AsyncE2EETransport(api_key=KEY, api_base=url, models_base=url)
        async with httpx2.AsyncClient(transport=transport) as http:
            first = (await http.get(url + "/v1/models")).text
            assert (await http.get(url + "/v1/models")).text == first  # reused while fresh
            await anyio.sleep(IDLE)
            assert (await http.get(url + "/v1/models")).text != first
        async with e2ee_aiohttp.E2EEClientSession(api_key=KEY, api_base=url, models_base=url) as s:
            first = await (await s.get(url + "/v1/models")).text()
            assert await (await s.get(url + "/v1/models")).text() == first
            await anyio.sleep(IDLE)
            assert await (await s.get(url + "/v1/models")).text() != first


@pytest.mark.anyio
async def test_a_scope_inside_one_of_the_same_deadline_only_checks(anyio_backend: str) -> None:
    """Inside the request's scope a step's scope opens no second cancel scope (same moment),
    yet a step overrunning the deadline still ends in DeadlineExceeded, and a scope opened
    after the request's (a stream read later) cancels by itself again."""
    import anyio

    from pqe2ee.transports._deadline import AsyncDeadline

    deadline = AsyncDeadline(0.2, time.monotonic)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded), deadline:
        outer = deadline._scope
        assert outer is not None
        with deadline:
            assert deadline._scope is outer and deadline._open == 2  # nested: a check only
            await anyio.sleep(5)
    assert time.monotonic() - started < 2
    assert deadline._open == 0 and deadline._scope is None
    later = AsyncDeadline(0.2, time.monotonic)
    with pytest.raises(DeadlineExceeded), later:
        assert later._scope is not None  # on its own: a real cancel scope
        await anyio.sleep(5)
    with pytest.raises(DeadlineExceeded), later:  # past it: refused at entry
        pass
    assert later._open == 0
