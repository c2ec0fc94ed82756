"""Issue 16 item 1: hostile JSON nesting gets each entry point's typed error, never a
RecursionError; a stream decryptor that hit one stays failed and never reports complete."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.errors import ErrorCode, LocalProtocolError, MalformedError, PQE2EEError, StreamError
from pqe2ee.protocol._codec import (
    MAX_JSON_DEPTH,
    extract_usage,
    json_decode,
    json_decode_object,
    json_too_deep,
)
from pqe2ee.protocol.client import e2e_model
from pqe2ee.protocol.clocks import Monotonic
from pqe2ee.protocol.discovery import parse_discovery, parse_models
from pqe2ee.proxy.app._plumbing import parse_object
from pqe2ee.proxy.app.failures import Failure
from pqe2ee.proxy.translate.anthropic import tool_input
from pqe2ee.server.relay.registry import parse_info
from test_protocol_stream import VLLM, Pair
from test_v2_protocol import decrypt, engine_chunks, exchange, make_stream

DEEP = b"[" * 5000 + b"]" * 5000  # past msgspec's own limit: RecursionError before the fix
JUST_TOO_DEEP = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)


def deep_object(n: int = 5000) -> bytes:
    return b'{"a":' * n + b"1" + b"}" * n


def test_depth_bound_is_exact() -> None:
    ok = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert json_decode(ok) is not None
    with pytest.raises(msgspec.DecodeError):
        json_decode(JUST_TOO_DEEP)
    # brackets inside strings (escaped quotes too) do not count
    quoted = b'["' + b"[" * 1000 + b'\\"[[[", "{{{"]'
    assert not json_too_deep(quoted)
    assert json_decode(quoted)[1] == "{{{"


@settings(max_examples=60, deadline=None)
@given(
    depth=st.integers(min_value=1, max_value=3000),
    kinds=st.lists(st.sampled_from(["[", '{"k":']), min_size=1, max_size=4),
    as_str=st.booleans(),
)
def test_any_nesting_is_a_decode_error_or_a_value(
    depth: int, kinds: list[str], as_str: bool
) -> None:
    opens = "".join(kinds[i % len(kinds)] for i in range(depth))
    closes = "".join(
        "]" if opens_k == "[" else "}"
        for opens_k in reversed([kinds[i % len(kinds)] for i in range(depth)])
    )
    doc = opens + "0" + closes
    data: Any = doc if as_str else doc.encode()
    if depth > MAX_JSON_DEPTH:
        with pytest.raises(msgspec.DecodeError):
            json_decode(data)
    else:
        json_decode(data)


@pytest.mark.parametrize("doc", [DEEP, deep_object(), JUST_TOO_DEEP])
def test_entry_points_give_typed_errors(doc: bytes) -> None:
    with pytest.raises(MalformedError) as info:
        json_decode_object(doc, what="request plaintext")  # the instance's opener
    assert info.value.code is ErrorCode.MALFORMED_PAYLOAD
    wrapped = b'{"data":' + doc + b"}"
    with pytest.raises(MalformedError) as info:
        parse_models(wrapped)
    assert info.value.code is ErrorCode.MALFORMED_DISCOVERY
    with pytest.raises(MalformedError) as info:
        parse_discovery(wrapped, Monotonic(0.0))
    assert info.value.code is ErrorCode.MALFORMED_DISCOVERY
    with pytest.raises(MalformedError) as info:
        parse_info(wrapped, 0.0)
    assert info.value.code is ErrorCode.MALFORMED_DISCOVERY
    # the engine-usage reader: "not usage"; the request's model peek: refused (it may hold a
    # prompt: neither sealed nor sent in plaintext)
    assert extract_usage(b'data: {"usage":' + doc + b"}") is None
    with pytest.raises(LocalProtocolError) as refused:
        e2e_model("POST", "/v1/chat", b'{"model":' + doc + b"}", {"/v1/chat"})
    assert refused.value.code is ErrorCode.INVALID_BODY
    # the proxy: its 400 invalid_json refusal, and a tool call's arguments kept raw
    with pytest.raises(Failure) as failure:
        parse_object(doc)
    assert failure.value.status == 400
    assert tool_input(doc.decode()) == {"_raw": doc.decode()}


def v1_pair() -> Pair:
    return Pair(get_kem("pyca"), get_aead("pyca"))


@pytest.mark.parametrize("after_done", [False, True])
def test_v1_stream_error_is_sticky_and_incomplete(after_done: bool) -> None:
    pair = v1_pair()
    wire = pair.encode(VLLM)
    if not after_done:
        wire = wire[: len(wire) // 2]
        wire = wire[: wire.rfind(b"\n\n") + 2]
    dec = pair.decryptor()
    dec.receive_data(wire)
    dec.events()
    assert dec.complete is after_done
    with pytest.raises(StreamError) as info:
        dec.receive_data(b'data: {"e2e_error":' + DEEP + b"}\n\n")
    assert info.value.code is ErrorCode.MALFORMED_EVENT
    assert not dec.complete
    for call in (lambda: dec.receive_data(b"\n"), dec.receive_eof, dec.events):
        with pytest.raises(StreamError):
            call()


def test_v2_stream_error_is_sticky_and_incomplete() -> None:
    ex = exchange(True)
    chunks, _ = engine_chunks()
    wire = make_stream(ex, chunks)
    bad = wire + b'data: {"e2e_error":' + DEEP + b"}\n\n"
    with pytest.raises(PQE2EEError) as info:
        decrypt(ex, bad)
    assert info.value.code is ErrorCode.MALFORMED_EVENT


def test_unexpected_exception_fails_the_decryptor_for_good() -> None:
    """Belt and braces: a non-pqe2ee exception inside a decryptor becomes a sticky
    StreamError, so nothing after it can report the stream complete."""
    pair = v1_pair()
    dec = pair.decryptor()

    def boom(_line: bytes) -> None:
        raise RecursionError("simulated")

    dec._line = boom  # type: ignore[method-assign]
    with pytest.raises(StreamError) as info:
        dec.receive_data(b"data: {}\n\n")
    assert isinstance(info.value.__cause__, RecursionError)
    with pytest.raises(StreamError):
        dec.receive_eof()
    assert not dec.complete


def test_unexpected_exception_at_eof_fails_the_decryptor_for_good() -> None:
    """The same at EOF (receive_eof is written flat, its guard inlined): the last line's
    unexpected failure is a sticky StreamError, and the stream is never complete."""
    pair = v1_pair()
    dec = pair.decryptor()

    def boom(_line: bytes) -> None:
        raise RecursionError("simulated")

    dec._line = boom  # type: ignore[method-assign]
    dec.receive_data(b"data: {}")  # an unterminated last line: read at EOF
    with pytest.raises(StreamError) as info:
        dec.receive_eof()
    assert isinstance(info.value.__cause__, RecursionError)
    assert info.value.code is ErrorCode.MALFORMED_EVENT
    with pytest.raises(StreamError):
        dec.receive_data(b"\n")
    assert not dec.complete
