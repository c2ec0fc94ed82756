"""A request body goes sealed or nowhere: what cannot be sealed is refused, never sent in plaintext.

Every transport seals a ``POST`` to an E2EE path (``/v1/chat/completions``,
``/v1/completions``) whose body is a JSON object with a ``model``. A body for such a path that
cannot be sealed — not JSON the client decodes (invalid, NaN, bad UTF-8, nested deeper than the
128 levels every instance accepts), or no ``model`` — is refused with ``invalid_body``; a body
for any other path or method (the Responses API, embeddings, Anthropic Messages) with
``plaintext_refused``. Either may hold a prompt. Only requests without a body (the model
listing) go in plaintext to ``models_base``. (Before, all of these went in plaintext there.)

The server here is a real loopback server that records every request it gets; for the refused
cases it must record none.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import httpx2
import openai
import pytest

import pqe2ee
import pqe2ee.transports.httpx as tx_httpx
import pqe2ee.transports.httpx2 as tx_httpx2
from pqe2ee.errors import ErrorCode
from pqe2ee.protocol._codec import MAX_JSON_DEPTH
from pqe2ee.transports.aiohttp import E2EEClientSession
from pqe2ee.transports.anyio import E2EEClient
from servers import run_app

KEY = "pk-unsealable-0123456789"
CHAT = "/v1/chat/completions"
SECRET = "the secret prompt"


@dataclass
class Recorder:
    """An ASGI app that records each request (method, path, body) and answers 400."""

    seen: list[tuple[str, str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        with self.lock:
            self.seen.append((scope["method"], scope["path"], body))
        answer = json.dumps({"error": {"message": "recorded", "type": "invalid_request"}})
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer.encode()})


@pytest.fixture(scope="module")
def recorded() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    with run_app(recorder) as url:
        yield url, recorder


@pytest.fixture
def server(recorded: tuple[str, Recorder]) -> Iterator[tuple[str, Recorder]]:
    url, recorder = recorded
    recorder.seen.clear()
    yield url, recorder


def nested(depth: int) -> Any:
    value: Any = {"leaf": SECRET}
    for _ in range(depth - 1):
        value = [value]
    return value


def deep_body(depth: int = MAX_JSON_DEPTH + 1) -> bytes:
    """A chat body nested ``depth`` levels deep (the outer object counts), as bytes (json's
    encoder stops at the interpreter's recursion limit)."""
    head = b'{"model":"m","messages":[{"role":"user","content":"%s"}],"x":' % SECRET.encode()
    inner = depth - 2  # the outer object and the innermost one
    return head + b"[" * inner + b'{"leaf":1}' + b"]" * inner + b"}"


# Bodies for an E2EE path that cannot be sealed: refused with invalid_body.
UNSEALABLE = {
    "too deep": deep_body(),
    "far too deep": deep_body(5000),
    "not json": b"prompt: " + SECRET.encode(),
    "NaN": b'{"model":"m","temperature":NaN,"messages":[{"role":"user","content":"x"}]}',
    "invalid utf-8": b'{"model":"m","messages":[{"role":"user","content":"\xff"}]}',
    "no model": b'{"messages":[{"role":"user","content":"%s"}]}' % SECRET.encode(),
    "empty model": b'{"model":"","prompt":"%s"}' % SECRET.encode(),
    "not an object": b'["%s"]' % SECRET.encode(),
}


def refused(exc: BaseException, code: ErrorCode = ErrorCode.INVALID_BODY) -> None:
    assert isinstance(exc, pqe2ee.LocalProtocolError)
    assert exc.code is code
    assert SECRET not in str(exc)


def test_the_deepest_accepted_body_is_not_refused() -> None:
    """The bound is the instances': 128 levels pass, 129 do not."""
    from pqe2ee.protocol.client import e2e_request

    paths = frozenset({CHAT})
    assert e2e_request("POST", CHAT, deep_body(MAX_JSON_DEPTH), paths) is not None
    with pytest.raises(pqe2ee.LocalProtocolError) as err:
        e2e_request("POST", CHAT, deep_body(MAX_JSON_DEPTH + 1), paths)
    refused(err.value)


@pytest.mark.parametrize("flavour", ["httpx2", "httpx"])
@pytest.mark.parametrize("case", sorted(UNSEALABLE))
def test_sync_transports_refuse(server: tuple[str, Recorder], flavour: str, case: str) -> None:
    url, recorder = server
    lib, mod = (httpx2, tx_httpx2) if flavour == "httpx2" else (httpx, tx_httpx)
    transport = mod.E2EETransport(api_key=KEY, api_base=url, models_base=url)
    with lib.Client(transport=transport) as client, pytest.raises(Exception) as err:
        client.post(url + CHAT, content=UNSEALABLE[case])
    refused(err.value)
    assert recorder.seen == []


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("flavour", ["httpx2", "httpx"])
async def test_async_transports_refuse(server: tuple[str, Recorder], flavour: str) -> None:
    url, recorder = server
    lib, mod = (httpx2, tx_httpx2) if flavour == "httpx2" else (httpx, tx_httpx)
    transport = mod.AsyncE2EETransport(api_key=KEY, api_base=url, models_base=url)
    async with lib.AsyncClient(transport=transport) as client:
        for case in sorted(UNSEALABLE):
            with pytest.raises(Exception) as err:
                await client.post(url + CHAT, content=UNSEALABLE[case])
            refused(err.value)
        assert recorder.seen == []
        # a body for another path or method: refused; no body: plaintext to models_base
        for method, path in (("POST", "/v1/embeddings"), ("PUT", CHAT)):
            with pytest.raises(Exception) as err:
                await client.request(method, url + path, content=UNSEALABLE["no model"])
            refused(err.value, ErrorCode.PLAINTEXT_REFUSED)
        assert recorder.seen == []
        assert (await client.post(url + CHAT)).status_code == 400
        assert (await client.get(url + "/v1/models")).status_code == 400
    assert recorder.seen == [("POST", CHAT, b""), ("GET", "/v1/models", b"")]


def test_the_sdk_refuses_a_too_deep_tool_schema(server: tuple[str, Recorder]) -> None:
    """Through the openai SDK: a tool schema nested past the bound (the SDK serialises it
    happily) is refused by the transport, not sent to ``models_base`` in plaintext."""
    url, recorder = server
    transport = tx_httpx2.E2EETransport(api_key=KEY, api_base=url, models_base=url)
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "x": nested(200)}},
    }
    with openai.OpenAI(
        api_key=KEY,
        base_url=url + "/v1",
        max_retries=0,
        http_client=httpx2.Client(transport=transport),
    ) as client:
        with pytest.raises(pqe2ee.LocalProtocolError) as err:
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": SECRET}], tools=[tool]
            )
    refused(err.value)
    assert recorder.seen == []


