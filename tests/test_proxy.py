"""``pqe2ee proxy`` end to end: the official openai and anthropic SDKs, pointed only at the proxy,
through a real pqe2ee relay and instance to the dev engine, all on loopback.

    SDK -> proxy -> (E2EE) -> FaultInjector -> relay -> instance -> dev-engine

The :class:`FaultInjector` in front of the relay passes everything through until a test arms it;
then it cuts the next ``/e2e/invoke`` answer after a number of bytes, either with a clean HTTP end
(``truncate``) or by dropping the connection (``abort``).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from click.testing import CliRunner

from pqe2ee.cli import cli
from pqe2ee.proxy.app import ProxyConfig, ProxyServer, create_app, server_config
from pqe2ee.proxy.app.pool import ClientPool as _ClientPool
from servers import run_app, serve_chain

KEY = "pk-proxy-test-5f0c1d2e3a4b"
OTHER_KEY = "pk-proxy-other-99aa88bb77"
THIRD_KEY = "pk-proxy-third-5566ccdd44"
LONG_TEXT = " ".join(f"w{i}" for i in range(300))
LONG_ANSWER = "Echo: " + LONG_TEXT

# A 1x1 transparent PNG.
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)

WEATHER_FN = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


# --------------------------------------------------------------------------------------------
# the stack


class FaultInjector:
    """ASGI wrapper in front of the relay: cuts the next invoke answer once armed."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.armed: tuple[str, int] | None = None
        self.fired = 0

    def arm(self, mode: str, cut_at: int) -> None:
        assert mode in ("truncate", "abort")
        self.armed = (mode, cut_at)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        armed = self.armed
        if scope["type"] != "http" or scope["path"] != "/e2e/invoke" or armed is None:
            await self.app(scope, receive, send)
            return
        self.armed = None
        mode, cut_at = armed
        sent = 0
        cut = False

        async def cutting_send(message: dict[str, Any]) -> None:
            nonlocal sent, cut
            if cut:
                if mode == "abort":
                    raise OSError("fault injected: connection dropped")
                return  # truncate: swallow the rest
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if sent + len(body) >= cut_at:
                    cut = True
                    self.fired += 1
                    keep = body[: cut_at - sent]
                    if mode == "truncate":
                        await send({"type": "http.response.body", "body": keep, "more_body": False})
                        return
                    await send({"type": "http.response.body", "body": keep, "more_body": True})
                    raise OSError("fault injected: connection dropped")
                sent += len(body)
            await send(message)

        await self.app(scope, receive, cutting_send)


@dataclass
class Stack:
    engine: str
    relay: str
    proxy: str  # callers must bring their own key
    proxy_keyed: str  # started with --api-key KEY
    proxy_small: str  # max_body = 64 KiB
    faults: FaultInjector

    def stats(self) -> dict[str, int]:
        return dict(httpx2.get(self.engine + "/dev/stats", timeout=10).json())


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with serve_chain(
        1,
        api_keys=(KEY, OTHER_KEY, THIRD_KEY),
        wrap_relay=FaultInjector,
        rate_limit=10_000,
        nonces_per_instance=100,
    ) as chain:

        def proxy(**kw: Any) -> str:
            config = ProxyConfig(api_base=chain.relay, models_base=chain.relay, **kw)
            return chain.exits.enter_context(run_app(create_app(config)))

        yield Stack(
            engine=chain.engine,
            relay=chain.relay,
            proxy=proxy(),
            proxy_keyed=proxy(api_key=KEY),
            proxy_small=proxy(max_body=64 * 1024),
            faults=chain.relay_app,
        )


@pytest.fixture(scope="module")
def oai(stack: Stack) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=stack.proxy + "/v1", api_key=KEY, max_retries=0, timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def ant(stack: Stack) -> Iterator[anthropic.Anthropic]:
    client = anthropic.Anthropic(base_url=stack.proxy, api_key=KEY, max_retries=0, timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=stack.proxy, timeout=30) as client:
        yield client


