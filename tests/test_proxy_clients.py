"""What real agent clients send, through ``pqe2ee proxy`` (issue 12): Claude Code's
mid-conversation system messages and ``HEAD /``, Codex's namespace and hosted tools and its
WebSocket probe, ``--model-map``, ``--upstream``; and the dev-engine's scripted tool loop.

The translations are checked as pure functions; the proxy through a real relay, instance and
dev-engine on loopback, with the official SDKs or raw HTTP where the SDK hides the JSON. The
CLIs themselves: tests/test_real_clis.py.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from click.testing import CliRunner

from pqe2ee.cli import cli
from pqe2ee.errors import LocalProtocolError
from pqe2ee.proxy.app import ProxyConfig, create_app
from pqe2ee.proxy.app.routes import responses_translation
from pqe2ee.proxy.translate.anthropic import messages_to_chat
from pqe2ee.proxy.translate.errors import TranslationError
from pqe2ee.proxy.translate.streams import ResponsesStreamTranslator
from pqe2ee.proxy.translate.tool_names import prepare_responses
from pqe2ee.testing import dev_engine
from servers import run_app, serve_chain

KEY = "pk-proxy-clients-0a1b2c3d"


def fn(name: str, **props: Any) -> dict[str, Any]:
    return {
        "type": "function",
        "name": name,
        "description": f"the {name} tool",
        "parameters": {"type": "object", "properties": props or {"city": {"type": "string"}}},
    }


NAMESPACE = {
    "type": "namespace",
    "name": "agents",
    "description": "sub-agents",
    "tools": [fn("get_weather"), fn("close_agent")],
}


# -- Anthropic: role "system" inside messages --------------------------------------------------


def chat_of(messages: list[Any]) -> list[dict[str, Any]]:
    req = {"model": "m", "max_tokens": 10, "system": "S", "messages": messages}
    return list(messages_to_chat(req)["messages"])


def test_system_message_after_the_user_turn_joins_it_as_a_reminder() -> None:
    out = chat_of([{"role": "user", "content": "hi"}, {"role": "system", "content": "ctx"}])
    assert out == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi\n<system-reminder>\nctx\n</system-reminder>"},
    ]


def test_leading_system_message_joins_the_system_prompt() -> None:
    blocks = [{"type": "text", "text": "more"}]
    out = chat_of([{"role": "system", "content": blocks}, {"role": "user", "content": "hi"}])
    assert out == [{"role": "system", "content": "S\n\nmore"}, {"role": "user", "content": "hi"}]


def test_system_message_after_a_tool_call_waits_for_the_tool_results() -> None:
    call = {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}
    out = chat_of(
        [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [call]},
            {"role": "system", "content": "<system-reminder>r</system-reminder>"},
            {"role": "user", "content": [result]},
        ]
    )
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool", "user"]
    assert out[3] == {"role": "tool", "tool_call_id": "t1", "content": "sunny"}
    assert out[4]["content"] == "<system-reminder>r</system-reminder>"  # not wrapped twice


def test_trailing_system_message_after_an_assistant_turn_becomes_a_user_turn() -> None:
    out = chat_of(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "system", "content": "c"},
        ]
    )
    assert out[-1] == {"role": "user", "content": "<system-reminder>\nc\n</system-reminder>"}


# -- Responses: namespaces and hosted tools (pure) ---------------------------------------------


def test_namespace_tools_are_flattened_and_clashes_prefixed() -> None:
    req = {"model": "m", "input": "x", "tools": [fn("get_weather"), NAMESPACE]}
    prepared = prepare_responses(req)
    names = [t["name"] for t in prepared.req["tools"]]
    assert names == ["get_weather", "agents__get_weather", "close_agent"]
    assert prepared.names.by_flat == {
        "agents__get_weather": ("agents", "get_weather"),
        "close_agent": ("agents", "close_agent"),
    }
    item = {"type": "function_call", "name": "close_agent", "call_id": "c", "arguments": "{}"}
    assert prepared.names.restore_item(item) == {**item, "namespace": "agents"}
    top = {**item, "name": "get_weather"}
    assert prepared.names.restore_item(top) == top  # a top-level tool gets no namespace


def test_namespaced_history_and_tool_choice_use_the_flat_names() -> None:
    call = {
        "type": "function_call",
        "namespace": "agents",
        "name": "get_weather",
        "call_id": "c1",
        "arguments": "{}",
    }
    req = {
        "model": "m",
        "input": [call, {"type": "function_call_output", "call_id": "c1", "output": "ok"}],
        "tools": [fn("get_weather"), NAMESPACE],
        "tool_choice": {"type": "function", "namespace": "agents", "name": "get_weather"},
    }
    prepared = prepare_responses(req)
    assert prepared.req["input"][0]["name"] == "agents__get_weather"
    assert prepared.req["tool_choice"] == {"type": "function", "name": "agents__get_weather"}


def test_hosted_tools_dropped_or_refused() -> None:
    req = {
        "model": "m",
        "input": "x",
        "tools": [{"type": "web_search", "external_web_access": False}, fn("f")],
        "tool_choice": {"type": "web_search"},
    }
    prepared = prepare_responses(req, "drop")
    assert prepared.dropped == ("web_search",)
    assert [t["type"] for t in prepared.req["tools"]] == ["function"]
    assert prepared.req["tool_choice"] == "auto"
    with pytest.raises(TranslationError) as info:
        prepare_responses(req, "refuse")
    assert info.value.status == 400 and info.value.param == "tools[0].type"


def test_namespace_holding_a_non_function_is_400() -> None:
    bad = {**NAMESPACE, "tools": [{"type": "web_search"}]}
    with pytest.raises(TranslationError) as info:
        prepare_responses({"model": "m", "input": "x", "tools": [bad]})
    assert info.value.status == 400


def test_config_checks_the_new_settings() -> None:
    with pytest.raises(LocalProtocolError):
        ProxyConfig(hosted_tools="maybe")
    with pytest.raises(LocalProtocolError):
        ProxyConfig(model_map=(("claude-*", ""),))
    config = ProxyConfig(model_map=(("claude-*", "a"), ("*", "b")))
    assert config.map_model("claude-x") == "a" and config.map_model("gpt") == "b"


# -- through the proxy -------------------------------------------------------------------------


@dataclass
class Stack:
    proxy: str  # drops hosted tools, maps claude-* to dev-echo
    refusing: str  # --hosted-tools refuse


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with serve_chain(1, api_keys=(KEY,), rate_limit=10_000, nonces_per_instance=100) as chain:

        def proxy(**kw: Any) -> str:
            config = ProxyConfig(api_base=chain.relay, models_base=chain.relay, **kw)
            return chain.exits.enter_context(run_app(create_app(config)))

        yield Stack(
            proxy=proxy(model_map=(("claude-*", "dev-echo"),)),
            refusing=proxy(hosted_tools="refuse"),
        )


def responses_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "dev-tools",
        "input": "weather in Oslo?",
        "tools": [NAMESPACE, {"type": "web_search"}],
        **extra,
    }


def post(url: str, body: dict[str, Any]) -> httpx2.Response:
    return httpx2.post(url, json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=30)


def test_namespaced_function_call_comes_back_with_its_namespace(stack: Stack) -> None:
    r = post(stack.proxy + "/v1/responses", responses_body())
    assert r.status_code == 200, r.text
    calls = [i for i in r.json()["output"] if i["type"] == "function_call"]
    assert len(calls) == 1
    assert calls[0]["name"] == "get_weather" and calls[0]["namespace"] == "agents"
    assert json.loads(calls[0]["arguments"]) == {"city": "Oslo"}


def test_namespaced_function_call_streamed(stack: Stack) -> None:
    r = post(stack.proxy + "/v1/responses", responses_body(stream=True))
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [(i["name"], i.get("namespace")) for i in done if i["type"] == "function_call"] == [
        ("get_weather", "agents")
    ]
    final = events[-1]["response"]["output"]
    assert [i.get("namespace") for i in final if i["type"] == "function_call"] == ["agents"]


def test_only_namespaced_streams_are_translated_through_the_name_restorer() -> None:
    """Without namespaced tools a Responses stream is translated by the plain translator (no
    restoring wrapper, and no call, per event); with them, events get their namespaces back."""
    translation = responses_translation("drop")
    plain = translation.translator({"model": "m", "input": "x", "stream": True})
    assert type(plain) is ResponsesStreamTranslator
    namespaced = translation.translator(responses_body(stream=True))
    assert type(namespaced) is not ResponsesStreamTranslator
    flat = prepare_responses(responses_body(), "drop").names.flat("agents", "get_weather")
    call = {"index": 0, "id": "c1", "function": {"name": flat, "arguments": "{}"}}
    chunk = {
        "id": "x",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}],
    }
    end = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
    events = namespaced.feed(chunk) + namespaced.feed(end) + namespaced.finish()
    done = [d for _, d in events if d["type"] == "response.output_item.done"]
    assert [(d["item"]["name"], d["item"]["namespace"]) for d in done] == [
        ("get_weather", "agents")
    ]


def test_hosted_tool_refused_when_configured(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.refusing + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="dev-echo", input="x", tools=[{"type": "web_search"}])
    body: Any = info.value.body
    assert body["code"] == "unsupported_tool" and "web_search" in body["message"]


def test_model_map_serves_claude_ids_and_echoes_them(stack: Stack) -> None:
    client = anthropic.Anthropic(base_url=stack.proxy, api_key=KEY, max_retries=0)
    reply = client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=50,
        messages=[{"role": "user", "content": "hi"}],
    )
    assert reply.model == "claude-sonnet-4-5"  # the caller's name, served by dev-echo
    assert reply.content[0].type == "text" and reply.content[0].text == "Echo: hi"
    oai = openai.OpenAI(base_url=stack.proxy + "/v1", api_key=KEY, max_retries=0)
    chat = oai.chat.completions.create(
        model="claude-x", messages=[{"role": "user", "content": "yo"}]
    )
    assert chat.choices[0].message.content == "Echo: yo"
    with pytest.raises(anthropic.NotFoundError):  # unmapped and unknown: still a 404
        client.messages.create(
            model="gpt-nothing", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )


def test_thinking_blocks_round_trip(stack: Stack) -> None:
    # Claude Code sends the thinking blocks it got (empty signature) back in the history.
    client = anthropic.Anthropic(base_url=stack.proxy, api_key=KEY, max_retries=0)
    first = client.messages.create(
        model="dev-reason",
        max_tokens=200,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "plan it"}],
    )
    assert [b.type for b in first.content] == ["thinking", "text"]
    history: list[Any] = [
        {"role": "user", "content": "plan it"},
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": "go on"},
    ]
    second = client.messages.create(
        model="dev-reason",
        max_tokens=200,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=history,
    )
    assert second.content[-1].type == "text" and second.content[-1].text == "Echo: go on"


def test_reasoning_items_round_trip(stack: Stack) -> None:
    # Codex sends the reasoning items it got back in its next input (store=false).
    oai = openai.OpenAI(base_url=stack.proxy + "/v1", api_key=KEY, max_retries=0)
    first = oai.responses.create(model="dev-reason", input="think", store=False)
    assert [o.type for o in first.output] == ["reasoning", "message"]
    again = [o.model_dump(exclude_none=True) for o in first.output]
    second = oai.responses.create(
        model="dev-reason",
        input=[{"role": "user", "content": "think"}, *again, {"role": "user", "content": "more"}],
        store=False,
    )
    assert second.output_text == "Echo: more"


def test_head_root_and_websocket_probe(stack: Stack) -> None:
    assert httpx2.head(stack.proxy + "/", timeout=10).status_code == 200
    r = httpx2.get(stack.proxy + "/v1/responses", timeout=10)
    assert r.status_code == 426 and r.json()["error"]["code"] == "websocket_not_supported"


def test_websocket_upgrade_is_refused_at_once(stack: Stack) -> None:
    # What Codex sends first: an upgrade of GET /v1/responses. One 426, so it falls back to
    # HTTP streaming at once (405 made it retry five times, ~7 s).
    host, port = stack.proxy.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        head = sock.recv(65536).split(b"\r\n", 1)[0]
    assert head == b"HTTP/1.1 426 Upgrade Required"


# -- the dev-engine's scripted tool loop -------------------------------------------------------


def engine_chat(url: str, messages: list[Any], tools: list[Any]) -> dict[str, Any]:
    body = {"model": "dev-echo", "messages": messages, "tools": tools}
    r = httpx2.post(url + "/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json()["choices"][0])


def test_dev_engine_scripted_tool_loop() -> None:
    tools = [{"type": "function", "function": {"name": "Read", "parameters": {}}}]
    ask = 'context\n__tool__ Read {"file_path": "/x", "n": 2}\nmore'
    with run_app(dev_engine.create_app()) as url:
        first = engine_chat(url, [{"role": "user", "content": ask}], tools)
        call = first["message"]["tool_calls"][0]
        assert first["finish_reason"] == "tool_calls"
        assert call["function"] == {"name": "Read", "arguments": '{"file_path": "/x", "n": 2}'}
        history = [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "file body"},
            {"role": "user", "content": "<system-reminder>r</system-reminder>"},
        ]
        second = engine_chat(url, history, tools)
        assert second["message"]["content"] == "Tool said: file body"
        other = engine_chat(url, [{"role": "user", "content": ask}], [])  # no such tool
        assert other["message"]["content"].startswith("Echo: context")


def test_dev_engine_max_model_len() -> None:
    body = {
        "model": "dev-echo",
        "max_tokens": 32768,
        "messages": [{"role": "user", "content": "x"}],
    }
    with (
        run_app(dev_engine.create_app()) as small,
        run_app(dev_engine.create_app(max_model_len=1_000_000)) as big,
    ):
        assert httpx2.post(small + "/v1/chat/completions", json=body, timeout=10).status_code == 400
        assert httpx2.post(big + "/v1/chat/completions", json=body, timeout=10).status_code == 200


# -- pqe2ee proxy --upstream / --model-map -----------------------------------------------------


def proxy_config(monkeypatch: pytest.MonkeyPatch, *args: str) -> ProxyConfig:
    seen: list[ProxyConfig] = []
    import pqe2ee.proxy.app

    monkeypatch.setattr(pqe2ee.proxy.app, "serve", lambda config, **kw: seen.append(config))
    result = CliRunner().invoke(cli, ["proxy", *args], env={})
    assert result.exit_code == 0, result.output
    return seen[0]


def test_cli_one_upstream_for_both(monkeypatch: pytest.MonkeyPatch) -> None:
    config = proxy_config(monkeypatch, "--upstream", "http://127.0.0.1:9/")
    assert config.api_base == config.models_base == "http://127.0.0.1:9"
    config = proxy_config(monkeypatch, "--api-base", "http://relay:1")
    assert config.models_base == "http://relay:1"  # not llm.chutes.ai behind a local relay
    config = proxy_config(monkeypatch)
    assert (config.api_base, config.models_base) == (
        "https://api.chutes.ai",
        "https://llm.chutes.ai",
    )


def test_cli_model_map_and_hosted_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    config = proxy_config(
        monkeypatch, "--model-map", "claude-*=m1", "--model-map", "*=m2", "--hosted-tools", "refuse"
    )
    assert config.model_map == (("claude-*", "m1"), ("*", "m2"))
    assert config.hosted_tools == "refuse"
    result = CliRunner().invoke(cli, ["proxy", "--model-map", "nonsense"])
    assert result.exit_code == 2 and "PATTERN=MODEL" in result.output
