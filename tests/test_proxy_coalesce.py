"""The proxy's streamed answers go out in as few body messages as the data allows, and nothing is
held back: :class:`~pqe2ee.server._coalesce.Coalescer` on its own, then the proxy's SSE answer
(:class:`~pqe2ee.proxy.app.streaming.StreamResponse`) over ASGI, under asyncio and trio."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, MutableMapping
from typing import Any

import anyio
import anyio.lowlevel
import httpx2
import pytest

from pqe2ee.proxy.app.metrics import Metrics
from pqe2ee.proxy.app.streaming import OpenStreams, PassthroughBody, StreamResponse
from pqe2ee.server._asgi import StreamedResponse
from pqe2ee.server._coalesce import MAX_BATCH, Coalescer

pytestmark = pytest.mark.anyio

EVENTS = [b'data: {"n": %d}\n\n' % i for i in range(6)]


class Sink:
    """Records ``(data, more)`` per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bool]] = []
        self.changed = anyio.Event()  # set (and replaced) on every call

    async def __call__(self, data: bytes, more: bool) -> None:
        self.calls.append((data, more))
        self.changed.set()
        self.changed = anyio.Event()

    @property
    def data(self) -> bytes:
        return b"".join(data for data, _ in self.calls)


async def at_once(chunks: list[bytes]) -> AsyncIterator[bytes]:
    """A source whose chunks are all there: it never waits between them."""
    for chunk in chunks:
        yield chunk


# trio runs a batch of ready tasks in random order: there the pump's first step may come after
# the drain's wake-up, and the first chunk then goes alone (correct, one message more). The
# servers run on asyncio, where the order is the one these tests pin.
ASYNCIO_ORDER = pytest.mark.parametrize("anyio_backend", ["asyncio"])


@ASYNCIO_ORDER
async def test_chunks_that_are_there_together_go_out_together(anyio_backend: str) -> None:
    sink = Sink()
    await Coalescer().run(at_once(EVENTS), sink)
    # A whole answer that is there at once: one message, the end with it (was the first chunk
    # alone, then the rest with the end: two writes, and the client woke twice).
    assert sink.calls == [(b"".join(EVENTS), False)]


@ASYNCIO_ORDER
async def test_the_first_chunk_waits_for_the_sources_next_step_only(anyio_backend: str) -> None:
    """The first chunk waits for no network read: the source's next step is a wait, so it goes
    out alone (and the end follows, with nothing, once the source ends)."""
    sink = Sink()
    go = anyio.Event()

    async def first_then_wait() -> AsyncIterator[bytes]:
        yield EVENTS[0]
        yield EVENTS[1]  # (there: goes with the first)
        await go.wait()  # the network
        yield EVENTS[2]

    async with anyio.create_task_group() as tg:
        tg.start_soon(Coalescer().run, first_then_wait(), sink)
        with anyio.fail_after(5):
            await sink.changed.wait()
        assert sink.calls == [(EVENTS[0] + EVENTS[1], True)]
        go.set()
    assert sink.calls[1:] == [(EVENTS[2], False)]


async def test_nothing_is_held_back_while_the_source_waits() -> None:
    sink = Sink()

    async def trickle() -> AsyncIterator[bytes]:
        for i, chunk in enumerate(EVENTS):
            if i:  # the previous chunk must have reached the sink before this one exists
                with anyio.fail_after(5):
                    while sink.data != b"".join(EVENTS[:i]):
                        await sink.changed.wait()
            yield chunk

    await Coalescer().run(trickle(), sink)
    assert [data for data, _ in sink.calls] == EVENTS
    assert [more for _, more in sink.calls] == [True] * 5 + [False]  # the end rides along


async def test_an_empty_source_just_ends() -> None:
    sink = Sink()
    await Coalescer().run(at_once([]), sink)
    assert sink.calls == [(b"", False)]