JSON_CT = {"content-type": "application/json"}  # the proxy refuses other bodies (issue 16)


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def wait_for(predicate: Callable[[], bool], what: str, limit: float = 15.0) -> None:
    """Poll until ``predicate`` holds (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def sse_frames(raw: bytes) -> list[tuple[str | None, str]]:
    """(event, data) of each SSE event in ``raw`` (test-side reading of the proxy's output)."""
    out: list[tuple[str | None, str]] = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        out.append((event, "\n".join(data)))
    return out


# --------------------------------------------------------------------------------------------
# OpenAI Chat Completions and Completions: passthrough


def test_chat_non_stream(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model="dev-echo", messages=user("hello proxy"))
    assert reply.choices[0].message.content == "Echo: hello proxy"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_chat_stream(oai: openai.OpenAI) -> None:
    text, finish = [], None
    with oai.chat.completions.create(
        model="dev-echo", messages=user("stream me please"), stream=True
    ) as stream:
        for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
    assert "".join(text) == "Echo: stream me please"
    assert finish == "stop"


def test_chat_stream_is_engine_sse_unchanged(http: httpx2.Client) -> None:
    body = {"model": "dev-echo", "messages": user("raw bytes"), "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"x-api-key": KEY}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    frames = sse_frames(raw)
    chunks = [json.loads(d) for _, d in frames if d != "[DONE]"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Echo: raw bytes"


def test_chat_tool_call_passthrough(oai: openai.OpenAI) -> None:
    tool: Any = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": WEATHER_FN["parameters"]},
    }
    reply = oai.chat.completions.create(
        model="dev-tools", messages=user("What is the weather in Paris?"), tools=[tool]
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]


def test_completions_non_stream_and_stream(oai: openai.OpenAI) -> None:
    reply = oai.completions.create(model="dev-echo", prompt="legacy prompt")
    assert reply.choices[0].text == "Echo: legacy prompt"
    parts = [
        c.choices[0].text
        for c in oai.completions.create(model="dev-echo", prompt="legacy stream", stream=True)
        if c.choices
    ]
    assert "".join(parts) == "Echo: legacy stream"


def test_models_listing_is_plaintext_passthrough(stack: Stack, oai: openai.OpenAI) -> None:
    ids = {m.id for m in oai.models.list()}
    assert {"dev-echo", "dev-tools", "dev-reason"} <= ids
    # The listing is public: it works without a key, too.
    r = httpx2.get(stack.proxy + "/v1/models", timeout=10)
    assert r.status_code == 200
    assert {m["id"] for m in r.json()["data"]} == ids


def test_configured_key_is_used_when_the_caller_has_none(stack: Stack) -> None:
    body = {"model": "dev-echo", "messages": user("no key here")}
    r = httpx2.post(stack.proxy_keyed + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Echo: no key here"


def test_engine_error_keeps_status_and_body(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        oai.chat.completions.create(model="dev-echo", messages=user("__error_500__"))
    assert info.value.status_code == 500
    assert "Simulated engine failure" in str(info.value.body)


def test_engine_error_in_translated_dialects(oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        oai.responses.create(model="dev-echo", input="__error_500__")
    assert info.value.status_code == 500
    assert "Simulated engine failure" in info.value.message
    with pytest.raises(anthropic.InternalServerError) as ainfo:
        ant.messages.create(model="dev-echo", max_tokens=5, messages=user("__error_500__"))
    assert ainfo.value.status_code == 500
    err = assert_anthropic_error(ainfo.value.body, "api_error")
    assert "Simulated engine failure" in err["message"]
    # Streamed calls fail the same way, before any event: a status error, not a broken stream.
    with pytest.raises(anthropic.InternalServerError):
        with ant.messages.stream(
            model="dev-echo", max_tokens=5, messages=user("__error_500__")
        ) as stream:
            stream.get_final_message()


# --------------------------------------------------------------------------------------------
# OpenAI Responses


def test_responses_non_stream(oai: openai.OpenAI) -> None:
    resp = oai.responses.create(model="dev-echo", input="hello responses", instructions="Be brief.")
    assert resp.status == "completed"
    assert resp.output_text == "Echo: hello responses"
    assert resp.model == "dev-echo"
    assert resp.usage is not None and resp.usage.output_tokens == 3


def test_responses_stream(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model="dev-echo", input="stream responses", stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "Echo: stream responses"
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_stream_helper_final_response(oai: openai.OpenAI) -> None:
    with oai.responses.stream(model="dev-echo", input="helper stream") as stream:
        final = stream.get_final_response()
    assert final.output_text == "Echo: helper stream"


def test_responses_function_tool_round_trip(oai: openai.OpenAI) -> None:
    first = oai.responses.create(
        model="dev-tools", input="What is the weather in Paris?", tools=[WEATHER_FN]
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    second = oai.responses.create(
        model="dev-tools",
        tools=[WEATHER_FN],
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"},
        ],
    )
    assert second.output_text == "Tool said: sunny, 21C"


def test_responses_function_call_streamed(oai: openai.OpenAI) -> None:
    with oai.responses.stream(
        model="dev-tools", input="What is the weather in Oslo?", tools=[WEATHER_FN]
    ) as stream:
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Oslo"}]


def test_responses_reasoning(oai: openai.OpenAI) -> None:
    resp = oai.responses.create(model="dev-reason", input="think it over")
    kinds = [item.type for item in resp.output]
    assert kinds == ["reasoning", "message"]
    assert resp.output_text == "Echo: think it over"


def test_responses_hosted_tool_is_dropped_by_default(oai: openai.OpenAI) -> None:
    # (--hosted-tools refuse: tests/test_proxy_clients.py)
    reply = oai.responses.create(model="dev-echo", input="x", tools=[{"type": "web_search"}])
    assert reply.output_text == "Echo: x"


# --------------------------------------------------------------------------------------------
# Anthropic Messages


def test_messages_non_stream(ant: anthropic.Anthropic) -> None:
    msg = ant.messages.create(model="dev-echo", max_tokens=64, messages=user("hello claude"))
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.model == "dev-echo"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "Echo: hello claude"  # type: ignore[union-attr]
    assert msg.stop_reason == "end_turn"
    assert msg.usage.output_tokens == 3


def test_messages_stream(ant: anthropic.Anthropic) -> None:
    with ant.messages.stream(
        model="dev-echo", max_tokens=64, messages=user("stream claude now")
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Echo: stream claude now"
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"


def test_messages_system_prompt(ant: anthropic.Anthropic) -> None:
    plain = ant.messages.create(model="dev-echo", max_tokens=64, messages=user("with system"))
    with_system = ant.messages.create(
        model="dev-echo",
        max_tokens=64,
        system=[{"type": "text", "text": "You are a terse assistant for tests."}],
        messages=user("with system"),
    )
    assert with_system.content[0].text == "Echo: with system"  # type: ignore[union-attr]
    # The system prompt reached the engine: it counts every message's words.
    assert with_system.usage.input_tokens == plain.usage.input_tokens + 7


def test_messages_tool_use_round_trip(ant: anthropic.Anthropic) -> None:
    first = ant.messages.create(
        model="dev-tools",
        max_tokens=64,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        messages=user("What is the weather in Lisbon?"),
    )
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert len(uses) == 1
    use = uses[0]
    assert use.name == "get_weather" and use.input == {"city": "Lisbon"}
    second = ant.messages.create(
        model="dev-tools",
        max_tokens=64,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": "What is the weather in Lisbon?"},
            {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": "rainy, 14C"}
                ],
            },
        ],
    )
    assert second.content[0].text == "Tool said: rainy, 14C"  # type: ignore[union-attr]


def test_messages_tool_use_streamed(ant: anthropic.Anthropic) -> None:
    with ant.messages.stream(
        model="dev-tools",
        max_tokens=64,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        messages=user("How is the weather in Rome?"),
    ) as stream:
        final = stream.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert [u.input for u in uses] == [{"city": "Rome"}]
    assert final.stop_reason == "tool_use"


def test_messages_image_block_accepted(ant: anthropic.Anthropic) -> None:
    msg = ant.messages.create(
        model="dev-echo",
        max_tokens=64,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64},
                    },
                    {"type": "text", "text": "describe this"},
                ],
            }
        ],
    )
    assert msg.content[0].text == "Echo: describe this"  # type: ignore[union-attr]
    assert base64.b64decode(PNG_B64)  # the block really carried an image


