"""E2EE transports for httpx2 and legacy httpx, end to end.

The official openai SDK drives ``pqe2ee.E2EETransport`` / ``AsyncE2EETransport`` (and the
legacy-httpx pair) against real servers on loopback: dev-engine -> two ``pqe2ee instance`` ->
the real ``pqe2ee relay`` behind :class:`faults.FaultyRelay`. The SDK's ``base_url`` points at
a host that does not exist, so every byte that arrives went where the transport sent it.
"""

from __future__ import annotations

import json
import pickle
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import httpx
import httpx2
import openai
import pytest

import pqe2ee
import pqe2ee.server.instance
import pqe2ee.transports.httpx as tx_httpx
import pqe2ee.transports.httpx2 as tx_httpx2
from faults import Fault, FaultyStack, RechunkingEncoder
from pqe2ee.errors import ErrorCode
from pqe2ee.protocol.client import ClientLimits
from pqe2ee.server.relay import chute_id_for

KEY = "pk-transport-test-0123456789"
SDK_BASE = "http://sdk-base-url.invalid/v1"  # never reached: the transport routes everything
FLAVOURS: dict[str, tuple[Any, Any]] = {"httpx2": (httpx2, tx_httpx2), "httpx": (httpx, tx_httpx)}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def transport(flavour: str, stack: FaultyStack, *, is_async: bool = False, **kw: Any) -> Any:
    mod = FLAVOURS[flavour][1]
    cls = mod.AsyncE2EETransport if is_async else mod.E2EETransport
    return cls(api_key=KEY, api_base=stack.relay, models_base=stack.relay, **kw)


def relay_error(info: pytest.ExceptionInfo[openai.APIStatusError]) -> Any:
    """The pqe2ee RelayError an SDK status error stands for (the transport answered it)."""
    err = info.value.response.extensions["pqe2ee_error"]
    assert isinstance(err, pqe2ee.RelayError)
    assert info.value.code == err.code.value  # the body's error.code
    return err


def sync_client(flavour: str, stack: FaultyStack, **kw: Any) -> openai.OpenAI:
    lib = FLAVOURS[flavour][0]
    return openai.OpenAI(
        api_key=KEY,
        base_url=SDK_BASE,
        http_client=lib.Client(transport=transport(flavour, stack, **kw)),
        max_retries=0,
    )


def async_client(flavour: str, stack: FaultyStack, **kw: Any) -> openai.AsyncOpenAI:
    lib = FLAVOURS[flavour][0]
    return openai.AsyncOpenAI(
        api_key=KEY,
        base_url=SDK_BASE,
        http_client=lib.AsyncClient(transport=transport(flavour, stack, is_async=True, **kw)),
        max_retries=0,
    )


