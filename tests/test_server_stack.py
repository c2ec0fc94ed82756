"""The servers' HTTP stack: uvloop + httptools by default (the [server]/[proxy] extras install
them), asyncio + h11 with ``--pure-python``; and the body limits (413) re-verified on
httptools + uvloop for the instance, the relay and the proxy (the rest of the suite serves on
h11, see tests/servers.py)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
import uvicorn
from click.testing import CliRunner

import relay_support
import servers
from pqe2ee.cli import cli
from pqe2ee.proxy.app import ProxyConfig, create_app
from pqe2ee.proxy.app.server import server_config
from pqe2ee.server import relay
from pqe2ee.server._http import HeaderTimeoutH11, HeaderTimeoutHttpTools
from pqe2ee.server._stack import MAX_HEAD, bounded_httptools, uvicorn_stack
from pqe2ee.testing import dev_engine
from relay_support import KEY_A, chat_body, discover, seal, serve_stack
from servers import run_app

FAST = uvicorn_stack()  # uvloop + bounded httptools
PURE_PYTHON = {"loop": "asyncio", "http": HeaderTimeoutH11}
LIMIT = 64 * 1024
ECHO = relay.chute_id_for("dev-echo")


def test_the_extras_stack_is_the_default() -> None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    # the test environment installs the extras
    assert FAST == {"loop": "uvloop", "http": bounded_httptools()}
    assert issubclass(bounded_httptools(), HttpToolsProtocol)
    assert issubclass(bounded_httptools(), HeaderTimeoutHttpTools)  # and the header timeout
    assert uvicorn_stack(pure_python=True) == PURE_PYTHON


@pytest.mark.parametrize("command", ["instance", "relay", "proxy"])
@pytest.mark.parametrize("how", ["default", "flag", "env"])
def test_commands_serve_on_the_chosen_stack(
    command: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What each command hands uvicorn: the extras' stack unless told to stay pure Python."""
    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kw: Any) -> None:
        seen.update(kw)

    def fake_server_run(self: uvicorn.Server, *args: Any) -> None:
        seen.update(http=self.config.http, loop=self.config.loop)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setattr(uvicorn.Server, "run", fake_server_run)
    args = {
        "instance": ["instance", "--upstream", "http://127.0.0.1:9"],
        "relay": ["relay", "--instance", "http://127.0.0.1:9", "--api-key", "k"],
        "proxy": ["proxy"],
    }[command]
    env = {}
    if how == "flag":
        args.append("--pure-python")
    elif how == "env":
        env["PQE2EE_PURE_PYTHON"] = "1"
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 0, result.output
    expected = FAST if how == "default" else PURE_PYTHON
    assert {k: seen[k] for k in ("http", "loop")} == expected


def test_proxy_server_config_keeps_an_explicit_stack() -> None:
    app = create_app(ProxyConfig())
    assert server_config(app, ProxyConfig()).http is bounded_httptools()
    assert server_config(app, ProxyConfig(), http="h11", loop="asyncio").http == "h11"


@pytest.mark.parametrize("stack", ["pure", "fast"])
def test_request_head_is_bounded(stack: str) -> None:
    """uvicorn's own httptools stack buffers any head (8 MB passed); ours refuses it like h11."""
    config = PURE_PYTHON if stack == "pure" else FAST
    with run_app(dev_engine.create_app(), **config) as url, httpx2.Client(timeout=20) as c:
        assert c.get(url + "/v1/models", headers={"x-big": "a" * 8000}).status_code == 200
        for size in (4 * MAX_HEAD, 8 << 20):
            try:
                r = c.get(url + "/v1/models", headers={"x-big": "a" * size})
            except httpx2.TransportError:
                continue  # cut off while still sending: refused too
            assert r.status_code == 400
        assert c.get(url + "/v1/models").status_code == 200


def _chunks(total: int, size: int = 16384) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"\0" * size


