"""The nonce-pool prefetch runs beside the request that triggers it, not in its path.

A request whose lease leaves the pool at the low watermark (3 nonces) starts a discovery in
the background (asyncio: a loop task; blocking: a thread; trio: inline, as before) and goes on
at once. Here the relay holds every discovery until the test lets it go
(``FaultyRelay.hold_discoveries``): the triggering request completes while its discovery is
held at the relay, the next ones use what is left and then the refilled pool (one discovery),
and closing the client with a discovery held is clean.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import httpx
import httpx2
import openai
import pytest

import pqe2ee.transports.httpx as tx_httpx
import pqe2ee.transports.httpx2 as tx_httpx2
from faults import FaultyStack
from pqe2ee.server.relay import chute_id_for
from pqe2ee.transports.aiohttp import E2EEClientSession
from pqe2ee.transports.anyio import E2EEClient
from transport_support import KEY

SDK_BASE = "http://sdk-base-url.invalid/v1"  # never reached: the transport routes everything
CHUTE = chute_id_for("dev-echo")
FLAVOURS: dict[str, tuple[Any, Any]] = {"httpx2": (httpx2, tx_httpx2), "httpx": (httpx, tx_httpx)}
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
#: One request through a client (its argument: the SDK client, where there is one).
Ask = Callable[[Any], Awaitable[Any]]


def _clients(
    flavour: str, stack: FaultyStack, *, is_async: bool, **options: Any
) -> tuple[Any, Any]:
    lib, mod = FLAVOURS[flavour]
    cls = mod.AsyncE2EETransport if is_async else mod.E2EETransport
    t = cls(api_key=KEY, api_base=stack.relay, models_base=stack.relay, **options)
    sdk = openai.AsyncOpenAI if is_async else openai.OpenAI
    http = lib.AsyncClient(transport=t) if is_async else lib.Client(transport=t)
    return t, sdk(api_key=KEY, base_url=SDK_BASE, http_client=http, max_retries=0)


def _available(t: Any) -> int:
    return int(t.state.available(CHUTE, time.monotonic()))


def _ours(record: logging.LogRecord) -> bool:
    """A client-side record (the servers here log each invoke at info)."""
    return record.name.startswith("pqe2ee.transports") or record.name == "asyncio"


def _wait(ok: Callable[[], bool]) -> None:
    for _ in range(1000):
        if ok():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


async def _await(ok: Callable[[], bool]) -> None:
    for _ in range(1000):
        if ok():
            return
        await anyio.sleep(0.01)
    raise AssertionError("timed out")


def _ask(client: Any) -> Any:
    reply = client.chat.completions.create(model="dev-echo", messages=MESSAGES)
    assert reply.choices[0].message.content == "Echo: hi"
    return reply


async def _ask_async(client: Any) -> Any:
    reply = await client.chat.completions.create(model="dev-echo", messages=MESSAGES)
    assert reply.choices[0].message.content == "Echo: hi"
    return reply


def _to_watermark(t: Any, client: Any) -> None:
    """Requests until the next lease leaves the pool at the watermark (3 nonces)."""
    _ask(client)  # the first discovery (in the request's path: the pool is empty)
    while _available(t) > 4:
        _ask(client)


async def _to_watermark_async(t: Any, client: Any, ask: Ask) -> None:
    await ask(client)
    while _available(t) > 4:
        await ask(client)


@pytest.mark.parametrize("flavour", ["httpx2", "httpx"])
def test_sync_request_goes_on_while_its_prefetch_runs(stack: FaultyStack, flavour: str) -> None:
    t, client = _clients(flavour, stack, is_async=False)
    with client:
        _to_watermark(t, client)
        faults = stack.faults
        faults.hold_discoveries = gate = threading.Event()
        _ask(client)  # leaves 3 nonces: starts the prefetch
        assert faults.discoveries_done == 1  # it returned before its discovery was answered
        _wait(lambda: faults.discoveries == 2)  # held at the relay now
        _ask(client)  # from what is left, while the discovery is held
        assert faults.discoveries_done == 1
        gate.set()
        _wait(lambda: t._engine._background.running() == 0)
        assert faults.discoveries_done == 2
        assert _available(t) > 4  # refilled
        for _ in range(5):
            _ask(client)
        assert faults.discoveries == 2  # the next requests used the refilled pool


@contextlib.asynccontextmanager
async def _async_client(
    kind: str, stack: FaultyStack, **options: Any
) -> AsyncIterator[tuple[Any, Ask]]:
    """An async client of ``kind`` (its engine's facade, and how to ask it once)."""
    bases: dict[str, Any] = {"api_key": KEY, "api_base": stack.relay, "models_base": stack.relay}
    bases.update(options)
    if kind == "aiohttp":
        async with E2EEClientSession(**bases) as session:

            async def ask_aiohttp(_: Any) -> None:
                body = {"model": "dev-echo", "messages": MESSAGES}
                async with session.post("/v1/chat/completions", json=body) as resp:
                    reply = await resp.json()
                assert reply["choices"][0]["message"]["content"] == "Echo: hi"

            yield session, ask_aiohttp
    elif kind == "anyio":
        async with E2EEClient(**bases) as client:

            async def ask_anyio(_: Any) -> None:
                reply = await client.chat(model="dev-echo", messages=MESSAGES)
                assert reply["choices"][0]["message"]["content"] == "Echo: hi"

            yield client, ask_anyio
    else:
        t, sdk = _clients(kind, stack, is_async=True, **options)
        async with sdk:
            yield t, lambda _: _ask_async(sdk)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # a loop task (trio: inline, below)
@pytest.mark.parametrize("kind", ["httpx2", "httpx", "aiohttp", "anyio"])
async def test_async_request_goes_on_while_its_prefetch_runs(stack: FaultyStack, kind: str) -> None:
    async with _async_client(kind, stack) as (t, ask):
        await _to_watermark_async(t, None, ask)
        faults = stack.faults
        faults.hold_discoveries = gate = threading.Event()
        await ask(None)  # leaves 3 nonces: starts the prefetch
        assert faults.discoveries_done == 1  # it returned before its discovery was answered
        await _await(lambda: faults.discoveries == 2)  # held at the relay now
        await ask(None)  # from what is left, while the discovery is held
        assert faults.discoveries_done == 1
        assert t._engine._background.running() == 1
        gate.set()
        await _await(lambda: t._engine._background.running() == 0)
        assert faults.discoveries_done == 2
        assert _available(t) > 4  # refilled
        for _ in range(5):
            await ask(None)
        assert faults.discoveries == 2  # the next requests used the refilled pool


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_prefetches_inline(stack: FaultyStack) -> None:
    t, client = _clients("httpx2", stack, is_async=True)
    async with client:
        await _to_watermark_async(t, client, _ask_async)
        await _ask_async(client)  # leaves 3 nonces: discovers before it is sent
        assert stack.faults.discoveries_done == 2
        assert _available(t) > 4
        assert t._engine._background.running() == 0


def test_sync_close_with_a_prefetch_in_flight(
    stack: FaultyStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pqe2ee.transports")
    t, client = _clients("httpx2", stack, is_async=False)
    faults = stack.faults
    with client:
        _to_watermark(t, client)
        caplog.clear()  # (the first request's warnings: no v2, no attestation)
        faults.hold_discoveries = gate = threading.Event()
        _ask(client)
        _wait(lambda: faults.discoveries == 2)
    gate.set()  # the client is closed: the held discovery fails or lands, forgiven
    _wait(lambda: t._engine._background.running() == 0)
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG and _ours(r)]
    assert KEY not in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("kind", ["httpx2", "aiohttp", "anyio"])
async def test_async_close_cancels_the_prefetch_in_flight(
    stack: FaultyStack,
    kind: str,
    caplog: pytest.LogCaptureFixture,
    recwarn: pytest.WarningsRecorder,
) -> None:
    caplog.set_level(logging.DEBUG, logger="pqe2ee.transports")
    faults = stack.faults
    async with _async_client(kind, stack) as (t, ask):
        await _to_watermark_async(t, None, ask)
        caplog.clear()  # (the first request's warnings: no v2, no attestation)
        faults.hold_discoveries = gate = threading.Event()
        await ask(None)
        await _await(lambda: faults.discoveries == 2)
        assert t._engine._background.running() == 1
    await _await(lambda: t._engine._background.running() == 0)  # cancelled, not waited for
    gate.set()
    assert faults.discoveries_done <= 2
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG and _ours(r)]
    assert not recwarn.list


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # a loop task (trio: inline)
@pytest.mark.parametrize("kind", ["httpx2", "aiohttp", "anyio"])
async def test_async_prefetch_held_at_the_relay_ends_at_its_own_deadline(
    stack: FaultyStack, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A prefetch runs in a block of its own deadline: a discovery the relay never answers
    is cut there (DeadlineExceeded, forgiven at debug), the client goes on."""
    caplog.set_level(logging.DEBUG, logger="pqe2ee.transports")
    faults = stack.faults
    async with _async_client(kind, stack, deadline=2.0) as (t, ask):
        await _to_watermark_async(t, None, ask)
        faults.hold_discoveries = gate = threading.Event()
        try:
            await ask(None)  # leaves 3 nonces: starts the prefetch
            await _await(lambda: faults.discoveries == 2)  # held at the relay now
            done = faults.discoveries_done
            started = time.monotonic()
            await _await(lambda: t._engine._background.running() == 0)  # never let go: cut
            assert time.monotonic() - started < 6.0
            assert faults.discoveries_done == done  # (still held)
            assert "discovery prefetch failed: DeadlineExceeded" in caplog.text
            await ask(None)  # the client goes on (the last nonces)
        finally:
            gate.set()


@pytest.mark.parametrize("flavour", ["sync", "asyncio", "trio"])
def test_an_unexpected_failure_of_a_background_job_is_a_warning(
    flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A prefetch forgives the failures it expects (pqe2ee, network: debug); anything else
    reaching the runner is a bug worth seeing - logged as a warning, its type only."""
    from pqe2ee.transports._primitives import AsyncBackground, Background

    caplog.set_level(logging.DEBUG, logger="pqe2ee.transports")

    def job() -> None:
        raise ValueError("secret prompt text")

    async def ajob() -> None:
        job()

    if flavour == "sync":
        background = Background()
        background.start(job)
        _wait(lambda: background.running() == 0)
    else:

        async def main() -> None:
            jobs = AsyncBackground()
            await jobs.start(ajob)
            for _ in range(1000):
                if not jobs.running():
                    break
                await anyio.sleep(0.01)

        anyio.run(main, backend=flavour)
    failed = [r for r in caplog.records if r.getMessage() == "background job failed: ValueError"]
    assert [r.levelno for r in failed] == [logging.WARNING]
    assert "secret" not in caplog.text


def test_sync_jobs_share_one_worker_thread_until_cancelled() -> None:
    """A thread start costs ~60 us of CPU: the blocking flavour keeps one worker for its
    jobs, and ends it on cancel (the transport's close) after the jobs queued so far."""
    from pqe2ee.transports._primitives import Background

    background = Background()
    seen: list[threading.Thread] = []

    def job() -> None:
        seen.append(threading.current_thread())

    for _ in range(3):
        background.start(job)
    _wait(lambda: background.running() == 0)
    assert len(seen) == 3 and len(set(seen)) == 1
    worker = seen[0]
    assert worker is not threading.current_thread() and worker.daemon
    background.cancel()
    worker.join(5)
    assert not worker.is_alive()
    background.start(job)  # after a cancel: a worker of its own
    _wait(lambda: background.running() == 0)
    assert seen[-1] is not worker
    background.cancel()
