"""Relay and discovery failures reach SDK users as the SDK's own error classes (issue 12).

The httpx/httpx2 transports answer a :class:`pqe2ee.RelayError` with an HTTP error
(:mod:`pqe2ee.transports._answers`); the openai SDK (``max_retries=0``) then raises its usual
class, with the pqe2ee code in ``.code`` and the error itself in
``.response.extensions["pqe2ee_error"]``. Against a real relay here: a wrong key (401) and an
unknown model (404), sync and async, httpx2 and httpx; refused paths (403), busy instances
(429), exhausted retries (503) and the discovery rate limit (429) against the fault-injecting
relay are in tests/test_transport_httpx.py. The mapping of every relay code is checked as a
table.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import msgspec
import openai
import pytest

from pqe2ee.errors import ErrorCode, LocalProtocolError, RelayError
from pqe2ee.transports import httpx as tx_httpx
from pqe2ee.transports import httpx2 as tx_httpx2
from pqe2ee.transports._answers import ERROR_HEADER, error_answer
from servers import serve_chain

KEY = "pk-sdk-errors-1a2b3c4d5e"


@pytest.fixture(scope="module")
def relay() -> Iterator[str]:
    with serve_chain(1, api_keys=(KEY,), rate_limit=10_000, nonces_per_instance=100) as chain:
        yield chain.relay


def client(relay: str, key: str, lib: str) -> openai.OpenAI:
    if lib == "httpx2":
        http: Any = httpx2.Client(
            transport=tx_httpx2.E2EETransport(api_key=key, api_base=relay, models_base=relay)
        )
    else:
        http = httpx.Client(
            transport=tx_httpx.E2EETransport(api_key=key, api_base=relay, models_base=relay)
        )
    return openai.OpenAI(base_url=relay + "/v1", api_key=key, http_client=http, max_retries=0)


def ask(sdk: openai.OpenAI, model: str = "dev-echo") -> None:
    sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("lib", ["httpx2", "httpx"])
def test_wrong_key_is_authentication_error(relay: str, lib: str) -> None:
    with client(relay, "pk-wrong-key-000000", lib) as sdk:
        with pytest.raises(openai.AuthenticationError) as info:
            ask(sdk)
    assert info.value.status_code == 401
    assert info.value.code == "discovery_failed"
    assert info.value.response.headers[ERROR_HEADER] == "discovery_failed"
    err = info.value.response.extensions["pqe2ee_error"]
    assert isinstance(err, RelayError) and err.status == 401


@pytest.mark.parametrize("lib", ["httpx2", "httpx"])
def test_unknown_model_is_not_found_error(relay: str, lib: str) -> None:
    with client(relay, KEY, lib) as sdk:
        with pytest.raises(openai.NotFoundError) as info:
            ask(sdk, model="no-such-model")
        assert info.value.code == "model_not_found"
        ask(sdk)  # the transport is fine afterwards


@pytest.mark.anyio
async def test_async_client_gets_sdk_errors_too(relay: str) -> None:
    transport = tx_httpx2.AsyncE2EETransport(api_key=KEY, api_base=relay, models_base=relay)
    async with openai.AsyncOpenAI(
        base_url=relay + "/v1",
        api_key=KEY,
        http_client=httpx2.AsyncClient(transport=transport),
        max_retries=0,
    ) as sdk:
        with pytest.raises(openai.NotFoundError) as info:
            await sdk.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "x"}]
            )
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("code", "relay_status", "status"),
    [
        (ErrorCode.MODEL_NOT_FOUND, None, 404),
        (ErrorCode.DISCOVERY_FAILED, 401, 401),
        (ErrorCode.DISCOVERY_FAILED, 403, 403),
        (ErrorCode.DISCOVERY_FAILED, 500, 502),
        (ErrorCode.DISCOVERY_FAILED, None, 502),
        (ErrorCode.DISCOVERY_RATE_LIMITED, None, 429),
        (ErrorCode.INSTANCE_BUSY, 429, 429),
        (ErrorCode.NO_INSTANCES, None, 503),
        (ErrorCode.PATH_FORBIDDEN, 403, 403),
        (ErrorCode.RETRIES_EXHAUSTED, 429, 429),
        (ErrorCode.RETRIES_EXHAUSTED, 403, 503),
        (ErrorCode.KEY_EXCHANGE_REQUIRED, 502, 502),
    ],
)
def test_relay_codes_map_to_statuses(
    code: ErrorCode, relay_status: int | None, status: int
) -> None:
    answer = error_answer(RelayError("m", code=code, status=relay_status))
    assert answer is not None
    got, headers, body = answer
    assert got == status
    assert (ERROR_HEADER, code.value) in headers
    decoded = msgspec.json.decode(body)
    assert decoded["error"]["code"] == code.value and decoded["type"] == "error"


def test_local_errors_relay_catch_all_and_v2_refusals_still_raise() -> None:
    assert error_answer(LocalProtocolError("strict", code=ErrorCode.PLAINTEXT_REFUSED)) is None
    # under v2 a non-200 is the relay's unauthenticated word (tests/test_v2_threats.py)
    assert error_answer(RelayError("forged", code=ErrorCode.RELAY_ERROR, status=400)) is None
    assert error_answer(RelayError("r", code=ErrorCode.REPLAY, status=409)) is None


def test_v1_client_against_a_v2_only_instance_is_told_so() -> None:
    """Not "key exchange required, try another instance": the relay passes the instance's
    426 ``v1_disabled`` on, and the SDK shows it."""
    with serve_chain(1, api_keys=(KEY,), instance_kw={"v2_only": True}) as chain:
        transport = tx_httpx2.E2EETransport(
            api_key=KEY, api_base=chain.relay, models_base=chain.relay, prefer_v2=False
        )
        sdk = openai.OpenAI(
            base_url=chain.relay + "/v1",
            api_key=KEY,
            http_client=httpx2.Client(transport=transport),
            max_retries=0,
        )
        with sdk, pytest.raises(openai.APIStatusError) as info:
            ask(sdk)
    assert info.value.status_code == 426
    assert "v1_disabled" in info.value.response.text
