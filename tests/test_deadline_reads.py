"""The total deadline over the reads of a streamed body (transports/_deadline.py, _bounded.py).

A streamed answer is read after the request's own cancel scope has closed, a chunk at a time
with yields to the caller in between. On asyncio one timer per body (``AsyncReadTimer``)
replaces the cancel scope each read used to open; under trio each read keeps its scope. Either
way the limit is the same - a read waiting past the deadline ends in ``DeadlineExceeded`` at
the deadline, a read starting after it is refused - and nothing is left behind (timers,
tasks, cancellation requests) however the body ends: read out, closed early, failed, cut off.
The loopback tests at the end drive the real relay through httpx2 and the anyio client.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx2
import pytest

import pqe2ee
from faults import Fault, FaultyStack
from pqe2ee.errors import DeadlineExceeded
from pqe2ee.transports import _deadline
from pqe2ee.transports._async._stream import AsyncRawBody, read_raw, reraise
from pqe2ee.transports._deadline import AsyncDeadline
from pqe2ee.transports._primitives import AsyncReadTimer
from transport_support import KEY, messages

pytestmark = pytest.mark.anyio


class FakeResponse:
    """A port response whose body is ``chunks``; a float in it is a wait of that many seconds
    before the next chunk, an exception is raised there."""

    status = 200

    def __init__(self, *chunks: bytes | float | BaseException) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self._chunks = chunks
        self.closed = False

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        for item in self._chunks:
            if isinstance(item, float):
                await anyio.sleep(item)
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    def raw_bytes(self) -> AsyncRawBody:
        return self.aiter_bytes(), reraise

    async def aclose(self) -> None:
        self.closed = True


class Bounded(FakeResponse):
    """A fake response and the request deadline its body is held to."""

    def __init__(self, deadline: AsyncDeadline, *chunks: bytes | float | BaseException) -> None:
        super().__init__(*chunks)
        self.deadline = deadline


async def body_of(response: Bounded) -> AsyncIterator[bytes]:
    """The body read as the transports read a stream (``read_raw`` over ``raw_bytes``, under
    the deadline's ``reads()``: checked before each read, each read in its guard), released at
    its end."""
    chunks, failed = response.raw_bytes()
    reads = response.deadline.reads()
    try:
        while (chunk := await read_raw(chunks, failed, reads, reads.per_read())) is not None:
            yield chunk
    finally:
        reads.release()


@pytest.fixture
def timers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[AsyncReadTimer]]:
    """Every AsyncReadTimer the deadline makes (asyncio only; none under trio)."""
    made: list[AsyncReadTimer] = []
    real = _deadline.read_timer

    def spy(error: Any) -> AsyncReadTimer | None:
        timer = real(error)
        if timer is not None:
            made.append(timer)
        return timer

    monkeypatch.setattr(_deadline, "read_timer", spy)
    yield made


class Leftovers:
    """What a task leaves behind: timers and tasks on asyncio, deadlines and tasks under trio."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.before = self._state()

    def _state(self) -> tuple[int, int]:
        if self.backend == "asyncio":
            loop: Any = asyncio.get_running_loop()
            live = sum(1 for handle in loop._scheduled if not handle.cancelled())
            return live, len(asyncio.all_tasks())
        import trio

        return 0, trio.lowlevel.current_statistics().tasks_living

    async def assert_none(self) -> None:
        # A body left unread is closed by the loop's async-generator finalizer, in a task of its
        # own (as before this change): let those run first.
        await anyio.sleep(0.05)
        assert self._state() == self.before
        if self.backend == "asyncio":
            task = asyncio.current_task()
            assert task is not None and task.cancelling() == 0
        else:
            import trio

            assert trio.current_effective_deadline() == math.inf


def bounded(seconds: float, *chunks: bytes | float | BaseException) -> Bounded:
    return Bounded(AsyncDeadline(seconds, time.monotonic), *chunks)


async def test_a_read_waiting_past_the_deadline_is_cut_at_it(
    anyio_backend: str, timers: list[AsyncReadTimer]
) -> None:
    left = Leftovers(anyio_backend)
    response = bounded(0.3, b"a", b"b", 5.0, b"never")
    got = []
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        async for chunk in body_of(response):
            got.append(chunk)
    assert got == [b"a", b"b"]
    assert 0.3 <= time.monotonic() - started < 2.0
    await response.aclose()
    await left.assert_none()
    await anyio.lowlevel.checkpoint()  # the task goes on normally: no cancellation pending
    assert len(timers) == (1 if anyio_backend == "asyncio" else 0)


async def test_a_read_after_the_deadline_is_refused(anyio_backend: str) -> None:
    """The deadline passes while the caller holds a chunk: the next read raises at once."""
    left = Leftovers(anyio_backend)
    response = bounded(0.2, b"a", b"b")
    chunks = body_of(response)
    assert await chunks.__anext__() == b"a"
    await anyio.sleep(0.4)  # the caller's own work, past the deadline
    with pytest.raises(DeadlineExceeded):
        await chunks.__anext__()
    await response.aclose()
    await left.assert_none()


@pytest.mark.parametrize("how", ["read out", "closed early", "failed", "caller cancelled"])
async def test_nothing_is_left_behind(
    anyio_backend: str, timers: list[AsyncReadTimer], how: str
) -> None:
    left = Leftovers(anyio_backend)
    chunks: list[bytes | float | BaseException] = [b"a", 0.01, b"b", b"c"]
    if how == "failed":
        chunks.insert(2, OSError("connection reset"))
    elif how == "caller cancelled":
        chunks.insert(2, 5.0)
    response = bounded(30.0, *chunks)
    got = []
    with anyio.move_on_after(0.3) as caller:
        try:
            async for chunk in body_of(response):
                got.append(chunk)
                if how == "closed early":
                    break
        except OSError:
            assert how == "failed"
        finally:
            await response.aclose()
    # The caller's own cancellation stays theirs, not a DeadlineExceeded.
    assert caller.cancelled_caught is (how == "caller cancelled")
    assert got == ([b"a", b"b", b"c"] if how == "read out" else [b"a"])
    await left.assert_none()
    if anyio_backend == "asyncio":
        assert len(timers) == 1 and timers[0]._handle is None


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncio's timer only
async def test_one_timer_per_body_not_one_per_read(anyio_backend: str) -> None:
    """On asyncio the reads of a 200-chunk body schedule one loop timer (a cancel scope per
    read scheduled one each)."""
    loop = asyncio.get_running_loop()
    scheduled = 0
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal scheduled
        scheduled += 1
        return call_at(when, callback, *args, **kwargs)

    response = bounded(30.0, *[b"x"] * 200)
    loop.call_at = counting  # type: ignore[method-assign]
    try:
        assert len([c async for c in body_of(response)]) == 200
    finally:
        del loop.call_at
    assert scheduled == 1


async def test_reads_inside_the_request_scope_only_check(
    anyio_backend: str, timers: list[AsyncReadTimer]
) -> None:
    """A body read before the request returns (inside its scope: a non-stream answer, a v2
    HEAD) makes no timer; the reads after the scope has closed share one."""
    deadline = AsyncDeadline(30.0, time.monotonic)
    response = Bounded(deadline, b"a", b"b", b"c")
    chunks = body_of(response)
    with deadline:
        assert await chunks.__anext__() == b"a"
    assert timers == []
    assert [c async for c in chunks] == [b"b", b"c"]
    assert len(timers) == (1 if anyio_backend == "asyncio" else 0)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncio's timer only
async def test_read_timer_idle_moment_moves_with_each_read(anyio_backend: str) -> None:
    """``after(seconds)`` bounds each read from its own start (an idle timeout): reads that
    each take less pass however long the body lasts, the first slower one is cut."""
    timer = AsyncReadTimer(asyncio.get_running_loop(), lambda: TimeoutError("idle"))
    started = time.monotonic()
    for _ in range(6):
        with timer.after(0.2):
            await anyio.sleep(0.1)
    assert time.monotonic() - started >= 0.6  # longer than one period: the moment moved
    with pytest.raises(TimeoutError, match="idle"), timer.after(0.2):
        await anyio.sleep(5)
    timer.close()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


# -- loopback: the real relay ------------------------------------------------------------------

CHAT = "/v1/chat/completions"


def chat(stream: bool = True) -> dict[str, Any]:
    return {"model": "dev-echo", "messages": messages("a long answer " * 20), "stream": stream}


async def test_httpx2_stream_one_timer_released_at_the_end(
    stack: FaultyStack, anyio_backend: str, timers: list[AsyncReadTimer]
) -> None:
    transport = pqe2ee.AsyncE2EETransport(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, deadline=30.0
    )
    async with httpx2.AsyncClient(transport=transport) as http:
        left = Leftovers(anyio_backend)
        for stop_early in (False, True):
            async with http.stream("POST", "http://sdk.invalid" + CHAT, json=chat()) as resp:
                reads = 0
                async for _ in resp.aiter_raw():
                    reads += 1
                    if stop_early:
                        break
            assert reads >= 1
        await left.assert_none()
    if anyio_backend == "asyncio":
        assert len(timers) == 2  # one per streamed body
        assert all(timer._handle is None for timer in timers)


@pytest.mark.parametrize("interval", [0.2, 8.0], ids=["trickling", "stalled"])
async def test_httpx2_stream_cut_by_the_timer_leaves_nothing(
    stack: FaultyStack, anyio_backend: str, timers: list[AsyncReadTimer], interval: float
) -> None:
    """A streamed body's read runs in its guard (asyncio: the body's timer; trio: a cancel
    scope): a relay trickling bytes, or sending nothing for longer than the deadline leaves,
    is cut off at the deadline (not when its next byte comes), leaving nothing behind."""
    stack.faults.trickle_interval = interval
    stack.faults.inject(Fault.TRICKLE, times=1)
    try:
        transport = pqe2ee.AsyncE2EETransport(
            api_key=KEY, api_base=stack.relay, models_base=stack.relay, deadline=1.0
        )
        async with httpx2.AsyncClient(transport=transport) as http:
            left = Leftovers(anyio_backend)
            started = time.monotonic()
            async with http.stream("POST", "http://sdk.invalid" + CHAT, json=chat()) as resp:
                with pytest.raises(DeadlineExceeded):
                    async for _ in resp.aiter_raw():
                        pass
            assert time.monotonic() - started < 4.0
            await left.assert_none()
            # The client goes on: the next request on it works.
            answer = await http.post("http://sdk.invalid" + CHAT, json=chat(stream=False))
            assert answer.status_code == 200
    finally:
        stack.faults.trickle_interval = 2.0
    if anyio_backend == "asyncio":
        assert timers and all(timer._handle is None for timer in timers)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncio's timer only
@pytest.mark.parametrize("first", ["theirs", "ours"])
async def test_read_timer_lets_a_cancellation_of_someone_else_through(
    anyio_backend: str, first: str
) -> None:
    """The timer fires in the same loop iteration as another cancellation of the reading
    task, in either order: the read ends in the plain cancellation (never swallowed into the
    timer's error), and only the timer's own request is withdrawn."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    timer = AsyncReadTimer(loop, lambda: TimeoutError("cut"))

    def both() -> None:
        if first == "theirs":
            task.cancel()
        assert timer._handle is not None
        timer._handle.cancel()  # the timer's moment comes now: it fires here, in this order
        timer.at(loop.time())._fire()
        if first == "ours":
            task.cancel()

    loop.call_soon(both)
    with pytest.raises(asyncio.CancelledError), timer.at(loop.time() + 30):
        await asyncio.sleep(5)
    assert task.cancelling() == 1  # theirs, still standing
    task.uncancel()
    timer.close()