def test_the_sdks_other_inference_apis_are_refused(server: tuple[str, Recorder]) -> None:
    """The Responses API and embeddings through the openai SDK, Messages through the anthropic
    SDK, on the E2EE transport: not E2EE paths, so refused - not sent to ``models_base``."""
    import anthropic

    url, recorder = server
    user = [{"role": "user", "content": SECRET}]
    with openai.OpenAI(
        api_key=KEY,
        base_url=url + "/v1",
        max_retries=0,
        http_client=httpx2.Client(
            transport=tx_httpx2.E2EETransport(api_key=KEY, api_base=url, models_base=url)
        ),
    ) as client:
        for call in (
            lambda: client.responses.create(model="m", input=SECRET),
            lambda: client.embeddings.create(model="m", input=SECRET),
        ):
            with pytest.raises(pqe2ee.LocalProtocolError) as err:
                call()
            refused(err.value, ErrorCode.PLAINTEXT_REFUSED)
    with anthropic.Anthropic(
        api_key=KEY,
        base_url=url,
        max_retries=0,
        http_client=httpx2.Client(
            transport=tx_httpx2.E2EETransport(api_key=KEY, api_base=url, models_base=url)
        ),
    ) as claude:
        # (the anthropic SDK wraps any transport error in its APIConnectionError)
        with pytest.raises(anthropic.APIConnectionError) as wrapped:
            claude.messages.create(model="m", max_tokens=10, messages=user)
        assert wrapped.value.__cause__ is not None
        refused(wrapped.value.__cause__, ErrorCode.PLAINTEXT_REFUSED)
    assert recorder.seen == []


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_aiohttp_session_refuses(server: tuple[str, Recorder]) -> None:
    url, recorder = server
    async with E2EEClientSession(api_key=KEY, api_base=url, models_base=url) as session:
        for case in sorted(UNSEALABLE):
            with pytest.raises(pqe2ee.LocalProtocolError) as err:
                await session.post(CHAT, data=UNSEALABLE[case])
            refused(err.value)
        for obj in (
            {"model": "m", "x": nested(MAX_JSON_DEPTH + 1)},
            {"model": "m", "x": nested(5000)},  # (past the interpreter's recursion limit)
            {"model": "m", "temperature": float("nan")},
            {"messages": [{"role": "user", "content": SECRET}]},
        ):
            with pytest.raises(pqe2ee.LocalProtocolError) as err:
                await session.post(CHAT, json=obj)
            refused(err.value)
        with pytest.raises(pqe2ee.LocalProtocolError) as err:
            await session.post("/v1/responses", json={"model": "m", "input": SECRET})
        refused(err.value, ErrorCode.PLAINTEXT_REFUSED)
        assert recorder.seen == []
        response = await session.post(CHAT)  # no body: plaintext
        assert response.status == 400 and not response.encrypted
    assert recorder.seen == [("POST", CHAT, b"")]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5000])
async def test_anyio_client_refuses(server: tuple[str, Recorder], depth: int) -> None:
    url, recorder = server
    async with E2EEClient(api_key=KEY, api_base=url, models_base=url) as client:
        body = {"model": "m", "messages": [{"role": "user", "content": SECRET}], "x": nested(depth)}
        with pytest.raises(pqe2ee.LocalProtocolError) as err:
            await client.chat(**body)
        refused(err.value)
        with pytest.raises(pqe2ee.LocalProtocolError) as err:
            client.stream_chat(**body)
        refused(err.value)
    assert recorder.seen == []
