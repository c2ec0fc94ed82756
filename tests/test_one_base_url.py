"""One base URL (issue 12): an E2EE transport made without ``api_base`` / ``models_base`` takes
the SDK's own base URL as the relay, instead of sending the encrypted call to api.chutes.ai
while the user pointed the SDK at a local relay. Chutes' own hosts keep the default pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from pqe2ee.errors import LocalProtocolError
from pqe2ee.transports import httpx2 as tx_httpx2
from pqe2ee.transports.options import DEFAULT_API_BASE, ClientOptions, bind_origin
from servers import serve_chain

KEY = "pk-one-base-url-5d6e7f"


@pytest.fixture(scope="module")
def relay() -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []

    def wrap(app: Any) -> Any:
        async def logged(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                seen.append(scope["path"])
            await app(scope, receive, send)

        return logged

    with serve_chain(
        1, api_keys=(KEY,), rate_limit=10_000, nonces_per_instance=100, wrap_relay=wrap
    ) as chain:
        yield chain.relay, seen


def test_the_sdk_base_url_is_the_relay(relay: tuple[str, list[str]]) -> None:
    url, seen = relay
    seen.clear()
    transport = tx_httpx2.E2EETransport(api_key=KEY)  # no api_base, no models_base
    with openai.OpenAI(
        base_url=url + "/v1",
        api_key=KEY,
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    ) as sdk:
        reply = sdk.chat.completions.create(
            model="dev-echo", messages=[{"role": "user", "content": "one url"}]
        )
        assert reply.choices[0].message.content == "Echo: one url"
        assert "dev-echo" in [m.id for m in sdk.models.list()]
        assert transport.settings.api_base == transport.settings.models_base == url
        assert "/e2e/invoke" in seen  # encrypted, through the relay the SDK names
        other = httpx2.Client(transport=transport)
        with pytest.raises(LocalProtocolError, match="one transport per relay"):
            other.post("http://127.0.0.2:9/v1/chat/completions", json={"model": "m"})


def test_chutes_hosts_keep_the_default_pair() -> None:
    options = ClientOptions()
    kept, bound = bind_origin(options, "https://llm.chutes.ai", unbound=True, bound=None)
    assert kept is options and bound is None and kept.api_base == DEFAULT_API_BASE
    moved, bound = bind_origin(options, "http://127.0.0.1:8000", unbound=True, bound=None)
    assert moved.api_base == moved.models_base == bound == "http://127.0.0.1:8000"
