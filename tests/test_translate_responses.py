"""Responses API ⇄ Chat Completions translation (pqe2ee.proxy.translate.responses, .chat, .errors),
and the purity of pqe2ee.proxy.translate as a whole (no I/O library, no web stack)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

import pqe2ee
import pqe2ee.proxy.translate
from imports_of import imports_of
from pqe2ee.errors import ErrorCode, LocalProtocolError
from pqe2ee.proxy.translate.chat import (
    ChatChunkReader,
    ReasoningDelta,
    TextDelta,
    ToolCallArgs,
    ToolCallStart,
    parse_chat_reply,
)
from pqe2ee.proxy.translate.errors import TranslationError, convert, openai_error_body
from pqe2ee.proxy.translate.responses import (
    ResponsesRequest,
    chat_to_response,
    response_error_code,
    responses_to_chat,
)
from pqe2ee.proxy.translate.streams import ResponsesStreamTranslator

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
    "strict": True,
}


def base_req(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "input": "hi", **extra}


def chat_req(**extra: Any) -> dict[str, Any]:
    return responses_to_chat(base_req(**extra))


def bad(req: dict[str, Any]) -> TranslationError:
    with pytest.raises(TranslationError) as info:
        responses_to_chat(req)
    assert info.value.status == 400
    assert info.value.type == "invalid_request_error"
    return info.value


# --------------------------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------------------------


def test_string_input_and_model() -> None:
    assert responses_to_chat({"model": "m", "input": "Hello"}) == {
        "model": "m",
        "messages": [{"role": "user", "content": "Hello"}],
    }


def test_instructions_and_leading_developer_messages_merge_into_one_system() -> None:
    chat = chat_req(
        instructions="Be terse.",
        input=[
            {"type": "message", "role": "developer", "content": "Sandbox: read-only."},
            {"role": "system", "content": [{"type": "input_text", "text": "Env info"}]},
            {"role": "user", "content": "go"},
            {"role": "developer", "content": "late note"},
        ],
    )
    assert chat["messages"] == [
        {"role": "system", "content": "Be terse.\n\nSandbox: read-only.\n\nEnv info"},
        {"role": "user", "content": "go"},
        {"role": "system", "content": "late note"},
    ]


def test_content_parts_text_and_images() -> None:
    chat = chat_req(
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": "https://x/y.png", "detail": "high"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                ],
            },
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "A cat.", "annotations": []}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "a"},
                    {"type": "input_text", "text": "b"},
                ],
            },
        ]
    )
    assert chat["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "high"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "a\nb"},
    ]


def test_consecutive_user_messages_are_merged() -> None:
    chat = chat_req(
        input=[
            {"role": "user", "content": "<env>"},
            {"role": "user", "content": [{"type": "input_image", "image_url": "https://i"}]},
            {"role": "user", "content": "prompt"},
        ]
    )
    assert chat["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<env>"},
                {"type": "image_url", "image_url": {"url": "https://i"}},
                {"type": "text", "text": "prompt"},
            ],
        }
    ]


def test_function_calls_and_outputs() -> None:
    chat = chat_req(
        input=[
            {"role": "user", "content": "weather in Paris and Rome?"},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "xx"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Checking."}],
            },
            {
                "type": "function_call",
                "call_id": "c1",
                "name": "get_weather",
                "arguments": '{"city":"Paris"}',
            },
            {
                "type": "function_call",
                "call_id": "c2",
                "name": "get_weather",
                "arguments": '{"city":"Rome"}',
                "id": "fc_2",
            },
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [{"type": "input_text", "text": "rain"}],
            },
            {"type": "function_call", "call_id": "c3", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c3", "output": "?"},
        ]
    )

    def call(cid: str, arguments: str) -> dict[str, Any]:
        return {
            "id": cid,
            "type": "function",
            "function": {"name": "get_weather", "arguments": arguments},
        }

    assert chat["messages"] == [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [call("c1", '{"city":"Paris"}'), call("c2", '{"city":"Rome"}')],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        {"role": "assistant", "content": None, "tool_calls": [call("c3", "{}")]},
        {"role": "tool", "tool_call_id": "c3", "content": "?"},
    ]


def test_function_call_output_images_follow_the_tool_messages() -> None:
    chat = chat_req(
        input=[
            {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "shot", "arguments": "{}"},
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": [{"type": "input_image", "image_url": "https://a"}],
            },
            {"type": "function_call_output", "call_id": "c2", "output": "no image"},
            {"role": "user", "content": "and?"},
        ]
    )
    msgs = chat["messages"]
    assert [m["role"] for m in msgs] == ["assistant", "tool", "tool", "user"]
    assert msgs[1] == {"role": "tool", "tool_call_id": "c1", "content": "[image]"}
    assert msgs[3]["content"][1:] == [
        {"type": "image_url", "image_url": {"url": "https://a"}},
        {"type": "text", "text": "and?"},
    ]


def test_tools_tool_choice_and_sampling_parameters() -> None:
    chat = chat_req(
        tools=[WEATHER_TOOL, {"type": "function", "name": "noop"}],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        max_output_tokens=321,
        temperature=0.5,
        top_p=1,
        user="u-1",
        metadata={"k": "v"},
        store=True,
        include=["reasoning.encrypted_content"],
        truncation="auto",
    )
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": WEATHER_TOOL["parameters"],
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "noop"}},
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["max_tokens"] == 321
    assert chat["temperature"] == 0.5
    assert chat["top_p"] == 1.0
    assert chat["user"] == "u-1"
    for dropped in ("metadata", "store", "include", "truncation", "stream", "stream_options"):
        assert dropped not in chat


@pytest.mark.parametrize("choice", ["auto", "none", "required"])
def test_tool_choice_strings(choice: str) -> None:
    assert chat_req(tools=[WEATHER_TOOL], tool_choice=choice)["tool_choice"] == choice


def test_tool_choice_without_tools_is_not_forwarded() -> None:
    assert "tool_choice" not in chat_req(tool_choice="auto", parallel_tool_calls=True)


def test_allowed_tools_filters_the_tool_list() -> None:
    chat = chat_req(
        tools=[WEATHER_TOOL, {"type": "function", "name": "other"}],
        tool_choice={
            "type": "allowed_tools",
            "mode": "required",
            "tools": [{"type": "function", "name": "other"}],
        },
    )
    assert chat["tool_choice"] == "required"
    assert [t["function"]["name"] for t in chat["tools"]] == ["other"]


@pytest.mark.parametrize(
    "tool",
    [{"type": "web_search"}, {"type": "custom", "name": "apply_patch"}, {"type": "local_shell"}],
)
def test_non_function_tools_are_unsupported(tool: dict[str, Any]) -> None:
    err = bad(base_req(tools=[WEATHER_TOOL, tool]))
    assert err.error_code == "unsupported_tool"
    assert err.param == "tools[1].type"
    assert repr(tool["type"]) in err.message


def test_hosted_tool_choice_is_unsupported() -> None:
    err = bad(base_req(tools=[WEATHER_TOOL], tool_choice={"type": "web_search_preview"}))
    assert err.error_code == "unsupported_tool_choice"


@pytest.mark.parametrize(
    ("effort", "expected"),
    [
        ("none", "none"),
        ("minimal", "low"),
        ("low", "low"),
        ("medium", "medium"),
        ("high", "high"),
        ("xhigh", "high"),
        ("max", "high"),
    ],
)
def test_reasoning_effort(effort: str, expected: str) -> None:
    assert chat_req(reasoning={"effort": effort, "summary": "auto"})["reasoning_effort"] == expected


def test_unknown_reasoning_effort_is_rejected() -> None:
    assert bad(base_req(reasoning={"effort": "ludicrous"})).param == "reasoning.effort"


def test_text_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = chat_req(
        text={"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}}
    )
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": schema, "strict": True},
    }
    assert chat_req(text={"format": {"type": "json_object"}})["response_format"] == {
        "type": "json_object"
    }
    assert "response_format" not in chat_req(text={"format": {"type": "text"}, "verbosity": "low"})


def test_stream_adds_include_usage() -> None:
    chat = chat_req(stream=True)
    assert chat["stream"] is True
    assert chat["stream_options"] == {"include_usage": True}


def test_previous_response_id_is_refused() -> None:
    err = bad(base_req(previous_response_id="resp_123"))
    assert err.param == "previous_response_id"
    assert err.error_code == "unsupported_parameter"
    assert "stateless" in err.message
    body = err.to_openai()
    assert body == {
        "error": {
            "message": err.message,
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "unsupported_parameter",
        }
    }


@pytest.mark.parametrize(
    "extra",
    [
        {"conversation": "conv_1"},
        {"background": True},
        {"prompt": {"id": "pmpt_1"}},
        {"input": [{"type": "item_reference", "id": "msg_1"}]},
    ],
)
def test_stateful_features_are_refused(extra: dict[str, Any]) -> None:
    assert bad(base_req(**extra)).error_code == "unsupported_parameter"


@pytest.mark.parametrize(
    ("req", "param"),
    [
        ({"model": "m"}, "input"),
        (base_req(input=[{"role": "user", "content": 5}]), "input[0].content"),
        (base_req(input=[{"role": "robot", "content": "x"}]), "input[0].role"),
        (base_req(input=[{"type": "function_call", "name": "f"}]), "input[0]"),
        (base_req(temperature="hot"), "temperature"),
        (base_req(max_output_tokens=True), "max_output_tokens"),
        (base_req(input=["x"]), "input[0]"),
        (
            base_req(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]),
            "input[0].content[0].type",
        ),
        (
            base_req(
                input=[{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]
            ),
            "input[0].content[0]",
        ),
        (base_req(input=[{"type": "web_search_call", "id": "ws"}]), "input[0].type"),
        (
            base_req(
                input=[{"role": "system", "content": [{"type": "input_image", "image_url": "u"}]}]
            ),
            "input[0].content",
        ),
    ],
)
def test_invalid_requests_name_the_field(req: dict[str, Any], param: str) -> None:
    err = bad(req)
    assert err.param == param
    assert err.message.startswith(param.removesuffix(".type"))
    assert err.code is ErrorCode.INVALID_BODY


def test_body_must_be_an_object() -> None:
    with pytest.raises(TranslationError, match="JSON object"):
        responses_to_chat([])  # type: ignore[arg-type]


def test_convert_reports_paths() -> None:
    with pytest.raises(TranslationError) as info:
        convert({"input": 3}, ResponsesRequest, where="body")
    assert info.value.param == "body.input"
    assert info.value.message == "body.input: Expected `str | array | null`, got `int`"


def test_openai_error_body() -> None:
    assert openai_error_body("server_error", "boom") == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": None}
    }


# --------------------------------------------------------------------------------------------
# non-stream replies
# --------------------------------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str = "stop", **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "upstream/model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
        ],
        "usage": {
            "prompt_tokens": 11,
            "completion_tokens": 7,
            "total_tokens": 18,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 3},
        },
        **extra,
    }


def test_text_reply() -> None:
    req = base_req(temperature=0.2, metadata={"a": "b"}, instructions="sys")
    out = chat_to_response(completion({"content": "Hello there"}), req)
    resp = Response.model_validate(out)
    assert resp.id.startswith("resp_")
    assert resp.object == "response"
    assert resp.status == "completed"
    assert resp.model == "gpt-test"
    assert resp.output_text == "Hello there"
    assert resp.created_at == 1_700_000_000
    assert resp.temperature == 0.2
    assert resp.metadata == {"a": "b"}
    assert resp.instructions == "sys"
    assert resp.incomplete_details is None
    assert resp.usage is not None
    assert resp.usage.input_tokens == 11
    assert resp.usage.output_tokens == 7
    assert resp.usage.total_tokens == 18
    assert resp.usage.input_tokens_details.cached_tokens == 4
    assert resp.usage.output_tokens_details.reasoning_tokens == 3
    (item,) = resp.output
    assert item.type == "message"
    assert item.id.startswith("msg_")
    assert item.status == "completed"


def test_reasoning_and_tool_calls_reply() -> None:
    req = base_req(tools=[WEATHER_TOOL], tool_choice="required", reasoning={"effort": "low"})
    chat = completion(
        {
            "content": None,
            "reasoning_content": "User wants weather.",
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        finish="tool_calls",
    )
    resp = Response.model_validate(chat_to_response(chat, req))
    assert [o.type for o in resp.output] == ["reasoning", "function_call", "function_call"]
    reasoning = resp.output[0]
    assert reasoning.type == "reasoning"
    assert reasoning.content is not None
    assert reasoning.content[0].text == "User wants weather."
    calls = [o for o in resp.output if o.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        ("call_a", "get_weather", '{"city":"Paris"}'),
        ("call_b", "get_weather", '{"city":"Rome"}'),
    ]
    assert all(c.id is not None and c.id.startswith("fc_") for c in calls)
    assert resp.tool_choice == "required"
    assert resp.tools[0].type == "function"
    assert resp.reasoning is not None and resp.reasoning.effort == "low"


def test_vllm_reasoning_field_is_read_too() -> None:
    resp = Response.model_validate(
        chat_to_response(completion({"content": "x", "reasoning": "hmm"}), base_req())
    )
    assert resp.output[0].type == "reasoning"


@pytest.mark.parametrize(
    ("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_truncated_reply_is_incomplete(finish: str, reason: str) -> None:
    resp = Response.model_validate(
        chat_to_response(completion({"content": "Once upon"}, finish), base_req())
    )
    assert resp.status == "incomplete"
    assert resp.incomplete_details is not None
    assert resp.incomplete_details.reason == reason
    assert resp.output[0].type == "message"
    assert resp.output[0].status == "incomplete"


def test_refusal_reply() -> None:
    resp = Response.model_validate(
        chat_to_response(completion({"content": None, "refusal": "I can't."}), base_req())
    )
    item = resp.output[0]
    assert item.type == "message"
    assert item.content[0].type == "refusal"


def test_reply_echoes_text_format_and_allowed_tools() -> None:
    req = base_req(
        tools=[WEATHER_TOOL],
        tool_choice={
            "type": "allowed_tools",
            "mode": "auto",
            "tools": [{"type": "function", "name": "get_weather"}],
        },
        text={
            "format": {"type": "json_schema", "name": "o", "schema": {"type": "object"}},
            "verbosity": "low",
        },
    )
    resp = Response.model_validate(chat_to_response(completion({"content": "{}"}), req))
    assert resp.text is not None and resp.text.format is not None
    assert resp.text.format.type == "json_schema"
    assert resp.tool_choice.type == "allowed_tools"  # type: ignore[union-attr]


def test_reply_without_usage() -> None:
    chat = completion({"content": "x"})
    del chat["usage"]
    assert Response.model_validate(chat_to_response(chat, base_req())).usage is None


@pytest.mark.parametrize(
    "chat",
    [
        {"choices": []},
        {"choices": "nope"},
        {"choices": [{"index": 0, "message": {"content": 5}}]},
        {"choices": [{"index": 0, "message": {"tool_calls": [{"id": "x", "function": {}}]}}]},
        [],
    ],
)
def test_malformed_upstream_reply_is_502(chat: Any) -> None:
    with pytest.raises(TranslationError) as info:
        chat_to_response(chat, base_req())
    assert info.value.status == 502
    assert info.value.code is ErrorCode.MALFORMED_PAYLOAD


def test_upstream_error_body_keeps_its_status() -> None:
    with pytest.raises(TranslationError) as info:
        chat_to_response(
            {
                "object": "error",
                "message": "context too long",
                "type": "BadRequestError",
                "code": 400,
            },
            base_req(),
        )
    assert (info.value.status, info.value.type, info.value.message) == (
        400,
        "BadRequestError",
        "context too long",
    )


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (429, "rate_limit_exceeded"),
        (400, "invalid_prompt"),
        (500, "server_error"),
        (502, "server_error"),
    ],
)
def test_response_error_code(status: int, code: str) -> None:
    assert response_error_code(status) == code


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
    """What vLLM sends for: reasoning, a sentence, two tool calls, then usage."""
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


def run(req: dict[str, Any], chunks: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    t = ResponsesStreamTranslator(req)
    events: list[tuple[str, dict[str, Any]]] = []
    for c in chunks:
        events += t.feed(c)
    events += t.finish()
    assert t.closed
    return events


def check_events(events: list[tuple[str, dict[str, Any]]]) -> ResponseStreamState[Any]:
    """Every event validates against the SDK union, sequence numbers count from 0, and the SDK's
    own stream accumulator accepts the sequence."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for n, (name, data) in enumerate(events):
        assert data["type"] == name
        assert data["sequence_number"] == n
        state.handle_event(EVENTS.validate_python(data))
    return state


