"""The instance's streams (v1 and v2) go out in as few body messages as the engine's data
allows: the records of engine chunks that arrived together leave as one message (the init event
first, on its own), the stream the same as with one message per chunk; an engine that breaks
off still gets what came before, then v1's error event and no clean end, or v2's END with the
failure. Over ASGI, under asyncio and trio."""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import anyio
import httpx2
import pytest

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.errors import ErrorCode, PQE2EEError
from pqe2ee.protocol import NEED_DATA, Done, StreamDecryptor, StreamEncoder, StreamSealer, Usage
from pqe2ee.protocol.response import ResponseDecoder
from pqe2ee.protocol.v2 import StreamEncoderV2
from pqe2ee.server._asgi import DisconnectWatch
from pqe2ee.server.instance.exchange import Concurrency, RequestLog, Slot
from pqe2ee.server.instance.v1 import SealedStream
from pqe2ee.server.instance.v2 import SealedStreamV2
from pqe2ee.testing.dev_engine import create_app as create_engine
from servers import run_app
from test_protocol_response import v2_exchange
from test_proxy_coalesce import loop_turns, serve

pytestmark = pytest.mark.anyio

KEM = get_kem()
AEAD = get_aead()

CHUNKS = [
    b'data: {"choices":[{"delta":{"content":"w%d"}}],"usage":{"total_tokens":%d}}\n\n' % (i, i)
    for i in range(8)
] + [b"data: [DONE]\n\n"]


async def at_once(chunks: list[bytes], error: Exception | None = None) -> AsyncIterator[bytes]:
    """An engine whose chunks are all there: the stream never waits between them."""
    for chunk in chunks:
        yield chunk
    if error is not None:
        raise error


def _sealed(engine: httpx2.Response) -> tuple[SealedStream, Any, Slot]:
    key = KEM.generate()
    slot = Slot(Concurrency(4))
    encoder = StreamEncoder(StreamSealer(key.public_key, kem=KEM, aead=AEAD))
    return (
        SealedStream(engine, encoder, slot=slot, log=RequestLog("POST", "/e2e/invoke")),
        key,
        slot,
    )


async def test_engine_chunks_that_arrived_together_leave_as_one_body_message() -> None:
    engine = httpx2.Response(200, content=at_once(CHUNKS))
    stream, key, slot = _sealed(engine)
    sent = await serve(stream)
    assert sent[0]["type"] == "http.response.start"
    bodies = [(m["body"], m["more_body"]) for m in sent[1:]]
    # was one message per engine chunk plus the init and an empty end: 11 messages and writes
    assert [more for _, more in bodies] == [True, False]
    assert bodies[0][0].startswith(b'data: {"e2e_init":"') and bodies[0][0].count(b"\n\n") == 1
    decryptor = StreamDecryptor(key, aead=AEAD)
    decryptor.receive_data(b"".join(body for body, _ in bodies))
    decryptor.receive_eof()
    events = list(iter(decryptor.next_event, NEED_DATA))
    assert decryptor.complete
    assert sum(isinstance(e, Usage) for e in events) == 8  # one per engine chunk with usage
    assert any(isinstance(e, Done) for e in events)
    assert decryptor.records == 2 * len(CHUNKS)  # one per engine line, as before
    assert engine.is_closed and not slot._held


async def test_an_engine_that_breaks_off_gets_what_came_before_then_the_error() -> None:
    engine = httpx2.Response(200, content=at_once(CHUNKS[:3], httpx2.ReadError("gone")))
    stream, key, slot = _sealed(engine)
    sent = await serve(stream)
    bodies = [(m["body"], m["more_body"]) for m in sent[1:]]
    assert all(more for _, more in bodies)  # no clean end
    assert bodies[-1][0].startswith(b'data: {"e2e_error":{"code":"upstream_error"')
    decryptor = StreamDecryptor(key, aead=AEAD)
    decryptor.receive_data(b"".join(body for body, _ in bodies[:-1]))
    assert decryptor.records == 6  # the three chunks' records all went out
    assert engine.is_closed and not slot._held


# --------------------------------------------------------------------------------------------
# v2


def _sealed_v2(engine: httpx2.Response) -> tuple[SealedStreamV2, Any, Slot]:
    ex = v2_exchange(True)
    slot = Slot(Concurrency(4))
    stream = SealedStreamV2(
        engine, StreamEncoderV2(ex.sealer), slot=slot, log=RequestLog("POST", "/e2e/invoke")
    )
    return stream, ex, slot