def test_count_tokens_estimate(ant: anthropic.Anthropic) -> None:
    short = ant.messages.count_tokens(model="dev-echo", messages=user("hi"))
    longer = ant.messages.count_tokens(model="dev-echo", messages=user("hi " * 400))
    assert 1 <= short.input_tokens < longer.input_tokens


def test_anthropic_bearer_auth_token(stack: Stack) -> None:
    client = anthropic.Anthropic(base_url=stack.proxy, auth_token=KEY, max_retries=0, timeout=30)
    with client:
        msg = client.messages.create(model="dev-echo", max_tokens=16, messages=user("bearer"))
    assert msg.content[0].text == "Echo: bearer"  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------
# errors in each dialect's shape

OPENAI_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/responses"]
ANTHROPIC_PATHS = ["/v1/messages", "/v1/messages/count_tokens"]


def assert_openai_error(body: Any, type_: str) -> dict[str, Any]:
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_ and isinstance(err["message"], str) and err["message"]
    return dict(err)


def assert_anthropic_error(body: Any, type_: str) -> dict[str, Any]:
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == type_ and body["error"]["message"]
    return dict(body["error"])


@pytest.mark.parametrize("path", OPENAI_PATHS)
def test_malformed_json_openai_shape(http: httpx2.Client, path: str) -> None:
    r = http.post(
        path,
        content=b'{"model": "dev-echo", ',
        headers={"authorization": f"Bearer {KEY}", **JSON_CT},
    )
    assert r.status_code == 400
    assert_openai_error(r.json(), "invalid_request_error")


@pytest.mark.parametrize("path", ANTHROPIC_PATHS)
def test_malformed_json_anthropic_shape(http: httpx2.Client, path: str) -> None:
    r = http.post(path, content=b"[1, 2", headers={"x-api-key": KEY, **JSON_CT})
    assert r.status_code == 400
    assert_anthropic_error(r.json(), "invalid_request_error")


def test_non_object_json_is_400(http: httpx2.Client) -> None:
    r = http.post("/v1/chat/completions", content=b"[]", headers={"x-api-key": KEY, **JSON_CT})
    assert r.status_code == 400
    assert_openai_error(r.json(), "invalid_request_error")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": user("no model")}),
        ("/v1/chat/completions", {"model": "", "messages": user("empty model")}),
        ("/v1/completions", {"model": 7, "prompt": "not a string"}),
        ("/v1/responses", {"input": "no model"}),
    ],
)
def test_model_call_without_model_is_refused(
    stack: Stack, http: httpx2.Client, path: str, body: dict[str, Any]
) -> None:
    # Without a model the transport could not route the call; it must never go in plaintext.
    before = stack.stats()["requests"]
    r = http.post(path, json=body, headers={"x-api-key": KEY})
    assert r.status_code == 400
    err = assert_openai_error(r.json(), "invalid_request_error")
    assert err["param"] == "model" or err["code"] == "missing_model"
    assert stack.stats()["requests"] == before