async def test_a_failing_source_delivers_what_it_gave_then_raises_its_error() -> None:
    boom = ValueError("boom")

    async def failing() -> AsyncIterator[bytes]:
        yield EVENTS[0]
        yield EVENTS[1]
        raise boom

    sink = Sink()
    with pytest.raises(ValueError) as info:
        await Coalescer().run(failing(), sink)
    assert info.value is boom  # itself, not wrapped in an exception group
    assert sink.data == EVENTS[0] + EVENTS[1]
    assert all(more for _, more in sink.calls)  # the caller decides how the body ends


async def test_a_failing_sink_stops_the_copy_and_raises_its_error() -> None:
    gone = OSError("client gone")
    pulled = 0

    async def endless() -> AsyncGenerator[bytes, None]:
        nonlocal pulled
        while True:
            pulled += 1
            yield b"x"
            await anyio.lowlevel.checkpoint()

    calls = 0

    async def sink(data: bytes, more: bool) -> None:
        nonlocal calls
        calls += 1
        raise gone

    source = endless()
    with pytest.raises(OSError) as info:
        await Coalescer().run(source, sink)
    assert info.value is gone  # itself, not wrapped in an exception group
    seen = pulled
    for _ in range(10):
        await anyio.lowlevel.checkpoint()
    assert (calls, pulled) == (1, seen)  # nothing runs on after the failure
    await source.aclose()  # closing the source is the caller's business


async def test_what_the_sink_did_not_take_before_a_cancellation_is_pending() -> None:
    coalescer = Coalescer()
    taken = anyio.Event()

    async def stuck(data: bytes, more: bool) -> None:
        taken.set()
        await anyio.sleep_forever()

    async def slow() -> AsyncIterator[bytes]:
        for chunk in EVENTS:
            yield chunk
            await anyio.lowlevel.checkpoint()

    with anyio.move_on_after(5) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(coalescer.run, slow(), stuck)
            await taken.wait()
            for _ in range(20):  # let the source produce the rest
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert coalescer.pending() == b"".join(EVENTS[1:])
    assert coalescer.pending() == b""  # handed over once


@contextlib.asynccontextmanager
async def loop_turns() -> AsyncIterator[Callable[[], int]]:
    """Counts the asyncio loop's turns while the block runs: the yielded function gives the
    count so far."""
    turns = 0

    async def count() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    counter = asyncio.get_running_loop().create_task(count())
    try:
        yield lambda: turns
    finally:
        counter.cancel()


@ASYNCIO_ORDER  # (and counts the loop's turns)
async def test_the_first_chunk_and_the_end_cost_no_extra_loop_turns(anyio_backend: str) -> None:
    """Latency in series at one stream: a source that ends right after its first chunk is sent
    with its end one loop turn after the chunk arrived (the pump sees the source end, the drain
    sees the pump end, in the same turn) - not after a task group's own wake-ups, and not as
    the chunk at once and the end alone two turns later."""
    at: list[int] = []

    async def source() -> AsyncIterator[bytes]:
        yield b"x"

    async with loop_turns() as turns:

        async def sink(data: bytes, more: bool) -> None:
            at.append(turns())

        await asyncio.sleep(0)
        start = turns()
        await Coalescer().run(source(), sink)
    assert at == [start + 1]


