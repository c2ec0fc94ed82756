"""v1 streaming: StreamSealer / StreamEncoder (instance side) and StreamDecryptor (client side),
plus the SSE helpers they sit on (src/pqe2ee/protocol/v1/stream.py, _events.py, sse.py).

As in h11's tests, everything is bytes in and events out: an encoder and a decryptor are wired
together in memory and the outer bytes are split, edited and replayed by hand.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

import independent_v1
from pqe2ee.backends import AEAD, KEM, get_aead, get_kem
from pqe2ee.backends.base import MLKEM768_CT_LEN, KEMPrivateKey
from pqe2ee.errors import (
    DecryptError,
    ErrorCode,
    LimitExceeded,
    LocalProtocolError,
    PQE2EEError,
    StreamError,
)
from pqe2ee.protocol import (
    NEED_DATA,
    Done,
    EndOfStream,
    InnerEvent,
    LineSplitter,
    RemoteErrorEvent,
    SSEParser,
    StreamDecryptor,
    StreamEncoder,
    StreamEvent,
    StreamSealer,
    Usage,
    extract_usage,
)

MiB = 1024 * 1024
SEED = bytes(range(64))
CANARY = "canary-51d0e2-SECRET-COMPLETION"


@pytest.fixture(scope="module")
def kem() -> KEM:
    return get_kem("pyca")


@pytest.fixture(scope="module")
def aead() -> AEAD:
    return get_aead("pyca")


def det_random() -> Callable[[int], bytes]:
    counter = itertools.count()
    return lambda n: hashlib.sha256(next(counter).to_bytes(8, "big")).digest()[:n]


def chunk(i: int, content: str, *, usage: bool = True) -> bytes:
    obj: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None}
        ],
    }
    if usage:
        obj["usage"] = {"prompt_tokens": 7, "total_tokens": 7 + i, "completion_tokens": i}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


VLLM = (
    chunk(0, "")
    + chunk(1, "Hello")
    + chunk(2, " world")
    + chunk(3, " \u00e9\u4e16")
    + b'data: {"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":7,"total_tokens":10,'
    b'"completion_tokens":3}}\n\n' + b"data: [DONE]\n\n"
)


class Pair:
    """A sealer/encoder for one response key and fresh decryptors for the same key."""

    def __init__(self, kem: KEM, aead: AEAD, **limits: int) -> None:
        self.kem, self.aead, self.limits = kem, aead, limits
        key = kem.from_seed(SEED)
        self.sealer = StreamSealer(key.public_key, kem=kem, aead=aead, random_bytes=det_random())

    def key(self) -> KEMPrivateKey:
        return self.kem.from_seed(SEED)  # decryptors wipe their key: a fresh object each time

    def decryptor(self, **limits: int) -> StreamDecryptor:
        return StreamDecryptor(self.key(), aead=self.aead, **{**self.limits, **limits})

    def encode(self, inner: bytes, *, emit_usage: bool = True) -> bytes:
        enc = StreamEncoder(self.sealer, emit_usage=emit_usage)
        return enc.start() + enc.feed(inner) + enc.finish()

    def records(self, *plaintexts: bytes) -> bytes:
        return self.sealer.init_event() + b"".join(self.sealer.seal_record(p) for p in plaintexts)


def run(
    dec: StreamDecryptor, data: bytes | Iterable[bytes], *, eof: bool = True
) -> list[StreamEvent]:
    out: list[StreamEvent] = []

    def pull() -> None:
        while (ev := dec.next_event()) is not NEED_DATA:
            assert isinstance(ev, InnerEvent | Done | Usage | RemoteErrorEvent | EndOfStream)
            out.append(ev)

    for piece in [data] if isinstance(data, bytes) else data:
        dec.receive_data(piece)
        pull()
    if eof:
        dec.receive_eof()
        pull()
    return out


def inner_bytes(events: list[StreamEvent]) -> bytes:
    return b"".join(e.raw for e in events if isinstance(e, InnerEvent | Done))


def expect_error(
    pair: Pair, data: bytes, exc_type: type[PQE2EEError], code: ErrorCode, **limits: int
) -> PQE2EEError:
    dec = pair.decryptor(**limits)
    with pytest.raises(exc_type) as info:
        run(dec, data)
    assert info.value.code is code, info.value
    return info.value


def outer_lines(outer: bytes) -> list[bytes]:
    return [line for line in outer.split(b"\n") if line]


def relay(lines: Iterable[bytes]) -> bytes:
    return b"".join(line + b"\n\n" for line in lines)


# -- round trips ----------------------------------------------------------------------------------


def test_vllm_round_trip(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.encode(VLLM)
    lines = outer_lines(outer)
    assert lines[0].startswith(b'data: {"e2e_init":"')
    # One record per inner line, blank lines included; a usage event before every usage line.
    inner_lines = VLLM.splitlines(keepends=True)
    assert sum(line.startswith(b'data: {"e2e":"') for line in lines) == len(inner_lines) == 12
    assert sum(line.startswith(b'data: {"usage":') for line in lines) == 5
    assert outer.endswith(b'"}\n\n')

    events = run(pair.decryptor(), outer)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Usage", "InnerEvent"] * 5 + ["Done", "EndOfStream"]
    assert inner_bytes(events) == VLLM
    inner = [e for e in events if isinstance(e, InnerEvent)]
    assert [e.raw for e in inner] == [part + b"\n\n" for part in VLLM.split(b"\n\n")[:5]]
    assert json.loads(inner[3].data)["choices"][0]["delta"]["content"] == " \u00e9\u4e16"
    usages = [e.usage for e in events if isinstance(e, Usage)]
    assert usages == [json.loads(e.data)["usage"] for e in inner]
    assert events[-2] == Done(raw=b"data: [DONE]\n\n")
    assert events[-1] == EndOfStream(complete=True)


def test_usage_is_not_injected_into_inner_events(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    with_usage = run(pair.decryptor(), pair.encode(VLLM, emit_usage=True))
    without = run(pair.decryptor(), pair.encode(VLLM, emit_usage=False))
    assert not any(isinstance(e, Usage) for e in without)
    assert [e for e in with_usage if not isinstance(e, Usage)] == without


def test_usage_event_comes_before_its_record(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    line = chunk(4, "x")
    lines = outer_lines(pair.encode(line + b"data: [DONE]\n\n"))
    assert (
        lines[1] == b'data: {"usage":{"prompt_tokens":7,"total_tokens":11,"completion_tokens":4}}'
    )
    assert lines[2].startswith(b'data: {"e2e":"')


def test_each_event_available_as_soon_as_its_blank_record_arrives(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.encode(VLLM, emit_usage=False)
    dec = pair.decryptor()
    seen: list[StreamEvent] = []
    for line in outer_lines(outer):
        dec.receive_data(line + b"\n\n")
        seen.extend(dec.events())
    assert [type(e) for e in seen] == [InnerEvent] * 5 + [Done]
    assert dec.complete
    assert dec.state == "done"
    dec.receive_eof()
    assert dec.events() == [EndOfStream(complete=True)]
    assert dec.state == "closed"


def test_line_split_over_records(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.records(b'data: {"a"', b":1", b"}\n", b"\n", b"data: [DO", b"NE]\n", b"\n")
    events = run(pair.decryptor(), outer)
    assert events == [
        InnerEvent(events[0].event),  # type: ignore[union-attr]
        Done(raw=b"data: [DONE]\n\n"),
        EndOfStream(complete=True),
    ]
    assert isinstance(events[0], InnerEvent)
    assert events[0].data == '{"a":1}'
    assert events[0].raw == b'data: {"a":1}\n\n'


def test_several_lines_in_one_record(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.records(b"data: one\n\ndata: two\n\ndata: [DONE]\n\n")
    events = run(pair.decryptor(), outer)
    assert [getattr(e, "data", None) for e in events[:2]] == ["one", "two"]
    assert events[2:] == [Done(raw=b"data: [DONE]\n\n"), EndOfStream(complete=True)]


def test_multibyte_character_split_over_records(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    text = "data: \u4e16\n".encode()
    outer = pair.records(text[:7], text[7:], b"\n", b"data: [DONE]\n\n")
    events = run(pair.decryptor(), outer)
    assert isinstance(events[0], InnerEvent)
    assert events[0].data == "\u4e16"


def test_crlf_inner_lines(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    inner = b"data: a\r\n\r\ndata: b\r\ndata: c\r\n\r\ndata: [DONE]\r\n\r\n"
    events = run(pair.decryptor(), pair.encode(inner))
    assert [getattr(e, "data", None) for e in events] == ["a", "b\nc", None, None]
    assert inner_bytes(events) == inner
    assert isinstance(events[2], Done)
    assert events[3] == EndOfStream(complete=True)


def test_inner_sse_fields_are_kept(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    inner = b": ping\n\nevent: delta\nid: 7\ndata: x\n\ndata: [DONE]\n\n"
    events = run(pair.decryptor(), pair.encode(inner))
    first = events[0]
    assert isinstance(first, InnerEvent)
    assert (first.event.event, first.event.id, first.data) == ("delta", "7", "x")
    assert first.raw == b": ping\n\nevent: delta\nid: 7\ndata: x\n\n"  # the comment is kept
    assert inner_bytes(events) == inner


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda line: re.sub(rb'^data: \{"(\w+)":"', rb'data: { "\1" : "', line).replace(
            b'"}', b'" }'
        ),
        lambda line: line.replace(b"data: ", b"data:", 1),
        lambda line: line.replace(b"data: ", b"data:   ", 1) + b"  ",
        lambda line: line + b"\r",
        lambda line: line.replace(b'":"', b'":\t"', 1),
    ],
    ids=["spaced-json", "no-space", "extra-spaces", "crlf", "tab"],
)
def test_outer_formatting_variants(rewrite: Callable[[bytes], bytes], kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.encode(VLLM)
    edited = relay(rewrite(line) for line in outer_lines(outer))
    assert edited != outer
    assert run(pair.decryptor(), edited) == run(pair.decryptor(), outer)


def test_outer_comments_and_extra_blank_lines_are_ignored(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.encode(VLLM)
    noisy = b": keepalive\n\n" + b"".join(line + b"\n\n:ping\n\n\n" for line in outer_lines(outer))
    assert run(pair.decryptor(), noisy) == run(pair.decryptor(), outer)


def test_outer_sse_fields_other_than_data_are_ignored(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.encode(VLLM)
    noisy = b"retry: 1000\n\n" + b"".join(
        b"event: message\nid: 1\n" + line + b"\n\n" for line in outer_lines(outer)
    )
    assert run(pair.decryptor(), noisy) == run(pair.decryptor(), outer)


def test_outer_done_is_ignored(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.encode(VLLM)
    assert run(pair.decryptor(), outer + b"data: [DONE]\n\n") == run(pair.decryptor(), outer)
    assert run(pair.decryptor(), outer + b"data:[DONE]\n\n") == run(pair.decryptor(), outer)
    # An outer [DONE] is not authenticated: it never ends a stream that lacks the inner one.
    cut = pair.encode(chunk(1, "x"))
    expect_error(pair, cut + b"data: [DONE]\n\n", StreamError, ErrorCode.STREAM_TRUNCATED)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000])
def test_any_chunk_size(size: int, kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.encode(VLLM)
    pieces = [outer[i : i + size] for i in range(0, len(outer), size)]
    assert run(pair.decryptor(), pieces) == run(pair.decryptor(), outer)


def test_unterminated_last_outer_line_is_still_read(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.encode(VLLM)
    assert outer.endswith(b"\n\n")
    assert run(pair.decryptor(), outer[:-2]) == run(pair.decryptor(), outer)


def test_eof_right_after_inner_done_line_is_complete(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.records(b"data: x\n", b"\n", b"data: [DONE]\n")
    events = run(pair.decryptor(), outer)
    assert events[1:] == [Done(raw=b"data: [DONE]\n\n"), EndOfStream(complete=True)]
    # ... and also when that record is the tail of the last record of a real stream
    full = pair.encode(VLLM)
    last_record = full.rindex(b'data: {"e2e"')
    assert run(pair.decryptor(), full[:last_record]) == run(pair.decryptor(), full)


@pytest.mark.parametrize("after", [b"id: 1\n", b": comment\n", b"x\n", b"data: more\n"])
def test_eof_after_done_line_and_more_is_truncated(after: bytes, kem: KEM, aead: AEAD) -> None:
    # Only a cut *right after* "data: [DONE]\n" completes the stream: a further line of the same
    # (never finished) event means the [DONE] event itself was cut short.
    pair = Pair(kem, aead)
    outer = pair.records(b"data: x\n", b"\n", b"data: [DONE]\n", after)
    expect_error(pair, outer, StreamError, ErrorCode.STREAM_TRUNCATED)


def test_eof_after_done_line_keeps_its_raw_bytes(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.records(b": ping\n", b"data: [DONE]\r\n")
    events = run(pair.decryptor(), outer)
    assert events == [Done(raw=b": ping\ndata: [DONE]\r\n\n"), EndOfStream(complete=True)]


def test_whitespace_records_after_done_are_accepted(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.records(b"data: [DONE]\n", b"\n", b"\n", b"\r\n", b" ")
    assert run(pair.decryptor(), outer) == [
        Done(raw=b"data: [DONE]\n\n"),
        EndOfStream(complete=True),
    ]


def test_remote_error(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    err = {"message": "engine failed", "type": "internal"}
    outer = pair.records(b"data: x\n", b"\n") + StreamSealer.error_event(err)
    events = run(pair.decryptor(), outer)
    assert [type(e) for e in events] == [InnerEvent, RemoteErrorEvent, EndOfStream]
    assert events[1] == RemoteErrorEvent(err)
    assert events[2] == EndOfStream(complete=False)


def test_remote_error_before_init(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    events = run(pair.decryptor(), StreamSealer.error_event("boom"))
    assert events == [RemoteErrorEvent("boom"), EndOfStream(complete=False)]


def test_relay_error_key_is_a_remote_error(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    events = run(pair.decryptor(), pair.sealer.init_event() + b'data: {"error":{"code":1}}\n\n')
    assert events == [RemoteErrorEvent({"code": 1}), EndOfStream(complete=False)]


def test_remote_error_after_done_marks_stream_failed(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.encode(b"data: [DONE]\n\n") + StreamSealer.error_event("late")
    events = run(pair.decryptor(), outer)
    assert events == [
        Done(raw=b"data: [DONE]\n\n"),
        RemoteErrorEvent("late"),
        EndOfStream(complete=False),
    ]


def test_usage_before_init_is_allowed(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = StreamSealer.usage_event({"prompt_tokens": 1}) + pair.encode(b"data: [DONE]\n\n")
    events = run(pair.decryptor(), outer)
    assert events[0] == Usage({"prompt_tokens": 1})
    assert events[-1] == EndOfStream(complete=True)


def test_next_event_need_data_and_counters(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    dec = pair.decryptor()
    assert dec.next_event() is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"
    assert dec.state == "await_init"
    dec.receive_data(b"")
    dec.receive_data(pair.sealer.init_event()[:10])
    assert dec.next_event() is NEED_DATA
    assert dec.events() == []
    dec.receive_data(pair.sealer.init_event()[10:])
    assert dec.state == "open"
    dec.receive_data(pair.sealer.seal_record(b"data: x\n") + pair.sealer.seal_record(b"\n"))
    assert dec.records == 2
    ev = dec.next_event()
    assert isinstance(ev, InnerEvent)
    assert dec.next_event() is NEED_DATA
    assert not dec.complete


def test_key_is_wiped_after_init(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    key = pair.key()
    dec = StreamDecryptor(key, aead=aead)
    dec.receive_data(pair.sealer.init_event())
    assert key.seed() is None  # pyca drops the private key object on wipe()


def test_extract_usage() -> None:
    assert extract_usage(chunk(2, "x")) == {
        "prompt_tokens": 7,
        "total_tokens": 9,
        "completion_tokens": 2,
    }
    assert extract_usage(chunk(2, "x", usage=False)) is None
    assert extract_usage(b'data: {"usage":null}\n') is None
    assert extract_usage(b'data: {"usage":0}\n') == 0
    assert extract_usage(b'data:{"usage":{}}\n') is None  # the runtime wants "data: "
    assert extract_usage(b'data: ["usage"]\n') is None
    assert extract_usage(b'data: {"usage":\n') is None
    assert extract_usage(b'data: {"usage":"\xc3"}\n') is None  # invalid UTF-8 in a string
    assert extract_usage(b"\n") is None
    # Only usage is built from the line, but the whole line is still checked as before.
    assert extract_usage(b'data: {"x":"\xc3","usage":1}\n') is None  # bad UTF-8 elsewhere
    assert extract_usage(b'data: {"x":"\xc3\xa9","usage":1}\n') == 1  # good UTF-8 elsewhere
    assert extract_usage(b'data: {"x":[1,,2],"usage":1}\n') is None
    assert extract_usage(b'data: {"usage":1} x\n') is None
    assert extract_usage(b'data: {"usage":1,"usage":{"a":[2]}}\n') == {"a": [2]}  # the last


def test_encoder_tail_and_max_line(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    enc = StreamEncoder(pair.sealer, max_line=100)
    outer = enc.start() + enc.feed(b"data: a\n\ndata: [DO") + enc.feed(b"NE]\n") + enc.finish()
    events = run(pair.decryptor(), outer)
    assert events[-2:] == [Done(raw=b"data: [DONE]\n\n"), EndOfStream(complete=True)]
    # An unterminated last line becomes a record of its own at finish() ...
    enc = StreamEncoder(pair.sealer)
    assert enc.feed(b"data: [DONE]") == b""
    tail = enc.finish()
    assert tail.startswith(b'data: {"e2e":"')
    assert enc.finish() == b""
    # ... but an SSE line without its newline never completes an event: that is a truncation.
    expect_error(pair, enc.start() + tail, StreamError, ErrorCode.STREAM_TRUNCATED)
    with pytest.raises(LimitExceeded):
        StreamEncoder(pair.sealer, max_line=100).feed(b"x" * 101)


# -- protocol violations --------------------------------------------------------------------------


def test_record_before_init(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.encode(VLLM)
    no_init = outer[outer.index(b"\n\n") + 2 :]
    expect_error(pair, no_init, StreamError, ErrorCode.RECORD_BEFORE_INIT)


def test_duplicate_init(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    init = pair.sealer.init_event()
    expect_error(pair, init + init, StreamError, ErrorCode.DUPLICATE_INIT)
    outer = pair.encode(VLLM)
    expect_error(pair, outer + init, StreamError, ErrorCode.DUPLICATE_INIT)  # after [DONE] too


def test_duplicate_record(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.encode(VLLM, emit_usage=False)
    lines = outer_lines(outer)
    for i in (1, 2, 5):
        replayed = relay([*lines[: i + 3], lines[i], *lines[i + 3 :]])
        expect_error(pair, replayed, StreamError, ErrorCode.DUPLICATE_RECORD)
    # a replay after the inner [DONE] is caught as well
    expect_error(pair, relay([*lines, lines[3]]), StreamError, ErrorCode.DUPLICATE_RECORD)


def _tamper(line: bytes, index: int) -> bytes:
    prefix, b64, suffix = line[:14], line[14:-2], line[-2:]
    raw = bytearray(base64.b64decode(b64))
    raw[index] ^= 0x80
    return prefix + base64.b64encode(bytes(raw)) + suffix


@pytest.mark.parametrize("index", [0, 11, 12, -17, -1])  # nonce, ciphertext, tag
def test_tampered_record(index: int, kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    lines = outer_lines(pair.encode(VLLM, emit_usage=False))
    assert lines[3].startswith(b'data: {"e2e":"')
    lines[3] = _tamper(lines[3], index)
    expect_error(pair, relay(lines), DecryptError, ErrorCode.DECRYPT_FAILED)


def test_record_from_another_stream(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    other = StreamSealer(pair.key().public_key, kem=kem, aead=aead)  # same client key, new stream
    outer = pair.sealer.init_event() + other.seal_record(b"data: [DONE]\n\n")
    expect_error(pair, outer, DecryptError, ErrorCode.DECRYPT_FAILED)


def test_init_for_another_key(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    stranger = StreamSealer(kem.generate().public_key, kem=kem, aead=aead)
    outer = stranger.init_event() + stranger.seal_record(b"data: [DONE]\n\n")
    expect_error(pair, outer, DecryptError, ErrorCode.DECRYPT_FAILED)


@pytest.mark.parametrize(
    "line",
    [
        b'data: {"e2e":"!!!!"}',
        b'data: {"e2e":"AAAA AAAA"}',
        b'data: {"e2e":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}',  # bad padding
        b'data: {"e2e":"\xc3\xa9AAA"}',
        b'data: {"e2e":"\\u00e9AAA"}',
    ],
)
def test_invalid_base64_record(line: bytes, kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    expect_error(
        pair, pair.sealer.init_event() + relay([line]), StreamError, ErrorCode.MALFORMED_EVENT
    )


@pytest.mark.parametrize("length", [0, 1, 12, 27])
def test_too_short_record(length: int, kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    line = b'data: {"e2e":"' + base64.b64encode(b"\x00" * length) + b'"}'
    expect_error(
        pair, pair.sealer.init_event() + relay([line]), StreamError, ErrorCode.MALFORMED_EVENT
    )


@pytest.mark.parametrize(
    "payload",
    [
        b'{"foo":1}',
        b'{"e2e":"AAAA","x":1}',
        b"{}",
        b'["e2e"]',
        b'"e2e"',
        b"null",
        b'{"e2e":5}',
        b'{"e2e":null}',
        b'{"e2e_init":5}',
        b'{"e2e_init":"AAAA"}',  # wrong KEM ciphertext length (duplicate init is checked first)
        b"hello",
        b"",
        b"{",
        b'{"usage":1',
        b'{"usage":"\xc3"}',  # invalid UTF-8 inside a JSON string
        b"\xff",
    ],
)
def test_malformed_outer_event(payload: bytes, kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    init = pair.sealer.init_event() if b"e2e_init" not in payload else b""
    expect_error(pair, init + b"data: " + payload + b"\n\n", StreamError, ErrorCode.MALFORMED_EVENT)


@pytest.mark.parametrize(
    "line",
    [b"dat: x", b"daTa: x", b"Jdata: x", b"x", b"\xe4ata: x", b'data; {"e2e":"AAAA"}', b"data"],
)
def test_unknown_outer_field_is_an_error(line: bytes, kem: KEM, aead: AEAD) -> None:
    # The relay only ever sends "data:" lines, comments and blank lines; anything else means the
    # stream was corrupted (a bit flip in "data" must not silently drop a record).
    pair = Pair(kem, aead)
    expect_error(
        pair, pair.sealer.init_event() + relay([line]), StreamError, ErrorCode.MALFORMED_EVENT
    )


def test_invalid_utf8_inside_a_record(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.records(b"data: \xff\xfe\n", b"\n")
    expect_error(pair, outer, StreamError, ErrorCode.INVALID_UTF8)
    # a truncated multibyte sequence at the end of a line
    outer = pair.records("data: \u4e16".encode()[:-1] + b"\n", b"\n")
    expect_error(pair, outer, StreamError, ErrorCode.INVALID_UTF8)


@pytest.mark.parametrize(
    "after",
    [
        [b"data: more\n", b"\n"],
        [b"data: more\n"],  # even a partial event
        [b": comment\n"],
        [b"x"],
    ],
)
def test_data_after_inner_done(after: list[bytes], kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.records(b"data: [DONE]\n", b"\n", *after)
    expect_error(pair, outer, StreamError, ErrorCode.DATA_AFTER_DONE)


@pytest.mark.parametrize(
    "record",
    [
        b"data: [DONE]\n\ndata: more\n\n",
        b"data: [DONE]\n\ndata: more\n",  # the rest of the record is a partial event
        b"data: [DONE]\n\n: comment\n",
        b"data: [DONE]\n\nx",
    ],
)
def test_data_after_inner_done_in_the_same_record(record: bytes, kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    expect_error(pair, pair.records(record), StreamError, ErrorCode.DATA_AFTER_DONE)


def test_done_then_whitespace_in_the_same_record_is_fine(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    events = run(pair.decryptor(), pair.records(b"data: [DONE]\n\n\n\r\n"))
    assert events == [Done(raw=b"data: [DONE]\n\n"), EndOfStream(complete=True)]


@pytest.mark.parametrize(
    "records",
    [
        [],
        [b"data: x\n", b"\n"],
        [b"data: [DONE]"],  # no newline: the line was never finished
        [b"data: [DONE]\r"],
        [b"data: x\n", b"\n", b"data: [DONE]\ndata: y\n"],  # a [DONE] that is not alone
        [b"data: x\n"],
    ],
)
def test_eof_before_inner_done(records: list[bytes], kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    expect_error(pair, pair.records(*records), StreamError, ErrorCode.STREAM_TRUNCATED)


@pytest.mark.parametrize("outer", [b"", b": keepalive\n\n", b"data: [DONE]\n\n"])
def test_eof_before_init(outer: bytes, kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    expect_error(pair, outer, StreamError, ErrorCode.STREAM_TRUNCATED)


def test_eof_mid_record_before_done_is_an_error(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.encode(VLLM)
    last = outer.rindex(b"data: {")
    done_record = outer.rindex(b"data: {", 0, last)  # the record carrying "data: [DONE]\n"
    # A last line cut short is truncation, whether it still parses as a line or not.
    for cut in (done_record + 1, done_record + 20, last - 3, done_record, done_record - 1):
        with pytest.raises(StreamError) as info:
            run(pair.decryptor(), outer[:cut])
        assert info.value.code is ErrorCode.STREAM_TRUNCATED


def test_eof_mid_record_after_done_is_complete(kem: KEM, aead: AEAD) -> None:
    # The last record (the blank line after "data: [DONE]") is cut: everything authenticated was
    # received, the partial outer line can carry nothing more.
    pair = Pair(kem, aead)
    outer = pair.encode(VLLM)
    full = run(pair.decryptor(), outer)
    last = outer.rindex(b"data: {")
    for cut in (last + 1, last + 6, last + 20, len(outer) - 4, len(outer) - 3):
        assert run(pair.decryptor(), outer[:cut]) == full


def test_unterminated_last_record_carrying_done_is_complete(kem: KEM, aead: AEAD) -> None:
    # The final outer event lacks its "\n\n" and its record is the engine's "data: [DONE]\n":
    # the authenticated end arrived whole, so the stream is complete (a fast-path regression).
    pair = Pair(kem, aead)
    outer = pair.records(b'data: {"x":1}\n', b"\n", b"data: [DONE]\n")
    assert outer.endswith(b"\n\n")
    events = run(pair.decryptor(), outer[:-2])
    assert [type(ev) for ev in events] == [InnerEvent, Done, EndOfStream]
    assert isinstance(events[-1], EndOfStream) and events[-1].complete


def test_data_after_eof_is_refused(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    dec = pair.decryptor()
    run(dec, pair.encode(VLLM))
    dec.receive_eof()  # a second EOF is harmless
    with pytest.raises(StreamError):
        dec.receive_data(b"data: x\n\n")


# -- limits ---------------------------------------------------------------------------------------


def test_oversize_outer_line_without_newline(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    dec = pair.decryptor(max_record=1024)
    dec.receive_data(pair.sealer.init_event())
    block = b"A" * MiB
    fed = 0
    with pytest.raises(LimitExceeded) as info:
        for _ in range(100):  # 100 MiB if nothing stopped it
            dec.receive_data(block)
            fed += 1
    assert info.value.code is ErrorCode.OVERSIZE
    assert fed == 0  # refused on the very first MiB: the buffer never grew past one chunk


def test_oversize_outer_line_in_small_pieces(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    dec = pair.decryptor(max_record=1024)
    fed = 0
    with pytest.raises(LimitExceeded):
        for _ in range(100 * MiB // 256):
            dec.receive_data(b"B" * 256)
            fed += 256
    assert fed <= 4096  # the bound is about 4/3 of max_record plus the JSON wrapper


def test_chunks_without_a_line_end_are_held_up_to_the_bound(kem: KEM, aead: AEAD) -> None:
    """A chunk with no line end is held up to the line bound, to the byte, and refused past
    it: alone (nothing held before it: split like any chunk) or after held bytes."""
    pair = Pair(kem, aead)
    bound = (1024 + 28) * 4 // 3 + 256  # max_record=1024's: base64 of a record + its wrapper
    for held in (b"", b'data: {"e2e":"'):
        dec = pair.decryptor(max_record=1024)
        dec.receive_data(pair.sealer.init_event() + held)
        dec.receive_data(b"A" * (bound - len(held)))
        with pytest.raises(LimitExceeded):
            dec.receive_data(b"A")


def test_oversize_record_with_newline(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    big = pair.sealer.seal_record(b"x" * 4096)
    expect_error(
        pair, pair.sealer.init_event() + big, LimitExceeded, ErrorCode.OVERSIZE, max_record=1024
    )
    # the same record fits a bigger bound
    run(pair.decryptor(max_record=4096), pair.sealer.init_event() + big, eof=False)


def test_oversize_inner_event(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    dec = pair.decryptor(max_event=4096)
    dec.receive_data(pair.sealer.init_event())
    sent = 0
    with pytest.raises(LimitExceeded):
        for _ in range(10_000):  # never a blank line
            dec.receive_data(pair.sealer.seal_record(b"data: " + b"y" * 100 + b"\n"))
            sent += 1
    assert sent <= 4096 // 107 + 1


def test_oversize_inner_line_without_newline(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    dec = pair.decryptor(max_event=4096)
    dec.receive_data(pair.sealer.init_event())
    sent = 0
    with pytest.raises(LimitExceeded):
        for _ in range(10_000):
            dec.receive_data(pair.sealer.seal_record(b"z" * 1000))
            sent += 1
    assert sent <= 4


def test_max_records(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    outer = pair.encode(VLLM, emit_usage=False)  # 12 records
    run(pair.decryptor(max_records=12), outer)
    expect_error(pair, outer, LimitExceeded, ErrorCode.OVERSIZE, max_records=11)


# -- sticky errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.records(b"data: \xff\n"),
        lambda p: p.sealer.seal_record(b"x"),
        lambda p: p.records() + b"data: nope\n\n",
        lambda p: p.records(b"data: [DONE]\n\n", b"data: x\n\n"),
    ],
)
def test_errors_are_sticky(make: Callable[[Pair], bytes], kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    dec = pair.decryptor()
    with pytest.raises(PQE2EEError) as info:
        dec.receive_data(make(pair))
    first = info.value
    for call in (
        lambda: dec.receive_data(b""),
        lambda: dec.receive_data(pair.records(b"data: [DONE]\n\n")),
        dec.next_event,
        dec.events,
        dec.receive_eof,
        dec.receive_eof,
    ):
        with pytest.raises(PQE2EEError) as again:
            call()
        assert again.value is first
    assert dec.state == "error"


def test_error_raised_at_eof_is_sticky(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    dec = pair.decryptor()
    dec.receive_data(pair.records(b"data: x\n"))
    with pytest.raises(StreamError) as info:
        dec.receive_eof()
    assert info.value.code is ErrorCode.STREAM_TRUNCATED
    with pytest.raises(StreamError) as again:
        dec.next_event()
    assert again.value is info.value


def test_error_messages_never_contain_plaintext(kem: KEM, aead: AEAD) -> None:
    pair = Pair(kem, aead)
    c = CANARY.encode()
    cases = [
        pair.records(b"data: " + c + b"\xff\n"),
        pair.records(b"data: [DONE]\n\ndata: " + c + b"\n\n"),
        pair.records(b"data: [DONE]\n\n", b"data: " + c + b"\n\n"),
        pair.records(b"data: " + c + b"\n"),
        pair.records() + b'data: {"' + c + b'":1}\n\n',
        pair.records() + b'data: {"e2e":"' + c + b'"}\n\n',
        pair.records() + b'data: {"usage":"' + c + b'\xc3"}\n\n',
        pair.records() + b"data: " + c + b"\n\n",
        pair.records() + c + b": x\n\n",
        pair.records() + b'data: {"e2e_init":"' + c + b'"}\n\n',
    ]
    for outer in cases:
        with pytest.raises(PQE2EEError) as info:
            run(pair.decryptor(max_event=len(c) * 4), outer)
        for text in (str(info.value), repr(info.value)):
            assert CANARY[:12] not in text, text


# -- LineSplitter -----------------------------------------------------------------------------


def test_line_splitter_basic() -> None:
    s = LineSplitter(max_line=100)
    assert s.feed(b"ab") == []
    assert s.pending == 2
    assert s.feed(b"c\nde\n\nf") == [b"abc\n", b"de\n", b"\n"]
    assert s.pending == 1
    assert s.feed(b"\r\n") == [b"f\r\n"]
    assert s.feed(b"") == []
    assert s.flush() == b""
    assert s.feed(b"tail") == []
    assert s.flush() == b"tail"
    assert s.pending == 0


def test_line_splitter_breaks_at_newline_only() -> None:
    # a whole chunk of lines is split at "\n" alone: a lone "\r" stays inside its line
    s = LineSplitter(max_line=100)
    assert s.feed(b"a\rb\nc\r\n\n") == [b"a\rb\n", b"c\r\n", b"\n"]
    assert s.feed(b"x\x0by\x0c\x1c\x85\n") == [b"x\x0by\x0c\x1c\x85\n"]
    assert s.feed(b"d\ne\n") == [b"d\n", b"e\n"]
    assert s.pending == 0


def test_line_splitter_bounds() -> None:
    s = LineSplitter(max_line=10)
    assert s.feed(b"x" * 9 + b"\n") == [b"x" * 9 + b"\n"]  # 10 bytes with the newline: fits
    with pytest.raises(LimitExceeded):
        LineSplitter(max_line=10).feed(b"x" * 10 + b"\n")
    with pytest.raises(LimitExceeded):
        LineSplitter(max_line=10).feed(b"x" * 11)  # an unterminated tail
    s = LineSplitter(max_line=10)
    s.feed(b"x" * 6)
    with pytest.raises(LimitExceeded):
        s.feed(b"y" * 5)
    s = LineSplitter(max_line=10)
    with pytest.raises(LimitExceeded):
        s.feed(b"a\n" + b"b" * 11)  # the tail after a complete line


@pytest.mark.parametrize("size", [1, 2, 5, 13])
def test_line_splitter_any_split(size: int) -> None:
    data = b"alpha\nbeta\n\ngamma\r\ndelta"
    s = LineSplitter(max_line=100)
    lines: list[bytes] = []
    for i in range(0, len(data), size):
        lines += s.feed(data[i : i + size])
    assert lines == [b"alpha\n", b"beta\n", b"\n", b"gamma\r\n"]
    assert s.flush() == b"delta"


# -- SSEParser --------------------------------------------------------------------------------


def test_sse_multiline_data_and_fields() -> None:
    p = SSEParser(max_event=1000)
    evs = p.feed(b"event: add\nid: 42\ndata: a\ndata:b\ndata:  c\ndata\nretry: 5\nfoo: bar\n\n")
    assert len(evs) == 1
    ev = evs[0]
    assert ev.data == "a\nb\n c\n"
    assert ev.event == "add"
    assert ev.id == "42"
    assert ev.raw == b"event: add\nid: 42\ndata: a\ndata:b\ndata:  c\ndata\nretry: 5\nfoo: bar\n\n"


def test_sse_id_persists_and_event_type_resets() -> None:
    p = SSEParser(max_event=1000)
    first, second = p.feed(b"event: x\nid: 1\ndata: a\n\ndata: b\n\n")
    assert (first.event, first.id) == ("x", "1")
    assert (second.event, second.id) == (None, "1")  # last event id is kept, the type is not
    (third,) = p.feed(b"id: bad\x00id\ndata: c\n\n")
    assert third.id == "1"  # an id containing NUL is ignored


def test_sse_comments_and_dataless_events() -> None:
    p = SSEParser(max_event=1000)
    assert p.feed(b": keepalive\n\n") == []
    assert p.has_partial
    assert p.feed(b"event: lonely\n\n") == []
    (ev,) = p.feed(b"data: x\n\n")
    assert ev.event is None  # the dataless event's type does not leak into the next one
    assert ev.raw == b": keepalive\n\nevent: lonely\n\ndata: x\n\n"
    assert not p.has_partial


def test_sse_crlf_and_split_feeding() -> None:
    data = b"data: a\r\ndata: b\r\n\r\ndata: [DONE]\r\n\r\n"
    whole = SSEParser(max_event=100).feed(data)
    p = SSEParser(max_event=100)
    pieces: list[Any] = []
    for b in data:
        pieces += p.feed(bytes([b]))
    assert pieces == whole
    assert [e.data for e in whole] == ["a\nb", "[DONE]"]


def test_sse_partial_is() -> None:
    p = SSEParser(max_event=100)
    assert not p.partial_is("[DONE]")
    p.feed(b"data: [DONE]\n")
    assert p.partial_is("[DONE]")
    p.feed(b"data: more")
    assert not p.partial_is("[DONE]")
    p = SSEParser(max_event=100)
    p.feed(b": c\ndata: [DONE]\n")
    assert p.partial_is("[DONE]")
    p.feed(b"id: 1\n")
    assert not p.partial_is("[DONE]")  # the data line must be the last line


def test_sse_invalid_utf8() -> None:
    with pytest.raises(StreamError) as info:
        SSEParser(max_event=100).feed(b"data: \xc3\x28\n")
    assert info.value.code is ErrorCode.INVALID_UTF8


def test_sse_event_size_bound() -> None:
    p = SSEParser(max_event=50)
    p.feed(b"data: " + b"x" * 20 + b"\n")
    with pytest.raises(LimitExceeded):
        p.feed(b"data: " + b"y" * 30 + b"\n")
    with pytest.raises(LimitExceeded):
        SSEParser(max_event=50).feed(b"x" * 51)
    # dataless lines count too: comments cannot grow an event without bound
    p = SSEParser(max_event=50)
    with pytest.raises(LimitExceeded):
        for _ in range(10):
            p.feed(b": ping\n\n")


_SSE_LINES = [
    b"data: x",
    b'data: {"a": [1]}',
    b"data: \xc3\xa9",
    b"data: ",
    b"data:y",
    b"data: a\rb",
    b"data: z\r",
    b"data: \xff",
    b"event: e",
    b"id: 7",
    b": c",
    b"retry: 1",
    b"",
]


def _sse_outcome(parser: SSEParser, chunks: Iterable[bytes]) -> tuple[Any, ...]:
    events: list[tuple[str, str | None, str | None, bytes]] = []
    try:
        for chunk in chunks:
            events += [(e.data, e.event, e.id, e.raw) for e in parser.feed(chunk)]
    except (StreamError, LimitExceeded) as exc:
        return ("raised", type(exc), events)
    return (events, parser.buffered(), parser.last_event_id)


@given(
    before=st.lists(st.sampled_from(_SSE_LINES), max_size=3),
    lines=st.lists(st.sampled_from(_SSE_LINES), min_size=1, max_size=12),
    ending=st.sampled_from([b"\n\n", b"\n", b"\r\n\n", b""]),
    limit=st.sampled_from([30, 1000]),
)
def test_sse_whole_chunks_parse_as_byte_by_byte(
    before: list[bytes], lines: list[bytes], ending: bytes, limit: int
) -> None:
    """The fast paths of ``SSEParser.feed`` (whole events of one ``data:`` line each, fed at
    once, as the proxy feeds a decrypted read) give what the general path gives the same bytes
    fed one at a time: the same events, the same error, the same state after."""
    head = b"".join(line + b"\n" for line in before) + b"\n" if before else b""
    chunk = b"\n".join(lines) + ending
    whole = _sse_outcome(SSEParser(limit), [head, chunk] if head else [chunk])
    data = head + chunk
    stepwise = _sse_outcome(SSEParser(limit), [data[i : i + 1] for i in range(len(data))])
    if whole[0] == "raised" or stepwise[0] == "raised":
        # Fed at once, a chunk is refused whole: compare the verdicts (and what came before it).
        assert whole[:2] == stepwise[:2]
    else:
        assert whole == stepwise


def test_sse_one_read_of_many_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """The events of one decrypted read at once (the proxy's translated streams), parsed
    without a call per line."""
    chunk = b"".join(b'data: {"n": %d}\n\n' % i for i in range(5)) + b"data: [DONE]\n\n"
    p = SSEParser(max_event=1000)
    assert [e.id for e in p.feed(b"id: 9\ndata: a\n\n")] == ["9"]

    def per_line(self: SSEParser, line: bytes) -> None:
        raise AssertionError("parsed line by line")

    monkeypatch.setattr(SSEParser, "_line", per_line)
    events = p.feed(chunk)
    assert [e.data for e in events] == [f'{{"n": {i}}}' for i in range(5)] + ["[DONE]"]
    assert [e.raw for e in events] == [b'data: {"n": %d}\n\n' % i for i in range(5)] + [
        b"data: [DONE]\n\n"
    ]
    assert {(e.event, e.id) for e in events} == {(None, "9")}
    assert not p.has_partial


def test_usage_events_unread_are_checked_but_not_built(kem: KEM, aead: AEAD) -> None:
    """decode_usage=False (what ResponseDecoder asks for without an on_usage listener): the same
    inner events, no Usage events, and a malformed usage event still fails the stream."""
    pair = Pair(kem, aead)
    outer = pair.encode(chunk(1, "a") + chunk(2, "b") + b"data: [DONE]\n\n")
    assert outer.count(b'data: {"usage":') == 2
    everything = run(pair.decryptor(), outer)
    unread = run(StreamDecryptor(pair.key(), aead=aead, decode_usage=False), outer)
    assert [e for e in everything if not isinstance(e, Usage)] == unread
    assert sum(isinstance(e, Usage) for e in everything) == 2
    for bad in (
        b'data: {"usage":{"a":1},"e2e":"x"}\n\n',  # a second key
        b'data: {"usage":{"a":1}\n\n',  # cut JSON
        b'data: {"usage":"\xc3"}\n\n',  # bad UTF-8
    ):
        dec = StreamDecryptor(pair.key(), aead=aead, decode_usage=False)
        with pytest.raises(StreamError) as info:
            run(dec, pair.sealer.init_event() + bad)
        assert info.value.code is ErrorCode.MALFORMED_EVENT
    # Usage after the inner [DONE] is still allowed; data after it still is not.
    tail = b'data: {"usage":{"total_tokens":3}}\n\n'
    assert run(StreamDecryptor(pair.key(), aead=aead, decode_usage=False), outer + tail) == unread


@pytest.mark.parametrize("decode_usage", [False, True])
def test_whole_chunk_checks_decide_per_line(kem: KEM, aead: AEAD, decode_usage: bool) -> None:
    """A chunk is scanned once for a backslash and for the line bound: a JSON escape in one
    record sends that chunk's lines the slow way, and they decode as when fed one line at a
    time; usage payloads with trailing whitespace (JSON's or not) give the same events too."""
    pair = Pair(kem, aead)
    outer = pair.encode(chunk(1, "a") + chunk(2, "b") + b"data: [DONE]\n\n")
    lines = outer.split(b"\n")
    first = next(k for k, line in enumerate(lines) if line.startswith(b'data: {"e2e":"'))
    lines[first] = lines[first][:14] + b"\\u%04x" % lines[first][14] + lines[first][15:]
    usage = [k for k, line in enumerate(lines) if line.startswith(b'data: {"usage"')]
    assert len(usage) == 2
    lines[usage[0]] += b" \r"
    lines[usage[1]] += b"\x0c"
    edited = b"\n".join(lines)
    assert edited.count(b"\\") == 1
    expected = run(StreamDecryptor(pair.key(), aead=aead, decode_usage=decode_usage), outer)
    whole = StreamDecryptor(pair.key(), aead=aead, decode_usage=decode_usage)
    assert run(whole, edited) == expected
    one_by_one = StreamDecryptor(pair.key(), aead=aead, decode_usage=decode_usage)
    assert run(one_by_one, [line + b"\n" for line in lines[:-1]]) == expected
    # The bound still holds for one long line among short ones, in one chunk.
    bounded = pair.decryptor(max_record=64)
    with pytest.raises(LimitExceeded):
        run(bounded, pair.records(b"\n", b"data: " + b"x" * 200 + b"\n", b"\n"))


def test_response_decoder_builds_usage_only_for_a_listener(kem: KEM, aead: AEAD) -> None:
    from pqe2ee.protocol.response import ResponseDecoder

    pair = Pair(kem, aead)
    outer = pair.encode(chunk(1, "a") + b"data: [DONE]\n\n")
    seen: list[Any] = []
    with_listener = ResponseDecoder(pair.key(), aead=aead, stream=True, on_usage=seen.append)
    without = ResponseDecoder(pair.key(), aead=aead, stream=True)
    assert with_listener.feed(outer) + with_listener.eof() == without.feed(outer) + without.eof()
    assert seen == [{"prompt_tokens": 7, "total_tokens": 8, "completion_tokens": 1}]


def test_sealer_nonces_from_the_system_source_are_fresh_past_each_batch(
    kem: KEM, aead: AEAD
) -> None:
    """The default source hands out the system CSPRNG's bytes in batches of 32 nonces: across
    several batches every record gets its own nonce and every record opens."""
    key = kem.from_seed(SEED)
    sealer = StreamSealer(key.public_key, kem=kem, aead=aead)
    inner = [line for i in range(50) for line in (b"data: %d\n" % i, b"\n")]
    inner += [b"data: [DONE]\n", b"\n"]
    records = [sealer.seal_record(p) for p in inner]
    nonces = {base64.b64decode(r[len(b'data: {"e2e":"') : -4])[:12] for r in records}
    assert len(nonces) == len(records)
    events = run(
        StreamDecryptor(kem.from_seed(SEED), aead=aead), sealer.init_event() + b"".join(records)
    )
    assert inner_bytes(events) == b"".join(inner)


def test_sealer_checks_the_nonces_of_a_source_passed_in(kem: KEM, aead: AEAD) -> None:
    """Nonces from the default source are 12 bytes by construction and sealed unchecked; a
    source passed in is still checked per record (a wrong length is the caller's error)."""
    key = kem.from_seed(SEED)
    short = StreamSealer(key.public_key, kem=kem, aead=aead, random_bytes=lambda n: b"\0" * 11)
    with pytest.raises(LocalProtocolError, match="nonce must be 12 bytes"):
        short.seal_record(b"data: x\n")
    long = StreamSealer(key.public_key, kem=kem, aead=aead, random_bytes=lambda n: b"\0" * 13)
    for _ in range(2):  # and again on the next record: the source is asked again
        with pytest.raises(LocalProtocolError, match="nonce must be 12 bytes"):
            long.seal_record(b"data: x\n")


def test_inner_parser_made_only_when_needed(kem: KEM, aead: AEAD) -> None:
    """A usual stream (a record per engine line, ending at the inner [DONE]) never needs the
    inner SSE parser, so none is made; a record the fast path cannot take makes it, and the
    events are the same as before."""
    pair = Pair(kem, aead)
    outer = pair.encode(chunk(1, "a") + chunk(2, "b") + b"data: [DONE]\n\n")
    dec = pair.decryptor()
    events = run(dec, outer)
    assert "_inner" not in vars(dec)
    assert [type(e).__name__ for e in events][-2:] == ["Done", "EndOfStream"]
    # An event of two data lines takes the parser.
    two = pair.sealer.init_event() + pair.sealer.seal_record(b"data: x\ndata: y\n\n")
    dec = pair.decryptor()
    dec.receive_data(two)
    assert "_inner" in vars(dec)
    (event,) = dec.events()
    assert isinstance(event, InnerEvent) and event.data == "x\ny"


def test_init_event_fast_path_keeps_the_slow_verdicts(kem: KEM, aead: AEAD) -> None:
    """The compact init line is decoded where it lies; any other form (a JSON escape, a stray
    character) takes the JSON path and gets its verdict, message included."""
    pair = Pair(kem, aead)
    init = pair.sealer.init_event()
    body = b"".join(pair.sealer.seal_record(p) for p in (b"data: x\n\n", b"data: [DONE]\n\n"))
    expected = run(pair.decryptor(), init + body)
    assert [type(e).__name__ for e in expected] == ["InnerEvent", "Done", "EndOfStream"]
    slash = init.index(b"/")  # (1,452 random base64 characters: one is a "/")
    escaped = init[:slash] + b"\\/" + init[slash + 1 :]  # a JSON escape: the slow path
    assert run(pair.decryptor(), escaped + body) == expected
    b64 = init[len(b'data: {"e2e_init":"') : -len(b'"}\n\n')]
    for bad, message in (
        (b"*" + b64[1:], "e2e_init is not valid base64"),
        (b64 + b'","x":"1', "outer event must be an object with one key"),
        (b64[:8], f"e2e_init must hold {MLKEM768_CT_LEN} bytes"),
    ):
        line = b'data: {"e2e_init":"' + bad + b'"}\n\n'
        with pytest.raises(StreamError) as info:
            run(pair.decryptor(), line + body)
        assert info.value.code is ErrorCode.MALFORMED_EVENT
        assert info.value.message == message
    with pytest.raises(StreamError) as info:
        run(pair.decryptor(), init + init + body)
    assert info.value.code is ErrorCode.DUPLICATE_INIT


@pytest.mark.parametrize(
    "usage",
    [
        b'{"usage":{"a":1}}',
        b'{"usage": {"a": [1, 2.5, "x", null, true]} }',
        b'{ "usage" : {"a":1} }',
        b'{"usage":{"a":1}} ',
        b'{"usage":null}',
        b'{"usage":"\\u00e9"}',
        b'{"usage":{"a":1}}}',
        b'{"usage":}',
        b'{"usage":{"a":1},"usage":{"a":2}}',
        b'{"usage":{"a":1}, "x":2}',
        b'{"usage":{"a":1} , "x":2}',
        b'{"usage":1 2}',
        b'{"usage":12',
        b'{"usage":{"a":01}}',
        b'{"usage":NaN}',
        b'{"usage":"\xc3\xa9"}',
    ],
)
def test_usage_lines_unread_get_the_verdict_of_read_ones(
    kem: KEM, aead: AEAD, usage: bytes
) -> None:
    """A usage line nobody reads is checked by a quick test (``{"usage":`` + one JSON value
    + ``}``) or else by the full parse; whatever the spelling, the verdict is the one a
    decryptor that builds the usage gives (the same events, or the same error)."""
    pair = Pair(kem, aead)
    outer = pair.encode(chunk(1, "a") + b"data: [DONE]\n\n")
    init, _, rest = outer.partition(b"\n\n")
    stream = init + b"\n\ndata: " + usage + b"\n\n" + rest

    def verdict(decode_usage: bool) -> object:
        dec = StreamDecryptor(pair.key(), aead=aead, decode_usage=decode_usage)
        try:
            events = run(dec, stream)
        except PQE2EEError as exc:
            return exc.code
        return [e for e in events if not isinstance(e, Usage)]

    assert verdict(False) == verdict(True)


def test_encoder_chunks_of_many_lines_are_the_records_built_one_by_one(
    kem: KEM, aead: AEAD
) -> None:
    """The encoder seals an engine chunk's lines in one pass (nonces taken from the pool for
    the whole chunk first). Its bytes are exactly those built record by record from the spec
    (``data: {"e2e":"<b64 nonce || ChaCha20-Poly1305>"}``, a usage event before each engine
    line carrying usage), with the source's nonces in order, across pool refills and chunks
    of 0, 1 and 45 lines; the default source's nonces are all distinct and every record opens."""
    counter = itertools.count()

    def numbered(n: int) -> bytes:
        assert n == 12  # a source passed in is asked once per record
        return next(counter).to_bytes(12, "big")

    key = kem.from_seed(SEED)
    usage_line = b'data: {"choices":[],"usage":{"prompt_tokens":3,"total_tokens":4}}\n'
    lines = [b"data: %d\n" % i if i % 7 else usage_line for i in range(44)] + [b"\n"]
    chunks = [b"".join(lines), b"", b"data: [DONE]\n", b"\n", b"data: tail"]
    for source in (numbered, None):
        sealer = (
            StreamSealer(key.public_key, kem=kem, aead=aead, random_bytes=source)
            if source
            else StreamSealer(key.public_key, kem=kem, aead=aead)
        )
        enc = StreamEncoder(sealer)
        init = enc.start()
        outer = init + b"".join(enc.feed(c) for c in chunks) + enc.finish()
        kem_ct = base64.b64decode(init[len(b'data: {"e2e_init":"') : -4])
        cipher = ChaCha20Poly1305(independent_v1._derive(SEED, kem_ct, b"e2e-stream-v1"))
        records = re.findall(rb'data: \{"e2e":"([^"]*)"\}\n\n', outer)
        nonces = [base64.b64decode(r)[:12] for r in records]
        assert len(set(nonces)) == len(records) == len(lines) + 3
        if source is None:
            nonces_used = nonces
        else:
            nonces_used = [n.to_bytes(12, "big") for n in range(len(records))]
            assert nonces == nonces_used
        expected = [init]
        plain = [*lines, b"data: [DONE]\n", b"\n", b"data: tail"]
        for nonce, line in zip(nonces_used, plain, strict=True):
            if line is usage_line:
                expected.append(b'data: {"usage":{"prompt_tokens":3,"total_tokens":4}}\n\n')
            sealed = nonce + cipher.encrypt(nonce, line, None)
            expected.append(b'data: {"e2e":"' + base64.b64encode(sealed) + b'"}\n\n')
        assert outer == b"".join(expected)


def _flip_tag(event: bytes) -> bytes:
    """A record event whose sealed bytes no longer verify (the last tag byte flipped)."""
    raw = bytearray(base64.b64decode(event[len(b'data: {"e2e":"') : -4]))
    raw[-1] ^= 1
    return b'data: {"e2e":"' + base64.b64encode(bytes(raw)) + b'"}\n\n'


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("bad_tag_then_bad_line", ErrorCode.DECRYPT_FAILED),
        ("repeat_then_unknown_event", ErrorCode.DUPLICATE_RECORD),
        ("bad_tag_then_long_line", ErrorCode.DECRYPT_FAILED),
        ("after_done_then_bad_line", ErrorCode.DATA_AFTER_DONE),
        ("long_line_then_bad_tag", ErrorCode.OVERSIZE),
        ("bad_tag_then_usage_then_bad_line", ErrorCode.DECRYPT_FAILED),
        ("usage_inside_an_event_then_bad_tag", ErrorCode.DECRYPT_FAILED),
        ("bad_tag_then_long_usage", ErrorCode.DECRYPT_FAILED),
        ("long_usage_then_bad_tag", ErrorCode.OVERSIZE),
        ("repeat_after_usage", ErrorCode.DUPLICATE_RECORD),
        ("after_done_then_usage_then_bad_tag", ErrorCode.DATA_AFTER_DONE),
        ("bad_usage_then_bad_tag", ErrorCode.MALFORMED_EVENT),
    ],
)
@pytest.mark.parametrize("decode_usage", [True, False])
def test_records_of_one_chunk_fail_in_line_order(
    kem: KEM, aead: AEAD, case: str, code: ErrorCode, decode_usage: bool
) -> None:
    """The record lines of a network chunk are opened together (one call; with nobody reading
    usage, the usage lines between them do not split the run): a fault is still the first one
    in line order, the same verdict as the lines fed one by one, and the events of the lines
    before it come out when they are fed one by one."""
    pair = Pair(kem, aead)
    seal = pair.sealer.seal_record
    init = pair.sealer.init_event()
    first = seal(b"data: a\n") + seal(b"\n")
    long = seal(b"x" * 1500)  # longer than the bound of max_record=1200 below
    bad_line = b"data: {not json}\n\n"
    usage = b'data: {"usage":{"total_tokens":3}}\n\n'
    long_usage = b'data: {"usage":{"x":"%s"}}\n\n' % (b"y" * 2000)  # (a well-formed one)
    lines = {
        "bad_tag_then_bad_line": [_flip_tag(seal(b"data: b\n")), bad_line],
        "repeat_then_unknown_event": [first[: first.index(b"\n\n") + 2], b'data: {"x":1}\n\n'],
        "bad_tag_then_long_line": [_flip_tag(seal(b"data: b\n")), long],
        "after_done_then_bad_line": [seal(b"data: [DONE]\n"), seal(b"\n"), seal(b"z\n"), bad_line],
        "long_line_then_bad_tag": [long, _flip_tag(seal(b"data: b\n"))],
        "bad_tag_then_usage_then_bad_line": [_flip_tag(seal(b"data: b\n")), usage, bad_line],
        "usage_inside_an_event_then_bad_tag": [
            seal(b"data: b\n"),
            usage,
            seal(b"\n"),
            usage,
            _flip_tag(seal(b"data: c\n")),
        ],
        "bad_tag_then_long_usage": [_flip_tag(seal(b"data: b\n")), long_usage],
        "long_usage_then_bad_tag": [usage, long_usage, _flip_tag(seal(b"data: b\n"))],
        "repeat_after_usage": [usage, first[first.index(b"\n\n") + 2 :]],
        "after_done_then_usage_then_bad_tag": [
            seal(b"data: [DONE]\n"),
            usage,
            seal(b"\n"),
            usage,
            seal(b"z\n"),
            usage,
            _flip_tag(seal(b"\n")),
        ],
        "bad_usage_then_bad_tag": [
            usage,
            b'data: {"usage":{"a":1},"b":2}\n\n',
            _flip_tag(seal(b"data: b\n")),
        ],
    }[case]
    limits = {"max_record": 1200, "decode_usage": decode_usage}
    whole = pair.decryptor(**limits)
    whole.receive_data(init)
    with pytest.raises(PQE2EEError) as at_once:
        whole.receive_data(first + b"".join(lines))
    assert at_once.value.code is code
    with pytest.raises(PQE2EEError):  # sticky
        whole.next_event()

    one_by_one = pair.decryptor(**limits)
    events = run(one_by_one, [init, first], eof=False)
    with pytest.raises(PQE2EEError) as each:
        run(one_by_one, lines, eof=False)
    assert each.value.code is code
    assert [e.data for e in events if isinstance(e, InnerEvent)] == ["a"]
    if case == "usage_inside_an_event_then_bad_tag":  # the event whose records it split
        more = run(pair.decryptor(**limits), [init, first, *lines[:3]], eof=False)
        assert [e.data for e in more if isinstance(e, InnerEvent)] == ["a", "b"]