def messages(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def stream_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def collect(stream: Any) -> tuple[str, BaseException | None]:
    """Content read from a chat stream and the exception that ended it, if any."""
    got: list[str] = []
    try:
        for chunk in stream:
            if chunk.choices:
                got.append(chunk.choices[0].delta.content or "")
    except openai.APIConnectionError as exc:
        return "".join(got), exc
    return "".join(got), None


def engine_direct(stack: FaultyStack, path: str, body: dict[str, Any]) -> bytes:
    resp = httpx2.post(stack.engine + path, json=body, timeout=10)
    assert resp.status_code == 200
    return resp.content


def without_created(data: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b'"created":0', data)


# -- chat and completions, every flavour ----------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_chat_sync(stack: FaultyStack, flavour: str) -> None:
    with sync_client(flavour, stack) as client:
        reply = client.chat.completions.create(model="dev-echo", messages=messages("hello there"))
        assert reply.choices[0].message.content == "Echo: hello there"
        assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert stack.faults.invokes == 1
    assert stack.faults.injected == []


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_chat_stream_sync(stack: FaultyStack, flavour: str) -> None:
    usage: list[Any] = []
    with sync_client(flavour, stack, on_usage=usage.append) as client:
        chunks = list(
            client.chat.completions.create(
                model="dev-echo",
                messages=messages("one two three"),
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert stream_text(chunks) == "Echo: one two three"
    sdk_usage = [c.usage for c in chunks if c.usage is not None]
    # The plaintext usage events went to on_usage only; the SDK saw what it asked for, as
    # the OpenAI API gives it: include_usage alone = the final usage-only chunk exactly once
    # (the instance streamed continuous stats: those are removed, tests/test_stream_semantics).
    assert len(sdk_usage) == 1 and len(usage) >= 1
    assert [c for c in chunks if not c.choices and c.usage is not None].__len__() == 1
    assert usage[-1]["completion_tokens"] == sdk_usage[-1].completion_tokens == 4
    assert usage[-1]["prompt_tokens"] == sdk_usage[-1].prompt_tokens


@pytest.mark.anyio
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_chat_async(stack: FaultyStack, flavour: str) -> None:
    usage: list[Any] = []
    async with async_client(flavour, stack, on_usage=usage.append) as client:
        reply = await client.chat.completions.create(model="dev-echo", messages=messages("hi"))
        assert reply.choices[0].message.content == "Echo: hi"
        stream = await client.chat.completions.create(
            model="dev-echo", messages=messages("async stream works"), stream=True
        )
        chunks = [c async for c in stream]
    assert stream_text(chunks) == "Echo: async stream works"
    assert usage and usage[-1]["completion_tokens"] == 4
    assert stack.faults.invokes == 2


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_completions_sync(stack: FaultyStack, flavour: str) -> None:
    with sync_client(flavour, stack) as client:
        reply = client.completions.create(model="dev-echo", prompt="say hi")
        assert reply.choices[0].text == "Echo: say hi"
        stream = client.completions.create(model="dev-echo", prompt="stream me", stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == "Echo: stream me"


@pytest.mark.anyio
async def test_completions_async(stack: FaultyStack) -> None:
    async with async_client("httpx2", stack) as client:
        reply = await client.completions.create(model="dev-echo", prompt="async words")
        assert reply.choices[0].text == "Echo: async words"
        stream = await client.completions.create(model="dev-echo", prompt="more", stream=True)
        assert "".join([c.choices[0].text async for c in stream if c.choices]) == "Echo: more"


def test_non_stream_bytes_are_the_engines(stack: FaultyStack) -> None:
    body = {"model": "dev-echo", "messages": messages("exact bytes please")}
    with httpx2.Client(transport=transport("httpx2", stack)) as http:
        resp = http.post(SDK_BASE + "/chat/completions", json=body)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert int(resp.headers["content-length"]) == len(resp.content)
    assert without_created(resp.content) == without_created(
        engine_direct(stack, "/v1/chat/completions", body)
    )


def test_stream_is_plain_engine_sse(stack: FaultyStack) -> None:
    body = {"model": "dev-echo", "messages": messages("raw sse"), "stream": True}
    with (
        httpx2.Client(transport=transport("httpx2", stack)) as http,
        http.stream("POST", SDK_BASE + "/chat/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for event in events[:-2]:
        assert event.startswith(b"data: {")
        obj = json.loads(event[6:])
        assert obj["object"] == "chat.completion.chunk"  # never an outer e2e/usage event


# -- tools and reasoning ----------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tool_calls(stack: FaultyStack, flavour: str) -> None:
    with sync_client(flavour, stack) as client:
        reply = client.chat.completions.create(
            model="dev-tools", messages=messages("What is the weather in Paris?"), tools=TOOLS
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls is not None
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]

        stream = client.chat.completions.create(
            model="dev-tools",
            messages=messages("weather in Lisbon?"),
            tools=TOOLS,
            stream=True,
        )
        name, args = "", ""
        for chunk in stream:
            for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                name += (tc.function.name or "") if tc.function else ""
                args += (tc.function.arguments or "") if tc.function else ""
        assert name == "get_weather"
        assert json.loads(args) == {"city": "Lisbon"}


@pytest.mark.anyio
async def test_reasoning_content(stack: FaultyStack) -> None:
    async with async_client("httpx2", stack) as client:
        reply = await client.chat.completions.create(
            model="dev-reason", messages=messages("why is the sky blue")
        )
        message = reply.choices[0].message
        assert (message.model_extra or {})["reasoning_content"] == (
            "Thinking about: why is the sky blue"
        )
        assert message.content == "Echo: why is the sky blue"
        stream = await client.chat.completions.create(
            model="dev-reason", messages=messages("think hard"), stream=True
        )
        reasoning, content = "", ""
        async for chunk in stream:
            if chunk.choices:
                delta = chunk.choices[0].delta
                reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
                content += delta.content or ""
        assert reasoning == "Thinking about: think hard"
        assert content == "Echo: think hard"


# -- engine errors sealed by the instance --------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sealed_engine_errors_become_sdk_errors(stack: FaultyStack, flavour: str) -> None:
    with sync_client(flavour, stack) as client:
        with pytest.raises(openai.InternalServerError) as err500:
            client.chat.completions.create(model="dev-echo", messages=messages("__error_500__"))
        assert err500.value.status_code == 500
        assert "Simulated engine failure" in err500.value.message
        with pytest.raises(openai.BadRequestError) as err400:
            client.chat.completions.create(model="dev-echo", messages=messages("x"), n=2)
        assert "only supports n=1" in err400.value.message
        # A stream request whose answer is not 200 takes the same path.
        with pytest.raises(openai.BadRequestError) as err400s:
            client.chat.completions.create(
                model="dev-echo", messages=messages("x"), n=2, stream=True
            )
        assert "only supports n=1" in err400s.value.message
    assert stack.faults.invokes == 3  # sealed errors are answers, never retried


def test_uuid_model_is_a_chute_id(stack: FaultyStack) -> None:
    chute = chute_id_for("dev-echo")
    with sync_client("httpx2", stack) as client:
        # The relay routes by chute; the engine then sees the UUID as the model name and says
        # so in a sealed 404 that only the client can read.
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model=chute, messages=messages("hi"))
    assert chute in err.value.message
    assert stack.faults.model_listings == 0
    assert stack.faults.invokes == 1


# -- plaintext, strict mode, models -----------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_models_listing_goes_plaintext_to_models_base(stack: FaultyStack, flavour: str) -> None:
    with sync_client(flavour, stack) as client:
        ids = [m.id for m in client.models.list()]
    assert {"dev-echo", "dev-tools", "dev-reason"} <= set(ids)
    assert stack.faults.model_listings == 1
    assert stack.faults.invokes == 0


def test_strict_refuses_plaintext(stack: FaultyStack) -> None:
    with sync_client("httpx2", stack, strict=True) as client:
        with pytest.raises(pqe2ee.LocalProtocolError) as err:
            client.models.list()
        assert err.value.code is ErrorCode.PLAINTEXT_REFUSED
        assert stack.faults.model_listings == 0
        reply = client.chat.completions.create(model="dev-echo", messages=messages("ok"))
        assert reply.choices[0].message.content == "Echo: ok"
    with httpx2.Client(transport=transport("httpx2", stack, strict=True)) as http:
        with pytest.raises(pqe2ee.LocalProtocolError) as err2:
            http.post(SDK_BASE + "/chat/completions", json={"messages": messages("no model")})
        assert err2.value.code is ErrorCode.INVALID_BODY  # (strict or not: sealed or nowhere)
    assert stack.faults.invokes == 1


def test_model_not_found_after_one_refresh(stack: FaultyStack) -> None:
    with sync_client("httpx2", stack) as client:
        for text in ("a", "b", "c"):
            client.chat.completions.create(model="dev-echo", messages=messages(text))
        assert stack.faults.model_listings == 1  # cached (TTL)
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model="no-such-model", messages=messages("x"))
    err = relay_error(info)
    assert err.code is ErrorCode.MODEL_NOT_FOUND
    assert stack.faults.model_listings == 2  # exactly one forced refresh
    assert stack.faults.invokes == 3


def test_stale_chute_mapping_is_refreshed_once(stack: FaultyStack) -> None:
    # The cached listing maps the model to a chute the relay no longer knows ("Chute not
    # found" at discovery): the transport re-reads the listing once and uses the new chute.
    gone = "00000000-0000-4000-8000-000000000000"
    doc = b'{"object":"list","data":[{"id":"dev-echo","chute_id":"' + gone.encode() + b'"}]}'
    tr = transport("httpx2", stack)
    http = httpx2.Client(transport=tr)
    with openai.OpenAI(api_key=KEY, base_url=SDK_BASE, http_client=http, max_retries=0) as client:
        tr.state.update_models(doc, time.monotonic())
        reply = client.chat.completions.create(model="dev-echo", messages=messages("moved"))
    assert reply.choices[0].message.content == "Echo: moved"
    assert stack.faults.model_listings == 1
    assert stack.faults.invokes == 1


# -- relay faults: transparent retries, typed errors -------------------------------------------


@pytest.mark.parametrize(
    ("fault", "discoveries"),
    [(Fault.NONCE_403, 2), (Fault.GONE_410, 1), (Fault.BUSY_429, 1), (Fault.KEY_502, 1)],
)
def test_retryable_relay_answers_are_retried(
    stack: FaultyStack, fault: Fault, discoveries: int
) -> None:
    t = transport("httpx2", stack)
    with httpx2.Client(transport=t) as http:
        client = openai.OpenAI(api_key=KEY, base_url=SDK_BASE, http_client=http, max_retries=0)
        stack.faults.inject(fault)
        reply = client.chat.completions.create(model="dev-echo", messages=messages("retry me"))
        assert reply.choices[0].message.content == "Echo: retry me"
        assert stack.faults.injected == [fault]
        assert stack.faults.invokes == 2
        # a refused nonce empties the pool (fresh discovery); the others keep it
        assert stack.faults.discoveries == discoveries
        first, second = stack.faults.instance_ids
        if fault is not Fault.NONCE_403:
            assert second != first  # another instance
        for i in range(6):
            client.chat.completions.create(model="dev-echo", messages=messages(f"after {i}"))
        if fault in (Fault.GONE_410, Fault.BUSY_429, Fault.KEY_502):
            assert first not in stack.faults.instance_ids[2:]  # dropped / cooling down


def test_retries_exhausted_carries_the_last_error(stack: FaultyStack) -> None:
    with sync_client("httpx2", stack, max_attempts=3) as client:
        stack.faults.inject(Fault.NONCE_403, times=3)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="dev-echo", messages=messages("x"))
    assert info.value.status_code == 503
    err = relay_error(info)
    assert isinstance(err, tx_httpx2.RetriesExhausted)
    assert err.code is ErrorCode.RETRIES_EXHAUSTED
    assert err.last_error.code is ErrorCode.NONCE_REJECTED
    assert err.__cause__ is err.last_error
    assert err.attempts == 3
    assert stack.faults.invokes == 3


def test_every_instance_busy_waits_out_the_cool_down_then_exhausts(stack: FaultyStack) -> None:
    """Both instances answer 429: the client waits out their cool-down (discovery cannot help,
    issue 16 follow-up) instead of failing at once, and gives up after max_attempts."""
    with sync_client("httpx2", stack) as client:
        stack.faults.inject(Fault.BUSY_429, times=4)
        with pytest.raises(openai.RateLimitError) as info:  # every instance busy
            client.chat.completions.create(model="dev-echo", messages=messages("x"))
    err = relay_error(info)
    assert err.code is ErrorCode.RETRIES_EXHAUSTED
    assert isinstance(err, tx_httpx2.RetriesExhausted)
    assert err.last_error.code is ErrorCode.INSTANCE_BUSY
    assert stack.faults.invokes == 4  # every attempt used, the later ones after the cool-down
    assert stack.faults.discoveries == 1  # waiting, not rediscovering


def test_path_forbidden_is_not_retried(stack: FaultyStack) -> None:
    with sync_client("httpx2", stack) as client:
        stack.faults.inject(Fault.PATH_403)
        with pytest.raises(openai.PermissionDeniedError) as info:
            client.chat.completions.create(model="dev-echo", messages=messages("x"))
    err = relay_error(info)
    assert err.code is ErrorCode.PATH_FORBIDDEN
    assert err.status == 403
    assert stack.faults.invokes == 1


def test_tampered_blob_is_a_decrypt_error(stack: FaultyStack) -> None:
    with sync_client("httpx2", stack) as client:
        stack.faults.inject(Fault.TAMPER_BLOB)
        with pytest.raises(pqe2ee.DecryptError) as err:
            client.chat.completions.create(model="dev-echo", messages=messages("secret"))
    assert err.value.code is ErrorCode.DECRYPT_FAILED
    assert "secret" not in str(err.value)


# -- broken streams: always an exception, never partial text as success -------------------------


STREAM_FAULTS = [
    (Fault.TRUNCATE, 3, ErrorCode.STREAM_TRUNCATED),
    (Fault.DUPLICATE, 1, ErrorCode.DUPLICATE_RECORD),
    (Fault.TAMPER, 2, ErrorCode.DECRYPT_FAILED),
    (Fault.BAD_BASE64, 0, ErrorCode.MALFORMED_EVENT),
    (Fault.RESET, 4, ErrorCode.CONNECTION_LOST),
    (Fault.REMOTE_ERROR, 3, ErrorCode.REMOTE_ERROR),
]


@pytest.mark.parametrize(("fault", "at", "code"), STREAM_FAULTS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_broken_stream_raises(
    stack: FaultyStack, flavour: str, fault: Fault, at: int, code: ErrorCode
) -> None:
    lib, mod = FLAVOURS[flavour]
    text = "alpha beta gamma delta epsilon zeta eta theta"
    with sync_client(flavour, stack) as client:
        stack.faults.inject(fault, at=at)
        stream = client.chat.completions.create(
            model="dev-echo", messages=messages(text), stream=True
        )
        got, exc = collect(stream)
        assert exc is not None, "a broken stream must not end as success"
        assert got != "Echo: " + text
        cause = exc.__cause__
        assert isinstance(cause, mod.E2EEStreamError)
        assert isinstance(cause, lib.TransportError)
        assert isinstance(cause, pqe2ee.PQE2EEError)
        assert cause.code is code
        assert text.split()[-1] not in str(cause)
        # the transport stays usable
        reply = client.chat.completions.create(model="dev-echo", messages=messages("after"))
        assert reply.choices[0].message.content == "Echo: after"
    assert stack.faults.injected == [fault]


@pytest.mark.anyio
@pytest.mark.parametrize(("fault", "at", "code"), STREAM_FAULTS)
async def test_broken_stream_raises_async(
    stack: FaultyStack, fault: Fault, at: int, code: ErrorCode
) -> None:
    async with async_client("httpx2", stack) as client:
        stack.faults.inject(fault, at=at)
        stream = await client.chat.completions.create(
            model="dev-echo", messages=messages("one two three four five six"), stream=True
        )
        with pytest.raises(openai.APIConnectionError) as err:
            async for _ in stream:
                pass
    cause = err.value.__cause__
    assert isinstance(cause, tx_httpx2.E2EEStreamError)
    assert cause.code is code


def test_remote_error_event(stack: FaultyStack) -> None:
    body = {"model": "dev-echo", "messages": messages("the far side fails"), "stream": True}
    stack.faults.inject(Fault.REMOTE_ERROR, at=2)
    with (
        httpx2.Client(transport=transport("httpx2", stack)) as http,
        http.stream("POST", SDK_BASE + "/chat/completions", json=body) as resp,
    ):
        with pytest.raises(pqe2ee.RemoteError) as err:
            resp.read()
    assert isinstance(err.value, tx_httpx2.E2EEStreamError)
    assert err.value.code is ErrorCode.REMOTE_ERROR
    assert err.value.detail == {"code": "upstream_error", "message": "the engine's stream broke"}
    assert "upstream_error" in str(err.value)


def test_stream_error_keeps_pqe2ee_class(stack: FaultyStack) -> None:
    body = {"model": "dev-echo", "messages": messages("tamper me please now"), "stream": True}
    stack.faults.inject(Fault.TAMPER, at=1)
    with (
        httpx2.Client(transport=transport("httpx2", stack)) as http,
        http.stream("POST", SDK_BASE + "/chat/completions", json=body) as resp,
    ):
        with pytest.raises(pqe2ee.DecryptError) as err:
            resp.read()
    assert isinstance(err.value, httpx2.TransportError)
    assert isinstance(err.value.error, pqe2ee.DecryptError)
    assert err.value.request is not None


STREAM_ERROR_CLASSES = {
    ErrorCode.STREAM_TRUNCATED: "E2EEStreamIntegrityError",
    ErrorCode.DUPLICATE_RECORD: "E2EEStreamIntegrityError",
    ErrorCode.DECRYPT_FAILED: "E2EEStreamDecryptError",
    ErrorCode.MALFORMED_EVENT: "E2EEStreamIntegrityError",
    ErrorCode.CONNECTION_LOST: "E2EEStreamConnectionLost",
    ErrorCode.REMOTE_ERROR: "E2EEStreamRemoteError",
}


@pytest.mark.parametrize(("fault", "at", "code"), STREAM_FAULTS)
def test_stream_errors_are_declared_classes_that_pickle(
    stack: FaultyStack, fault: Fault, at: int, code: ErrorCode
) -> None:
    body = {"model": "dev-echo", "messages": messages("one two three four five"), "stream": True}
    stack.faults.inject(fault, at=at)
    with (
        httpx2.Client(transport=transport("httpx2", stack)) as http,
        http.stream("POST", SDK_BASE + "/chat/completions", json=body) as resp,
        pytest.raises(tx_httpx2.E2EEStreamError) as err,
    ):
        resp.read()
    exc = err.value
    assert type(exc) is getattr(tx_httpx2, STREAM_ERROR_CLASSES[code])  # a name, not a type()
    assert type(exc).__module__ == "pqe2ee.transports._httpx2_common"
    assert isinstance(exc, type(exc.error))
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert (copy.code, copy.message, str(copy)) == (exc.code, exc.message, str(exc))
    assert type(copy.error) is type(exc.error) and copy.error.code is code
    assert isinstance(copy, httpx2.TransportError) and isinstance(copy, pqe2ee.PQE2EEError)


@pytest.mark.anyio
@pytest.mark.parametrize("is_async", [False, True])
async def test_a_closed_transport_leaves_no_key_filler_running(
    stack: FaultyStack, is_async: bool
) -> None:
    from pqe2ee.transports._keypool import KeyPool, XWingKeyPool

    t = transport("httpx2", stack, is_async=is_async)
    engine = t._engine
    t.keys = KeyPool(engine.settings.kem, 2, filler=True)
    if engine.keys_v2 is not None:
        engine.keys_v2 = XWingKeyPool(engine.settings.xwing, 2, filler=True)
    pools = [p for p in (engine.keys, engine.keys_v2) if p is not None]
    body = {"model": "dev-echo", "messages": messages("warm the pools")}
    if is_async:
        async with httpx2.AsyncClient(transport=t) as http:
            assert (await http.post(SDK_BASE + "/chat/completions", json=body)).status_code == 200
    else:
        with httpx2.Client(transport=t) as http:
            assert http.post(SDK_BASE + "/chat/completions", json=body).status_code == 200
    assert any(p._thread is not None for p in pools)  # a filler was started by the request
    # closing the client closed the transport: every filler is stopped and joined
    assert t.closed
    assert not any(p.running for p in pools)


def test_records_that_split_and_coalesce_lines(
    stack: FaultyStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pqe2ee.server.instance, "StreamEncoder", RechunkingEncoder)
    before = RechunkingEncoder.streams
    usage: list[Any] = []
    text = "records need not follow lines at all — ünïcödé too"
    with sync_client("httpx2", stack, on_usage=usage.append) as client:
        chunks = list(
            client.chat.completions.create(
                model="dev-reason",
                messages=messages(text),
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert RechunkingEncoder.streams == before + 1
    assert stream_text(chunks) == "Echo: " + text
    assert usage and usage[-1]["completion_tokens"] == chunks[-1].usage.completion_tokens  # type: ignore[union-attr]


# -- closing and cancelling streams ---------------------------------------------------------------


def _cancelled(stack: FaultyStack) -> Callable[[], bool]:
    before = stack.engine_stats()["streams_cancelled"]
    return lambda: stack.engine_stats()["streams_cancelled"] > before


def wait_until(pred: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_closing_a_stream_cancels_the_generation(stack: FaultyStack) -> None:
    cancelled = _cancelled(stack)
    with sync_client("httpx2", stack) as client:
        stream = client.chat.completions.create(
            model="dev-echo", messages=messages("__slow__"), stream=True
        )
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()
        stream.close()  # idempotent
        wait_until(cancelled, "the engine to see the cancel")


@pytest.mark.anyio
async def test_cancelled_task_closes_the_stream(stack: FaultyStack) -> None:
    cancelled = _cancelled(stack)
    async with async_client("httpx2", stack) as client:
        with anyio.CancelScope() as scope:
            stream = await client.chat.completions.create(
                model="dev-echo", messages=messages("__slow__"), stream=True
            )
            n = 0
            async for _ in stream:
                n += 1
                if n == 2:
                    scope.cancel()
        assert scope.cancelled_caught
        await anyio.to_thread.run_sync(wait_until, cancelled, "the engine to see the cancel")


# -- concurrency, discovery pacing ------------------------------------------------------------


def test_sixteen_threads(stack: FaultyStack) -> None:
    with sync_client("httpx2", stack) as client:

        def work(i: int) -> list[str]:
            return [
                client.chat.completions.create(
                    model="dev-echo", messages=messages(f"thread {i} request {j}")
                )
                .choices[0]
                .message.content
                or ""
                for j in range(4)
            ]

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(work, range(16)))
    assert results == [[f"Echo: thread {i} request {j}" for j in range(4)] for i in range(16)]
    assert stack.faults.invokes == 64
    assert stack.faults.max_parallel_discoveries == 1
    assert 4 <= stack.faults.discoveries <= 10  # 20 nonces each; the client's own limit is 10


@pytest.mark.anyio
async def test_sixty_four_async_streams(stack: FaultyStack) -> None:
    results: dict[int, str] = {}
    async with async_client("httpx2", stack) as client:

        async def one(i: int) -> None:
            stream = await client.chat.completions.create(
                model="dev-echo", messages=messages(f"stream number {i}"), stream=True
            )
            results[i] = stream_text([c async for c in stream])

        async with anyio.create_task_group() as tg:
            for i in range(64):
                tg.start_soon(one, i)
    assert results == {i: f"Echo: stream number {i}" for i in range(64)}
    assert stack.faults.max_parallel_discoveries == 1
    assert 4 <= stack.faults.discoveries <= 10


def test_prefetch_keeps_the_pool_from_running_dry(stack: FaultyStack) -> None:
    chute = chute_id_for("dev-echo")
    t = transport("httpx2", stack)
    with openai.OpenAI(
        api_key=KEY, base_url=SDK_BASE, http_client=httpx2.Client(transport=t), max_retries=0
    ) as client:
        for i in range(25):  # one discovery gives 2 x 10 nonces
            client.chat.completions.create(model="dev-echo", messages=messages(f"n{i}"))
            assert t.state.available(chute, time.monotonic()) > 0
    assert stack.faults.discoveries >= 2


def test_client_discovery_limit_refuses_a_wait_past_the_timeout(stack: FaultyStack) -> None:
    limits = ClientLimits(discovery_per_window=1, discovery_window=600.0)
    with sync_client("httpx2", stack, limits=limits, timeout=1.0) as client:
        client.chat.completions.create(model="dev-echo", messages=messages("first"))
        stack.faults.inject(Fault.NONCE_403)  # empties the pool: the retry needs a discovery
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="dev-echo", messages=messages("second"))
    assert relay_error(info).code is ErrorCode.DISCOVERY_RATE_LIMITED
    assert stack.faults.discoveries == 1


def test_client_discovery_limit_waits_for_a_slot(stack: FaultyStack) -> None:
    limits = ClientLimits(discovery_per_window=1, discovery_window=0.3)
    with sync_client("httpx2", stack, limits=limits, timeout=10.0) as client:
        client.chat.completions.create(model="dev-echo", messages=messages("first"))
        stack.faults.inject(Fault.NONCE_403)
        reply = client.chat.completions.create(model="dev-echo", messages=messages("second"))
    assert reply.choices[0].message.content == "Echo: second"
    assert stack.faults.discoveries == 2


# -- key hygiene and lifecycle ----------------------------------------------------------------


class _SpyKEM:
    """Wraps the real KEM; remembers every key it made."""

    def __init__(self, kem: Any) -> None:
        self.kem = kem
        self.keys: list[Any] = []
        self.name = kem.name

    def generate(self) -> Any:
        key = self.kem.generate()
        self.keys.append(key)
        return key


def _wiped(key: Any) -> bool:
    try:
        key.decapsulate(b"\x00" * 1088)
    except pqe2ee.LocalProtocolError:
        return True
    return False


@pytest.mark.anyio
async def test_every_key_is_fresh_and_wiped(stack: FaultyStack) -> None:
    from pqe2ee.backends import get_kem
    from pqe2ee.transports._keypool import KeyPool

    spy = _SpyKEM(get_kem())
    t = transport("httpx2", stack, is_async=True)
    t.keys.close()
    t.keys = KeyPool(spy, size=0)  # type: ignore[arg-type]
    async with httpx2.AsyncClient(transport=t) as http:
        client = openai.AsyncOpenAI(api_key=KEY, base_url=SDK_BASE, http_client=http)
        await client.chat.completions.create(model="dev-echo", messages=messages("a"))
        stream = await client.chat.completions.create(
            model="dev-echo", messages=messages("b"), stream=True
        )
        assert stream_text([c async for c in stream]) == "Echo: b"
        with pytest.raises(openai.InternalServerError):
            await client.with_options(max_retries=0).chat.completions.create(
                model="dev-echo", messages=messages("__error_500__")
            )
        stack.faults.inject(Fault.NONCE_403)
        await client.chat.completions.create(model="dev-echo", messages=messages("c"))
    assert len(spy.keys) == 5  # one per invoke, retries included
    assert len({k.public_key for k in spy.keys}) == 5
    assert all(_wiped(k) for k in spy.keys)


def test_connect_errors_are_httpx_errors() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"http://127.0.0.1:{port}"
    for flavour, (lib, mod) in FLAVOURS.items():
        t = mod.E2EETransport(api_key=KEY, api_base=dead, models_base=dead)
        with openai.OpenAI(
            api_key=KEY, base_url=SDK_BASE, http_client=lib.Client(transport=t), max_retries=0
        ) as client:
            with pytest.raises(openai.APIConnectionError) as err:
                client.chat.completions.create(model="dev-echo", messages=messages("x"))
        assert isinstance(err.value.__cause__, lib.ConnectError), flavour


class _RaisingTransport(httpx2.BaseTransport):
    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        raise ConnectionRefusedError(111, "refused")


class _AsyncRaisingTransport(httpx2.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        raise TimeoutError


class _BrokenBody(httpx2.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        raise ConnectionResetError(104, "reset")


class _AsyncBrokenBody(httpx2.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        raise TimeoutError
        yield b""  # (an async generator)


class _BrokenBodyTransport(httpx2.BaseTransport):
    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, stream=_BrokenBody())


class _AsyncBrokenBodyTransport(httpx2.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, stream=_AsyncBrokenBody())


@pytest.mark.parametrize(
    ("inner", "async_inner", "error", "cause", "async_error"),
    [
        pytest.param(
            _RaisingTransport(),
            _AsyncRaisingTransport(),
            httpx2.ConnectError,
            ConnectionRefusedError,
            httpx2.ConnectTimeout,
            id="connect",
        ),
        pytest.param(
            _BrokenBodyTransport(),
            _AsyncBrokenBodyTransport(),
            httpx2.ReadError,
            ConnectionResetError,
            httpx2.ReadTimeout,
            id="body",  # (the discovery answer's)
        ),
    ],
)
def test_inner_os_errors_are_mapped(
    inner: httpx2.BaseTransport,
    async_inner: httpx2.AsyncBaseTransport,
    error: type[Exception],
    cause: type[Exception],
    async_error: type[Exception],
) -> None:
    """An inner transport's OSError (sync) / TimeoutError (async), when sending or while a
    body is read, is httpx2's error for that step, chained."""
    chute = chute_id_for("dev-echo")
    body = {"model": chute, "messages": messages("x")}
    t = tx_httpx2.E2EETransport(api_key=KEY, inner=inner)
    with httpx2.Client(transport=t) as http:
        with pytest.raises(error) as err:
            http.post(SDK_BASE + "/chat/completions", json=body)
        assert isinstance(err.value.__cause__, cause)

    async def run() -> None:
        at = tx_httpx2.AsyncE2EETransport(api_key=KEY, inner=async_inner)
        async with httpx2.AsyncClient(transport=at) as http:
            with pytest.raises(async_error) as err:
                await http.post(SDK_BASE + "/chat/completions", json=body)
            assert isinstance(err.value.__cause__, TimeoutError)

    anyio.run(run)


def test_closed_transport_refuses(stack: FaultyStack) -> None:
    t = transport("httpx2", stack)
    t.close()
    t.close()  # idempotent
    assert t.keys.closed
    with pytest.raises(pqe2ee.LocalProtocolError):
        t.handle_request(httpx2.Request("GET", SDK_BASE + "/models"))


def test_top_level_exports() -> None:
    assert pqe2ee.E2EETransport is tx_httpx2.E2EETransport
    assert pqe2ee.AsyncE2EETransport is tx_httpx2.AsyncE2EETransport
    assert issubclass(tx_httpx.E2EETransport, httpx.BaseTransport)
    assert issubclass(tx_httpx.AsyncE2EETransport, httpx.AsyncBaseTransport)
    assert issubclass(tx_httpx.E2EEStreamError, httpx.TransportError)
    assert not issubclass(tx_httpx.E2EEStreamError, httpx2.TransportError)


@pytest.mark.parametrize("lib", ["httpx2", "httpx"])
def test_a_decrypted_answer_is_left_as_content_leaves_a_response(lib: str) -> None:
    """json_response skips the library's read machinery but leaves the same state as
    ``Response(content=...)``: read, consumed, closed, same bytes, headers and counters."""
    import importlib

    http = httpx2 if lib == "httpx2" else httpx
    common = importlib.import_module(f"pqe2ee.transports._{lib}_common")
    body = b'{"choices":[{"message":{"content":"hi"}}]}'
    request = http.Request("POST", "http://relay.test/v1/chat/completions")
    ours = common.json_response(200, body, request)
    ref = http.Response(
        200, headers=[("content-type", "application/json")], content=body, request=request
    )
    for response in (ours, ref):
        assert response.is_closed and response.is_stream_consumed
        assert response.num_bytes_downloaded == 0  # (as httpx leaves it)
        assert response.read() == response.content == body
        assert list(response.iter_bytes()) == [body]
        assert anyio.run(response.aread) == body
        assert response.json() == json.loads(body)
        with pytest.raises(http.StreamConsumed):
            list(response.iter_raw())
    assert sorted(ours.headers.items()) == sorted(ref.headers.items())


class _RecordingInner(httpx2.BaseTransport):
    """The way to the relay through something that keeps each request it is handed."""

    def __init__(self) -> None:
        self._inner = httpx2.HTTPTransport()
        self.requests: list[httpx2.Request] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


class _AsyncRecordingInner(httpx2.AsyncBaseTransport):
    """:class:`_RecordingInner` for the async transport."""

    def __init__(self) -> None:
        self._inner = httpx2.AsyncHTTPTransport()
        self.requests: list[httpx2.Request] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _check_invoke_requests(requests: list[httpx2.Request]) -> None:
    invokes = [r for r in requests if r.url.path == "/e2e/invoke"]
    assert len(invokes) == 3
    for request in invokes:
        body = request.content  # (httpx2.RequestNotRead if it was left unread)
        assert len(body) > 1100
        own = [
            (k, v) for k, v in request.headers.raw if k.lower() not in (b"host", b"content-length")
        ]
        ref = httpx2.Request("POST", str(request.url), headers=own, content=body)
        assert request.headers.raw == ref.headers.raw
        assert request.url == ref.url


def test_invoke_requests_are_what_content_would_build(stack: FaultyStack) -> None:
    """Every invoke request an inner transport gets - the first (built by httpx2 from the
    URL) and the later ones (built from the parsed URL kept per transport) - is read
    (``request.content`` there) and carries the headers ``content=`` gives it, in order."""
    inner = _RecordingInner()
    e2ee = transport("httpx2", stack, inner=inner)
    with openai.OpenAI(
        api_key=KEY, base_url=SDK_BASE, http_client=httpx2.Client(transport=e2ee), max_retries=0
    ) as client:
        for text in ("one", "two", "three"):
            reply = client.chat.completions.create(model="dev-echo", messages=messages(text))
            assert reply.choices[0].message.content == f"Echo: {text}"
    _check_invoke_requests(inner.requests)
    assert all(b"".join(r.stream) == r.content for r in inner.requests)


@pytest.mark.anyio
async def test_async_invoke_requests_are_what_content_would_build(stack: FaultyStack) -> None:
    """:func:`test_invoke_requests_are_what_content_would_build`, async."""
    inner = _AsyncRecordingInner()
    e2ee = transport("httpx2", stack, is_async=True, inner=inner)
    async with openai.AsyncOpenAI(
        api_key=KEY,
        base_url=SDK_BASE,
        http_client=httpx2.AsyncClient(transport=e2ee),
        max_retries=0,
    ) as client:
        for text in ("one", "two", "three"):
            reply = await client.chat.completions.create(model="dev-echo", messages=messages(text))
            assert reply.choices[0].message.content == f"Echo: {text}"
    _check_invoke_requests(inner.requests)


class _RewrappingInner(httpx2.BaseTransport):
    """The way to the relay through something that reads each invoke answer and hands it over
    read (``content=``), gzipped in transit (``Content-Encoding: gzip``, as an HTTP middlebox
    may) when ``gzip``."""

    def __init__(self, gzip: bool) -> None:
        self._inner = httpx2.HTTPTransport()
        self._gzip = gzip
        self.coded = 0

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        import gzip

        response = self._inner.handle_request(request)
        if request.url.path != "/e2e/invoke":
            return response
        body = response.read()
        self.coded += 1
        hop = (b"content-length", b"transfer-encoding")
        headers = [(k, v) for k, v in response.headers.raw if k.lower() not in hop]
        if self._gzip:
            headers.append((b"Content-Encoding", b"gzip"))
            body = gzip.compress(body)
        return httpx2.Response(response.status_code, headers=headers, content=body)

    def close(self) -> None:
        self._inner.close()


@pytest.mark.parametrize("gzip", [True, False])
def test_a_coded_or_already_read_relay_answer_is_opened(stack: FaultyStack, gzip: bool) -> None:
    """Relay answers are read raw unless they carry a Content-Encoding (a coded one, single
    or streamed, is decoded first, as before) or an inner transport read them already."""
    inner = _RewrappingInner(gzip)
    e2ee = transport("httpx2", stack, inner=inner)
    with openai.OpenAI(
        api_key=KEY, base_url=SDK_BASE, http_client=httpx2.Client(transport=e2ee), max_retries=0
    ) as client:
        reply = client.chat.completions.create(model="dev-echo", messages=messages("coded"))
        assert reply.choices[0].message.content == "Echo: coded"
        chunks = list(
            client.chat.completions.create(
                model="dev-echo", messages=messages("coded stream"), stream=True
            )
        )
        assert stream_text(chunks) == "Echo: coded stream"
    assert inner.coded == 2


# -- a DecryptingStream made by hand (no engine: its reads are held to no deadline) -----------


def _sealed_stream(text: str) -> tuple[Any, list[bytes], bytes]:
    from pqe2ee.backends import get_aead, get_kem
    from pqe2ee.protocol.v1.stream import StreamEncoder, StreamSealer

    kem, aead = get_kem(), get_aead()
    key = kem.generate()
    inner = [
        b'data: {"choices":[{"delta":{"content":"%s"}}]}\n\n' % text.encode(),
        b"data: [DONE]\n\n",
    ]
    encoder = StreamEncoder(StreamSealer(key.public_key, kem=kem, aead=aead))
    wire = [encoder.start(), *(encoder.feed(part) for part in inner), encoder.finish()]
    return key, [part for part in wire if part], b"".join(inner)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_a_decrypting_stream_made_by_hand_reads_without_a_deadline(flavour: str) -> None:
    lib, mod = FLAVOURS[flavour]
    key, wire, expected = _sealed_stream("by hand")
    settings = mod.E2EETransport(api_key=KEY, api_base="http://relay.invalid").settings
    request = lib.Request("POST", "http://relay.invalid/e2e/invoke")

    class Body(lib.SyncByteStream):  # type: ignore[misc]
        def __iter__(self) -> Iterator[bytes]:
            yield from wire

    upstream = lib.Response(200, stream=Body(), request=request)
    stream = mod.DecryptingStream(upstream, key, settings, request)
    assert b"".join(stream) == expected
    assert upstream.is_closed


@pytest.mark.anyio
@pytest.mark.parametrize("flavour", list(FLAVOURS))
async def test_an_async_decrypting_stream_made_by_hand_reads_without_a_deadline(
    flavour: str,
) -> None:
    lib, mod = FLAVOURS[flavour]
    key, wire, expected = _sealed_stream("by hand, async")
    settings = mod.AsyncE2EETransport(api_key=KEY, api_base="http://relay.invalid").settings
    request = lib.Request("POST", "http://relay.invalid/e2e/invoke")

    class Body(lib.AsyncByteStream):  # type: ignore[misc]
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for part in wire:
                yield part

    upstream = lib.Response(200, stream=Body(), request=request)
    stream = mod.AsyncDecryptingStream(upstream, key, settings, request)
    assert b"".join([chunk async for chunk in stream]) == expected
    assert upstream.is_closed