@pytest.fixture(scope="module")
def fast_stack() -> Iterator[relay_support.Stack]:
    """Engine, one instance and the relay, each served on httptools + uvloop."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(servers, "run_app", functools.partial(run_app, **FAST))  # serve_chain's
        with serve_stack(1, max_body=LIMIT, instance_kw={"max_body": LIMIT}) as stack:
            yield stack


def test_instance_body_limit_on_httptools(fast_stack: relay_support.Stack) -> None:
    url = fast_stack.instances[0] + "/e2e/invoke"
    engine_calls = httpx2.get(fast_stack.engine + "/dev/stats").json()["requests"]
    head = {"x-e2e-path": "/v1/chat/completions", "content-type": "application/octet-stream"}
    with httpx2.Client(timeout=20, headers=head) as c:
        r = c.post(url, content=b"\0" * (4 * LIMIT))  # declared length: refused before reading
        assert r.status_code == 413
        assert r.json() == {"detail": f"Request body exceeds {LIMIT} bytes", "code": "oversize"}
        assert c.get(fast_stack.instances[0] + "/health").status_code == 200  # connection reused
        try:  # no length: reading stops at the limit
            r = c.post(url, content=_chunks(64 * LIMIT))
        except httpx2.TransportError:
            pass  # the reset can beat the 413 to the client; both mean "refused"
        else:
            assert r.status_code == 413
    assert fast_stack.server().inflight == 0
    assert httpx2.get(fast_stack.engine + "/dev/stats").json()["requests"] == engine_calls


def test_relay_body_limit_on_httptools(fast_stack: relay_support.Stack) -> None:
    with httpx2.Client(base_url=fast_stack.relay, timeout=20) as c:
        inst = discover(c, ECHO)[0][0]
        first = seal(inst, inst.nonces[0], ECHO, chat_body("x"))
        r = c.post("/e2e/invoke", content=b"\0" * (4 * LIMIT), headers=first.headers)
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        r = c.post("/e2e/invoke", content=first.blob, headers=first.headers)  # nonce unspent
        assert r.status_code == 200
        second = seal(inst, inst.nonces[1], ECHO, chat_body("x"))
        r = c.post("/e2e/invoke", content=_chunks(4 * LIMIT), headers=second.headers)
        assert r.status_code == 413
        third = seal(inst, inst.nonces[2], ECHO, chat_body("fine"))
        assert c.post("/e2e/invoke", content=third.blob, headers=third.headers).status_code == 200


def test_proxy_body_limit_on_httptools(fast_stack: relay_support.Stack) -> None:
    config = ProxyConfig(api_base=fast_stack.relay, models_base=fast_stack.relay, max_body=LIMIT)
    with contextlib.ExitStack() as es:
        proxy = es.enter_context(run_app(create_app(config), **FAST))
        c = es.enter_context(httpx2.Client(base_url=proxy, timeout=30))
        head = {"x-api-key": KEY_A}
        big = {"model": "dev-echo", "messages": [{"role": "user", "content": "x" * (2 * LIMIT)}]}
        r = c.post("/v1/chat/completions", json=big, headers=head)
        assert r.status_code == 413
        assert r.json()["error"]["type"] == "invalid_request_error"

        def chunked() -> Iterator[bytes]:
            yield b'{"model": "dev-echo", "messages": [{"role": "user", "content": "'
            yield from (b"z" * 8192 for _ in range(2 * LIMIT // 8192))
            yield b'"}]}'

        r = c.post(
            "/v1/messages", content=chunked(), headers={**head, "content-type": "application/json"}
        )
        assert r.status_code == 413
        assert r.json()["error"]["type"] == "invalid_request_error"
        small = {"model": "dev-echo", "messages": [{"role": "user", "content": "y" * 1000}]}
        r = c.post("/v1/chat/completions", json=small, headers=head)
        assert r.status_code == 200
        assert "y" * 1000 in r.json()["choices"][0]["message"]["content"]
