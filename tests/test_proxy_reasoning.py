"""Reasoning round trips through ``pqe2ee proxy`` (issue 12 follow-up).

The engine's reasoning (vLLM 0.10's ``reasoning_content`` or vLLM >= 0.11's ``reasoning``)
reaches Anthropic clients as ``thinking`` blocks and Responses clients as ``reasoning`` items,
streamed and not; sent back in the history, it reaches the engine again on the assistant message
it belongs to. The dev-engine's ``__recall__`` line makes it say which earlier reasoning it got.
Real relay, instance and dev-engine on loopback; the official SDKs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from pqe2ee.proxy.app import ProxyConfig, create_app
from pqe2ee.proxy.translate.anthropic import messages_to_chat
from pqe2ee.proxy.translate.responses import responses_to_chat
from servers import run_app, serve_chain

KEY = "pk-proxy-reasoning-5e6f7a8b"
THINK = {"type": "enabled", "budget_tokens": 1024}


@pytest.fixture(scope="module", params=["reasoning_content", "reasoning"])
def proxy(request: pytest.FixtureRequest) -> Iterator[str]:
    engine_kw = {"reasoning_field": request.param}
    with serve_chain(1, api_keys=(KEY,), rate_limit=10_000, engine_kw=engine_kw) as chain:
        config = ProxyConfig(api_base=chain.relay, models_base=chain.relay)
        yield chain.exits.enter_context(run_app(create_app(config)))


def claude(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0)


def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_blocks_out_and_back(proxy: str, stream: bool) -> None:
    client = claude(proxy)
    ask: dict[str, Any] = {
        "model": "dev-reason",
        "max_tokens": 200,
        "thinking": THINK,
        "messages": [{"role": "user", "content": "plan it"}],
    }
    if stream:
        with client.messages.stream(**ask) as s:
            first = s.get_final_message()
    else:
        first = client.messages.create(**ask)
    assert [b.type for b in first.content] == ["thinking", "text"]
    block = first.content[0]
    assert block.type == "thinking" and block.thinking == "Thinking about: plan it"
    back = [b.model_dump() for b in first.content]
    again = client.messages.create(
        **{
            **ask,
            "messages": [
                *ask["messages"],
                {"role": "assistant", "content": back},
                {"role": "user", "content": "__recall__"},
            ],
        }
    )
    assert again.content[-1].type == "text"
    assert again.content[-1].text == "Recalled: Thinking about: plan it"


def test_no_thinking_requested_none_returned_and_nothing_to_recall(proxy: str) -> None:
    client = claude(proxy)
    first = client.messages.create(
        model="dev-reason", max_tokens=200, messages=[{"role": "user", "content": "plan it"}]
    )
    assert [b.type for b in first.content] == ["text"]
    again = client.messages.create(
        model="dev-echo",
        max_tokens=200,
        messages=[
            {"role": "user", "content": "plan it"},
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": "__recall__"},
        ],
    )
    assert again.content[0].type == "text" and again.content[0].text == "Recalled: nothing"


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_items_out_and_back(proxy: str, stream: bool) -> None:
    client = oai(proxy)
    if stream:
        with client.responses.stream(model="dev-reason", input="think", store=False) as s:
            first = s.get_final_response()
    else:
        first = client.responses.create(model="dev-reason", input="think", store=False)
    assert [o.type for o in first.output] == ["reasoning", "message"]
    item = first.output[0]
    assert item.type == "reasoning" and item.content is not None
    assert [c.text for c in item.content] == ["Thinking about: think"]
    back = [o.model_dump(exclude_none=True) for o in first.output]
    again = client.responses.create(
        model="dev-echo",
        input=[
            {"role": "user", "content": "think"},
            *back,
            {"role": "user", "content": "__recall__"},
        ],
        store=False,
    )
    assert again.output_text == "Recalled: Thinking about: think"


def test_reasoning_before_a_tool_call_reaches_the_engine(proxy: str) -> None:
    # Codex's loop: reasoning, function_call, function_call_output, then the next turn.
    client = oai(proxy)
    history: list[Any] = [
        {"role": "user", "content": "weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        {
            "type": "reasoning",
            "id": "rs_2",
            "summary": [{"type": "summary_text", "text": "call the tool"}],
        },
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
        {"role": "user", "content": "__recall__"},
    ]
    again = client.responses.create(model="dev-echo", input=history, store=False)
    assert again.output_text == "Recalled: call the tool"


# -- the translations, as pure functions -------------------------------------------------------


def test_anthropic_history_what_is_carried_and_what_is_not() -> None:
    chat = messages_to_chat(
        {
            "model": "m",
            "max_tokens": 10,
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "first", "signature": ""},
                        {"type": "redacted_thinking", "data": "EncryptedByAnthropic"},
                        {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
                        {"type": "thinking", "thinking": "second", "signature": "x"},
                        {"type": "text", "text": "done"},
                    ],
                },
                {"role": "user", "content": "next"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "alone"}]},
                {"role": "user", "content": "last"},
            ],
        }
    )
    assistants = [m for m in chat["messages"] if m["role"] == "assistant"]
    assert len(assistants) == 1  # the thinking-only turn is dropped, and its thinking with it
    assert assistants[0]["reasoning"] == assistants[0]["reasoning_content"] == "first\nsecond"
    assert "EncryptedByAnthropic" not in str(chat)


def test_responses_history_what_is_carried_and_what_is_not() -> None:
    chat = responses_to_chat(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": "q"},
                {
                    "type": "reasoning",
                    "summary": [{"type": "summary_text", "text": "short"}],
                    "content": [{"type": "reasoning_text", "text": "raw"}],
                },
                {"role": "assistant", "content": "a"},
                {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"},
                {"type": "reasoning", "summary": [{"type": "summary_text", "text": "orphan"}]},
                {"role": "user", "content": "b"},
            ],
        }
    )
    assert chat["messages"] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning": "raw", "reasoning_content": "raw"},
        {"role": "user", "content": "b"},
    ]


def test_a_malformed_reasoning_item_is_a_400() -> None:
    from pqe2ee.proxy.translate.errors import TranslationError

    with pytest.raises(TranslationError) as info:
        responses_to_chat({"model": "m", "input": [{"type": "reasoning", "summary": "x"}]})
    assert "input[0].summary" in str(info.value)


# -- the dev-engine's side ---------------------------------------------------------------------


def test_dev_engine_reasoning_field_and_recall() -> None:
    import httpx2

    from pqe2ee.testing import dev_engine

    with pytest.raises(ValueError, match="reasoning_field"):
        dev_engine.create_app(reasoning_field="thoughts")
    with run_app(dev_engine.create_app(reasoning_field="reasoning")) as url:

        def ask(messages: list[Any], **kw: Any) -> httpx2.Response:
            body = {"model": "dev-reason", "messages": messages, **kw}
            return httpx2.post(url + "/v1/chat/completions", json=body, timeout=10)

        reply = ask([{"role": "user", "content": "hmm"}]).json()
        message = reply["choices"][0]["message"]
        assert message["reasoning"] == "Thinking about: hmm" and "reasoning_content" not in message
        streamed = ask([{"role": "user", "content": "hmm"}], stream=True).text
        assert '"reasoning":"Thinking' in streamed and "reasoning_content" not in streamed
        history = [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "reasoning_content": "old name"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d", "reasoning": "new name"},
            {"role": "user", "content": "__recall__"},
        ]
        recalled = ask(history).json()
        assert recalled["choices"][0]["message"]["content"] == "Recalled: old name | new name"
        assert recalled["usage"]["prompt_tokens"] == 9  # 5 message words + 4 reasoning words
        bad = ask([{"role": "assistant", "content": "x", "reasoning": 1}, history[-1]])
        assert bad.status_code == 400 and "messages[0].reasoning" in bad.json()["message"]


def test_dev_engine_cli_takes_the_reasoning_field() -> None:
    from click.testing import CliRunner

    from pqe2ee.cli import cli

    result = CliRunner().invoke(cli, ["dev-engine", "--help"])
    assert result.exit_code == 0 and "--reasoning-field" in result.output
    result = CliRunner().invoke(cli, ["dev-engine", "--reasoning-field", "thoughts"])
    assert result.exit_code == 2 and "thoughts" in result.output