@ASYNCIO_ORDER
async def test_on_asyncio_a_paced_source_costs_no_asyncio_event_per_chunk(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pump and the drain wake each other once per batch - per chunk, when the source waits
    between chunks (an engine's tokens): on asyncio through bare loop futures, not an
    ``asyncio.Event`` each (anyio's event), with the same hand-over."""
    made: list[asyncio.Event] = []
    init = asyncio.Event.__init__

    def counted(self: asyncio.Event) -> None:
        made.append(self)
        init(self)

    monkeypatch.setattr(asyncio.Event, "__init__", counted)

    async def paced() -> AsyncIterator[bytes]:
        for chunk in EVENTS:
            await asyncio.sleep(0)  # the network between two chunks
            yield chunk

    calls: list[tuple[bytes, bool]] = []

    async def sink(data: bytes, more: bool) -> None:
        calls.append((data, more))

    await Coalescer().run(paced(), sink)
    # a batch per chunk (the last one with the end)
    assert calls == [(chunk, True) for chunk in EVENTS[:-1]] + [(EVENTS[-1], False)]
    assert made == []  # was one (or two) per batch


async def test_a_cancellation_while_the_sink_side_waits_ends_the_copy() -> None:
    """The drain waiting for the pump (the source waits for the network) is cancelled with its
    scope; the pump goes with it, and what the source gave before was sent."""
    sink = Sink()

    async def first_then_stall() -> AsyncIterator[bytes]:
        yield EVENTS[0]
        await anyio.sleep_forever()
        yield EVENTS[1]  # (never)

    with anyio.move_on_after(5) as outer:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(Coalescer().run, first_then_stall(), sink)
                while not sink.calls:
                    await anyio.lowlevel.checkpoint()
                for _ in range(5):  # the drain is back waiting on the pump
                    await anyio.lowlevel.checkpoint()
                scope.cancel()
    assert not outer.cancelled_caught
    assert sink.calls == [(EVENTS[0], True)]


async def test_a_long_burst_is_flushed_every_max_batch_bytes() -> None:
    chunk = b"y" * (MAX_BATCH // 3 + 1)
    sink = Sink()
    await Coalescer().run(at_once([chunk] * 12), sink)
    assert sink.data == chunk * 12
    assert len(sink.calls) > 2
    assert max(len(data) for data, _ in sink.calls) <= MAX_BATCH + len(chunk)


# --------------------------------------------------------------------------------------------
# the proxy's SSE answer over ASGI


@pytest.mark.parametrize(
    ("chunks", "cut"),
    [
        ([b"data: a\n\n"], False),
        ([b"data: a\n", b"\n"], False),
        ([b"data: a\n\n", b"d"], True),
        ([b"data: a\n\nda", b"ta: b\n"], True),
        ([b"d", b"\n", b"\n"], False),
        ([b"data: a\n\n", b"x", b"\n"], True),
        ([], False),
    ],
)
async def test_a_broken_passthrough_ends_a_half_written_event_first(
    chunks: list[bytes], cut: bool
) -> None:
    """The error event that ends a broken chat stream stands on its own: a blank line first
    when the bytes sent so far stop inside an event (whatever the chunks' sizes)."""

    class Broken:
        async def aiter_bytes(self) -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk
            raise httpx2.ReadError("gone")

    body = PassthroughBody(Broken(), Metrics(), "chat")  # type: ignore[arg-type]
    out = [chunk async for chunk in body.chunks()]
    assert out[:-1] == chunks
    assert out[-1].startswith(b"\n\ndata: {" if cut else b"data: {")


async def serve(response: StreamedResponse) -> list[MutableMapping[str, Any]]:
    """Run ``response`` as an ASGI app; the messages it sent."""
    sent: list[MutableMapping[str, Any]] = []
    done = anyio.Event()

    async def receive() -> dict[str, Any]:
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    await response(scope, receive, send)
    done.set()
    return sent


@ASYNCIO_ORDER
async def test_events_decoded_together_reach_the_client_as_one_body_message(
    anyio_backend: str,
) -> None:
    released: list[bool] = []

    async def release() -> None:
        released.append(True)

    upstream = httpx2.Response(200, content=at_once(EVENTS))
    metrics = Metrics()
    response = StreamResponse(
        PassthroughBody(upstream, metrics, "chat"),
        upstream=upstream,
        release=release,
        metrics=metrics,
        streams=OpenStreams(),
        route="chat",
    )
    sent = await serve(response)
    assert sent[0]["type"] == "http.response.start"
    bodies = [(m["body"], m["more_body"]) for m in sent[1:]]
    # was one message per event plus an empty end: 7 messages, 7 writes, 7 frames to read
    assert bodies == [(b"".join(EVENTS), False)]
    assert released == [True]
    assert upstream.is_closed
