"""Streams as the OpenAI API gives them (issue 12): streamed calls reuse their connection.

The SDK stops reading at the inner ``data: [DONE]``; the relay's last bytes (v1: the outer
usage and ``[DONE]``; v2: anything after END) used to arrive after that, so the response was
closed unfinished and every streamed call opened a new TCP connection. The transport now reads
the relay's answer to its end before handing over the final events. Counted here at the relay:
the client port of every ``/e2e/invoke`` (one port = one connection), through the openai SDK
on the httpx2 transports (v1 and v2, sync and async) and through ``pqe2ee proxy``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import openai
import pytest

import relay_support
from pqe2ee.proxy.app import ProxyConfig, create_app
from pqe2ee.transports import httpx2 as tx_httpx2
from servers import run_app, serve_chain

KEY = "pk-stream-semantics-9f8e7d"


@dataclass
class Ports:
    """The client port of each ``/e2e/invoke`` the relay received."""

    seen: list[int] = field(default_factory=list)

    def wrap(self, app: Any) -> Any:
        async def counted(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"] == "/e2e/invoke":
                self.seen.append(scope["client"][1])
            await app(scope, receive, send)

        return counted


@dataclass
class Stack:
    relay: str
    proxy: str
    ports: Ports


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    ports = Ports()
    with serve_chain(
        1, api_keys=(KEY,), rate_limit=10_000, nonces_per_instance=100, wrap_relay=ports.wrap
    ) as chain:
        config = ProxyConfig(api_base=chain.relay, models_base=chain.relay)
        proxy = chain.exits.enter_context(run_app(create_app(config)))
        yield Stack(chain.relay, proxy, ports)


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def streamed_text(stream: Any) -> str:
    return "".join((c.choices[0].delta.content or "") for c in stream if c.choices)


def sdk_on(relay: str, prefer_v2: bool) -> openai.OpenAI:
    """The openai SDK on our blocking httpx2 transport to ``relay``."""
    sdk: openai.OpenAI = relay_support.sdk_on(relay, prefer_v2, KEY)
    return sdk


@pytest.mark.parametrize("prefer_v2", [False, True], ids=["v1", "v2"])
def test_streamed_calls_reuse_one_connection(stack: Stack, prefer_v2: bool) -> None:
    sdk = sdk_on(stack.relay, prefer_v2)
    stack.ports.seen.clear()
    with sdk:
        for i in range(4):
            stream = sdk.chat.completions.create(
                model="dev-echo", messages=user(f"call {i}"), stream=True
            )
            assert streamed_text(stream) == f"Echo: call {i}"
        reply = sdk.chat.completions.create(model="dev-echo", messages=user("plain"))
        assert reply.choices[0].message.content == "Echo: plain"
    assert len(stack.ports.seen) == 5
    assert len(set(stack.ports.seen)) == 1, stack.ports.seen


@pytest.mark.anyio
async def test_async_streamed_calls_reuse_one_connection(stack: Stack) -> None:
    transport = tx_httpx2.AsyncE2EETransport(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay
    )
    stack.ports.seen.clear()
    async with openai.AsyncOpenAI(
        base_url=stack.relay + "/v1",
        api_key=KEY,
        http_client=httpx2.AsyncClient(transport=transport),
        max_retries=0,
    ) as sdk:
        for i in range(3):
            stream = await sdk.chat.completions.create(
                model="dev-echo", messages=user(f"a{i}"), stream=True
            )
            text = "".join([(c.choices[0].delta.content or "") async for c in stream if c.choices])
            assert text == f"Echo: a{i}"
    assert len(stack.ports.seen) == 3 and len(set(stack.ports.seen)) == 1, stack.ports.seen


@pytest.mark.parametrize("prefer_v2", [False, True], ids=["v1", "v2"])
def test_a_stream_read_out_frees_its_connection_before_it_is_closed(
    stack: Stack, prefer_v2: bool
) -> None:
    """The stream reads the relay's bytes itself (no port generator that closed the answer
    when it ran out): once the last events are handed over the connection is back in the
    pool, though the caller holds the stream open - the next call, made before closing it,
    goes over the same connection."""
    transport = tx_httpx2.E2EETransport(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, prefer_v2=prefer_v2
    )
    body = {"model": "dev-echo", "messages": user("held"), "stream": True}
    stack.ports.seen.clear()
    with httpx2.Client(transport=transport) as http:
        with http.stream("POST", stack.relay + "/v1/chat/completions", json=body) as first:
            got = b""
            chunks = first.iter_raw()  # (held: not closed by the loop's end)
            for chunk in chunks:
                got += chunk
                if b"data: [DONE]" in got:
                    break  # (the stream is neither read past its end nor closed yet)
            second = http.post(stack.relay + "/v1/chat/completions", json={**body, "stream": False})
            assert second.status_code == 200
    assert len(stack.ports.seen) == 2 and len(set(stack.ports.seen)) == 1, stack.ports.seen


def test_proxy_streams_reuse_its_relay_connection(stack: Stack) -> None:
    sdk = openai.OpenAI(base_url=stack.proxy + "/v1", api_key=KEY, max_retries=0)
    stack.ports.seen.clear()
    with sdk:
        for i in range(3):
            stream = sdk.chat.completions.create(
                model="dev-echo", messages=user(f"p{i}"), stream=True
            )
            assert streamed_text(stream) == f"Echo: p{i}"
    assert len(stack.ports.seen) == 3 and len(set(stack.ports.seen)) == 1, stack.ports.seen


# -- usage as the OpenAI API gives it ------------------------------------------------------------


def stream_chunks(stack: Stack, prefer_v2: bool, options: dict[str, Any] | None) -> list[Any]:
    transport = tx_httpx2.E2EETransport(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, prefer_v2=prefer_v2
    )
    body: dict[str, Any] = {"model": "dev-echo", "messages": user("a b c"), "stream": True}
    if options is not None:
        body["stream_options"] = options
    with httpx2.Client(transport=transport) as http:
        r = http.post(stack.relay + "/v1/chat/completions", json=body)
    assert r.status_code == 200
    lines = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("prefer_v2", [False, True], ids=["v1", "v2"])
def test_usage_as_the_caller_asked(stack: Stack, prefer_v2: bool) -> None:
    # The instance (like the Chutes runtime) forces usage into the engine's stream; the
    # caller sees exactly what it asked for.
    none = stream_chunks(stack, prefer_v2, None)
    assert all(c.get("usage") is None for c in none) and all(c["choices"] for c in none)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in none) == "Echo: a b c"

    final = stream_chunks(stack, prefer_v2, {"include_usage": True})
    with_usage = [c for c in final if c.get("usage") is not None]
    assert with_usage == [final[-1]] and final[-1]["choices"] == []
    assert final[-1]["usage"]["completion_tokens"] == 4

    every = stream_chunks(stack, prefer_v2, {"include_usage": True, "continuous_usage_stats": True})
    assert all(c.get("usage") is not None for c in every)  # asked for: passed unchanged


@pytest.mark.parametrize("prefer_v2", [False, True], ids=["v1", "v2"])
def test_usage_removed_on_the_async_transport(stack: Stack, prefer_v2: bool) -> None:
    # The same bytes read through the async transport (its own copy of the stream code).
    transport = tx_httpx2.AsyncE2EETransport(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, prefer_v2=prefer_v2
    )
    body = {"model": "dev-echo", "messages": user("a b c"), "stream": True}

    async def read() -> bytes:
        async with httpx2.AsyncClient(transport=transport) as http:
            r = await http.post(stack.relay + "/v1/chat/completions", json=body)
            assert r.status_code == 200
            return r.content

    raw = anyio.run(read)
    lines = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]" and lines[:-1]
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all("usage" not in c and c["choices"] for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Echo: a b c"


def test_usage_filter_rewrites_only_what_it_must() -> None:
    from pqe2ee.protocol._events import Done, InnerEvent
    from pqe2ee.protocol.sse import SSEParser
    from pqe2ee.transports._usage import UsageFilter

    raw = (
        b'data: {"choices":[{"delta":{"content":"x"}}],"usage":{"total_tokens":3}}\n\n'
        b'data: {"choices":[{"delta":{"content":"y"}}]}\n\n'
        b'data: {"choices":[],"usage":{"total_tokens":4}}\n\n'
    )
    events: list[Any] = [InnerEvent(e) for e in SSEParser(max_event=1 << 16).feed(raw)]
    batch = [*events, Done(raw=b"data: [DONE]\n\n")]
    assert UsageFilter.for_request(b'{"stream": false}') is None
    assert (
        UsageFilter.for_request(
            b'{"stream": true, "stream_options": {"include_usage": true,'
            b' "continuous_usage_stats": true}}'
        )
        is None
    )
    none = UsageFilter.for_request(b'{"stream": true}')
    assert none is not None
    # The body already decoded by the caller is what is looked at (not parsed again).
    assert UsageFilter.for_request(b"", {"stream": True}) == none
    assert UsageFilter.for_request(b'{"stream": true}', {"stream": False}) is None
    out = none.apply(batch)
    assert [e.raw for e in out] == [
        b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n',
        events[1].raw,  # untouched: byte for byte
        b"data: [DONE]\n\n",
    ]
    final = UsageFilter.for_request(b'{"stream": true, "stream_options": {"include_usage": true}}')
    assert final is not None
    assert [e.raw for e in final.apply(batch)][1:] == [
        events[1].raw,
        events[2].raw,
        b"data: [DONE]\n\n",
    ]
    # A rewritten event keeps its type (and its bytes say so); the event id is not carried.
    typed = SSEParser(max_event=1 << 16).feed(
        b'event: chunk\nid: 7\ndata: {"choices":[{"delta":{}}],"usage":{"total_tokens":5}}\n\n'
    )
    (kept,) = none.apply([InnerEvent(typed[0])])
    assert isinstance(kept, InnerEvent)
    assert kept.raw == b'event: chunk\ndata: {"choices":[{"delta":{}}]}\n\n' == kept.event.raw
    assert (kept.event.event, kept.event.id, kept.data) == (
        "chunk",
        None,
        '{"choices":[{"delta":{}}]}',
    )


def _joined(app: Any) -> Any:
    """The relay's ``/e2e/invoke`` answers sent as one body message: the instance's init (v2:
    init and HEAD) arrives in the same read as the whole answer and its end - as a network
    may join them."""

    async def joined(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/e2e/invoke":
            await app(scope, receive, send)
            return
        start: Any = None
        parts: list[bytes] = []

        async def hold(message: Any) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await send(start)
                    await send({"type": "http.response.body", "body": b"".join(parts)})
            else:
                await send(message)

        await app(scope, receive, hold)

    return joined


@pytest.fixture(scope="module")
def joined_stack() -> Iterator[Stack]:
    ports = Ports()
    with serve_chain(
        1,
        api_keys=(KEY,),
        rate_limit=10_000,
        nonces_per_instance=100,
        wrap_relay=lambda app: ports.wrap(_joined(app)),
    ) as chain:
        yield Stack(chain.relay, "", ports)


@pytest.mark.parametrize("prefer_v2", [False, True], ids=["v1", "v2"])
def test_a_stream_read_in_one_piece_reuses_its_connection(
    joined_stack: Stack, prefer_v2: bool
) -> None:
    """The answer's end in the read that brought the stream's start (v2: the events read on
    the way to HEAD) is held like any later read's: the SDK stops at [DONE] with the response
    read out, and the next call goes over the same connection."""
    stack = joined_stack
    sdk = sdk_on(stack.relay, prefer_v2)
    stack.ports.seen.clear()
    with sdk:
        for i in range(3):
            stream = sdk.chat.completions.create(
                model="dev-echo", messages=user(f"joined {i}"), stream=True
            )
            assert streamed_text(stream) == f"Echo: joined {i}"
    assert len(stack.ports.seen) == 3
    assert len(set(stack.ports.seen)) == 1, stack.ports.seen
