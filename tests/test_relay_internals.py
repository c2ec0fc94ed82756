"""Relay pieces that replace library calls with cheaper equivalents, checked against them.

* The relay builds each upstream request itself (the instance's URL parsed once, the client's
  default headers computed once): it must be the request ``client.build_request`` would build
  for the same body, header for header and in the same order, with the client's timeouts.
* Discovery draws all of a row's nonces from one CSPRNG read: each must look exactly like
  ``secrets.token_urlsafe(24)`` (32 URL-safe characters, 24 random bytes)."""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import AsyncIterator

import anyio
import httpx2
import pytest
from starlette.requests import Request

from pqe2ee.server._client import backend_client
from pqe2ee.server.relay.app import _new_nonces
from pqe2ee.server.relay.config import RelayConfig
from pqe2ee.server.relay.forward import Forwarder, Invocation
from pqe2ee.server.relay.metrics import RelayMetrics
from pqe2ee.server.relay.registry import Prober, Registry


def _request(headers: list[tuple[bytes, bytes]]) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/e2e/invoke", "headers": headers}
    return Request(scope)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8123/", "https://instance.example:8443"])
@pytest.mark.parametrize("length", [1234, None])
def test_upstream_request_is_what_build_request_builds(url: str, length: int | None) -> None:
    config = RelayConfig(instances=(url,), api_keys=("key-0123456789",))
    metrics = RelayMetrics()
    registry = Registry(config.instances)
    forwarder = Forwarder(config, metrics, Prober(config, registry, metrics.instances_up))
    client = backend_client(connect=3, read=7, write=11, max_connections=10, max_keepalive=10)
    forwarder.client = client
    inst = registry.instances[0]
    inst.instance_id = "inst-7"
    incoming = [
        (b"x-chute-id", b"chute-1"),
        (b"x-e2e-path", b"/v1/chat/completions"),
        (b"x-e2e-stream", b" True "),
        (b"authorization", b"Bearer key-0123456789"),
    ]
    answer = forwarder.forward(_request(incoming), inst, length)
    assert isinstance(answer, Invocation)
    ours = answer.upstream

    async def body() -> AsyncIterator[bytes]:
        yield b""

    sent = [
        (b"content-type", b"application/octet-stream"),
        (b"x-e2e-path", b"/v1/chat/completions"),
        (b"x-e2e-stream", b"true"),
        (b"x-chute-id", b"chute-1"),
        (b"x-instance-id", b"inst-7"),
    ]
    if length is not None:
        sent.append((b"content-length", str(length).encode()))
    reference = client.build_request(
        "POST", config.instances[0] + "/e2e/invoke", headers=sent, content=body()
    )
    assert ours.method == reference.method == "POST"
    assert ours.url == reference.url
    assert ours.headers.raw == reference.headers.raw
    assert ours.extensions == reference.extensions
    # a second request reuses the parsed URL and still matches
    again = forwarder.forward(_request(incoming), inst, length)
    assert isinstance(again, Invocation)
    assert again.upstream.headers.raw == reference.headers.raw
    anyio.run(client.aclose)


def test_a_new_client_is_asked_again() -> None:
    config = RelayConfig(instances=("http://127.0.0.1:8123",), api_keys=("key-0123456789",))
    metrics = RelayMetrics()
    registry = Registry(config.instances)
    forwarder = Forwarder(config, metrics, Prober(config, registry, metrics.instances_up))
    inst = registry.instances[0]
    inst.instance_id = "inst-7"
    incoming = [(b"x-chute-id", b"chute-1")]
    for agent in ("first/1", "second/2"):
        forwarder.client = httpx2.AsyncClient(headers={"user-agent": agent}, timeout=9)
        answer = forwarder.forward(_request(incoming), inst, 5)
        assert isinstance(answer, Invocation)
        assert answer.upstream.headers["user-agent"] == agent
        assert answer.upstream.extensions["timeout"]["read"] == 9


@pytest.mark.parametrize("count", [1, 2, 10, 1000])
def test_nonces_look_like_token_urlsafe(count: int) -> None:
    reference = secrets.token_urlsafe(24)
    shape = re.compile(r"^[A-Za-z0-9_-]{32}$")
    assert shape.match(reference)
    nonces = _new_nonces(count)
    assert len(nonces) == count
    for nonce in nonces:
        assert shape.match(nonce), nonce
        assert len(base64.urlsafe_b64decode(nonce)) == 24
    assert len(set(nonces + _new_nonces(count))) == 2 * count