def test_realistic_vllm_stream() -> None:
    req = base_req(stream=True, tools=[WEATHER_TOOL])
    events = run(req, vllm_stream())
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",  # reasoning
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",  # message
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",  # call 1
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",  # call 2
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    state = check_events(events)

    # deltas accumulate to the done values and to the final output
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert text == "Let me check."
    (done,) = [d for n, d in events if n == "response.output_text.done"]
    assert done["text"] == text
    args: dict[str, str] = {}
    for n, d in events:
        if n == "response.function_call_arguments.delta":
            args[d["item_id"]] = args.get(d["item_id"], "") + d["delta"]
    assert list(args.values()) == ['{"city": "Paris"}', '{"city": "Rome"}']

    final = Response.model_validate(events[-1][1]["response"])
    assert final.status == "completed"
    assert final.output_text == "Let me check."
    assert [o.type for o in final.output] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]
    calls = [o for o in final.output if o.type == "function_call"]
    assert [(c.call_id, c.arguments) for c in calls] == [
        ("chatcmpl-tool-1", '{"city": "Paris"}'),
        ("chatcmpl-tool-2", '{"city": "Rome"}'),
    ]
    assert final.usage is not None and final.usage.total_tokens == 29

    # output indexes and item ids are consistent between added/done and the final output
    added = {
        d["output_index"]: d["item"]["id"] for n, d in events if n == "response.output_item.added"
    }
    assert added == {i: o.id for i, o in enumerate(final.output)}

    # the created response is in progress and empty; the SDK accumulator agrees with us
    created = Response.model_validate(events[0][1]["response"])
    assert created.status == "in_progress" and created.output == [] and created.usage is None
    sdk_final = state._completed_response
    assert sdk_final is not None
    assert sdk_final.output_text == "Let me check."


