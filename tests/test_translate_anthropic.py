"""Anthropic Messages ⇄ Chat Completions translation (pqe2ee.proxy.translate.anthropic, .errors)."""

from __future__ import annotations

import json
import math
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from pqe2ee.errors import ErrorCode, LocalProtocolError
from pqe2ee.proxy.translate.anthropic import (
    IMAGE_TOKEN_ESTIMATE,
    chat_to_message,
    count_tokens_estimate,
    messages_to_chat,
    tool_input,
)
from pqe2ee.proxy.translate.errors import (
    ANTHROPIC_ERROR_TYPES,
    TranslationError,
    anthropic_error_body,
    anthropic_error_type,
    invalid_request,
    upstream_error,
)
from pqe2ee.proxy.translate.streams import MessagesStreamTranslator

EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def base_req(**extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-test",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


def chat_req(**extra: Any) -> dict[str, Any]:
    return messages_to_chat(base_req(**extra))


def bad(req: Any) -> TranslationError:
    with pytest.raises(TranslationError) as info:
        messages_to_chat(req)
    assert info.value.status == 400
    assert info.value.to_anthropic()["error"]["type"] == "invalid_request_error"
    return info.value


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (402, "billing_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (408, "timeout_error"),
        (413, "invalid_request_error"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ],
)
def test_anthropic_error_type(status: int, kind: str) -> None:
    assert anthropic_error_type(status) == kind
    assert kind in ANTHROPIC_ERROR_TYPES
    body = anthropic_error_body(status, "whatever_openai_type", "msg")
    assert body == {"type": "error", "error": {"type": kind, "message": "msg"}}
    ErrorResponse.model_validate(body)


def test_anthropic_error_body_keeps_anthropic_types() -> None:
    body = anthropic_error_body(500, "overloaded_error", "busy")
    assert body["error"]["type"] == "overloaded_error"


def test_translation_error_renderings() -> None:
    err = invalid_request("tools[0]: nope", param="tools[0]", code="unsupported_tool")
    assert err.code is ErrorCode.INVALID_BODY
    assert str(err) == "invalid_body: tools[0]: nope"
    assert err.to_openai() == {
        "error": {
            "message": "tools[0]: nope",
            "type": "invalid_request_error",
            "param": "tools[0]",
            "code": "unsupported_tool",
        }
    }
    assert err.to_anthropic() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "tools[0]: nope"},
    }
    up = upstream_error("garbage")
    assert (up.status, up.type, up.code) == (502, "server_error", ErrorCode.MALFORMED_PAYLOAD)
    assert up.to_anthropic()["error"]["type"] == "api_error"


# --------------------------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------------------------


def test_minimal_request() -> None:
    assert chat_req() == {
        "model": "claude-test",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1024,
    }


def test_system_string_and_blocks() -> None:
    assert chat_req(system="Be brief.")["messages"][0] == {"role": "system", "content": "Be brief."}
    blocks = [
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Rules."},
    ]
    assert chat_req(system=blocks)["messages"][0] == {
        "role": "system",
        "content": "You are Claude Code.\n\nRules.",
    }


def test_text_and_image_blocks() -> None:
    chat = chat_req(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look:"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x/cat.jpg"}},
                ],
            }
        ]
    )
    assert chat["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                {"type": "image_url", "image_url": {"url": "https://x/cat.jpg"}},
            ],
        }
    ]


def test_tool_use_and_tool_result_round() -> None:
    chat = chat_req(
        tools=[WEATHER_TOOL],
        messages=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "plan", "signature": "sig"},
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                    {
                        "type": "tool_use",
                        "id": "toolu_2",
                        "name": "get_weather",
                        "input": {"city": "Rome"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Here you go"},
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": [
                            {"type": "text", "text": "boom"},
                            {"type": "text", "text": "again"},
                        ],
                        "is_error": True,
                    },
                ],
            },
        ],
    )
    assert chat["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning": "plan",  # the thinking block's text, for vLLM >= 0.11
            "reasoning_content": "plan",  # ... and for vLLM 0.10 / chat templates
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "[tool error] boom\nagain"},
        {"role": "user", "content": "Here you go"},
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": WEATHER_TOOL["input_schema"],
            },
        }
    ]


