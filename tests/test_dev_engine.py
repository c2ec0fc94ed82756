"""The dev engine (a deterministic OpenAI-compatible test stand-in), driven by the openai SDK."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam

from pqe2ee.testing.dev_engine import create_app
from servers import run_app

WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with run_app(create_app()) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=20)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=20) as c:
        yield c


def sse_events(raw: str) -> list[str]:
    """Split an SSE body into its ``data:`` payloads, checking vLLM's exact framing."""
    assert raw.endswith("data: [DONE]\n\n")
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    payloads = []
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        payloads.append(block[len("data: ") :])
    return payloads


# ---------------------------------------------------------------------------------- basics


def test_health_and_models(client: openai.OpenAI, http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == ["dev-echo", "dev-tools", "dev-reason"]
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list"
    card = raw["data"][0]
    assert card["object"] == "model"
    assert card["owned_by"] == "pqe2ee-dev"
    assert card["root"] == "dev-echo"
    assert isinstance(card["created"], int) and isinstance(card["max_model_len"], int)


def test_custom_models() -> None:
    app = create_app(models=["only-one"])
    with run_app(app) as url, httpx.Client(base_url=url) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["only-one"]
        r = c.post(
            "/v1/chat/completions",
            json={"model": "dev-echo", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 404


def test_chat_non_stream(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="dev-echo",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Hello there, engine"},
        ],
        temperature=1.7,
    )
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == "dev-echo"
    (choice,) = resp.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "Echo: Hello there, engine"
    assert choice.finish_reason == "stop"
    assert not choice.message.tool_calls
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 5  # "be brief" + "Hello there, engine"
    assert resp.usage.completion_tokens == 4
    assert resp.usage.total_tokens == 9


def test_chat_is_deterministic(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "dev-echo", "messages": [{"role": "user", "content": "same"}]}
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert a.id == b.id
    assert a.choices[0].message.content == b.choices[0].message.content


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "stream me some words please"}]
    full = client.chat.completions.create(model="dev-echo", messages=messages)
    stream = client.chat.completions.create(
        model="dev-echo",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert {c.id for c in chunks} == {full.id}
    assert len({c.created for c in chunks}) == 1
    assert {c.model for c in chunks} == {"dev-echo"}
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(text_chunks) > 3
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None and full.usage is not None
    assert usage_chunk.usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_without_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="dev-echo", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_chat_stream_wire_shape(http: httpx.Client) -> None:
    body = {
        "model": "dev-echo",
        "messages": [{"role": "user", "content": "a b"}],
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    payloads = sse_events(r.text)
    assert payloads[-1] == "[DONE]"
    objs = [json.loads(p) for p in payloads[:-1]]
    for p in payloads[:-1]:  # compact JSON, as vLLM's model_dump_json
        assert json.dumps(json.loads(p), separators=(",", ":"), ensure_ascii=False) == p
    assert objs[0]["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert [o["choices"][0]["delta"].get("content") for o in objs[1:-1]] == [
        "Echo:",
        " a",
        " b",
        "",
    ]
    final = objs[-2]["choices"][0]
    assert final["finish_reason"] == "stop" and final["stop_reason"] is None
    # continuous usage: every chunk has the usage so far
    assert [o["usage"]["completion_tokens"] for o in objs] == [0, 1, 2, 3, 3, 3]
    assert all(o["usage"]["prompt_tokens"] == 2 for o in objs)
    assert objs[-1]["choices"] == []
    assert objs[-1]["usage"] == {"prompt_tokens": 2, "total_tokens": 5, "completion_tokens": 3}


def test_content_parts(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="dev-echo",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look at"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "this"},
                ],
            }
        ],
    )
    assert resp.choices[0].message.content == "Echo: look at\nthis"
    assert resp.usage is not None and resp.usage.prompt_tokens == 4  # 3 words + 1 image part


