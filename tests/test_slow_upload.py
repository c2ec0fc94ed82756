"""Issue 16 item 8 (the body part): an upload that stalls or crawls is cut off - the instance
and the relay answer it like a client that hung up instead of holding the connection and a
request slot for as long as the sender likes. (Header read timeouts: not done.)"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from pqe2ee.server import _asgi, instance, relay
from pqe2ee.testing import dev_engine
from servers import run_app

CHUTE = relay.chute_id_for("dev-echo")


@pytest.fixture()
def short_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_asgi, "BODY_IDLE_TIMEOUT", 1.0, raising=False)
    monkeypatch.setattr(_asgi, "BODY_RATE_GRACE", 1.0, raising=False)
    monkeypatch.setattr(_asgi, "BODY_MIN_RATE", 100, raising=False)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    with run_app(dev_engine.create_app()) as engine:
        app = instance.create_app(instance.InstanceConfig(upstream=engine))
        with run_app(app) as inst:
            cfg = relay.RelayConfig(instances=(inst,), api_keys=("k",), startup_wait=5.0)
            with run_app(relay.create_app(cfg)) as relay_url:
                yield {
                    "instance": inst,
                    "relay": relay_url,
                    "instance_id": app.state.instance.instance_id,
                }


def upload(url: str, instance_id: str, *, trickle: bool) -> bytes:
    """POST /e2e/invoke declaring 4,000 bytes, then send 1 byte every 0.2 s (``trickle``) or
    nothing; the answer, or b"" if the server closed. Bounded: gives up after 20 s."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=20) as sock:
        sock.sendall(
            b"POST /e2e/invoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            + f"X-Chute-Id: {CHUTE}\r\nX-Instance-Id: {instance_id}\r\n".encode()
            + b"X-E2E-Nonce: n\r\nX-E2E-Path: /v1/chat/completions\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 4000\r\n\r\n"
        )
        sock.settimeout(0.2 if trickle else 20)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if trickle:
                try:
                    sock.sendall(b"x")
                except OSError:
                    break
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            sock.settimeout(2)
            with contextlib.suppress(OSError):
                while more := sock.recv(4096):  # the rest of the answer
                    data += more
            return data
        raise AssertionError("the server still waits for the upload after 20 s")
    return b""


@pytest.mark.parametrize("trickle", [True, False], ids=["crawling", "stalled"])
def test_instance_cuts_off_a_slow_upload(
    servers: dict[str, str], short_bounds: None, trickle: bool
) -> None:
    answer = upload(servers["instance"], servers["instance_id"], trickle=trickle)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"connection_lost" in answer


def test_relay_cuts_off_a_slow_upload(servers: dict[str, str], short_bounds: None) -> None:
    answer = upload(servers["relay"], servers["instance_id"], trickle=True)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]
