"""The usage filter against the filter it replaced (a decode, a ``del`` and a re-encode per
chunk, an event object per rewritten event): for every input, odd ones included (key order,
escapes, whitespace, a ``usage`` that is not last, ``null`` usage, duplicate keys, non-JSON
data, ``[DONE]``, typed events, ids), the same events and the same bytes, whether the caller
reads events (``apply``) or bytes (``joined``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqe2ee.protocol._events import Done, InnerEvent, data_event
from pqe2ee.protocol.sse import SSEParser
from pqe2ee.transports._usage import UsageFilter

_DECODER = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()


def _reference(include_usage: bool, batch: Sequence[InnerEvent | Done]) -> list[Any]:
    """The filter as it was (4554ad8..6fd1343), kept as the oracle."""
    out: list[Any] = []
    for event in batch:
        kept: Any = event
        if isinstance(event, InnerEvent):
            inner = event.event
            data = inner.data
            if '"usage"' in data:
                try:
                    chunk: Any = _DECODER.decode(data)
                except msgspec.DecodeError:
                    chunk = None
                if isinstance(chunk, dict) and chunk.get("usage") is not None:
                    if chunk.get("choices") == []:
                        kept = event if include_usage else None
                    else:
                        del chunk["usage"]
                        body = _ENCODER.encode(chunk)
                        raw = b"data: " + body + b"\n\n"
                        if inner.event is not None:
                            raw = b"event: " + inner.event.encode() + b"\n" + raw
                        kept = data_event(body.decode(), None, raw, inner.event)
        if kept is not None:
            out.append(kept)
    return out


def _view(events: Sequence[Any]) -> list[Any]:
    return [
        (type(e).__name__, e.raw, e.event.data, e.event.event, e.event.id, e.event.raw)
        if isinstance(e, InnerEvent)
        else (type(e).__name__, e.raw)
        for e in events
    ]


def _check(raw: bytes) -> None:
    parsed = SSEParser(max_event=1 << 20).feed(raw)
    batch: list[Any] = [InnerEvent(e) for e in parsed]
    batch.append(Done(raw=b"data: [DONE]\n\n"))
    for include in (False, True):
        want = _reference(include, batch)
        flt = UsageFilter(include_usage=include)
        assert _view(flt.apply(batch)) == _view(want)
        assert flt.joined(batch) == b"".join(e.raw for e in want)
        # one event per read (a paced stream), and a read of nothing but a dropped event
        for event in batch:
            one = _reference(include, [event])
            assert flt.joined([event]) == b"".join(e.raw for e in one)


_USAGES = st.one_of(
    st.none(),
    st.integers(),
    st.just("usage"),
    st.dictionaries(
        st.sampled_from(["prompt_tokens", "completion_tokens", "total_tokens"]),
        st.integers(0, 10**6),
    ),
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def _chunk_text(draw: st.DrawFn) -> str:
    items: list[tuple[str, Any]] = draw(
        st.lists(st.tuples(st.sampled_from(["id", "model", "x", "é", "usage"]), _JSON), max_size=4)
    )
    if draw(st.booleans()):
        items.append(("choices", draw(st.sampled_from([[], [{"index": 0, "delta": {}}], None]))))
    if draw(st.booleans()):
        items.insert(draw(st.integers(0, len(items))), ("usage", draw(_USAGES)))
    style = draw(st.integers(0, 4))
    if style == 0:  # msgspec's own form (what the runtime sends, near enough)
        return _ENCODER.encode(dict(items)).decode()
    if style == 4:  # duplicate keys kept
        return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in items) + "}"
    text = json.dumps(
        dict(items),
        ensure_ascii=style == 1,
        separators=(",", ":") if style == 2 else (", ", ": "),
        indent=None if style != 3 else 1,
    )
    if draw(st.booleans()):  # damaged or trailing text: not JSON any more
        text += draw(st.sampled_from(["", " ", "x", "}", ', "usage": 1']))
    return text


_DATA = st.one_of(
    _chunk_text(),
    st.just("[DONE]"),
    st.text().map(lambda t: t + '"usage"'),
    st.sampled_from(['"usage"', '["usage"]', '{"usage": 1} ', '{"\\u0075sage": 1, "a": 2}']),
)


def _frame(data: str, name: str | None, id: str | None) -> bytes:
    lines = [] if name is None else [f"event: {name}"]
    if id is not None:
        lines.append(f"id: {id}")
    lines += [f"data: {line}" for line in data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            _DATA,
            st.none() | st.sampled_from(["chunk", "é", "message"]),
            st.none() | st.sampled_from(["7", ""]),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_filter_matches_the_old_one(events: list[tuple[str, str | None, str | None]]) -> None:
    _check(b"".join(_frame(d.replace("\r", ""), n, i) for d, n, i in events))


def test_filter_matches_the_old_one_on_runtime_chunks() -> None:
    head = '{"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
    usage = '"usage":{"prompt_tokens":5,"total_tokens":6,"completion_tokens":1}'
    chunks = [
        head
        + '"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}],'
        + usage
        + "}",
        head + '"choices":[],' + usage + "}",
        head + '"choices":[{"delta":{"content":"a\\u00e9\\/b"}}],' + usage + "}",
        head + '"choices":[{"delta":{}}],"usage":null}',
        head + usage + ',"choices":[{"delta":{"content":"first"}}]}',
        head + '"choices":[{"delta":{"content":"x"}}], ' + usage + " }",
        '{"choices":[{"logprob":-1.50e-3}],' + usage + "}",
        '{"usage":{"a":1},"usage":null}',
        '{"usage":null,"usage":{"a":1},"choices":[]}',
        "[DONE]",
        '"usage"',
    ]
    _check(b"".join(_frame(c, None, None) for c in chunks))
    _check(b"".join(_frame(c, "chunk", "3") for c in chunks))