def test_max_tokens_and_stop(client: openai.OpenAI) -> None:
    msgs: list[Any] = [{"role": "user", "content": "one two three four five"}]
    resp = client.chat.completions.create(model="dev-echo", messages=msgs, max_tokens=3)
    assert resp.choices[0].message.content == "Echo: one two"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 3
    resp = client.chat.completions.create(
        model="dev-echo", messages=msgs, max_completion_tokens=2, max_tokens=50
    )
    assert resp.choices[0].message.content == "Echo: one"
    resp = client.chat.completions.create(model="dev-echo", messages=msgs, stop=["four", "zzz"])
    assert resp.choices[0].message.content == "Echo: one two three "
    assert resp.choices[0].finish_reason == "stop"
    assert resp.model_extra is not None
    assert resp.choices[0].model_extra == {"stop_reason": "four"}
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="dev-echo", messages=msgs, stop="four", stream=True
        )
    )
    assert streamed == "Echo: one two three "


# ---------------------------------------------------------------------------- completions


def test_completions_non_stream(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="dev-echo", prompt="the quick brown fox")
    assert resp.id.startswith("cmpl-")
    assert resp.object == "text_completion"
    assert resp.choices[0].text == "Echo: the quick brown fox"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (4, 5)


def test_completions_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    prompt = " ".join(f"w{i}" for i in range(30))
    resp = client.completions.create(model="dev-echo", prompt=prompt)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 16
    resp = client.completions.create(model="dev-echo", prompt=prompt, max_tokens=100)
    assert resp.choices[0].text == "Echo: " + prompt