def test_text_only_stream_and_start_is_idempotent() -> None:
    t = ResponsesStreamTranslator(base_req())
    first = t.start()
    assert [n for n, _ in first] == ["response.created", "response.in_progress"]
    assert t.start() == []
    events = first
    for c in [
        chunk({"role": "assistant"}),
        chunk({"content": "Hi"}),
        chunk({"content": "!"}, finish="stop"),
        chunk(None, usage=USAGE),
    ]:
        events += t.feed(c)
    events += t.finish()
    check_events(events)
    final = Response.model_validate(events[-1][1]["response"])
    assert final.output_text == "Hi!"
    assert final.id == t.response_id


def test_length_ends_with_response_incomplete() -> None:
    events = run(
        base_req(),
        [
            chunk({"content": "Once"}),
            chunk({"content": " upon"}, finish="length"),
            chunk(None, usage=USAGE),
        ],
    )
    check_events(events)
    assert events[-1][0] == "response.incomplete"
    final = Response.model_validate(events[-1][1]["response"])
    assert final.status == "incomplete"
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].status == "incomplete"  # type: ignore[union-attr]


def test_refusal_stream() -> None:
    events = run(base_req(), [chunk({"refusal": "No"}), chunk({"refusal": "pe."}, finish="stop")])
    check_events(events)
    names = [n for n, _ in events]
    assert "response.refusal.delta" in names and "response.refusal.done" in names
    final = Response.model_validate(events[-1][1]["response"])
    item = final.output[0]
    assert item.type == "message"
    part = item.content[0]
    assert part.type == "refusal" and part.refusal == "Nope."


