"""Issue 16 item 8 (the header part): a connection that does not finish its request head in
time is closed - whether it sends nothing or dribbles a header byte at a time - in both of
uvicorn's protocol flavours; complete requests on the same protocols are unaffected."""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx2
import pytest

from pqe2ee.proxy.app import ProxyConfig, create_app
from pqe2ee.proxy.app.server import server_config
from pqe2ee.server import _http
from pqe2ee.server._stack import bounded_httptools, uvicorn_stack
from pqe2ee.testing import dev_engine
from servers import run_app

FLAVOURS = [_http.HeaderTimeoutH11] + (
    [_http.HeaderTimeoutHttpTools, bounded_httptools()]  # the last: what the servers run
    if _http.HeaderTimeoutHttpTools is not None
    else []
)


def held_for(url: str, *, dribble: bool, limit: float = 15.0) -> float:
    """Open a connection, send part of a request head (then a byte every 0.2 s when
    ``dribble``); seconds until the server closed it (AssertionError past ``limit``)."""
    parts = urlsplit(url)
    started = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=0.2) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() - started < limit:
            try:
                if dribble:
                    sock.sendall(b"X")
                if sock.recv(1024) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - started
    raise AssertionError(f"the connection was still open after {limit} s")


@pytest.mark.parametrize("protocol", FLAVOURS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dribble", [False, True], ids=["silent", "dribbling"])
def test_incomplete_head_is_closed(
    monkeypatch: pytest.MonkeyPatch, protocol: Any, dribble: bool
) -> None:
    monkeypatch.setattr(_http, "HEADER_TIMEOUT", 1.0)
    with run_app(dev_engine.create_app(), http=protocol) as url:
        held_for(url, dribble=dribble)
        # a normal client, twice on one keep-alive connection, is served
        with httpx2.Client(timeout=10) as client:
            assert client.get(url + "/health").status_code == 200
            time.sleep(1.5)  # (longer than the header timeout, shorter than keep-alive)
            assert client.get(url + "/health").status_code == 200


def test_servers_use_it() -> None:
    config = server_config(create_app(ProxyConfig()), ProxyConfig())
    assert issubclass(config.http, _http.HeaderTimeoutHttpTools)
    assert uvicorn_stack(pure_python=True)["http"] is _http.HeaderTimeoutH11