def test_tool_only_assistant_turn_has_null_content() -> None:
    chat = chat_req(
        messages=[
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
        ]
    )
    assert chat["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    assert chat["messages"][2] == {"role": "tool", "tool_call_id": "t", "content": ""}


def test_tool_result_images_follow_tool_messages() -> None:
    chat = chat_req(
        messages=[
            {"role": "user", "content": "read img"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": "Read", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t",
                        "content": [
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/png",
                                    "data": "AA",
                                },
                            }
                        ],
                    },
                    {"type": "text", "text": "describe it"},
                ],
            },
        ]
    )
    msgs = chat["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "user"]
    assert msgs[2]["content"] == "[image]"
    assert msgs[3]["content"][1:] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
        {"type": "text", "text": "describe it"},
    ]


def test_consecutive_turns_merge_and_thinking_only_turns_vanish() -> None:
    chat = chat_req(
        messages=[
            {"role": "user", "content": "a"},
            {"role": "user", "content": [{"type": "text", "text": "b"}]},
            {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "xx"}]},
            {"role": "assistant", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    )
    assert chat["messages"] == [
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "c\nd"},
    ]


def test_plain_text_document_is_forwarded_as_text() -> None:
    chat = chat_req(
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "document",
                        "source": {"type": "text", "media_type": "text/plain", "data": "DOC"},
                    },
                    {"type": "text", "text": "summarise"},
                ],
            }
        ]
    )
    assert chat["messages"] == [{"role": "user", "content": "DOC\nsummarise"}]


@pytest.mark.parametrize(
    ("choice", "expected", "parallel"),
    [
        ({"type": "auto"}, "auto", None),
        ({"type": "any"}, "required", None),
        ({"type": "none"}, "none", None),
        (
            {"type": "tool", "name": "get_weather"},
            {"type": "function", "function": {"name": "get_weather"}},
            None,
        ),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
        ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: Any, parallel: bool | None) -> None:
    chat = chat_req(tools=[WEATHER_TOOL], tool_choice=choice)
    assert chat["tool_choice"] == expected
    assert chat.get("parallel_tool_calls") == parallel


def test_sampling_stop_metadata_and_stream() -> None:
    chat = chat_req(
        stop_sequences=["\n\nHuman:", "END"],
        temperature=0.3,
        top_p=0.9,
        top_k=40,
        metadata={"user_id": "user-7"},
        stream=True,
    )
    assert chat["stop"] == ["\n\nHuman:", "END"]
    assert chat["temperature"] == 0.3
    assert chat["top_p"] == 0.9
    assert "top_k" not in chat
    assert chat["user"] == "user-7"
    assert chat["stream"] is True
    assert chat["stream_options"] == {"include_usage": True}
    assert "tool_choice" not in chat


@pytest.mark.parametrize(
    ("extra", "effort"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "low"),
        ({"thinking": {"type": "enabled", "budget_tokens": 8000}}, "medium"),
        ({"thinking": {"type": "enabled", "budget_tokens": 32000}}, "high"),
        ({"thinking": {"type": "adaptive"}}, None),
        ({"thinking": {"type": "disabled"}}, None),
        ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}, "high"),
        ({"output_config": {"effort": "low"}}, "low"),
        ({"output_config": {"effort": "xhigh"}}, "high"),
    ],
)
def test_reasoning_effort(extra: dict[str, Any], effort: str | None) -> None:
    assert chat_req(**extra).get("reasoning_effort") == effort


def test_output_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    chat = chat_req(output_config={"format": {"type": "json_schema", "schema": schema}})
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema, "strict": True},
    }


def test_server_tools_are_unsupported() -> None:
    err = bad(base_req(tools=[WEATHER_TOOL, {"type": "web_search_20250305", "name": "web_search"}]))
    assert err.error_code == "unsupported_tool"
    assert err.param == "tools[1].type"