def test_text_after_tool_call_opens_a_new_message() -> None:
    events = run(
        base_req(),
        [
            chunk({"content": "a"}),
            chunk(
                {
                    "tool_calls": [
                        {"index": 0, "id": "c", "function": {"name": "f", "arguments": "{}"}}
                    ]
                }
            ),
            chunk({"content": "b"}, finish="stop"),
        ],
    )
    check_events(events)
    final = Response.model_validate(events[-1][1]["response"])
    assert [o.type for o in final.output] == ["message", "function_call", "message"]


def test_tool_name_after_arguments_is_buffered_and_ids_generated() -> None:
    events = run(
        base_req(),
        [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ":1}"}}]}),
            chunk({}, finish="tool_calls"),
        ],
    )
    check_events(events)
    final = Response.model_validate(events[-1][1]["response"])
    call = final.output[0]
    assert call.type == "function_call"
    assert call.arguments == '{"a":1}'
    assert call.call_id.startswith("call_")


def test_usage_is_taken_from_the_last_usage_chunk() -> None:
    events = run(
        base_req(),
        [
            chunk(
                {"content": "a"},
                usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            ),
            chunk(
                {"content": "b"},
                finish="stop",
                usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
            ),
        ],
    )
    final = Response.model_validate(events[-1][1]["response"])
    assert final.usage is not None and final.usage.output_tokens == 2


