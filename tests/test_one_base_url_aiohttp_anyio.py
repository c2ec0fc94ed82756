"""One base URL and SDK-style error answers for the aiohttp session and the anyio client
(issue 12 follow-up; the httpx flavours: tests/test_one_base_url.py, tests/test_sdk_errors.py).

* :class:`E2EEClientSession` made without bases takes the first full URL's origin as the relay
  (or ``base_url=``), refuses a full URL for another origin afterwards, and answers relay and
  discovery failures with the HTTP errors the httpx transports give (status, JSON body with the
  pqe2ee code, ``x-pqe2ee-error``, the error in ``resp.error``).
* :class:`E2EEClient` takes ``base_url=`` (the SDK's ``.../v1`` form) for both bases.

Real relay, instance and dev-engine on loopback; the relay logs the paths it is asked for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from pqe2ee.errors import ErrorCode, LocalProtocolError, RelayError
from pqe2ee.transports._answers import ERROR_HEADER
from pqe2ee.transports.aiohttp import E2EEClientSession
from pqe2ee.transports.anyio import E2EEClient
from pqe2ee.transports.options import DEFAULT_API_BASE, DEFAULT_MODELS_BASE
from test_one_base_url import KEY, relay  # the relay, logging the paths it is asked for

CHAT = "/v1/chat/completions"
pytestmark = pytest.mark.anyio
__all__ = ["relay"]  # a fixture, shared


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp runs on asyncio only


def body(text: str, model: str = "dev-echo") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


@pytest.fixture
async def session(relay: tuple[str, list[str]]) -> AsyncIterator[E2EEClientSession]:
    async with E2EEClientSession(api_key=KEY, base_url=relay[0] + "/v1") as s:
        yield s


# -- one base URL ------------------------------------------------------------------------------


async def test_aiohttp_first_full_url_is_the_relay(relay: tuple[str, list[str]]) -> None:
    url, seen = relay
    seen.clear()
    async with E2EEClientSession(api_key=KEY) as session:  # no bases
        assert session.settings.api_base == DEFAULT_API_BASE
        async with session.post(url + CHAT, json=body("one url")) as resp:
            assert resp.status == 200 and resp.encrypted
            reply = await resp.json()
        assert reply["choices"][0]["message"]["content"] == "Echo: one url"
        assert session.settings.api_base == session.settings.models_base == url
        assert "/e2e/invoke" in seen
        async with session.get(url + "/v1/models") as resp:  # plaintext, same relay
            assert "dev-echo" in [m["id"] for m in (await resp.json())["data"]]
        async with session.post(CHAT, json=body("by path")) as resp:  # then by path: same
            assert (await resp.json())["choices"][0]["message"]["content"] == "Echo: by path"
        with pytest.raises(LocalProtocolError, match="one transport per relay") as err:
            await session.post("http://127.0.0.2:9" + CHAT, json=body("elsewhere"))
        assert err.value.code is ErrorCode.INVALID_ARGUMENT


async def test_aiohttp_base_url_and_by_path(session: E2EEClientSession, relay: Any) -> None:
    assert session.settings.api_base == session.settings.models_base == relay[0]
    async with session.post(CHAT, json=body("base url")) as resp:
        assert (await resp.json())["choices"][0]["message"]["content"] == "Echo: base url"


async def test_aiohttp_first_request_by_path_keeps_chutes_pair() -> None:
    async with E2EEClientSession(api_key=KEY, strict=True) as session:
        with pytest.raises(LocalProtocolError):  # refused locally: nothing is sent anywhere
            await session.get("/v1/models")
        with pytest.raises(LocalProtocolError):
            await session.get("http://127.0.0.1:9/v1/models")
        assert session.settings.api_base == DEFAULT_API_BASE  # by path first: Chutes' pair
        assert session.settings.models_base == DEFAULT_MODELS_BASE


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("https://relay.example/prefix/v1", "https://relay.example/prefix"),
        ("https://llm.chutes.ai/v1", None),
    ],
)
async def test_base_url_forms(base_url: str, expected: str | None) -> None:
    async with E2EEClient(api_key=KEY, base_url=base_url) as client:
        api, models = client.settings.api_base, client.settings.models_base
    if expected is None:
        assert (api, models) == (DEFAULT_API_BASE, DEFAULT_MODELS_BASE)
    else:
        assert api == models == expected


@pytest.mark.parametrize("bad", [{"api_base": "http://127.0.0.1:1"}, {"models_base": "http://x"}])
async def test_base_url_with_a_base_is_refused(bad: dict[str, str]) -> None:
    for make in (E2EEClient, E2EEClientSession):
        with pytest.raises(LocalProtocolError, match="not both") as err:
            make(api_key=KEY, base_url="http://127.0.0.1:8000/v1", **bad)  # type: ignore[arg-type]
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(LocalProtocolError):
        E2EEClient(api_key=KEY, base_url="ftp://127.0.0.1/v1")


async def test_anyio_base_url_is_the_relay(relay: tuple[str, list[str]]) -> None:
    url, seen = relay
    seen.clear()
    async with E2EEClient(api_key=KEY, base_url=url + "/v1") as client:
        reply = await client.chat(**body("anyio one url"))
        assert reply["choices"][0]["message"]["content"] == "Echo: anyio one url"
        async with client.stream_chat(**body("anyio stream")) as events:
            parts = [c["choices"][0]["delta"].get("content") or "" async for c in events]
        assert "".join(parts) == "Echo: anyio stream"
        with pytest.raises(RelayError) as err:  # no HTTP answers here: still raised
            await client.chat(**body("x", model="no-such-model"))
        assert err.value.code is ErrorCode.MODEL_NOT_FOUND
    assert seen.count("/e2e/invoke") == 2


# -- SDK-style error answers (aiohttp) ---------------------------------------------------------


async def test_aiohttp_unknown_model_is_a_404_answer(session: E2EEClientSession) -> None:
    async with session.post(CHAT, json=body("x", model="no-such-model")) as resp:
        assert resp.status == 404 and not resp.ok and resp.encrypted
        assert resp.headers[ERROR_HEADER] == "model_not_found"
        answer = await resp.json()
        assert answer["error"]["code"] == "model_not_found"
        assert answer["error"]["type"] == "not_found_error"
        assert isinstance(resp.error, RelayError)
        assert resp.error.code is ErrorCode.MODEL_NOT_FOUND
        with pytest.raises(aiohttp.ClientResponseError) as info:
            resp.raise_for_status()
        assert info.value.status == 404 and info.value.__cause__ is resp.error
    async with session.post(CHAT, json=body("fine")) as resp:  # the session is fine after
        assert resp.status == 200 and resp.error is None


async def test_aiohttp_wrong_key_is_a_401_answer(relay: tuple[str, list[str]]) -> None:
    async with E2EEClientSession(api_key="pk-wrong-000000", base_url=relay[0]) as session:
        async with session.post(CHAT, json=body("x")) as resp:
            assert resp.status == 401
            answer = await resp.json()
        assert answer["error"] == {
            "message": str(resp.error),
            "type": "authentication_error",
            "code": "discovery_failed",
            "param": None,
        }
        assert isinstance(resp.error, RelayError) and resp.error.status == 401


async def test_aiohttp_stream_request_gets_the_answer_too(session: E2EEClientSession) -> None:
    wanted = {**body("x", model="no-such-model"), "stream": True}
    async with session.post(CHAT, json=wanted) as resp:
        assert resp.status == 404 and resp.content_type == "application/json"
        assert (await resp.json())["error"]["code"] == "model_not_found"