@pytest.mark.parametrize(
    ("req", "param"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        (base_req(max_tokens=0), "max_tokens"),
        ({"model": "m", "max_tokens": 5}, "messages"),
        (base_req(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
        (base_req(messages=[{"role": "user", "content": 1}]), "messages[0].content"),
        (
            base_req(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ]
            ),
            "messages[0].content[0].source",
        ),
        (
            base_req(messages=[{"role": "user", "content": [{"type": "search_result"}]}]),
            "messages[0].content[0].type",
        ),
        (
            base_req(
                messages=[
                    {
                        "role": "assistant",
                        "content": [{"type": "image", "source": {"type": "url", "url": "u"}}],
                    }
                ]
            ),
            "messages[0].content[0].type",
        ),
        (
            base_req(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "document",
                                "source": {
                                    "type": "base64",
                                    "media_type": "application/pdf",
                                    "data": "x",
                                },
                            }
                        ],
                    }
                ]
            ),
            "messages[0].content[0].source",
        ),
        (
            base_req(
                messages=[
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "x"}],
                    }
                ]
            ),
            "messages[0].content[0].input",
        ),
        (base_req(tool_choice={"type": "tool"}, tools=[WEATHER_TOOL]), "tool_choice.name"),
        (base_req(tool_choice={"type": "sometimes"}, tools=[WEATHER_TOOL]), "tool_choice.type"),
        (base_req(tools=[{"name": "x"}]), "tools[0]"),
        (base_req(thinking={"type": "enabled"}), "thinking.budget_tokens"),
        (base_req(output_config={"effort": "ultra"}), "output_config.effort"),
        (base_req(stop_sequences="STOP"), "stop_sequences"),
        (base_req(mcp_servers=[{"type": "url", "url": "https://m", "name": "m"}]), "mcp_servers"),
        (base_req(container="container_1"), "container"),
    ],
)
def test_invalid_requests_name_the_field(req: dict[str, Any], param: str) -> None:
    assert bad(req).param == param


def test_body_must_be_an_object() -> None:
    bad("nope")


# --------------------------------------------------------------------------------------------
# non-stream replies
# --------------------------------------------------------------------------------------------


def completion(
    message: dict[str, Any], finish: str | None = "stop", **choice: Any
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "upstream/model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "finish_reason": finish,
                **choice,
            }
        ],
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 12,
            "total_tokens": 112,
            "prompt_tokens_details": {"cached_tokens": 64},
        },
    }


def to_message(chat: dict[str, Any], req: dict[str, Any] | None = None) -> Message:
    return Message.model_validate(chat_to_message(chat, req or base_req()))


def test_text_reply() -> None:
    msg = to_message(completion({"content": "Hello!"}))
    assert msg.id.startswith("msg_")
    assert (msg.type, msg.role, msg.model) == ("message", "assistant", "claude-test")
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "Hello!"  # type: ignore[union-attr]
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.input_tokens == 36
    assert msg.usage.cache_read_input_tokens == 64
    assert msg.usage.output_tokens == 12


def test_tool_use_reply() -> None:
    chat = completion(
        {
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": ""}},
                {"type": "function", "function": {"name": "broken", "arguments": '{"city": '}},
            ],
        },
        "tool_calls",
    )
    msg = to_message(chat, base_req(tools=[WEATHER_TOOL]))
    assert [b.type for b in msg.content] == ["text", "tool_use", "tool_use", "tool_use"]
    blocks = [b for b in msg.content if b.type == "tool_use"]
    assert [(b.id, b.name, b.input) for b in blocks[:2]] == [
        ("call_1", "get_weather", {"city": "Paris"}),
        ("call_2", "now", {}),
    ]
    assert blocks[2].input == {"_raw": '{"city": '}
    assert blocks[2].id.startswith("toolu_")
    assert msg.stop_reason == "tool_use"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ("", {}),
        ("  ", {}),
        ('{"a": [1]}', {"a": [1]}),
        ("[1, 2]", {"_raw": "[1, 2]"}),
        ("nope", {"_raw": "nope"}),
    ],
)
def test_tool_input(arguments: str, expected: dict[str, Any]) -> None:
    assert tool_input(arguments) == expected


def test_thinking_only_when_requested() -> None:
    chat = completion({"content": "42", "reasoning_content": "6*7"})
    assert [b.type for b in to_message(chat).content] == ["text"]
    msg = to_message(chat, base_req(thinking={"type": "enabled", "budget_tokens": 2048}))
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "6*7"  # type: ignore[union-attr]
    omitted = base_req(thinking={"type": "adaptive", "display": "omitted"})
    assert [b.type for b in to_message(chat, omitted).content] == ["text"]


