"""``pqe2ee.transports.aiohttp`` end to end: dev-engine -> two real instances -> the real relay
behind :class:`faults.FaultyRelay`, driven through :class:`E2EEClientSession` over aiohttp."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anyio
import pytest

import pqe2ee
from faults import Fault, FaultyStack
from pqe2ee.errors import ErrorCode
from pqe2ee.transports.aiohttp import E2EEClientSession, E2EEStreamError, RetriesExhausted
from transport_support import (
    KEY,
    RETRYABLE_FAULTS,
    SAME_ANSWER_CASES,
    STREAM_FAULTS,
    TOOLS,
    cancelled_since_now,
    chat_text,
    dead_url,
    delta_field,
    engine_direct,
    httpx2_answer,
    messages,
    normalise,
    spy_on_keys,
    sse_objects,
    tool_call,
    wait_until,
    wiped,
    without_created,
)

CHAT = "/v1/chat/completions"
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # pinned: aiohttp runs on asyncio only


@pytest.fixture
async def session(stack: FaultyStack) -> AsyncIterator[E2EEClientSession]:
    async with E2EEClientSession(api_key=KEY, api_base=stack.relay, models_base=stack.relay) as s:
        yield s


def chat_body(text: str, **kw: Any) -> dict[str, Any]:
    return {"model": "dev-echo", "messages": messages(text), **kw}


async def stream_raw(session: E2EEClientSession, path: str, body: dict[str, Any]) -> bytes:
    async with session.post(path, json={**body, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return await resp.read()


# -- chat and completions -------------------------------------------------------------------------


async def test_chat(session: E2EEClientSession, stack: FaultyStack) -> None:
    async with session.post(CHAT, json=chat_body("hello there")) as resp:
        assert resp.status == 200 and resp.ok and resp.encrypted
        assert resp.headers["Content-Type"] == "application/json"
        reply = await resp.json()
    assert reply["choices"][0]["message"]["content"] == "Echo: hello there"
    assert reply["usage"]["completion_tokens"] == 3
    assert stack.faults.invokes == 1
    # awaiting instead of `async with` works too
    resp = await session.post("http://ignored.invalid" + CHAT, json=chat_body("again"))
    assert (await resp.json())["choices"][0]["message"]["content"] == "Echo: again"
    assert stack.faults.invokes == 2


async def test_non_stream_bytes_are_the_engines(
    session: E2EEClientSession, stack: FaultyStack
) -> None:
    body = chat_body("exact bytes please")
    async with session.post(CHAT, json=body) as resp:
        data = await resp.read()
        assert int(resp.headers["Content-Length"]) == len(data)
    assert without_created(data) == without_created(engine_direct(stack, CHAT, body))


async def test_chat_stream_lines_and_usage(stack: FaultyStack) -> None:
    usage: list[Any] = []
    async with (
        E2EEClientSession(
            api_key=KEY, api_base=stack.relay, models_base=stack.relay, on_usage=usage.append
        ) as session,
        session.post(
            CHAT,
            json=chat_body("one two three", stream=True, stream_options={"include_usage": True}),
        ) as resp,
    ):
        assert resp.status == 200
        lines = [line async for line in resp.content]
    raw = b"".join(lines)
    assert all(line.endswith(b"\n") for line in lines)
    chunks = sse_objects(raw)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)  # never an outer event
    assert chat_text(chunks) == "Echo: one two three"
    in_stream = [c["usage"] for c in chunks if c.get("usage")]
    # include_usage only: the stream holds the totals chunk alone (as the OpenAI API gives it),
    # whatever usage the instance streamed; on_usage got every plaintext usage event
    assert len(in_stream) == 1 and len(usage) >= 1
    assert usage[-1]["completion_tokens"] == in_stream[-1]["completion_tokens"] == 4


async def test_content_reading_styles(session: E2EEClientSession) -> None:
    body = chat_body("read me in pieces", stream=True)
    async with session.post(CHAT, json=body) as resp:
        pieces = [chunk async for chunk in resp.content.iter_chunked(7)]
    assert all(len(p) == 7 for p in pieces[:-1]) and 0 < len(pieces[-1]) <= 7
    assert chat_text(sse_objects(b"".join(pieces))) == "Echo: read me in pieces"
    async with session.post(CHAT, json=body) as resp:
        chunks = [chunk async for chunk in resp.content.iter_any()]
        assert resp.content.at_eof()
    assert chat_text(sse_objects(b"".join(chunks))) == "Echo: read me in pieces"
    async with session.post(CHAT, json=body) as resp:
        text = await resp.text()
        assert await resp.read() == text.encode()  # the body is kept
    assert chat_text(sse_objects(text.encode())) == "Echo: read me in pieces"


async def test_completions(session: E2EEClientSession) -> None:
    resp = await session.post("/v1/completions", json={"model": "dev-echo", "prompt": "say hi"})
    assert (await resp.json())["choices"][0]["text"] == "Echo: say hi"
    raw = await stream_raw(session, "/v1/completions", {"model": "dev-echo", "prompt": "more"})
    assert "".join(c["choices"][0]["text"] for c in sse_objects(raw) if c["choices"]) == (
        "Echo: more"
    )


async def test_tool_calls(session: E2EEClientSession) -> None:
    body = {"model": "dev-tools", "messages": messages("weather in Paris?"), "tools": TOOLS}
    reply = await (await session.post(CHAT, json=body)).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    body["messages"] = messages("weather in Lisbon?")
    name, args = tool_call(sse_objects(await stream_raw(session, CHAT, body)))
    assert name == "get_weather" and json.loads(args) == {"city": "Lisbon"}


async def test_reasoning(session: E2EEClientSession) -> None:
    body = {"model": "dev-reason", "messages": messages("why is the sky blue")}
    message = (await (await session.post(CHAT, json=body)).json())["choices"][0]["message"]
    assert message["reasoning_content"] == "Thinking about: why is the sky blue"
    assert message["content"] == "Echo: why is the sky blue"
    body["messages"] = messages("think hard")
    chunks = sse_objects(await stream_raw(session, CHAT, body))
    assert delta_field(chunks, "reasoning_content") == "Thinking about: think hard"
    assert chat_text(chunks) == "Echo: think hard"


@pytest.mark.parametrize(("path", "body"), SAME_ANSWER_CASES)
async def test_same_answers_as_httpx(
    session: E2EEClientSession, stack: FaultyStack, path: str, body: dict[str, Any]
) -> None:
    ours = await (await session.post(path, json=body)).read()
    assert without_created(ours) == without_created(await httpx2_answer(stack, path, body))
    streamed = {**body, "stream": True}
    ours_sse = await stream_raw(session, path, body)
    theirs_sse = await httpx2_answer(stack, path, streamed)
    assert normalise(sse_objects(ours_sse)) == normalise(sse_objects(theirs_sse))


# -- engine errors, plaintext, strict ---------------------------------------------------------------


async def test_sealed_engine_errors(session: E2EEClientSession, stack: FaultyStack) -> None:
    resp = await session.post(CHAT, json=chat_body("__error_500__"))
    assert resp.status == 500 and resp.encrypted and not resp.ok
    assert "Simulated engine failure" in json.dumps(await resp.json())
    with pytest.raises(aiohttp.ClientResponseError) as err:
        resp.raise_for_status()
    assert err.value.status == 500
    for stream in (False, True):
        async with session.post(CHAT, json=chat_body("x", n=2, stream=stream)) as resp:
            assert resp.status == 400
            assert "only supports n=1" in json.dumps(await resp.json())
    assert stack.faults.invokes == 3  # sealed errors are answers, never retried


async def test_models_listing_goes_plaintext(
    session: E2EEClientSession, stack: FaultyStack
) -> None:
    async with session.get("/v1/models") as resp:
        assert resp.status == 200 and not resp.encrypted
        ids = {m["id"] for m in (await resp.json())["data"]}
    assert {"dev-echo", "dev-tools", "dev-reason"} <= ids
    # a body without a model cannot be sealed: refused, not sent in plaintext
    with pytest.raises(pqe2ee.LocalProtocolError) as err:
        await session.post(CHAT, json={"messages": messages("no model")})
    assert err.value.code is ErrorCode.INVALID_BODY
    assert stack.faults.invokes == 0


async def test_strict_refuses_plaintext(stack: FaultyStack) -> None:
    async with E2EEClientSession(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, strict=True
    ) as session:
        for call, code in (
            (session.get("/v1/models"), ErrorCode.PLAINTEXT_REFUSED),
            (session.post(CHAT, json={"messages": messages("no model")}), ErrorCode.INVALID_BODY),
            (session.post("/v1/embeddings", json=chat_body("x")), ErrorCode.PLAINTEXT_REFUSED),
        ):
            with pytest.raises(pqe2ee.LocalProtocolError) as err:
                await call
            assert err.value.code is code
        reply = await (await session.post(CHAT, json=chat_body("ok"))).json()
        assert reply["choices"][0]["message"]["content"] == "Echo: ok"
    assert stack.faults.model_listings == 1  # the session's own listing only


async def test_bearer_token_from_the_request(stack: FaultyStack) -> None:
    async with E2EEClientSession(api_base=stack.relay, models_base=stack.relay) as session:
        resp = await session.post(CHAT, json=chat_body("no key"))  # answered, SDK-style
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "discovery_failed"
        assert isinstance(resp.error, pqe2ee.RelayError)
        assert resp.error.code is ErrorCode.DISCOVERY_FAILED and resp.error.status == 401
        resp = await session.post(
            CHAT, json=chat_body("key"), headers={"Authorization": f"Bearer {KEY}"}
        )
        assert (await resp.json())["choices"][0]["message"]["content"] == "Echo: key"


# -- relay faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "discoveries"), RETRYABLE_FAULTS)
async def test_retryable_relay_answers_are_retried(
    session: E2EEClientSession, stack: FaultyStack, fault: Fault, discoveries: int
) -> None:
    stack.faults.inject(fault)
    reply = await (await session.post(CHAT, json=chat_body("retry me"))).json()
    assert reply["choices"][0]["message"]["content"] == "Echo: retry me"
    assert stack.faults.injected == [fault]
    assert stack.faults.invokes == 2
    assert stack.faults.discoveries == discoveries
    first, second = stack.faults.instance_ids
    if fault is not Fault.NONCE_403:
        assert second != first


async def test_retries_exhausted(stack: FaultyStack) -> None:
    async with E2EEClientSession(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, max_attempts=3
    ) as session:
        stack.faults.inject(Fault.NONCE_403, times=3)
        resp = await session.post(CHAT, json=chat_body("x"))
        assert resp.status == 503  # answered as the httpx transports do
        assert (await resp.json())["error"]["code"] == "retries_exhausted"
    err = resp.error
    assert isinstance(err, RetriesExhausted) and err.code is ErrorCode.RETRIES_EXHAUSTED
    assert err.last_error.code is ErrorCode.NONCE_REJECTED
    assert err.attempts == 3 == stack.faults.invokes


async def test_path_forbidden_is_not_retried(
    session: E2EEClientSession, stack: FaultyStack
) -> None:
    stack.faults.inject(Fault.PATH_403)
    resp = await session.post(CHAT, json=chat_body("x"))
    assert resp.status == 403 and resp.headers["x-pqe2ee-error"] == "path_forbidden"
    assert isinstance(resp.error, pqe2ee.RelayError)
    assert resp.error.code is ErrorCode.PATH_FORBIDDEN and resp.error.status == 403
    assert stack.faults.invokes == 1


async def test_tampered_blob_is_a_decrypt_error(
    session: E2EEClientSession, stack: FaultyStack
) -> None:
    stack.faults.inject(Fault.TAMPER_BLOB)
    with pytest.raises(pqe2ee.DecryptError) as err:
        await session.post(CHAT, json=chat_body("secret"))
    assert err.value.code is ErrorCode.DECRYPT_FAILED
    assert "secret" not in str(err.value)


# -- broken streams: an exception, never partial text as success --------------------------------


@pytest.mark.parametrize(("fault", "at", "code"), STREAM_FAULTS)
async def test_broken_stream_raises(
    session: E2EEClientSession, stack: FaultyStack, fault: Fault, at: int, code: ErrorCode
) -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta"
    stack.faults.inject(fault, at=at)
    got: list[bytes] = []
    async with session.post(CHAT, json=chat_body(text, stream=True)) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientError) as err:
            async for line in resp.content:
                got.append(line)
    exc = err.value
    assert isinstance(exc, E2EEStreamError)
    assert isinstance(exc, aiohttp.ClientPayloadError)
    assert isinstance(exc, pqe2ee.PQE2EEError)
    assert exc.code is code
    assert b"[DONE]" not in b"".join(got)
    assert text.split()[-1] not in str(exc)
    if code is ErrorCode.REMOTE_ERROR:
        assert isinstance(exc, pqe2ee.RemoteError)
        assert exc.detail == {"code": "upstream_error", "message": "the engine's stream broke"}
    if code is ErrorCode.DECRYPT_FAILED:
        assert isinstance(exc, pqe2ee.DecryptError)
    # the session stays usable
    reply = await (await session.post(CHAT, json=chat_body("after"))).json()
    assert reply["choices"][0]["message"]["content"] == "Echo: after"
    assert stack.faults.injected == [fault]


async def test_read_of_a_broken_stream_raises(
    session: E2EEClientSession, stack: FaultyStack
) -> None:
    stack.faults.inject(Fault.TRUNCATE, at=3)
    async with session.post(CHAT, json=chat_body("a b c d e f", stream=True)) as resp:
        with pytest.raises(pqe2ee.StreamError) as err:
            await resp.read()
        # sticky: a failed body never reads as a finished one
        with pytest.raises(pqe2ee.StreamError):
            await resp.read()
        with pytest.raises(pqe2ee.StreamError):
            await resp.content.readany()
    assert err.value.code is ErrorCode.STREAM_TRUNCATED


# -- concurrency, closing, keys, connections ---------------------------------------------------


async def test_sixty_four_concurrent_streams(
    session: E2EEClientSession, stack: FaultyStack
) -> None:
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        raw = await stream_raw(session, CHAT, chat_body(f"stream number {i}"))
        results[i] = chat_text(sse_objects(raw))

    async with anyio.create_task_group() as tg:
        for i in range(64):
            tg.start_soon(one, i)
    assert results == {i: f"Echo: stream number {i}" for i in range(64)}
    assert stack.faults.invokes == 64
    assert stack.faults.max_parallel_discoveries == 1
    assert 4 <= stack.faults.discoveries <= 10


async def test_closing_a_stream_early_cancels_the_generation(
    session: E2EEClientSession, stack: FaultyStack
) -> None:
    cancelled = cancelled_since_now(stack)
    async with session.post(CHAT, json=chat_body("__slow__", stream=True)) as resp:
        n = 0
        async for _ in resp.content:
            n += 1
            if n == 3:
                break
    await resp.aclose()  # idempotent
    await anyio.to_thread.run_sync(wait_until, cancelled, "the engine to see the cancel")


async def test_every_key_is_fresh_and_wiped(stack: FaultyStack) -> None:
    async with E2EEClientSession(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay
    ) as session:
        spy = spy_on_keys(session)
        await (await session.post(CHAT, json=chat_body("a"))).read()
        await stream_raw(session, CHAT, chat_body("b"))
        assert (await session.post(CHAT, json=chat_body("__error_500__"))).status == 500
        stack.faults.inject(Fault.NONCE_403)
        await (await session.post(CHAT, json=chat_body("c"))).read()
    assert len(spy.keys) == 5  # one per invoke, retries included
    assert len({k.public_key for k in spy.keys}) == 5
    assert all(wiped(k) for k in spy.keys)


async def test_connect_errors_are_aiohttp_errors() -> None:
    dead = dead_url()
    async with E2EEClientSession(api_key=KEY, api_base=dead, models_base=dead) as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.post(CHAT, json=chat_body("x"))


async def test_own_session_is_used_and_left_open(stack: FaultyStack) -> None:
    async with aiohttp.ClientSession() as http:
        async with E2EEClientSession(
            api_key=KEY, api_base=stack.relay, models_base=stack.relay, session=http
        ) as session:
            reply = await (await session.post(CHAT, json=chat_body("mine"))).json()
            assert reply["choices"][0]["message"]["content"] == "Echo: mine"
        assert session.closed and not http.closed
        with pytest.raises(pqe2ee.LocalProtocolError):
            await session.post(CHAT, json=chat_body("closed"))


async def test_json_and_data_together_are_refused(session: E2EEClientSession) -> None:
    with pytest.raises(pqe2ee.LocalProtocolError) as err:
        await session.post(CHAT, json={"a": 1}, data=b"{}")
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