@pytest.mark.parametrize("path", OPENAI_PATHS + ANTHROPIC_PATHS)
def test_missing_key_is_401_in_dialect_shape(http: httpx2.Client, path: str) -> None:
    r = http.post(path, json={"model": "dev-echo", "messages": user("x"), "max_tokens": 5})
    assert r.status_code == 401
    if path.startswith("/v1/messages"):
        assert_anthropic_error(r.json(), "authentication_error")
    else:
        assert_openai_error(r.json(), "authentication_error")


def test_wrong_key_is_401(stack: Stack) -> None:
    client = openai.OpenAI(
        base_url=stack.proxy + "/v1", api_key="pk-wrong-key-000", max_retries=0, timeout=30
    )
    with client, pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="dev-echo", messages=user("x"))


def test_unknown_model_is_404(oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="no-such-model", messages=user("x"))
    err = assert_openai_error({"error": info.value.body}, "invalid_request_error")
    assert err["code"] == "model_not_found" and "model_not_found" in err["message"]
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="no-such-model", input="x")
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-model", messages=user("x"), stream=True)
    with pytest.raises(anthropic.NotFoundError) as ainfo:
        ant.messages.create(model="no-such-model", max_tokens=5, messages=user("x"))
    assert_anthropic_error(ainfo.value.body, "not_found_error")
    assert "model_not_found" in ainfo.value.message


def test_oversize_body_is_413(stack: Stack) -> None:
    big = "x" * (80 * 1024)
    client = openai.OpenAI(
        base_url=stack.proxy_small + "/v1", api_key=KEY, max_retries=0, timeout=30
    )
    with client, pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="dev-echo", messages=user(big))
    assert info.value.status_code == 413
    assert_openai_error({"error": info.value.body}, "invalid_request_error")
    aclient = anthropic.Anthropic(base_url=stack.proxy_small, api_key=KEY, max_retries=0)
    with aclient, pytest.raises(anthropic.APIStatusError) as ainfo:
        aclient.messages.create(model="dev-echo", max_tokens=5, messages=user(big))
    assert ainfo.value.status_code == 413
    assert_anthropic_error(ainfo.value.body, "invalid_request_error")
    # Just under the limit still goes through.
    ok = httpx2.post(
        stack.proxy_small + "/v1/chat/completions",
        json={"model": "dev-echo", "messages": user("y" * (60 * 1024))},
        headers={"x-api-key": KEY},
        timeout=30,
    )
    assert ok.status_code == 200


def test_oversize_without_content_length_is_413(stack: Stack) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "dev-echo", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"z" * 8192
        yield b'"}]}'

    r = httpx2.post(
        stack.proxy_small + "/v1/messages",
        content=chunks(),
        headers={"x-api-key": KEY, **JSON_CT},
        timeout=30,
    )
    assert r.status_code == 413
    assert_anthropic_error(r.json(), "invalid_request_error")


def test_unknown_route_is_404_in_shape(http: httpx2.Client) -> None:
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404
    assert_openai_error(r.json(), "not_found_error")
    r = http.get("/v1/messages")
    assert r.status_code == 405
    assert r.json()["type"] == "error"


# --------------------------------------------------------------------------------------------
# a stream that breaks mid-way never ends cleanly

CUT_AT = 6000  # past the init event and a few records, well before the end


@pytest.mark.parametrize("mode", ["truncate", "abort"])
def test_chat_stream_fault_ends_with_error_event(
    stack: Stack, http: httpx2.Client, mode: str
) -> None:
    stack.faults.arm(mode, CUT_AT)
    fired = stack.faults.fired
    body = {"model": "dev-echo", "messages": user(LONG_TEXT), "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"x-api-key": KEY}) as r:
        assert r.status_code == 200
        raw = r.read()
    assert stack.faults.fired == fired + 1
    frames = sse_frames(raw)
    assert all(d != "[DONE]" for _, d in frames)
    last = json.loads(frames[-1][1])
    err = assert_openai_error(last, "server_error")
    # A cut mid-record is reported by the transport as malformed/truncated; a dropped
    # connection as connection_lost. Either way a typed pqe2ee code, and no [DONE].
    assert err["code"] in ("stream_truncated", "malformed_event", "connection_lost")
    assert err["message"].startswith(err["code"] + ": ")
    text = "".join(
        json.loads(d)["choices"][0]["delta"].get("content", "")
        for _, d in frames[:-1]
        if json.loads(d)["choices"]
    )
    assert 0 < len(text) < len(LONG_ANSWER) and LONG_ANSWER.startswith(text)


@pytest.mark.parametrize("mode", ["truncate", "abort"])
def test_chat_stream_fault_sdk_raises(stack: Stack, oai: openai.OpenAI, mode: str) -> None:
    stack.faults.arm(mode, CUT_AT)
    text: list[str] = []
    with pytest.raises(openai.APIError):
        for chunk in oai.chat.completions.create(
            model="dev-echo", messages=user(LONG_TEXT), stream=True
        ):
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
    assert 0 < len("".join(text)) < len(LONG_ANSWER)


@pytest.mark.parametrize("mode", ["truncate", "abort"])
def test_responses_stream_fault_fails(stack: Stack, oai: openai.OpenAI, mode: str) -> None:
    stack.faults.arm(mode, CUT_AT)
    events = list(oai.responses.create(model="dev-echo", input=LONG_TEXT, stream=True))
    types = [e.type for e in events]
    assert types[-2:] == ["error", "response.failed"]
    assert "response.completed" not in types and "response.incomplete" not in types
    assert any(t == "response.output_text.delta" for t in types)
    stack.faults.arm(mode, CUT_AT)
    with (
        pytest.raises(RuntimeError, match=r"response\.completed"),
        oai.responses.stream(model="dev-echo", input=LONG_TEXT) as stream,
    ):
        stream.get_final_response()


@pytest.mark.parametrize("mode", ["truncate", "abort"])
def test_messages_stream_fault_sdk_raises(
    stack: Stack, ant: anthropic.Anthropic, mode: str
) -> None:
    stack.faults.arm(mode, CUT_AT)
    seen: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        ant.messages.stream(model="dev-echo", max_tokens=4096, messages=user(LONG_TEXT)) as stream,
    ):
        for event in stream:
            seen.append(event.type)
    assert "message_stop" not in seen
    assert "content_block_delta" in seen
    # The HTTP status was already 200; the error event carries the failure.
    err = assert_anthropic_error(info.value.body, "api_error")
    assert err["message"].split(":")[0] in (
        "stream_truncated",
        "malformed_event",
        "connection_lost",
    )


