"""The shared ASGI plumbing of the servers (``pqe2ee.server._asgi`` and ``_metrics``), driven
with raw ASGI messages on every anyio backend: bounded reads refuse and never truncate, the
disconnect watch cancels its block and lets errors through as themselves, streamed responses
report how they ended, the metrics middleware sees every exchange."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import anyio
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from pqe2ee.errors import ErrorCode, LimitExceeded
from pqe2ee.server import _asgi, relay
from pqe2ee.server._asgi import (
    BodyTooLarge,
    DisconnectWatch,
    InvalidContentLength,
    SlowUpload,
    StreamedResponse,
    StreamOutcome,
    declared_length,
    iter_body,
    json_response,
    read_body,
    read_bounded,
    watch_disconnect,
)
from pqe2ee.server._metrics import Exchange, MetricsMiddleware


def _scope(headers: Iterable[tuple[str, str]] = (), path: str = "/x") -> Scope:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(k.encode(), v.encode()) for k, v in headers],
        "query_string": b"",
    }


def _receiver(chunks: Iterable[bytes], *, then_disconnect: bool = True) -> Receive:
    queue = list(chunks)

    async def receive() -> Message:
        if queue:
            body = queue.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(queue)}
        if then_disconnect:
            return {"type": "http.disconnect"}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    return receive


def _request(chunks: Iterable[bytes], headers: Iterable[tuple[str, str]] = ()) -> Request:
    return Request(_scope(headers), _receiver(chunks))


# -- bounded reads -----------------------------------------------------------------------------


def test_declared_length() -> None:
    assert declared_length({}, 10) is None  # chunked: bounded while it streams
    assert declared_length({"content-length": "10"}, 10) == 10
    for bad in ("ten", "-1", "1.5", ""):
        with pytest.raises(InvalidContentLength) as invalid:
            declared_length({"content-length": bad}, 10)
        assert invalid.value.code is ErrorCode.MALFORMED_PAYLOAD
    with pytest.raises(BodyTooLarge) as big:
        declared_length({"content-length": "11"}, 10)
    assert (big.value.declared, big.value.limit, big.value.received) == (11, 10, 0)
    assert isinstance(big.value, LimitExceeded) and big.value.code is ErrorCode.OVERSIZE


@pytest.mark.anyio
async def test_read_body_refuses_instead_of_truncating() -> None:
    assert await read_body(_request([b"abc", b"", b"def"]), 6) == b"abcdef"
    with pytest.raises(BodyTooLarge) as exc:
        await read_body(_request([b"abc", b"defg", b"h"]), 6)
    assert exc.value.declared is None and exc.value.received == 7
    with pytest.raises(BodyTooLarge):  # announced too large: refused before reading
        await read_body(_request([b"abc"], [("content-length", "7")]), 6)
    with pytest.raises(InvalidContentLength):
        await read_body(_request([b"abc"], [("content-length", "x")]), 6)


@pytest.mark.anyio
async def test_read_body_idle_timeout_restarts_with_every_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_asgi, "BODY_IDLE_TIMEOUT", 0.5)

    def paced(gaps: list[float]) -> Request:
        async def receive() -> Message:
            await anyio.sleep(gaps.pop(0))
            return {"type": "http.request", "body": b"ab", "more_body": bool(gaps)}

        return Request(_scope(), receive)

    # 4 chunks 0.3 s apart: 1.2 s in all, never 0.5 s without a chunk.
    assert await read_body(paced([0.3, 0.3, 0.3, 0.3]), 100) == b"ab" * 4
    with pytest.raises(SlowUpload):  # one gap of 0.8 s
        await read_body(paced([0.1, 0.8, 0.1]), 100)
    with pytest.raises(SlowUpload):
        async for _ in iter_body(paced([0.1, 0.8, 0.1]), 100):
            pass


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncio's timer only
async def test_iter_body_one_timer_per_body_none_left(anyio_backend: str) -> None:
    """On asyncio the reads of a 200-chunk body schedule one loop timer (a cancel scope per
    chunk scheduled one each), and none stays armed once the body ended, was refused or was
    left half read."""
    loop = asyncio.get_running_loop()
    handles: list[asyncio.TimerHandle] = []
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
        handle = call_at(when, callback, *args, **kwargs)
        handles.append(handle)
        return handle

    loop.call_at = counting  # type: ignore[method-assign]
    try:
        assert await read_body(_request([b"x"] * 200), 1000) == b"x" * 200
        assert len(handles) == 1 and handles[0].cancelled()
        with pytest.raises(BodyTooLarge):
            await read_body(_request([b"x"] * 200), 100)
        assert len(handles) == 2 and handles[1].cancelled()
        chunks = iter_body(_request([b"x"] * 200), 1000)
        assert await chunks.__anext__() == b"x"
        await chunks.aclose()  # a reader that stops early
        assert len(handles) == 3 and handles[2].cancelled()
    finally:
        del loop.call_at


@pytest.mark.anyio
async def test_iter_body_passes_a_cancellation_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body read cancelled from outside (a hang-up, a shutdown) ends as a cancellation, not
    as a SlowUpload, and the idle rule still holds on the next body."""
    monkeypatch.setattr(_asgi, "BODY_IDLE_TIMEOUT", 0.3)

    def stalled() -> Request:  # one chunk, then silence
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"a", "more_body": True}
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        return Request(_scope(), receive)

    with anyio.move_on_after(0.05) as outer:
        await read_body(stalled(), 100)
    assert outer.cancelled_caught
    with pytest.raises(SlowUpload):
        await read_body(stalled(), 100)


