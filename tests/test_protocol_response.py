"""The sans-IO response decoder (src/pqe2ee/protocol/response.py), fed raw bytes: v1 and v2,
single and streamed, split at every offset; sticky faults; usage and error reporting."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.backends.xwing import get_xwing
from pqe2ee.errors import ErrorCode, LimitExceeded, PQE2EEError, RemoteError, StreamError
from pqe2ee.protocol import Done, InnerEvent, StreamEncoder, StreamSealer, seal_response
from pqe2ee.protocol.response import (
    Opened,
    ResponseDecoder,
    ResponseEvent,
    open_answer,
    remote_error,
)
from pqe2ee.protocol.v2 import (
    InstanceV2,
    MemoryReplayCache,
    ResponseSealer,
    ResponseSecrets,
    StreamEncoderV2,
    UpstreamError,
    seal_request_v2,
    seal_response_v2,
)

KEM = get_kem("pyca")
AEAD = get_aead("pyca")
XW = get_xwing("pyca")
SEED = bytes(range(64))
XSEED = bytes(range(32))
CHUTE = "5f0b7ad3-1c2e-4d5a-9b8c-7e6f5a4b3c2d"
INST = "0e9d8c7b-6a59-4837-a625-140f3e2d1c0b"
PATH = "/v1/chat/completions"
T0 = 1_767_225_600_000
INSTANCE_KEY = XW.from_seed(hashlib.sha256(b"response-decoder").digest())

INNER = (
    b'data: {"choices":[{"delta":{"content":"Hello"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":" w\\u00f6rld"}}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
    b"data: [DONE]\n\n"
)
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def det_random() -> Callable[[int], bytes]:
    counter = itertools.count()
    return lambda n: hashlib.sha256(next(counter).to_bytes(8, "big")).digest()[:n]


# -- fixtures: wire bytes of each kind ---------------------------------------------------------


def v1_key() -> Any:
    return KEM.from_seed(SEED)  # a decoder wipes its key: a fresh object each time


def v1_stream(inner: bytes = INNER) -> bytes:
    sealer = StreamSealer(v1_key().public_key, kem=KEM, aead=AEAD, random_bytes=det_random())
    enc = StreamEncoder(sealer)
    return enc.start() + enc.feed(inner) + enc.finish()


@dataclass
class V2:
    sealer: ResponseSealer
    exporter: bytes
    stream: bool

    def secrets(self) -> ResponseSecrets:
        return ResponseSecrets(self.exporter, XW.from_seed(XSEED), self.stream)


def v2_exchange(stream: bool) -> V2:
    obj: dict[str, Any] = {"model": "m", "messages": [], "stream": stream}
    sealed = seal_request_v2(
        json.dumps(obj).encode(),
        INSTANCE_KEY.public_key,
        chute_id=CHUTE,
        instance_id=INST,
        relay_nonce="nonce-1",
        path=PATH,
        now_ms=T0,
        xwing=XW,
        aead=AEAD,
        response_key=XW.from_seed(XSEED),
    )
    instance = InstanceV2(
        chute_id=CHUTE,
        instance_id=INST,
        keys=[INSTANCE_KEY],
        aead=AEAD,
        replay_cache=MemoryReplayCache(),
    )
    opened = instance.open(sealed.blob, path=PATH, stream=stream, now_ms=T0)
    sealer = ResponseSealer.for_request(opened, xwing=XW, aead=AEAD)
    return V2(sealer, sealed.secrets.exporter, stream)


def v2_stream(
    inner: bytes = INNER, *, status: int = 200, error: UpstreamError | None = None
) -> tuple[V2, bytes]:
    ex = v2_exchange(True)
    enc = StreamEncoderV2(ex.sealer)
    wire = enc.start(status) + enc.feed(inner) + enc.finish(error=error)
    return ex, wire


def decode(decoder: ResponseDecoder, pieces: Iterable[bytes]) -> list[ResponseEvent]:
    out: list[ResponseEvent] = []
    for piece in pieces:
        out += decoder.feed(piece)
    out += decoder.eof()
    assert decoder.events() == []  # nothing is kept back without a fault
    return out


def splits(wire: bytes) -> Iterable[list[bytes]]:
    """The wire whole, then cut in two at every offset, then cut at every offset into two
    pieces of which the second is itself cut in the middle."""
    yield [wire]
    for i in range(len(wire) + 1):
        yield [wire[:i], wire[i:]]
    for i in range(0, len(wire), 7):
        j = (i + len(wire)) // 2
        yield [wire[:i], wire[i:j], wire[j:]]


def inner_bytes(events: list[ResponseEvent]) -> bytes:
    assert all(isinstance(e, InnerEvent | Done) for e in events)
    return b"".join(e.raw for e in events if isinstance(e, InnerEvent | Done))


# -- v1 ----------------------------------------------------------------------------------------


def test_v1_stream_at_every_split() -> None:
    wire = v1_stream()
    for pieces in splits(wire):
        usages: list[Any] = []
        dec = ResponseDecoder(v1_key(), aead=AEAD, stream=True, on_usage=usages.append)
        events = decode(dec, pieces)
        assert inner_bytes(events) == INNER
        assert isinstance(events[-1], Done)
        assert usages and usages[-1] == USAGE
        assert dec.version == 1 and dec.head is None and dec.answer is None


def test_feed_returns_each_event_as_soon_as_it_is_complete() -> None:
    wire = v1_stream()
    dec = ResponseDecoder(v1_key(), aead=AEAD, stream=True)
    seen: list[bytes] = []
    for i in range(len(wire)):
        for event in dec.feed(wire[i : i + 1]):
            seen.append(event.raw)
            # the event's last byte has just arrived: its bytes end the inner stream so far
            assert INNER.startswith(b"".join(seen))
    assert [e.raw for e in dec.eof()] == [] and b"".join(seen) == INNER


def test_v1_stream_truncated_and_sticky() -> None:
    cut = v1_stream(INNER[: INNER.index(b"data: [DONE]")])  # no inner [DONE]
    dec = ResponseDecoder(v1_key(), aead=AEAD, stream=True)
    dec.feed(cut)
    with pytest.raises(StreamError) as info:
        dec.eof()
    assert info.value.code is ErrorCode.STREAM_TRUNCATED
    with pytest.raises(StreamError):  # sticky
        dec.feed(b"data: x\n\n")
    with pytest.raises(StreamError):
        dec.eof()


def test_v1_stream_remote_error_raises() -> None:
    wire = v1_stream(INNER[:60])  # a partial inner stream, then the relay's error event
    wire = wire[: wire.rindex(b"data: ", 0, len(wire) - 1)]
    wire += b'data: {"e2e_error":{"type":"engine_down","status":503}}\n\n'
    dec = ResponseDecoder(v1_key(), aead=AEAD, stream=True)
    with pytest.raises(RemoteError) as info:
        decode(dec, [wire])
    assert info.value.code is ErrorCode.REMOTE_ERROR and info.value.status == 503
    assert remote_error("odd").status is None


@pytest.mark.parametrize("status", [200, 500])
def test_v1_single_at_every_split(status: int) -> None:
    body = b'{"id":"x","choices":[{"message":{"content":"hi"}}]}'
    blob = seal_response(body, v1_key().public_key, kem=KEM, aead=AEAD)
    for pieces in itertools.islice(splits(blob), 0, None, 97):
        dec = ResponseDecoder(v1_key(), aead=AEAD, stream=False, status=status)
        assert decode(dec, pieces) == []
        assert dec.answer == Opened(status, body)
    assert open_answer(v1_key(), blob, aead=AEAD, status=status) == Opened(status, body)


def test_single_answer_is_bounded() -> None:
    dec = ResponseDecoder(v1_key(), aead=AEAD, stream=False, max_body=10)
    dec.feed(b"x" * 10)
    with pytest.raises(LimitExceeded):
        dec.feed(b"x")


# -- v2 ----------------------------------------------------------------------------------------


def test_v2_stream_at_every_split() -> None:
    ex, wire = v2_stream()
    for pieces in splits(wire):
        usages: list[Any] = []
        dec = ResponseDecoder(ex.secrets(), aead=AEAD, stream=True, on_usage=usages.append)
        events = decode(dec, pieces)
        assert inner_bytes(events) == INNER
        assert isinstance(events[-1], Done) and events[-1].raw == b"data: [DONE]\n\n"
        assert usages == [USAGE]  # once, at the authenticated END
        assert dec.version == 2 and dec.head is not None and dec.head.status == 200
        assert dec.answer is None


def test_v2_done_is_held_back_until_end() -> None:
    ex, wire = v2_stream()
    end_at = wire.rindex(b"data: ", 0, len(wire) - 1)  # the END record's event
    dec = ResponseDecoder(ex.secrets(), aead=AEAD, stream=True)
    before = dec.feed(wire[:end_at])
    assert inner_bytes(before) == INNER[: INNER.index(b"data: [DONE]")]
    assert not any(isinstance(e, Done) for e in before)
    assert dec.feed(wire[end_at:]) == [Done(b"data: [DONE]\n\n")]


def test_v2_stream_without_end_is_truncated() -> None:
    ex, wire = v2_stream()
    end_at = wire.rindex(b"data: ", 0, len(wire) - 1)
    dec = ResponseDecoder(ex.secrets(), aead=AEAD, stream=True)
    dec.feed(wire[:end_at])
    with pytest.raises(PQE2EEError) as info:
        dec.eof()
    assert info.value.code is ErrorCode.STREAM_TRUNCATED


def test_v2_fault_keeps_the_events_before_it() -> None:
    ex, wire = v2_stream()
    lines = wire.split(b"\n")
    # Flip one byte in the third record event (a DATA record): the events before it survive.
    events_at = [i for i, line in enumerate(lines) if line.startswith(b"data: ")]
    bad = events_at[3]
    line = bytearray(lines[bad])
    line[-5] ^= 1
    lines[bad] = bytes(line)
    dec = ResponseDecoder(ex.secrets(), aead=AEAD, stream=True)
    with pytest.raises(PQE2EEError):
        dec.feed(b"\n".join(lines))
    kept = dec.events()
    assert kept and inner_bytes(kept) == INNER[: len(inner_bytes(kept))]
    assert dec.events() == []  # once
    with pytest.raises(PQE2EEError):  # sticky
        dec.feed(b"\n")


def test_v2_upstream_error_in_end_raises() -> None:
    err = UpstreamError("ServerError", "engine died", 502)
    ex, wire = v2_stream(INNER[:40], error=err)
    dec = ResponseDecoder(ex.secrets(), aead=AEAD, stream=True)
    with pytest.raises(RemoteError) as info:
        decode(dec, [wire])
    assert info.value.code is ErrorCode.UPSTREAM_ERROR and info.value.status == 502


def test_v2_non_2xx_head_gives_the_whole_error_answer() -> None:
    body = b'{"error":{"message":"bad model"}}'
    ex = v2_exchange(True)
    enc = StreamEncoderV2(ex.sealer)
    wire = enc.start(404, "application/json") + enc.feed(body) + enc.finish()
    for pieces in itertools.islice(splits(wire), 0, None, 13):
        dec = ResponseDecoder(ex.secrets(), aead=AEAD, stream=True)
        assert decode(dec, pieces) == []
        assert dec.answer == Opened(404, body, "application/json", 2)
        assert dec.head is not None and dec.head.status == 404
    # With no body, END's error becomes the answer.
    ex = v2_exchange(True)
    enc = StreamEncoderV2(ex.sealer)
    wire = enc.start(504, None) + enc.finish(error=UpstreamError("Timeout", "slow", 504))
    dec = ResponseDecoder(ex.secrets(), aead=AEAD, stream=True)
    assert decode(dec, [wire]) == []
    opened = dec.answer
    assert isinstance(opened, Opened) and opened.status == 504
    assert json.loads(opened.body)["error"]["code"] == ErrorCode.UPSTREAM_ERROR.value


def test_v2_error_body_is_bounded() -> None:
    ex = v2_exchange(True)
    enc = StreamEncoderV2(ex.sealer)
    wire = enc.start(500, "text/plain") + enc.feed(b"e" * 100) + enc.finish()
    dec = ResponseDecoder(ex.secrets(), aead=AEAD, stream=True, max_body=50)
    with pytest.raises(LimitExceeded):
        decode(dec, [wire])


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (200, None, 200),
        (201, None, 201),
        (200, UpstreamError("E", "died mid-answer", None), 502),
        (200, UpstreamError("E", "died mid-answer", 503), 503),
        (500, None, 500),
    ],
)
def test_v2_single_at_every_split(status: int, error: UpstreamError | None, expected: int) -> None:
    body = b'{"id":"x"}'
    ex = v2_exchange(False)
    blob = seal_response_v2(ex.sealer, status=status, body=body, error=error)
    for pieces in itertools.islice(splits(blob), 0, None, 211):
        dec = ResponseDecoder(ex.secrets(), aead=AEAD, stream=False)
        assert decode(dec, pieces) == []
        opened = dec.answer
        assert isinstance(opened, Opened) and opened.status == expected and opened.version == 2
        if error is None:
            assert opened.body == body
        else:
            assert json.loads(opened.body)["error"]["message"] == "died mid-answer"
