"""Upstream chunks decoded straight into :class:`ChatReply` (the proxy's per-event fast path)
give exactly what the dict path gives, and everything else still goes the dict path - with its
errors unchanged; the stream translators read both alike, over long streams too."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from pqe2ee._json import MAX_JSON_DEPTH, json_decode
from pqe2ee.proxy.translate import chat, streams
from pqe2ee.proxy.translate.chat import decode_chat_chunk, parse_chat_reply
from pqe2ee.proxy.translate.errors import TranslationError
from pqe2ee.proxy.translate.streams import MessagesStreamTranslator, ResponsesStreamTranslator


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 1733400000, "model": "m"}
    return json.dumps({**body, "choices": [choice], **extra})


TOOL_START = {
    "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    ]
}
TOOL_ARGS = {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}
USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}

STREAM = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "thinking "}),
    chunk({"reasoning": "more"}),
    chunk({"content": "Hello"}),
    chunk({"content": [{"type": "text", "text": " world"}]}),
    chunk({"refusal": "no"}),
    chunk({"content": "é ✓ \\u2028"}, unknown_field={"nested": [1, 2, {"x": None}]}),
    chunk(TOOL_START),
    chunk(TOOL_ARGS),
    chunk({}, "tool_calls", stop_reason=None),
    json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}),
]

NOT_FAST = [
    '{"error": {"message": "boom", "code": 503}}',  # reported in-band
    '{"error": "boom"}',
    '{"object": "error", "message": "vllm says no", "type": "BadRequest", "code": 400}',
    "[1, 2]",  # not an object
    '"text"',
    "{not json",
    '{"choices": "many"}',  # the wrong shape
    '{"choices": [{"index": "0"}]}',
    '{"object": 5}',
    '{"created": "yesterday"}',
    "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1),  # too deep
]


@pytest.mark.parametrize("data", STREAM)
def test_a_good_chunk_decodes_to_what_the_dict_path_gives(data: str) -> None:
    fast = decode_chat_chunk(data)
    assert fast is not None
    assert fast == parse_chat_reply(json_decode(data))
    assert decode_chat_chunk(data.encode()) == fast
    assert parse_chat_reply(fast) is fast  # already checked: passes as it is


@pytest.mark.parametrize("data", NOT_FAST)
def test_anything_else_is_left_to_the_dict_path(data: str) -> None:
    assert decode_chat_chunk(data) is None


@pytest.mark.parametrize("data", NOT_FAST[:3])
def test_an_error_reported_in_band_is_still_raised_as_the_upstreams(data: str) -> None:
    with pytest.raises(TranslationError) as info:
        parse_chat_reply(json_decode(data))
    assert info.value.error_code == "upstream_error"


def _translate(translator: Any, chunks: list[Any]) -> list[Any]:
    out: list[Any] = []
    for c in chunks:
        out += translator.feed(c)
    out += translator.finish()
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda: MessagesStreamTranslator(
            {
                "model": "m",
                "max_tokens": 9,
                "messages": [{"role": "user", "content": "x"}],
                "thinking": {"type": "enabled", "budget_tokens": 1024},
            }
        ),
        lambda: ResponsesStreamTranslator({"model": "m", "input": "x"}),
    ],
)
def test_translators_read_decoded_replies_and_dicts_alike(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the same ids and clock for both runs
    monkeypatch.setattr(streams, "new_id", lambda prefix: prefix + "1")
    monkeypatch.setattr(chat, "new_id", lambda prefix: prefix + "1")
    monkeypatch.setattr(streams, "time", SimpleNamespace(time=lambda: 1733400000.0))
    from_dicts = _translate(make(), [json_decode(d) for d in STREAM])
    from_replies = _translate(make(), [decode_chat_chunk(d) for d in STREAM])
    assert from_replies == from_dicts
    assert any(name.endswith("delta") for name, _ in from_replies)


def test_a_long_responses_stream_keeps_every_delta() -> None:
    words = [f"w{i} " for i in range(5000)]
    chunks = [decode_chat_chunk(chunk({"content": w})) for w in words]
    chunks.append(decode_chat_chunk(chunk({}, "stop")))
    events = dict(_translate(ResponsesStreamTranslator({"model": "m", "input": "x"}), chunks))
    assert events["response.output_text.done"]["text"] == "".join(words)
    final = events["response.completed"]["response"]["output"][0]["content"][0]
    assert final["text"] == "".join(words)