@pytest.mark.anyio
async def test_read_bounded() -> None:
    async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    assert await read_bounded(chunks(b"ab", b"cd"), 4) == b"abcd"
    with pytest.raises(BodyTooLarge) as exc:
        await read_bounded(chunks(b"ab", b"cd", b"e"), 4)
    assert exc.value.received == 5


# -- disconnect watch --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_watch_disconnect_cancels_the_block() -> None:
    reached = False
    async with watch_disconnect(_receiver([b"body"])) as watch:
        await anyio.sleep(5)
        reached = True
    assert watch.disconnected and not reached


@pytest.mark.anyio
async def test_watch_disconnect_waits_for_after_and_passes_errors_unwrapped() -> None:
    uploaded = anyio.Event()
    with anyio.fail_after(5):
        async with watch_disconnect(_receiver([]), after=uploaded) as watch:
            await anyio.sleep(0.05)
            assert not watch.disconnected  # not listening yet
            uploaded.set()
            await anyio.sleep(5)
    assert watch.disconnected
    with pytest.raises(KeyError):  # not an ExceptionGroup
        async with watch_disconnect(_receiver([], then_disconnect=False)):
            raise KeyError("x")
    async with watch_disconnect(_receiver([], then_disconnect=False)) as watch:
        pass
    assert not watch.disconnected


# -- streamed responses ------------------------------------------------------------------------


class _Chunks(StreamedResponse):
    def __init__(self, chunks: list[bytes]) -> None:
        super().__init__(200, [(b"content-type", b"text/plain")])
        self.chunks = chunks
        self.outcome: StreamOutcome | None = None

    async def write(self, send: Send) -> None:
        await self.send_start(send)
        for chunk in self.chunks:
            await self.send_body(send, chunk)
        await self.send_body(send, b"", more=False)

    async def finish(self, outcome: StreamOutcome) -> None:
        self.outcome = outcome

    def watching(self, watch: DisconnectWatch) -> None:
        self.watch = watch

    async def cancelled(self, send: Send) -> None:
        await self.send_body(send, b"event: shutdown\n\n" if self.started else b"never")


