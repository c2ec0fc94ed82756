"""The relay's and the instance's ``POST /e2e/invoke`` skip Starlette's stack, as the proxy's
model calls do (:class:`~pqe2ee.server._asgi.ServerApp`, issue 14): each goes straight to its
route's own chain - the metrics layer around the endpoint - and never reaches Starlette's
router or its error and exception middleware; everything else still does, and every failure
is answered as before. Real uvicorn, a real dev-engine -> instance -> relay chain, the openai
SDK on our transport (v1 and v2, stream and not)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
import uvicorn

import pqe2ee.server.instance.app as instance_app
import pqe2ee.server.relay.app as relay_app
from pqe2ee.server.instance import InstanceConfig
from pqe2ee.server.relay import RelayConfig
from relay_support import sdk_on
from servers import Chain, StackSpy, serve_chain

KEY = "direct-server-key"


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    with serve_chain(1, api_keys=(KEY,), rate_limit=10_000, nonces_per_instance=100) as chain:
        yield chain


@pytest.fixture
def spies(chain: Chain) -> Iterator[tuple[StackSpy, StackSpy]]:
    """The relay's and the instance's Starlette stacks, spied on (built by the lifespan)."""
    apps = [chain.relay_app, chain.instance_apps[0]]
    stacks = [app.middleware_stack for app in apps]
    assert all(stack is not None for stack in stacks)
    spies = []
    for app, stack in zip(apps, stacks, strict=True):
        app.middleware_stack = StackSpy(stack)
        spies.append(app.middleware_stack)
    try:
        yield spies[0], spies[1]
    finally:
        for app, stack in zip(apps, stacks, strict=True):
            app.middleware_stack = stack


@pytest.mark.parametrize("prefer_v2", [False, True], ids=["v1", "v2"])
def test_invocations_go_straight_to_their_route(
    chain: Chain, spies: tuple[StackSpy, StackSpy], prefer_v2: bool
) -> None:
    relay, instance = spies
    msgs: Any = [{"role": "user", "content": "hello there"}]
    with sdk_on(chain.relay, prefer_v2, KEY) as sdk:
        reply = sdk.chat.completions.create(model="dev-echo", messages=msgs)
        assert reply.choices[0].message.content == "Echo: hello there"
        stream = sdk.chat.completions.create(model="dev-echo", messages=msgs, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == "Echo: hello there"
    # discovery (and the relay's probes of the instance) went through Starlette, no invoke
    assert [seen for seen in relay.seen if seen[0] == "POST"] == []
    assert [seen for seen in instance.seen if seen[0] == "POST"] == []
    assert ("GET", "/v1/models") in relay.seen or any("/e2e/instances/" in p for _, p in relay.seen)


def test_everything_else_goes_through_starlette(
    chain: Chain, spies: tuple[StackSpy, StackSpy]
) -> None:
    relay, instance = spies
    auth = {"authorization": f"Bearer {KEY}"}
    with httpx2.Client(timeout=30) as http:
        r = http.get(chain.relay + "/e2e/invoke", headers=auth)
        assert (r.status_code, r.json()) == (405, {"detail": "Method Not Allowed"})
        assert r.headers["allow"] == "POST"
        r = http.post(chain.relay + "/e2e/nowhere", headers=auth)
        assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
        r = http.get(chain.instances[0] + "/e2e/invoke")
        assert (r.status_code, r.text) == (405, "Method Not Allowed")
        r = http.post(chain.instances[0] + "/e2e/nowhere")
        assert (r.status_code, r.text) == (404, "Not Found")
    assert relay.seen == [("GET", "/e2e/invoke"), ("POST", "/e2e/nowhere")]
    assert [s for s in instance.seen if s[1] != "/e2e/info"] == [
        ("GET", "/e2e/invoke"),
        ("POST", "/e2e/nowhere"),
    ]


def test_refusals_are_the_routes_own(chain: Chain, spies: tuple[StackSpy, StackSpy]) -> None:
    """The handlers' answers, unchanged: the relay's 401 with its challenge, 422 for missing
    headers, 403 for a bad nonce; the instance's typed refusals."""
    relay, instance = spies
    with httpx2.Client(timeout=30) as http:
        r = http.post(chain.relay + "/e2e/invoke", content=b"x")
        assert (r.status_code, r.headers["www-authenticate"]) == (401, "Bearer")
        assert r.json() == {"detail": "Invalid or missing API key"}
        r = http.post(
            chain.relay + "/e2e/invoke", content=b"x", headers={"authorization": f"Bearer {KEY}"}
        )
        assert r.status_code == 422
        assert [e["loc"] for e in r.json()["detail"]] == [
            ["header", "x-chute-id"],
            ["header", "x-instance-id"],
            ["header", "x-e2e-nonce"],
        ]
        r = http.post(
            chain.instances[0] + "/e2e/invoke", content=b"x", headers={"x-e2e-path": "/nope"}
        )
        assert r.status_code == 403 and r.json()["detail"] == "Path not available via E2E"
        r = http.post(
            chain.instances[0] + "/e2e/invoke",
            content=b"x" * 16,
            headers={"x-instance-id": "other", "x-e2e-path": "/v1/chat/completions"},
        )
        assert r.status_code == 400 and "names a different instance" in r.text
        metrics = http.get(chain.relay + "/metrics").text
        imetrics = http.get(chain.instances[0] + "/metrics").text
    assert 'pqe2ee_relay_requests_total{endpoint="invoke",status="401"}' in metrics
    assert 'pqe2ee_relay_requests_total{endpoint="invoke",status="422"}' in metrics
    assert 'pqe2ee_instance_requests_total{endpoint="invoke",status="403"}' in imetrics
    assert [s for s in relay.seen if s[0] == "POST"] == []
    assert [s for s in instance.seen if s[0] == "POST"] == []