def test_error_mid_stream_fails_and_refuses_more_input() -> None:
    t = ResponsesStreamTranslator(base_req())
    events = t.feed(chunk({"content": "partial"}))
    events += t.error(503, "server_error", "upstream went away")
    check_events(events)
    assert [n for n, _ in events[-2:]] == ["error", "response.failed"]
    assert events[-2][1]["message"] == "upstream went away"
    failed = Response.model_validate(events[-1][1]["response"])
    assert failed.status == "failed"
    assert failed.error is not None and failed.error.code == "server_error"
    assert failed.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert t.closed and t.failure is not None and t.failure.status == 503
    with pytest.raises(LocalProtocolError):
        t.feed(chunk({"content": "more"}))
    with pytest.raises(LocalProtocolError):
        t.finish()
    with pytest.raises(LocalProtocolError):
        t.error(500, "server_error", "again")
    with pytest.raises(LocalProtocolError):
        t.start()


def test_error_before_any_chunk() -> None:
    t = ResponsesStreamTranslator(base_req())
    events = t.error(429, "rate_limit_error", "slow down")
    check_events(events)
    assert [n for n, _ in events] == [
        "response.created",
        "response.in_progress",
        "error",
        "response.failed",
    ]
    assert events[-1][1]["response"]["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize(
    "bad_chunks",
    [
        [chunk({"content": "x"}), {"choices": [{"delta": {"content": 1}}]}],
        [chunk({"content": "x"}), "not a dict"],
        [
            chunk({"content": "x"}),
            {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}},
        ],
        [chunk({"content": "x"}, finish="stop"), chunk({"content": "late"})],
        [
            chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f"}}]}),
            chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g"}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        ],
    ],
)
def test_bad_upstream_chunks_fail_the_stream(bad_chunks: list[Any]) -> None:
    t = ResponsesStreamTranslator(base_req())
    events: list[tuple[str, dict[str, Any]]] = []
    for c in bad_chunks:
        events += t.feed(c)
    check_events(events)
    assert events[-1][0] == "response.failed"
    assert t.closed and t.failure is not None
    with pytest.raises(LocalProtocolError):
        t.finish()