@pytest.mark.anyio
async def test_streamed_response_outcomes() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    ok = _Chunks([b"a", b"b"])
    await ok(_scope(), _receiver([], then_disconnect=False), send)
    assert ok.outcome is StreamOutcome.COMPLETE
    assert [m.get("body") for m in sent[1:]] == [b"a", b"b", b""]

    async def broken_send(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise OSError("client gone")  # ASGI 2.4 servers report a gone client this way

    gone = _Chunks([b"a"])
    await gone(_scope(), _receiver([], then_disconnect=False), broken_send)
    assert gone.outcome is StreamOutcome.CLIENT_GONE

    async def slow_send(message: Message) -> None:
        await anyio.sleep(5)

    hung_up = _Chunks([b"a"])
    await hung_up(_scope(), _receiver([]), slow_send)
    assert hung_up.outcome is StreamOutcome.CLIENT_GONE

    sent.clear()
    ended = _Chunks([b"a", b"b"])

    async def send_then_stall(message: Message) -> None:
        sent.append(message)
        if message.get("body") == b"b":
            ended.watch.cancel_scope.cancel()  # a shutdown ends the stream from outside
            await anyio.sleep(5)

    await ended(_scope(), _receiver([], then_disconnect=False), send_then_stall)
    assert ended.outcome is StreamOutcome.CANCELLED
    assert [m.get("body") for m in sent[1:]] == [b"a", b"b", b"event: shutdown\n\n"]


class _HeldStart(StreamedResponse):
    """Leaves its start to the first body message; the start is due once ``due`` is set."""

    def __init__(self, parts: list[bytes], *, due: bool, fail: bool = False) -> None:
        super().__init__(200, [(b"content-type", b"text/plain")])
        self.parts = parts
        self.due = due
        self.fail = fail

    async def write(self, send: Send) -> None:
        for part in self.parts:
            await self.send_body(send, part)
        if self.fail:
            raise RuntimeError("broke before the end")
        await self.send_body(send, b"", more=False)

    def start_due(self) -> bool:
        return self.due


@pytest.mark.anyio
async def test_streamed_response_start_held_for_the_first_body_message() -> None:
    """send_body() sends a start that has not gone out; a due start still goes out when no
    body message came (a failure), one that is not due does not."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await _HeldStart([b"a", b"b"], due=True)(_scope(), _receiver([], then_disconnect=False), send)
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 3
    assert [m.get("body") for m in sent[1:]] == [b"a", b"b", b""]
    for due in (True, False):
        sent.clear()
        with pytest.raises(RuntimeError):
            await _HeldStart([], due=due, fail=True)(
                _scope(), _receiver([], then_disconnect=False), send
            )
        assert [m["type"] for m in sent] == (["http.response.start"] if due else [])


# -- metrics middleware ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_metrics_middleware_sees_every_exchange() -> None:
    seen: list[Exchange] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/fail":
            raise RuntimeError("boom")
        request = Request(scope, receive)
        await json_response({"got": len(await request.body())}, 201)(scope, receive, send)

    async def send(message: Message) -> None:
        pass

    wrapped = MetricsMiddleware(app, seen.append)
    await wrapped(_scope(), _receiver([b"abc", b"de"], then_disconnect=False), send)
    with pytest.raises(RuntimeError):
        await wrapped(_scope(path="/fail"), _receiver([]), send)
    ok, failed = seen
    assert (ok.status, ok.bytes_in, ok.bytes_out, ok.complete) == (201, 5, len(b'{"got":5}'), True)
    assert ok.first_byte is not None and ok.path == "/x" and ok.method == "POST"
    assert (failed.status, failed.complete, failed.path) == (None, False, "/fail")


@pytest.mark.anyio
@pytest.mark.parametrize("direct", [False, True])
async def test_metrics_middleware_counts_a_streamed_response(direct: bool) -> None:
    """With ``direct_bodies`` the body messages of a StreamedResponse go beneath the
    middleware (past the layers inside it, here ``inner``), counted the same way; the start
    still goes through every layer. A plain response's body always does."""
    seen: list[Exchange] = []
    inner: list[str] = []
    out: list[Message] = []
    stream = _Chunks([b"ab", b"cde"])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def layer(message: Message) -> None:  # a Starlette routing layer, say
            inner.append(message["type"])
            await send(message)

        await stream(scope, receive, layer)

    async def send(message: Message) -> None:
        out.append(message)

    wrapped = MetricsMiddleware(app, seen.append, direct_bodies=direct)
    await wrapped(_scope(), _receiver([], then_disconnect=False), send)
    (ex,) = seen
    assert (ex.status, ex.bytes_in, ex.bytes_out, ex.complete) == (200, 0, 5, True)
    assert stream.outcome is StreamOutcome.COMPLETE and stream.bytes_sent == 5
    assert [m.get("body") for m in out[1:]] == [b"ab", b"cde", b""]
    assert out[-1]["more_body"] is False
    body_layers = ["http.response.body"] * 3
    assert inner == ["http.response.start"] + ([] if direct else body_layers)


# -- the relay's Content-Length check ----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("length", ["-1", "ten"])
async def test_relay_refuses_an_invalid_content_length(length: str) -> None:
    app = relay.create_app(relay.RelayConfig(instances=("http://127.0.0.1:9",), no_auth=True))
    headers = [
        ("x-chute-id", relay.chute_id_for("m")),
        ("x-instance-id", "i"),
        ("x-e2e-nonce", "n"),
        ("content-length", length),
    ]
    messages: list[Message] = []

    async def send(message: Message) -> None:
        messages.append(message)

    await app(_scope(headers, path="/e2e/invoke"), _receiver([b""]), send)
    assert messages[0]["status"] == 400
    body: Any = b"".join(m.get("body", b"") for m in messages[1:])
    assert body == b'{"detail":"Invalid Content-Length"}'


def test_json_response_is_compact() -> None:
    response: Response = json_response({"a": [1, "é"]}, 418, {"x-y": "z"})
    assert response.body == '{"a":[1,"é"]}'.encode()
    assert response.status_code == 418
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-y"] == "z"