def test_an_internal_error_is_answered_as_starlette_did(
    chain: Chain, spies: tuple[StackSpy, StackSpy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception escaping the hot route: the relay's 500 detail, the instance's plain-text
    500 (Starlette's), counted as 500 - and not through Starlette's stack."""
    relay, instance = spies

    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(chain.relay_app.state.relay, "authenticate", broken)
    monkeypatch.setattr(chain.instance_apps[0].state.instance, "_read_body", broken)
    with httpx2.Client(timeout=30) as http:
        r = http.post(chain.relay + "/e2e/invoke", content=b"x")
        assert (r.status_code, r.json()) == (
            500,
            {"detail": "Internal error during E2E invocation"},
        )
        path = {"x-e2e-path": "/v1/chat/completions"}
        r = http.post(chain.instances[0] + "/e2e/invoke", content=b"x", headers=path)
        assert (r.status_code, r.text) == (500, "Internal Server Error")
        assert r.headers["content-type"].startswith("text/plain")
    monkeypatch.undo()
    # A fresh client: the server closes a connection whose request raised (as uvicorn did
    # under Starlette's error middleware), so a kept-alive one may be reset when reused.
    with httpx2.Client(timeout=30) as http:
        metrics = http.get(chain.relay + "/metrics").text
        imetrics = http.get(chain.instances[0] + "/metrics").text
    assert 'pqe2ee_relay_requests_total{endpoint="invoke",status="500"} 1.0' in metrics
    assert 'pqe2ee_instance_requests_total{endpoint="invoke",status="500"} 1.0' in imetrics
    assert [s for s in relay.seen if s[0] == "POST"] == []
    assert [s for s in instance.seen if s[0] == "POST"] == []


@pytest.mark.parametrize("command", ["instance", "relay"])
def test_serve_and_the_bench_run_the_same_settings(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve`` hands uvicorn its module's ``server_settings`` (no X-Forwarded-* rewriting:
    neither server reads the client's address or scheme from it), and bench_server's
    ``_serve`` runs the relay and the instance with the same."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_server

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.append(kw))
    module: Any = instance_app if command == "instance" else relay_app
    config: Any = (
        InstanceConfig(upstream="http://127.0.0.1:9", port=1234)
        if command == "instance"
        else RelayConfig(instances=("http://127.0.0.1:9",), api_keys=(KEY,), port=1234)
    )
    module.serve(config, log_level="warning")
    bench_server._serve(command, 1234, "http://127.0.0.1:9")
    served, benched = seen
    assert served == module.server_settings(config, log_level="warning")
    assert served["proxy_headers"] is False and served["server_header"] is False
    assert benched == served