def test_completions_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model="dev-echo", prompt="stream this prompt")
    chunks = list(
        client.completions.create(
            model="dev-echo",
            prompt="stream this prompt",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.id for c in chunks} == {full.id}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and full.usage is not None
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


# ---------------------------------------------------------------------------------- tools


def test_tool_call_round_trip(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris today?"}]
    resp = client.chat.completions.create(
        model="dev-tools", messages=messages, tools=[WEATHER_TOOL, TIME_TOOL]
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    # the same request streamed: same id, name and arguments, in vLLM's delta shape
    chunks = list(
        client.chat.completions.create(
            model="dev-tools", messages=messages, tools=[WEATHER_TOOL, TIME_TOOL], stream=True
        )
    )
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id == call.id and deltas[0].type == "function"
    assert deltas[0].function is not None and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    args = "".join((d.function.arguments or "") if d.function else "" for d in deltas)
    assert len(deltas) > 2
    assert args == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # feed the tool's answer back
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    resp = client.chat.completions.create(
        model="dev-tools", messages=messages, tools=[WEATHER_TOOL, TIME_TOOL]
    )
    assert resp.choices[0].message.content == "Tool said: sunny, 21 C"
    assert resp.choices[0].finish_reason == "stop"


def test_tool_choice(client: openai.OpenAI) -> None:
    msgs: list[Any] = [{"role": "user", "content": "hello"}]
    # no trigger word: plain answer
    resp = client.chat.completions.create(model="dev-tools", messages=msgs, tools=[WEATHER_TOOL])
    assert resp.choices[0].message.content == "Echo: hello"
    # "required" calls the first tool
    resp = client.chat.completions.create(
        model="dev-tools", messages=msgs, tools=[WEATHER_TOOL], tool_choice="required"
    )
    assert resp.choices[0].finish_reason == "tool_calls"
    (call,) = resp.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    # a named function is called, with finish_reason "stop" as vLLM does for named calls
    resp = client.chat.completions.create(
        model="dev-tools",
        messages=[{"role": "user", "content": "time in Tokyo"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    (call,) = resp.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_time"
    assert json.loads(call.function.arguments) == {"zone": "Tokyo"}
    assert resp.choices[0].finish_reason == "stop"
    # "none" never calls
    resp = client.chat.completions.create(
        model="dev-tools",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
    )
    assert resp.choices[0].message.content == "Echo: weather?"


# ------------------------------------------------------------------------------- reasoning


def test_reasoning_content(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="dev-reason", messages=[{"role": "user", "content": "why is the sky blue"}]
    )
    msg = resp.choices[0].message
    assert msg.content == "Echo: why is the sky blue"
    assert msg.model_extra is not None
    assert msg.model_extra["reasoning_content"] == "Thinking about: why is the sky blue"
    assert resp.usage is not None and resp.usage.completion_tokens == 7 + 6

    chunks = list(
        client.chat.completions.create(
            model="dev-reason",
            messages=[{"role": "user", "content": "why is the sky blue"}],
            stream=True,
        )
    )
    kinds = []
    reasoning = content = ""
    for c in chunks[1:]:
        extra = c.choices[0].delta.model_extra or {}
        if "reasoning_content" in extra:
            kinds.append("r")
            reasoning += extra["reasoning_content"]
        if c.choices[0].delta.content:
            kinds.append("c")
            content += c.choices[0].delta.content
    assert kinds == sorted(kinds, reverse=True)  # all reasoning deltas come first
    assert reasoning == "Thinking about: why is the sky blue"
    assert content == msg.content


def test_reasoning_by_request_field(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model="dev-echo", messages=[{"role": "user", "content": "q"}]
    )
    assert (plain.choices[0].message.model_extra or {}).get("reasoning_content") is None
    for extra in ({"reasoning": True}, {"reasoning_effort": "low"}):
        resp = client.chat.completions.create(
            model="dev-echo", messages=[{"role": "user", "content": "q"}], extra_body=extra
        )
        assert (resp.choices[0].message.model_extra or {})["reasoning_content"] == (
            "Thinking about: q"
        )


# ---------------------------------------------------------------------------------- errors


def test_bad_request_errors(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="dev-echo", messages=[])
    assert exc.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="dev-echo", messages=[{"role": "user", "content": "x"}], n=2
        )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="dev-echo", prompt="x", max_tokens=0)

    for path, body in [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b"[1, 2]"),
        ("/v1/chat/completions", b'{"model": "dev-echo"}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}'),
        ("/v1/completions", b'{"model": "dev-echo"}'),
        ("/v1/completions", b'{"prompt": "x"}'),
    ]:
        r = http.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, body)
        err = r.json()
        assert set(err) == {"object", "message", "type", "param", "code"}
        assert (err["object"], err["type"], err["param"], err["code"]) == (
            "error",
            "BadRequestError",
            None,
            400,
        )


def test_not_found_error(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    assert exc.value.status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    r = http.post(
        "/v1/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.json() == {
        "object": "error",
        "message": "The model `no-such-model` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }


def test_error_500_trigger(client: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(
                model="dev-echo",
                messages=[{"role": "user", "content": "__error_500__"}],
                stream=stream,
            )
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="dev-echo", prompt="__error_500__")


# ------------------------------------------------------------------------- cancellation


def _wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_disconnect_cancels_stream() -> None:
    app = create_app()
    with run_app(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        stats = app.state.stats
        chunks = list(
            client.chat.completions.create(
                model="dev-echo", messages=[{"role": "user", "content": "ok"}], stream=True
            )
        )
        assert chunks
        assert stats["streams_completed"] == 1

        t0 = time.monotonic()
        stream = client.chat.completions.create(
            model="dev-echo", messages=[{"role": "user", "content": "__slow__"}], stream=True
        )
        it = iter(stream)
        first = next(it)
        assert first.choices[0].delta.role == "assistant"
        second = next(it)
        assert second.choices[0].delta.content == "Echo:"
        assert stats["streams_in_flight"] == 1
        stream.close()  # drop the connection mid-generation

        _wait_for(lambda: stats["streams_cancelled"] == 1)
        assert time.monotonic() - t0 < 5  # far less than the ~10 s the full answer takes
        remote = httpx.get(url + "/dev/stats").json()
        assert remote["streams_started"] == 2
        assert remote["streams_completed"] == 1
        assert remote["streams_cancelled"] == 1
        assert remote["streams_in_flight"] == 0
        client.close()


def test_delay_and_fast_shutdown_with_open_stream() -> None:
    app = create_app(delay=0.05)
    t0 = time.monotonic()
    with run_app(app) as url:
        with httpx.Client(base_url=url, timeout=10) as c:
            t1 = time.monotonic()
            r = c.post(
                "/v1/completions",
                json={"model": "dev-echo", "prompt": "a b c d", "max_tokens": 10},
            )
            assert r.json()["choices"][0]["text"] == "Echo: a b c d"
            assert time.monotonic() - t1 >= 0.2  # 5 words x 0.05 s
        # leave a slow stream open while the server stops
        client = httpx.Client(base_url=url, timeout=10)
        req = client.build_request(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "dev-echo",
                "messages": [{"role": "user", "content": "__slow__"}],
                "stream": True,
            },
        )
        resp = client.send(req, stream=True)
        assert resp.status_code == 200
    assert time.monotonic() - t0 < 8
    resp.close()
    client.close()