def test_messages_stream_fault_raw_events(stack: Stack, http: httpx2.Client) -> None:
    stack.faults.arm("truncate", CUT_AT)
    body = {"model": "dev-echo", "max_tokens": 4096, "messages": user(LONG_TEXT), "stream": True}
    with http.stream("POST", "/v1/messages", json=body, headers={"x-api-key": KEY}) as r:
        raw = r.read()
    frames = sse_frames(raw)
    names = [e for e, _ in frames]
    assert names[0] == "message_start" and names[-1] == "error"
    assert "message_stop" not in names
    assert_anthropic_error(json.loads(frames[-1][1]), "api_error")


def test_non_stream_fault_is_502(stack: Stack, oai: openai.OpenAI) -> None:
    stack.faults.arm("truncate", 100)
    with pytest.raises(openai.InternalServerError) as info:
        oai.chat.completions.create(model="dev-echo", messages=user("cut me"))
    assert info.value.status_code == 502
    stack.faults.arm("abort", 100)
    with pytest.raises(openai.InternalServerError) as info:
        oai.responses.create(model="dev-echo", input="cut me too")
    assert info.value.status_code == 502


# --------------------------------------------------------------------------------------------
# a client that hangs up cancels the upstream generation


def test_disconnect_cancels_upstream_chat(stack: Stack, oai: openai.OpenAI) -> None:
    before = stack.stats()["streams_cancelled"]
    stream = oai.chat.completions.create(model="dev-echo", messages=user("__slow__"), stream=True)
    first = next(iter(stream))
    assert first.object == "chat.completion.chunk"
    stream.close()
    wait_for(lambda: stack.stats()["streams_cancelled"] > before, "the engine to see the cancel")
    assert stack.stats()["streams_in_flight"] == 0

    def metric(name: str) -> float:
        text = httpx2.get(stack.proxy + "/metrics", timeout=10).text
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    wait_for(lambda: metric("pqe2ee_proxy_open_streams") == 0, "the stream to be released")
    assert metric('pqe2ee_proxy_client_disconnects_total{route="chat"}') >= 1


def test_disconnect_cancels_upstream_messages(stack: Stack, ant: anthropic.Anthropic) -> None:
    before = stack.stats()["streams_cancelled"]
    with ant.messages.stream(model="dev-echo", max_tokens=4096, messages=user("__slow__")) as s:
        for event in s:
            if event.type == "content_block_delta":
                break
    wait_for(lambda: stack.stats()["streams_cancelled"] > before, "the engine to see the cancel")


# --------------------------------------------------------------------------------------------
# shutting down with streams open: each ends with its dialect's error event, no traceback