@pytest.mark.parametrize(
    ("finish", "choice", "req_extra", "stop_reason", "stop_sequence"),
    [
        ("stop", {}, {}, "end_turn", None),
        (None, {}, {}, "end_turn", None),
        ("length", {}, {}, "max_tokens", None),
        ("tool_calls", {}, {}, "tool_use", None),
        ("content_filter", {}, {}, "refusal", None),
        ("stop", {"stop_reason": "END"}, {"stop_sequences": ["END"]}, "stop_sequence", "END"),
        ("stop", {"matched_stop": "END"}, {"stop_sequences": ["END"]}, "stop_sequence", "END"),
        ("stop", {"stop_reason": 128001}, {"stop_sequences": ["END"]}, "end_turn", None),
        ("stop", {"stop_reason": "</s>"}, {"stop_sequences": ["END"]}, "end_turn", None),
    ],
)
def test_stop_reasons(
    finish: str | None,
    choice: dict[str, Any],
    req_extra: dict[str, Any],
    stop_reason: str,
    stop_sequence: str | None,
) -> None:
    msg = to_message(completion({"content": "x"}, finish, **choice), base_req(**req_extra))
    assert (msg.stop_reason, msg.stop_sequence) == (stop_reason, stop_sequence)


def test_refusal_reply() -> None:
    msg = to_message(completion({"content": None, "refusal": "I can't help."}))
    assert msg.stop_reason == "refusal"
    assert msg.content[0].text == "I can't help."  # type: ignore[union-attr]


def test_reply_without_usage_and_empty_content() -> None:
    chat = completion({"content": ""})
    del chat["usage"]
    msg = to_message(chat)
    assert msg.content == []
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (0, 0)


@pytest.mark.parametrize(
    "chat", [{"choices": []}, {"choices": [{"message": {"content": {}}}]}, {"usage": 5}]
)
def test_malformed_upstream_reply_is_502(chat: dict[str, Any]) -> None:
    with pytest.raises(TranslationError) as info:
        chat_to_message(chat, base_req())
    assert info.value.status == 502
    assert info.value.to_anthropic()["error"]["type"] == "api_error"


def test_upstream_rate_limit_error_body() -> None:
    with pytest.raises(TranslationError) as info:
        chat_to_message(
            {"error": {"message": "slow down", "type": "rate_limit", "code": 429}}, base_req()
        )
    assert info.value.to_anthropic() == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }


# --------------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------------


def chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any
) -> dict[str, Any]:
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    )
    return {
        "id": "chatcmpl-abc",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "upstream/model",
        "choices": choices,
        **extra,
    }


USAGE = {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}