def test_upstream_error_chunk_message_is_forwarded() -> None:
    t = ResponsesStreamTranslator(base_req())
    events = t.feed(
        {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}
    )
    assert events[-2][1]["message"] == "engine died"
    assert t.failure is not None and t.failure.status == 500


@pytest.mark.parametrize(
    "chunks",
    [
        [],
        [chunk({"content": "cut"})],
        [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
            chunk({}, finish="tool_calls"),
        ],
    ],
)
def test_stream_without_proper_end_fails_at_finish(chunks: list[dict[str, Any]]) -> None:
    t = ResponsesStreamTranslator(base_req())
    events: list[tuple[str, dict[str, Any]]] = []
    for c in chunks:
        events += t.feed(c)
    events += t.finish()
    check_events(events)
    assert [n for n, _ in events[-2:]] == ["error", "response.failed"]
    assert t.failure is not None and t.failure.status == 502


def test_invalid_request_is_rejected_by_the_translator() -> None:
    with pytest.raises(TranslationError):
        ResponsesStreamTranslator(base_req(previous_response_id="resp_1"))


def test_chunk_reader_ops() -> None:
    r = ChatChunkReader(call_id_prefix="call_")
    ops = []
    for c in vllm_stream():
        ops += r.feed(c)
    r.end()
    assert ops[0] == ReasoningDelta("Need ")
    assert TextDelta("Let") in ops
    assert ToolCallStart(0, "chatcmpl-tool-1", "get_weather") in ops
    assert ToolCallArgs(1, '{"city": "Rome"}') in ops
    assert r.finish_reason == "tool_calls"
    assert r.usage is not None and r.usage.total_tokens == 29
    assert parse_chat_reply(chunk(None, usage=USAGE)).usage == r.usage


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
def split_streams(draw: st.DrawFn) -> tuple[str, str, list[str], list[dict[str, Any]]]:
    reasoning = draw(st.text(max_size=30))
    text = draw(st.text(max_size=60))
    args = [
        json.dumps(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)))
        for _ in range(draw(st.integers(0, 3)))
    ]
    cuts = st.lists(st.integers(0, 200), max_size=8)
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"reasoning_content": p}) for p in split(reasoning, draw(cuts))]
    chunks += [chunk({"content": p}) for p in split(text, draw(cuts))]
    for i, a in enumerate(args):
        pieces = split(a, draw(cuts))
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
    chunks.append(chunk({}, finish="tool_calls" if args else "stop"))
    chunks.append(chunk(None, usage=USAGE))
    return reasoning, text, args, chunks


