"""The proxy's model calls skip Starlette's stack (issue 14: the hop is what the proxy adds):
a POST to a model-call path runs its route's own chain - the metrics and browser-guard
middleware around the endpoint - and never reaches Starlette's router or its error and
exception middleware; everything else still does. Real uvicorn, a real relay chain."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from pqe2ee.proxy.app import ProxyConfig, create_app
from servers import StackSpy, run_app, serve_chain

KEY = "direct-test-key"
CHAT = {"model": "dev-echo", "messages": [{"role": "user", "content": "hello there"}]}
MESSAGES = {"model": "dev-echo", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def relay() -> Iterator[str]:
    with serve_chain(1, api_keys=(KEY,), rate_limit=10_000, nonces_per_instance=100) as chain:
        yield chain.relay


def _app(relay: str, **kw: Any) -> tuple[Any, StackSpy]:
    app = create_app(ProxyConfig(api_base=relay, models_base=relay, api_key=KEY, **kw))
    spy = StackSpy(app.build_middleware_stack())
    app.middleware_stack = spy
    return app, spy


def test_model_calls_go_straight_to_their_route(relay: str) -> None:
    app, spy = _app(relay)
    with run_app(app) as url, httpx2.Client(base_url=url, timeout=30) as http:
        chat = http.post("/v1/chat/completions", json=CHAT)
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"]
        with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status_code == 200
            assert r.read().endswith(b"data: [DONE]\n\n")
        assert http.post("/v1/messages", json=MESSAGES).status_code == 200
        assert http.post("/v1/messages/count_tokens", json=MESSAGES).status_code == 200
        assert spy.seen == []
        # Everything else is Starlette's, as before: other methods, other paths, 404s.
        assert http.get("/health").status_code == 200
        assert http.get("/v1/chat/completions").status_code == 405
        assert http.post("/v1/nowhere", json=CHAT).status_code == 404
        assert spy.seen == [
            ("GET", "/health"),
            ("GET", "/v1/chat/completions"),
            ("POST", "/v1/nowhere"),
        ]


def test_the_direct_chain_keeps_the_guard_the_metrics_and_the_dialects(relay: str) -> None:
    app, spy = _app(relay)
    with run_app(app) as url, httpx2.Client(base_url=url, timeout=30) as http:
        # browser guard: a web page's request and a non-JSON body are refused
        r = http.post("/v1/chat/completions", json=CHAT, headers={"origin": "https://evil.test"})
        assert (r.status_code, r.json()["error"]["code"]) == (403, "origin_not_allowed")
        r = http.post("/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"})
        assert (r.status_code, r.json()["error"]["code"]) == (415, "unsupported_content_type")
        # failures in the route's dialect (Anthropic for /v1/messages), limits as before
        r = http.post("/v1/messages", content=b"[1]", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["type"] == "error"
        missing = http.post("/v1/chat/completions", json={"messages": []})
        assert (missing.status_code, missing.json()["error"]["code"]) == (400, "missing_model")
        big = {**CHAT, "pad": "x" * (app.state.config.max_body + 1)}
        r = http.post("/v1/chat/completions", json=big)
        assert (r.status_code, r.json()["error"]["code"]) == (413, "oversize")
        ok = http.post("/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200
        metrics = http.get("/metrics").text
    assert spy.seen == [("GET", "/metrics")]
    for line in (
        'pqe2ee_proxy_requests_total{route="chat",status="200"} 1.0',
        'pqe2ee_proxy_requests_total{route="chat",status="403"} 1.0',
        'pqe2ee_proxy_requests_total{route="chat",status="413"} 1.0',
        'pqe2ee_proxy_requests_total{route="messages",status="400"} 1.0',
    ):
        assert line in metrics
    # bodies counted as read: the refused ones were not (the 413 from its Content-Length)
    read = len(missing.request.content) + len(ok.request.content)
    assert f'pqe2ee_proxy_request_bytes_total{{route="chat"}} {float(read)}' in metrics


def test_a_root_path_goes_through_starlette(relay: str) -> None:
    app, spy = _app(relay)
    with run_app(app, root_path="/proxy") as url, httpx2.Client(base_url=url, timeout=30) as http:
        http.post("/v1/chat/completions", json=CHAT)
    assert spy.seen == [("POST", "/proxy/v1/chat/completions")]


def test_the_access_log_looks_each_routes_samples_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five ``labels()`` lookups per request were a fifth of the proxy's own calls per stream:
    each route's samples (and each route + status counter) are looked up once, and count the
    same."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics import MetricWrapperBase

    from pqe2ee.proxy.app.metrics import AccessLog, Metrics
    from pqe2ee.server._metrics import Exchange

    lookups: list[tuple[str, ...]] = []
    labels = MetricWrapperBase.labels

    def counted(self: MetricWrapperBase, *values: str) -> Any:
        lookups.append(values)
        return labels(self, *values)

    monkeypatch.setattr(MetricWrapperBase, "labels", counted)
    metrics = Metrics()
    observe = AccessLog(metrics)
    for path, status, size in [
        ("/v1/chat/completions", 200, 10),
        ("/v1/chat/completions", 200, 20),
        ("/v1/messages", 200, 5),
        ("/v1/chat/completions", 400, 7),
        ("/v1/chat/completions", None, 0),
    ]:
        ex = Exchange("POST", path, status=status, first_byte=0.001, bytes_in=size, bytes_out=1)
        observe(ex)
    assert len(lookups) == 4 + 4 + 4  # 4 samples of chat and of messages; 4 route + status
    text = generate_latest(metrics.registry).decode()
    for line in (
        'pqe2ee_proxy_requests_total{route="chat",status="200"} 2.0',
        'pqe2ee_proxy_requests_total{route="chat",status="400"} 1.0',
        'pqe2ee_proxy_requests_total{route="chat",status="499"} 1.0',
        'pqe2ee_proxy_requests_total{route="messages",status="200"} 1.0',
        'pqe2ee_proxy_request_bytes_total{route="chat"} 37.0',
        'pqe2ee_proxy_response_bytes_total{route="chat"} 4.0',
        'pqe2ee_proxy_duration_seconds_count{route="chat"} 4.0',
        'pqe2ee_proxy_first_byte_seconds_count{route="messages"} 1.0',
    ):
        assert line in text, line


def test_a_model_call_hands_the_transport_only_what_it_seals(
    relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request the proxy gives its E2EE transport is built bare: path, body and the
    client's timeouts - the transport seals the body for the path with its own key and sends
    nothing else, so merging the client's default headers and cookies per call was work for
    nothing (the wire is the same: every proxy test)."""
    from pqe2ee.proxy.app.pool import client_timeout
    from pqe2ee.transports.httpx2 import AsyncE2EETransport

    seen: list[httpx2.Request] = []
    handle = AsyncE2EETransport.handle_async_request

    async def recording(self: AsyncE2EETransport, request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return await handle(self, request)

    monkeypatch.setattr(AsyncE2EETransport, "handle_async_request", recording)
    config = ProxyConfig(api_base=relay, models_base=relay, api_key=KEY, read_timeout=42.0)
    with run_app(create_app(config)) as url, httpx2.Client(base_url=url, timeout=30) as http:
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert http.post("/v1/messages", json=MESSAGES).status_code == 200
    assert [r.url.path for r in seen] == ["/v1/chat/completions"] * 2
    for request in seen:
        assert request.method == "POST"
        assert "user-agent" not in request.headers and "cookie" not in request.headers
        assert request.extensions["timeout"] == client_timeout(config).as_dict()
        assert request.extensions["timeout"]["read"] == 42.0