async def test_v2_engine_chunks_that_arrived_together_leave_as_one_body_message() -> None:
    engine = httpx2.Response(200, content=at_once(CHUNKS))
    stream, ex, slot = _sealed_v2(engine)
    sent = await serve(stream)
    bodies = [(m["body"], m["more_body"]) for m in sent[1:]]
    assert [more for _, more in bodies] == [True, False]  # init and HEAD, then the rest
    dec = ResponseDecoder(ex.secrets(), aead=AEAD, stream=True)
    events = dec.feed(b"".join(body for body, _ in bodies)) + dec.eof()
    assert b"".join(e.raw for e in events if hasattr(e, "raw")) == b"".join(CHUNKS)
    assert engine.is_closed and not slot._held


async def test_v2_an_engine_that_breaks_off_ends_with_an_authenticated_error() -> None:
    engine = httpx2.Response(200, content=at_once(CHUNKS[:3], httpx2.ReadError("gone")))
    stream, ex, slot = _sealed_v2(engine)
    sent = await serve(stream)
    bodies = [(m["body"], m["more_body"]) for m in sent[1:]]
    assert bodies[-1][1] is False  # END carries the failure: a clean HTTP end
    dec = ResponseDecoder(ex.secrets(), aead=AEAD, stream=True)
    with pytest.raises(PQE2EEError) as info:
        dec.feed(b"".join(body for body, _ in bodies))
    assert info.value.code is ErrorCode.UPSTREAM_ERROR
    assert engine.is_closed and not slot._held


async def test_a_complete_stream_does_not_trip_the_disconnect_watch() -> None:
    """The body's end goes out once the coalescer's task is gone: a server whose receive()
    reports the completed response as a disconnect (uvicorn does) does not cancel the watch
    while the stream is still closing its task group."""
    engine = httpx2.Response(200, content=at_once(CHUNKS))
    stream, _, slot = _sealed(engine)
    watches: list[DisconnectWatch] = []
    stream.watching = watches.append  # type: ignore[method-assign]
    write = stream.write
    tripped: list[bool] = []

    async def watched_write(send: Any) -> None:
        await write(send)
        tripped.append(watches[0].cancel_scope.cancel_called)

    stream.write = watched_write  # type: ignore[method-assign]
    complete = anyio.Event()

    async def receive() -> dict[str, Any]:
        await complete.wait()  # as uvicorn: a disconnect once the response is complete
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            complete.set()

    scope = {"type": "http", "method": "POST", "path": "/e2e/invoke", "headers": []}
    await stream(scope, receive, send)
    assert tripped == [False]  # the stream ended with its watch untouched
    assert not slot._held  # released at the end


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # counts the loop's turns
async def test_the_start_goes_out_with_the_init_event(anyio_backend: str) -> None:
    """No turn of the event loop between the response start and the init event: written back
    to back, the relay reads them at once."""
    engine = httpx2.Response(200, content=at_once(CHUNKS))
    stream, _, _ = _sealed(engine)
    at_start: list[int] = []

    async def receive() -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async with loop_turns() as turns:

        async def send(message: MutableMapping[str, Any]) -> None:
            at_start.append(turns())

        scope = {"type": "http", "method": "POST", "path": "/e2e/invoke", "headers": []}
        await stream(scope, receive, send)
    assert at_start[0] == at_start[1] < at_start[-1]  # start and init event in one turn


# --------------------------------------------------------------------------------------------
# the engine connection


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_the_engine_connection_is_released_when_its_body_ends(version: str) -> None:
    """A real engine on loopback: its response is closed (the connection back in the client's
    pool) once its body has been read, before the stream's last message goes out - not only
    in the stream's cleanup after it (the body is read from the response's own byte stream,
    which does not close the response at its end)."""
    body = {"model": "dev-echo", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with run_app(create_engine()) as url:
        async with httpx2.AsyncClient() as client:
            request = client.build_request("POST", url + "/v1/chat/completions", json=body)
            engine = await client.send(request, stream=True)
            stream = _sealed(engine)[0] if version == "v1" else _sealed_v2(engine)[0]
            closed_at_end: list[bool] = []

            async def receive() -> dict[str, Any]:
                await anyio.sleep_forever()
                raise AssertionError("unreachable")

            async def send(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.body" and not message["more_body"]:
                    closed_at_end.append(engine.is_closed)

            scope = {"type": "http", "method": "POST", "path": "/e2e/invoke", "headers": []}
            await stream(scope, receive, send)
    assert closed_at_end == [True]