def comparable(output: list[Any]) -> list[Any]:
    """Output items without their random ids."""
    return [{k: v for k, v in item.items() if k != "id"} for item in output]


@settings(max_examples=150, deadline=None)
@given(split_streams())
def test_any_split_gives_the_same_output(
    case: tuple[str, str, list[str], list[dict[str, Any]]],
) -> None:
    reasoning, text, args, chunks = case
    events = run(base_req(), chunks)
    check_events(events)
    final = events[-1][1]["response"]
    resp = Response.model_validate(final)
    assert resp.output_text == text
    assert [o.arguments for o in resp.output if o.type == "function_call"] == args
    reasoning_items = [o for o in resp.output if o.type == "reasoning"]
    assert "".join(o.content[0].text for o in reasoning_items if o.content) == reasoning
    # the streamed result equals the non-streamed translation of the same completion
    message: dict[str, Any] = {"content": text or None, "reasoning_content": reasoning or None}
    if args:
        message["tool_calls"] = [
            {
                "id": f"call-{i}",
                "type": "function",
                "function": {"name": f"tool{i}", "arguments": a},
            }
            for i, a in enumerate(args)
        ]
    full = chat_to_response(completion(message, "tool_calls" if args else "stop"), base_req())
    assert comparable(final["output"]) == comparable(full["output"])


# --------------------------------------------------------------------------------------------
# end to end: the official client talks to the translators over a mock transport
# --------------------------------------------------------------------------------------------