def vllm_stream() -> list[dict[str, Any]]:
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "Need "}),
        chunk({"reasoning_content": "weather."}),
        chunk({"content": "Let"}),
        chunk({"content": " me"}),
        chunk({"content": " check."}),
        chunk(
            {
                "tool_calls": [
                    {
                        "id": "chatcmpl-tool-1",
                        "type": "function",
                        "index": 0,
                        "function": {"name": "get_weather"},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk(
            {
                "tool_calls": [
                    {
                        "id": "chatcmpl-tool-2",
                        "type": "function",
                        "index": 1,
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"city": "Rome"}'}}]}),
        chunk({"content": ""}, finish="tool_calls"),
        chunk(None, usage=USAGE),
    ]


def run(req: dict[str, Any], chunks: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    t = MessagesStreamTranslator(req)
    events: list[tuple[str, dict[str, Any]]] = []
    for c in chunks:
        events += t.feed(c)
    events += t.finish()
    assert t.closed
    return events


def accumulate(events: list[tuple[str, dict[str, Any]]]) -> Any:
    """Validate every event against the SDK union and fold them with the SDK's accumulator."""
    snapshot = None
    bufs: dict[int, bytes] = {}
    for name, data in events:
        assert data["type"] == name
        snapshot = accumulate_event(
            event=EVENTS.validate_python(data), current_snapshot=snapshot, json_bufs=bufs
        )
    return snapshot


THINKING = {"thinking": {"type": "enabled", "budget_tokens": 2048}}


def test_realistic_vllm_stream() -> None:
    events = run(base_req(tools=[WEATHER_TOOL], stream=True, **THINKING), vllm_stream())
    assert [(n, d.get("index")) for n, d in events] == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("content_block_start", 3),
        ("content_block_delta", 3),
        ("content_block_stop", 3),
        ("message_delta", None),
        ("message_stop", None),
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["model"] == "claude-test"
    assert [events[i][1]["content_block"]["type"] for i in (1, 5, 10, 14)] == [
        "thinking",
        "text",
        "tool_use",
        "tool_use",
    ]
    assert {d["delta"]["type"] for n, d in events if n == "content_block_delta"} == {
        "thinking_delta",
        "text_delta",
        "input_json_delta",
    }
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 9
    assert delta["usage"]["input_tokens"] == 20

    text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    assert text == "Let me check."
    partial: dict[int, str] = {}
    for n, d in events:
        if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta":
            partial[d["index"]] = partial.get(d["index"], "") + d["delta"]["partial_json"]
    assert [json.loads(v) for v in partial.values()] == [{"city": "Paris"}, {"city": "Rome"}]

    final = Message.model_validate(accumulate(events).to_dict())
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert final.content[0].thinking == "Need weather."  # type: ignore[union-attr]
    assert final.content[1].text == "Let me check."  # type: ignore[union-attr]
    assert [(b.id, b.input) for b in final.content[2:]] == [  # type: ignore[union-attr]
        ("chatcmpl-tool-1", {"city": "Paris"}),
        ("chatcmpl-tool-2", {"city": "Rome"}),
    ]
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (20, 9)


def test_thinking_is_dropped_unless_enabled() -> None:
    events = run(base_req(), vllm_stream())
    final = accumulate(events)
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert [d["index"] for n, d in events if n == "content_block_start"] == [0, 1, 2]


def test_message_start_carries_input_tokens_when_first_chunk_has_usage() -> None:
    first = chunk(
        {"role": "assistant"},
        usage={"prompt_tokens": 33, "completion_tokens": 0, "total_tokens": 33},
    )
    events = run(base_req(), [first, chunk({"content": "x"}, finish="stop")])
    assert events[0][1]["message"]["usage"]["input_tokens"] == 33
    accumulate(events)


def test_stop_sequence_and_length_in_streams() -> None:
    events = run(
        base_req(stop_sequences=["END"]),
        [
            chunk({"content": "a"}),
            {
                **chunk({}, finish="stop"),
                "choices": [
                    {"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}
                ],
            },
        ],
    )
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    events = run(base_req(), [chunk({"content": "a"}, finish="length")])
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"] == {"output_tokens": 0}
    accumulate(events)


def test_text_after_tool_call_opens_a_new_block() -> None:
    events = run(
        base_req(),
        [
            chunk(
                {
                    "tool_calls": [
                        {"index": 0, "id": "c", "function": {"name": "f", "arguments": "{}"}}
                    ]
                }
            ),
            chunk({"content": "done"}, finish="tool_calls"),
        ],
    )
    final = accumulate(events)
    assert [b.type for b in final.content] == ["tool_use", "text"]
    assert final.stop_reason == "tool_use"


def test_error_mid_stream_and_refusal_of_more_input() -> None:
    t = MessagesStreamTranslator(base_req())
    events = t.feed(chunk({"content": "partial"}))
    events += t.error(529, "server_error", "Overloaded")
    assert events[-1] == (
        "error",
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    ErrorResponse.model_validate(events[-1][1])
    assert "message_stop" not in [n for n, _ in events]
    assert t.closed and t.failure is not None
    with pytest.raises(LocalProtocolError):
        t.feed(chunk({"content": "x"}))
    with pytest.raises(LocalProtocolError):
        t.finish()
    with pytest.raises(LocalProtocolError):
        t.start()
    with pytest.raises(LocalProtocolError):
        t.error(500, "e", "m")


def test_error_before_any_chunk_is_a_bare_error_event() -> None:
    t = MessagesStreamTranslator(base_req())
    assert t.error(401, "authentication_error", "bad key") == [
        (
            "error",
            {"type": "error", "error": {"type": "authentication_error", "message": "bad key"}},
        )
    ]


@pytest.mark.parametrize(
    "chunks",
    [
        [chunk({"content": "x"}), {"choices": [{"delta": {"tool_calls": "x"}}]}],
        [
            chunk({"content": "x"}),
            {"object": "error", "message": "oom", "type": "InternalServerError", "code": 500},
        ],
        [chunk({"content": "x"}, finish="stop"), chunk({"reasoning_content": "late"})],
        [
            chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f"}}]}),
            chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g"}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        ],
    ],
)
def test_bad_upstream_chunks_end_with_an_error_event(chunks: list[Any]) -> None:
    t = MessagesStreamTranslator(base_req())
    events: list[tuple[str, dict[str, Any]]] = []
    for c in chunks:
        events += t.feed(c)
    assert events[-1][0] == "error"
    ErrorResponse.model_validate(events[-1][1])
    assert t.failure is not None
    with pytest.raises(LocalProtocolError):
        t.finish()


@pytest.mark.parametrize("chunks", [[], [chunk({"content": "cut"})]])
def test_stream_without_finish_reason_errors_at_finish(chunks: list[Any]) -> None:
    t = MessagesStreamTranslator(base_req())
    events: list[tuple[str, dict[str, Any]]] = []
    for c in chunks:
        events += t.feed(c)
    events += t.finish()
    assert events[0][0] == "message_start"
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "api_error"
    assert "message_stop" not in [n for n, _ in events]


def test_missing_max_tokens_is_rejected_by_the_translator() -> None:
    with pytest.raises(TranslationError):
        MessagesStreamTranslator({"model": "m", "messages": []})


# --------------------------------------------------------------------------------------------
# property: however the upstream splits its output, the result is the same
# --------------------------------------------------------------------------------------------


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    pieces = []
    prev = 0
    for p in [*points, len(text)]:
        pieces.append(text[prev:p])
        prev = p
    return pieces


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def split_streams(draw: st.DrawFn) -> tuple[str, str, list[dict[str, Any]], list[dict[str, Any]]]:
    reasoning = draw(st.text(max_size=30))
    text = draw(st.text(max_size=60))
    inputs = [
        draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3))
        for _ in range(draw(st.integers(0, 3)))
    ]
    cuts = st.lists(st.integers(0, 200), max_size=8)
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"reasoning_content": p}) for p in split(reasoning, draw(cuts))]
    chunks += [chunk({"content": p}) for p in split(text, draw(cuts))]
    for i, value in enumerate(inputs):
        pieces = split(json.dumps(value), draw(cuts))
        head = {
            "index": i,
            "id": f"call-{i}",
            "type": "function",
            "function": {"name": f"tool{i}", "arguments": pieces[0]},
        }
        chunks.append(chunk({"tool_calls": [head]}))
        chunks += [
            chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]}) for p in pieces[1:]
        ]
    chunks.append(chunk({}, finish="tool_calls" if inputs else "stop"))
    chunks.append(chunk(None, usage=USAGE))
    return reasoning, text, inputs, chunks


@settings(max_examples=150, deadline=None)
@given(split_streams())
def test_any_split_gives_the_same_message(
    case: tuple[str, str, list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    reasoning, text, inputs, chunks = case
    req = base_req(**THINKING)
    streamed = accumulate(run(req, chunks)).to_dict()
    Message.model_validate(streamed)
    blocks = streamed["content"]
    assert "".join(b["thinking"] for b in blocks if b["type"] == "thinking") == reasoning
    assert "".join(b["text"] for b in blocks if b["type"] == "text") == text
    assert [b["input"] for b in blocks if b["type"] == "tool_use"] == inputs
    # ... and equals the non-streamed translation of the same completion
    message: dict[str, Any] = {"content": text or None, "reasoning_content": reasoning or None}
    if inputs:
        message["tool_calls"] = [
            {
                "id": f"call-{i}",
                "type": "function",
                "function": {"name": f"tool{i}", "arguments": json.dumps(v)},
            }
            for i, v in enumerate(inputs)
        ]
    chat = completion(message, "tool_calls" if inputs else "stop")
    chat["usage"] = USAGE
    full = chat_to_message(chat, req)
    assert streamed["content"] == full["content"]
    assert (streamed["stop_reason"], streamed["stop_sequence"]) == (
        full["stop_reason"],
        full["stop_sequence"],
    )
    assert streamed["usage"]["output_tokens"] == full["usage"]["output_tokens"]


# --------------------------------------------------------------------------------------------
# count_tokens
# --------------------------------------------------------------------------------------------


def test_count_tokens_estimate() -> None:
    req = {
        "model": "claude-test",
        "system": "abcd" * 10,  # 40 chars
        "messages": [
            {"role": "user", "content": "x" * 30},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "ignored" * 100, "signature": "s"},
                    {"type": "tool_use", "id": "t", "name": "ab", "input": {"k": "v"}},  # 2 + 9
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t",
                        "content": [{"type": "text", "text": "y" * 20}],
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x"}},
                ],
            },
        ],
        "tools": [
            {"name": "tool", "description": "d" * 6, "input_schema": {"type": "object"}}
        ],  # 4+6+17
    }
    chars = 40 + 30 + 2 + len('{"k":"v"}') + 20 + 4 + 6 + len('{"type":"object"}')
    out = count_tokens_estimate(req)
    assert out == {"input_tokens": math.ceil(chars / 4) + IMAGE_TOKEN_ESTIMATE}
    MessageTokensCount.model_validate(out)


def test_count_tokens_minimum_and_validation() -> None:
    assert count_tokens_estimate({"model": "m", "messages": []}) == {"input_tokens": 1}
    with pytest.raises(TranslationError) as info:
        count_tokens_estimate({"model": "m"})
    assert info.value.param == "messages"
    with pytest.raises(TranslationError):
        count_tokens_estimate({"model": "m", "messages": [{"role": "bot", "content": "x"}]})


# --------------------------------------------------------------------------------------------
# end to end: the official client talks to the translators over a mock transport
# --------------------------------------------------------------------------------------------


def sse(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    return "".join(f"event: {n}\ndata: {json.dumps(d)}\n\n" for n, d in events).encode()


def sdk_client(chunks: list[dict[str, Any]], *, fail: bool = False) -> anthropic.Anthropic:
    """An Anthropic client whose server translates the request and answers from ``chunks``."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        try:
            if request.url.path == "/v1/messages/count_tokens":
                return httpx2.Response(200, json=count_tokens_estimate(body))
            assert request.url.path == "/v1/messages"
            chat = messages_to_chat(body)
        except TranslationError as exc:
            return httpx2.Response(exc.status, json=exc.to_anthropic())
        if not chat.get("stream"):
            return httpx2.Response(
                200, json=chat_to_message(completion({"content": "Bonjour"}), body)
            )
        t = MessagesStreamTranslator(body)
        events: list[tuple[str, dict[str, Any]]] = []
        for c in chunks:
            events += t.feed(c)
        events += t.error(529, "overloaded_error", "Overloaded") if fail else t.finish()
        return httpx2.Response(
            200, headers={"content-type": "text/event-stream"}, content=sse(events)
        )

    return anthropic.Anthropic(
        api_key="sk-ant-test",
        base_url="http://proxy.local",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        max_retries=0,
        _strict_response_validation=True,
    )


MSGS: list[Any] = [{"role": "user", "content": "hi"}]


def test_sdk_non_stream_count_tokens_and_error() -> None:
    client = sdk_client([])
    msg = client.messages.create(model="claude-test", max_tokens=100, messages=MSGS)
    assert msg.content[0].type == "text" and msg.content[0].text == "Bonjour"
    assert client.messages.count_tokens(model="claude-test", messages=MSGS).input_tokens == 1
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model="claude-test",
            max_tokens=100,
            messages=MSGS,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    assert "unsupported" in str(info.value) or "not supported" in str(info.value)


def test_sdk_stream_helper_accumulates_our_events() -> None:
    client = sdk_client(vllm_stream())
    with client.messages.stream(
        model="claude-test",
        max_tokens=100,
        messages=MSGS,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        thinking={"type": "enabled", "budget_tokens": 2048},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Let me check."
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert [b.input for b in final.content if b.type == "tool_use"] == [
        {"city": "Paris"},
        {"city": "Rome"},
    ]
    assert final.stop_reason == "tool_use"


def test_sdk_stream_raises_on_our_error_event() -> None:
    client = sdk_client([chunk({"content": "par"})], fail=True)
    with pytest.raises(anthropic.APIStatusError) as info:
        with client.messages.stream(model="claude-test", max_tokens=100, messages=MSGS) as stream:
            stream.get_final_message()
    assert "Overloaded" in str(info.value)