@contextlib.contextmanager
def serve_proxy(config: ProxyConfig) -> Iterator[tuple[str, ProxyServer, threading.Thread]]:
    """The proxy under its own server class (as ``pqe2ee proxy`` runs it), in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    app = create_app(config)
    uv = server_config(app, config, log_level="warning", http="h11", loop="asyncio")
    server = ProxyServer(uv, grace=config.shutdown_grace)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the proxy to start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def test_shutdown_ends_open_streams_with_error_events(stack: Stack) -> None:
    config = ProxyConfig(api_base=stack.relay, models_base=stack.relay, shutdown_grace=0.2)
    with capture_all_logs() as logs, serve_proxy(config) as (url, server, thread):
        oai = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        ant = anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=30)
        with oai, ant:
            chat = iter(
                oai.chat.completions.create(
                    model="dev-echo", messages=user("__slow__"), stream=True
                )
            )
            next(chat)
            with ant.messages.stream(
                model="dev-echo", max_tokens=4096, messages=user("__slow__")
            ) as messages:
                events = iter(messages)
                next(events)
                server.should_exit = True
                with pytest.raises(anthropic.APIStatusError, match="shutting down"):
                    for _ in events:
                        pass
            with pytest.raises(openai.APIError, match="shutting down"):
                for _ in chat:
                    pass
        thread.join(15)
        assert not thread.is_alive()
    assert not [t for t in logs.texts if "Exception in ASGI application" in t]
    assert any("ending 2 open stream(s) for shutdown" in t for t in logs.texts)


# --------------------------------------------------------------------------------------------
# the per-key transports share one set of response-key pools


def _key_pools_of(app: Any) -> list[Any]:
    """The key pools every live per-key transport of the proxy ``app`` takes keys from."""
    pools = []
    for entry in app.state.pool._entries.values():
        engine = entry.client._transport._engine
        pools += [p for p in (engine.keys, engine.keys_v2) if p is not None]
    return pools


def test_per_key_transports_share_key_pools_and_stop_their_fillers(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pqe2ee.transports import _keypool

    # Every pool decides for a filler thread after its probes, whatever the backend's speed.
    monkeypatch.setattr(_keypool, "HANDOFF_COST", 0.0)
    config = ProxyConfig(api_base=stack.relay, models_base=stack.relay)
    with serve_proxy(config) as (url, server, thread):
        app = server.config.app
        for key in (KEY, OTHER_KEY, THIRD_KEY):
            with openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client:
                for i in range(_keypool.PROBES + 2):
                    client.chat.completions.create(model="dev-echo", messages=user(f"k{i}"))
        pools = _key_pools_of(app)
        assert len(app.state.pool) == 3 and len(pools) >= 3
        running = {id(p): type(p).__name__ for p in pools if p.running}  # a filler each
        per_type = sorted(collections.Counter(running.values()).values())
        assert per_type and per_type[-1] == 1, running  # at most one filler per key type
        shared = {id(p) for p in (app.state.key_pools.v1, app.state.key_pools.v2) if p}
        assert {id(p) for p in pools} <= shared  # every key's transport uses the same pools
    assert not thread.is_alive()
    assert not [p for p in pools if p.running]  # closed: transports first, then the pools
    assert all(p.closed for p in pools)


# --------------------------------------------------------------------------------------------
# logs, metrics, health


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.texts.append(f"{record.name}: {text}")


@contextlib.contextmanager
def capture_all_logs() -> Iterator[_Capture]:
    handler = _Capture()
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    saved = [(lg, lg.level, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg, level, disabled in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.disabled = disabled


def test_log_canary(stack: Stack, oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    canary = "Canary7f3aQ9 zebra-sapphire-cantaloupe"
    with capture_all_logs() as logs:
        oai.chat.completions.create(model="dev-echo", messages=user(canary))
        list(oai.chat.completions.create(model="dev-echo", messages=user(canary), stream=True))
        oai.completions.create(model="dev-echo", prompt=canary)
        oai.responses.create(model="dev-echo", input=canary)
        list(oai.responses.create(model="dev-echo", input=canary, stream=True))
        ant.messages.create(model="dev-echo", max_tokens=64, messages=user(canary))
        with ant.messages.stream(model="dev-echo", max_tokens=64, messages=user(canary)) as s:
            s.get_final_message()
        ant.messages.count_tokens(model="dev-echo", messages=user(canary))
        stack.faults.arm("abort", 3000)
        with contextlib.suppress(openai.APIError):
            list(oai.chat.completions.create(model="dev-echo", messages=user(canary), stream=True))
        with contextlib.suppress(openai.APIError):
            oai.chat.completions.create(model="dev-echo", messages=user("__error_500__ " + canary))
    proxy_lines = [t for t in logs.texts if t.startswith("pqe2ee.proxy:")]
    assert len(proxy_lines) >= 10  # the capture really saw the proxy's access lines
    # Everything but the test's own SDK clients, which log their request options at DEBUG
    # in this process: the proxy, transport, relay, instance, engine, uvicorn, httpx2, httpcore.
    server_side = [t for t in logs.texts if not t.startswith(("openai.", "anthropic."))]
    assert len(server_side) > len(proxy_lines)
    for text in server_side:
        assert "Canary7f3aQ9" not in text and "cantaloupe" not in text, text
        assert KEY not in text, text


def test_metrics_and_health(stack: Stack, oai: openai.OpenAI) -> None:
    access = re.compile(
        r"pqe2ee\.proxy: (\S+) (.+) (\d+) in=\d+B out=\d+B first=[\d.]+ms total=[\d.]+ms$"
    )
    with capture_all_logs() as logs:
        oai.chat.completions.create(model="dev-echo", messages=user("count me"))
        httpx2.get(stack.proxy + "/nowhere/secret-path", timeout=10)

        def logged(*line: str) -> bool:  # the line is written once the exchange has ended
            return line in [m.groups() for t in logs.texts if (m := access.match(t))]

        wait_for(lambda: logged("POST", "/v1/chat/completions", "200"), "the chat access line")
        wait_for(lambda: logged("GET", "(other path)", "404"), "the 404 access line")
    r = httpx2.get(stack.proxy + "/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    text = httpx2.get(stack.proxy + "/metrics", timeout=10).text
    assert 'pqe2ee_proxy_requests_total{route="chat",status="200"}' in text
    assert "pqe2ee_proxy_duration_seconds_bucket" in text
    assert re.search(r"^pqe2ee_proxy_pooled_keys [1-9]", text, re.MULTILINE)
    assert "count me" not in text and KEY not in text


# --------------------------------------------------------------------------------------------
# the per-key transport pool


class _FakeClient:
    def __init__(self, key: str | None) -> None:
        self.key = key
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


def _pool(
    max_size: int = 2, ttl: float = 100.0
) -> tuple[_ClientPool, list[_FakeClient], list[float]]:
    made: list[_FakeClient] = []
    now = [0.0]

    def factory(key: str | None) -> Any:
        made.append(_FakeClient(key))
        return made[-1]

    return _ClientPool(factory, max_size=max_size, idle_ttl=ttl, clock=lambda: now[0]), made, now


@pytest.mark.anyio
async def test_pool_reuses_per_key_and_evicts_lru() -> None:
    pool, made, _ = _pool(max_size=2)
    a = await pool.acquire("a")
    await pool.release(a)
    assert (await pool.acquire("a")) is a
    await pool.release(a)
    b = await pool.acquire("b")
    await pool.release(b)
    c = await pool.acquire("c")  # evicts "a", the least recently used
    await pool.release(c)
    assert len(pool) == 2
    assert [f.closed for f in made] == [True, False, False]
    a2 = await pool.acquire("a")
    assert a2 is not a and len(made) == 4
    await pool.release(a2)
    await pool.aclose()
    assert all(f.closed for f in made)


@pytest.mark.anyio
async def test_pool_keeps_busy_entries_open_until_released() -> None:
    pool, made, _ = _pool(max_size=1)
    a = await pool.acquire("a")  # in use (a long stream)
    b = await pool.acquire("b")  # evicts "a" from the pool, but it is still in use
    assert not made[0].closed
    await pool.release(a)
    assert made[0].closed
    await pool.release(b)
    assert not made[1].closed
    await pool.aclose()


@pytest.mark.anyio
async def test_pool_idle_ttl() -> None:
    pool, made, now = _pool(max_size=8, ttl=10.0)
    a = await pool.acquire("a")
    await pool.release(a)
    busy = await pool.acquire("busy")
    now[0] = 11.0
    await pool.sweep()
    assert made[0].closed and not made[1].closed  # idle one closed, busy one kept
    assert len(pool) == 1
    await pool.release(busy)
    await pool.aclose()


# --------------------------------------------------------------------------------------------
# the plumbing on its own: bounded reads refuse (never truncate)


def _request(
    chunks: list[bytes], headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[Any, list[int]]:
    """A starlette Request whose body arrives in ``chunks``; ``reads[0]`` counts receive calls."""
    from starlette.requests import Request

    reads = [0]

    async def receive() -> dict[str, Any]:
        i = reads[0]
        reads[0] += 1
        if i < len(chunks):
            return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
    return Request({**scope, "headers": headers or []}, receive), reads


@pytest.mark.anyio
async def test_read_body_refuses_a_streamed_body_over_the_limit_as_soon_as_it_crosses() -> None:
    from pqe2ee.proxy.app._plumbing import read_body
    from pqe2ee.proxy.app.failures import Failure

    request, reads = _request([b"x" * 40] * 5)  # no Content-Length: 200 bytes in 5 pieces
    with pytest.raises(Failure) as info:
        await read_body(request, 100)
    assert (info.value.status, info.value.code) == (413, "oversize")
    assert reads[0] == 3  # stopped at the piece that crossed the limit, not at the end


@pytest.mark.anyio
async def test_read_body_refuses_a_declared_length_over_the_limit_before_reading() -> None:
    from pqe2ee.proxy.app._plumbing import read_body
    from pqe2ee.proxy.app.failures import Failure

    request, reads = _request([b"x" * 500], [(b"content-length", b"500")])
    with pytest.raises(Failure) as info:
        await read_body(request, 100)
    assert (info.value.status, info.value.code) == (413, "oversize")
    assert reads[0] == 0
    bad, _ = _request([b"{}"], [(b"content-length", b"two")])
    with pytest.raises(Failure) as info:
        await read_body(bad, 100)
    assert info.value.status == 400


@pytest.mark.anyio
async def test_read_body_at_the_limit_is_whole() -> None:
    from pqe2ee.proxy.app._plumbing import read_body

    request, _ = _request([b"a" * 60, b"b" * 40])
    assert await read_body(request, 100) == b"a" * 60 + b"b" * 40


@pytest.mark.anyio
async def test_read_upstream_refuses_over_the_limit_and_always_closes() -> None:
    from pqe2ee.proxy.app._plumbing import read_upstream
    from pqe2ee.proxy.app.failures import Failure

    def reply(pieces: list[bytes]) -> httpx2.Response:
        async def body() -> Any:
            for piece in pieces:
                yield piece

        return httpx2.Response(200, content=body())

    big = reply([b"x" * 60] * 3)
    with pytest.raises(Failure) as info:
        await read_upstream(big, 100)
    assert (info.value.status, info.value.code) == (502, "oversize")
    assert big.is_closed
    exact = reply([b"x" * 60, b"y" * 40])
    assert await read_upstream(exact, 100) == b"x" * 60 + b"y" * 40
    assert exact.is_closed


@pytest.mark.anyio
@pytest.mark.parametrize("length", [b"-1", b"1e3", b""])
async def test_read_body_answers_a_bad_content_length_with_400_before_reading(
    length: bytes,
) -> None:
    # The disconnect watch is the shared one (test_server_plumbing); the mapping is the proxy's.
    from pqe2ee.proxy.app._plumbing import read_body
    from pqe2ee.proxy.app.failures import Failure

    request, reads = _request([b"{}"], [(b"content-length", length)])
    with pytest.raises(Failure) as info:
        await read_body(request, 100)
    assert (info.value.status, info.value.message) == (400, "bad Content-Length header")
    assert reads[0] == 0


# --------------------------------------------------------------------------------------------
# the stream re-framing on its own: odd upstream streams never end cleanly

CHUNK = (
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"m","choices":'
    b'[{"index":0,"delta":{"role":"assistant","content":"hi"},"finish_reason":null}]}\n\n'
)
FINAL = (
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"m","choices":'
    b'[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
)
DONE = b"data: [DONE]\n\n"


async def _reframe(pieces: list[bytes], dialect: str) -> list[tuple[str | None, str]]:
    from pqe2ee.proxy.app.metrics import Metrics as _Metrics
    from pqe2ee.proxy.app.streaming import TranslatedBody as _TranslatedBody
    from pqe2ee.proxy.translate.streams import MessagesStreamTranslator, ResponsesStreamTranslator

    async def body() -> Any:
        for piece in pieces:
            yield piece

    resp = httpx2.Response(200, content=body())
    translator: Any
    if dialect == "responses":
        translator = ResponsesStreamTranslator({"model": "m", "input": "x", "stream": True})
    else:
        translator = MessagesStreamTranslator(
            {"model": "m", "max_tokens": 5, "messages": user("x"), "stream": True}
        )
    out = b""
    body = _TranslatedBody(resp, translator, max_event=1 << 16, metrics=_Metrics(), route="t")
    async for chunk in body.chunks():
        out += chunk
    return sse_frames(out)


END_OK = {"responses": "response.completed", "messages": "message_stop"}
END_FAILED = {"responses": "response.failed", "messages": "error"}


@pytest.mark.anyio
@pytest.mark.parametrize("dialect", ["responses", "messages"])
@pytest.mark.parametrize(
    ("pieces", "clean"),
    [
        ([CHUNK, FINAL, DONE], True),
        ([CHUNK + FINAL + DONE[:7], DONE[7:]], True),  # split anywhere
        ([CHUNK, FINAL, b"data: [DONE]\n"], True),  # end marker without its blank line
        ([CHUNK, FINAL], False),  # no [DONE]
        ([CHUNK, DONE], False),  # no finish_reason
        ([CHUNK, b"data: {not json}\n\n", FINAL, DONE], False),
        ([CHUNK, b"data: [1]\n\n", FINAL, DONE], False),
        ([CHUNK, FINAL, DONE, CHUNK], False),  # data after [DONE]
        ([CHUNK, FINAL, DONE, b"data: {"], False),  # a partial event after [DONE]
        ([CHUNK, b'data: {"error": {"message": "boom", "code": 503}}\n\n', FINAL, DONE], False),
        ([CHUNK, b"data: \xff\xfe\n\n", FINAL, DONE], False),  # not UTF-8
    ],
)
async def test_reframing_never_ends_cleanly_after_a_fault(
    dialect: str, pieces: list[bytes], clean: bool
) -> None:
    frames = await _reframe(pieces, dialect)
    names = [name for name, _ in frames]
    assert names[-1] == (END_OK if clean else END_FAILED)[dialect]
    assert (END_OK[dialect] in names) is clean
    assert names.count(END_OK[dialect]) + names.count(END_FAILED[dialect]) == 1


# --------------------------------------------------------------------------------------------
# the command line


def test_cli_help_explains_what_is_encrypted() -> None:
    result = CliRunner().invoke(cli, ["proxy", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for needle in (
        "--api-base",
        "--models-base",
        "--api-key",
        "PQE2EE_PROXY_API_KEY",
        "plaintext",
        "/v1/models",
        "relay",
        "x-api-key",
    ):
        assert needle in text, needle


def test_config_validation() -> None:
    from pqe2ee.errors import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        ProxyConfig(api_base="ftp://x")
    with pytest.raises(LocalProtocolError):
        ProxyConfig(max_body=0)
    assert "sk-secret" not in repr(ProxyConfig(api_key="sk-secret"))