def sse(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    return "".join(f"event: {n}\ndata: {json.dumps(d)}\n\n" for n, d in events).encode()


def sdk_client(chunks: list[dict[str, Any]], *, fail: bool = False) -> openai.OpenAI:
    """An OpenAI client whose server translates the request and answers from ``chunks``."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        assert request.url.path == "/v1/responses"
        try:
            chat = responses_to_chat(body)
        except TranslationError as exc:
            return httpx2.Response(exc.status, json=exc.to_openai())
        if not chat.get("stream"):
            message: dict[str, Any] = {"content": "Bonjour"}
            return httpx2.Response(200, json=chat_to_response(completion(message), body))
        t = ResponsesStreamTranslator(body)
        events: list[tuple[str, dict[str, Any]]] = []
        for c in chunks:
            events += t.feed(c)
        events += t.error(502, "server_error", "upstream reset") if fail else t.finish()
        return httpx2.Response(
            200, headers={"content-type": "text/event-stream"}, content=sse(events)
        )

    return openai.OpenAI(
        api_key="sk-test",
        base_url="http://proxy.local/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        max_retries=0,
        _strict_response_validation=True,
    )


def test_sdk_non_stream_and_error() -> None:
    client = sdk_client([])
    resp = client.responses.create(model="gpt-test", input="hi")
    assert resp.output_text == "Bonjour"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="gpt-test", input="hi", previous_response_id="resp_1")
    assert info.value.code == "unsupported_parameter"
    assert info.value.param == "previous_response_id"


def test_sdk_stream_helper_accumulates_our_events() -> None:
    client = sdk_client(vllm_stream())
    with client.responses.stream(
        model="gpt-test",
        input="weather?",
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Let me check."
    assert final.output_text == "Let me check."
    calls = [o for o in final.output if o.type == "function_call"]
    assert [c.arguments for c in calls] == ['{"city": "Paris"}', '{"city": "Rome"}']
    assert final.usage is not None and final.usage.input_tokens == 20


def test_sdk_raw_stream_sees_the_failure() -> None:
    client = sdk_client([chunk({"content": "par"})], fail=True)
    kinds = [e.type for e in client.responses.create(model="gpt-test", input="x", stream=True)]
    assert kinds[-2:] == ["error", "response.failed"]


# ---------------------------------------------------------------------------------------------
# pqe2ee.proxy.translate as a whole: pure, importable without the web stack

TRANSLATE = Path(pqe2ee.proxy.translate.__file__).parent

#: All that translate/ may import: pure parts of the standard library, msgspec, pqe2ee's errors
#: and itself. (The web stack, sockets, event loops and HTTP clients belong to proxy/app/.)
PURE_IMPORTS = {
    "__future__",
    "abc",
    "collections",
    "dataclasses",
    "enum",
    "math",
    "msgspec",
    "re",
    "secrets",
    "time",
    "typing",
}


def _imports(path: Path) -> list[str]:
    return ["." * i.level + i.module for i in imports_of(ast.parse(path.read_text()))]


def test_translate_imports_no_io_library() -> None:
    paths = sorted(TRANSLATE.glob("*.py"))
    assert {p.name for p in paths} >= {"chat.py", "responses.py", "anthropic.py", "streams.py"}
    for path in paths:
        for name in _imports(path):
            allowed = (
                name.split(".")[0] in PURE_IMPORTS
                or name == "pqe2ee.errors"
                or name == "pqe2ee._json"  # pure too: the bounded JSON decoder
                or name.startswith("pqe2ee.proxy.translate")
            )
            assert allowed, f"translate/{path.name} imports {name}"


def test_translate_imports_without_the_web_stack() -> None:
    """Every translate/ module imports with the web stack, HTTP clients and event loops made
    unimportable (as on a machine without the ``proxy`` extra)."""
    script = """
import importlib, pkgutil, sys
for name in ("starlette", "uvicorn", "prometheus_client", "httpx", "httpx2", "aiohttp",
             "anyio", "trio", "asyncio", "socket"):
    sys.modules[name] = None  # import raises ImportError
import pqe2ee.proxy.translate as translate
for info in pkgutil.iter_modules(translate.__path__):
    importlib.import_module("pqe2ee.proxy.translate." + info.name)
"""
    src = str(Path(pqe2ee.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
