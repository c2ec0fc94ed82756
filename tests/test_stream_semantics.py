"""Streams as the OpenAI API gives them (issue 12): streamed calls reuse their connection.

The SDK stops reading at the inner ``data: [DONE]``; the relay's last bytes (v1: the outer
usage and ``[DONE]``; v2: anything after END) used to arrive after that, so the response was
closed unfinished and every streamed call opened a new TCP connection. The transport now reads
the relay's answer to its end before handing over the final events. Counted here at the relay:
the client port of every ``/e2e/invoke`` (one port = one connection), through the openai SDK
on the httpx2 transports (v1 and v2, sync and async) and through ``pqe2ee proxy``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import pytest

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


@pytest.mark.parametrize("prefer_v2", [False, True], ids=["v1", "v2"])
def test_streamed_calls_reuse_one_connection(stack: Stack, prefer_v2: bool) -> None:
    transport = tx_httpx2.E2EETransport(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, prefer_v2=prefer_v2
    )
    sdk = openai.OpenAI(
        base_url=stack.relay + "/v1",
        api_key=KEY,
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )
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
