"""Health that tells the truth: ``/health`` is liveness, ``/ready`` names each dependency that
does not answer (the engine for the instance, instances for the relay, the relay for the proxy),
the instance has ``/metrics``, and the relay backs off a dead instance with one log line."""

from __future__ import annotations

import itertools
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import pqe2ee
from pqe2ee.proxy.app import ProxyConfig, create_app
from pqe2ee.server import instance, relay
from relay_support import KEY_A, serve_stack
from servers import run_app


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def stack() -> Iterator[Any]:
    with serve_stack(1, api_keys=(KEY_A,), rate_limit=1000) as st:
        yield st


def get(url: str) -> tuple[int, Any]:
    resp = httpx2.get(url, timeout=10)
    return resp.status_code, resp.json()


def test_everything_ready_on_a_healthy_stack(stack: Any) -> None:
    assert get(stack.instances[0] + "/ready") == (
        200,
        {"status": "ready", "checks": {"engine": {"ok": True}}},
    )
    assert get(stack.relay + "/ready") == (
        200,
        {"status": "ready", "checks": {stack.instances[0]: {"ok": True}}},
    )
    config = ProxyConfig(api_base=stack.relay, models_base=stack.relay)
    with run_app(create_app(config)) as proxy:
        assert get(proxy + "/ready") == (
            200,
            {"status": "ready", "checks": {"relay": {"ok": True}, "models": {"ok": True}}},
        )


def test_instance_with_a_dead_engine_is_alive_but_not_ready() -> None:
    app = instance.create_app(instance.InstanceConfig(upstream=dead_url()))
    with run_app(app) as url:
        assert get(url + "/health") == (200, {"status": "ok"})
        status, doc = get(url + "/ready")
    assert status == 503
    assert doc == {
        "status": "not ready",
        "checks": {"engine": {"ok": False, "reason": "unreachable (ConnectError)"}},
    }


def test_proxy_with_a_dead_relay_is_not_ready() -> None:
    dead = dead_url()
    with run_app(create_app(ProxyConfig(api_base=dead, models_base=dead))) as proxy:
        assert get(proxy + "/health")[0] == 200
        status, doc = get(proxy + "/ready")
    assert status == 503
    assert doc["checks"]["relay"] == {"ok": False, "reason": "unreachable (ConnectError)"}
    assert doc["checks"]["models"] == {"ok": False, "reason": "unreachable (ConnectError)"}


def test_proxy_with_a_models_host_that_errs_is_not_ready(stack: Any) -> None:
    """The relay is up but the model list answers 500: model names cannot be resolved."""

    async def models(request: Request) -> Response:
        return Response("no", status_code=500)

    with run_app(Starlette(routes=[Route("/v1/models", models)])) as models_url:
        config = ProxyConfig(api_base=stack.relay, models_base=models_url)
        with run_app(create_app(config)) as proxy:
            status, doc = get(proxy + "/ready")
    assert status == 503
    assert doc["checks"] == {
        "relay": {"ok": True},
        "models": {"ok": False, "reason": "answered 500"},
    }


def test_relay_without_instances_is_not_ready_and_says_why() -> None:
    dead = dead_url()
    config = relay.RelayConfig(instances=(dead,), api_keys=(KEY_A,), startup_wait=0)
    with run_app(relay.create_app(config)) as url:
        status, doc = get(url + "/ready")
    assert status == 503
    assert doc == {"status": "not ready", "checks": {dead: {"ok": False, "reason": "ConnectError"}}}


def test_relay_backs_off_a_failing_instance_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An instance whose /e2e/info answers 500: probed at 0.05 s, 0.1 s, 0.2 s, ... apart, not
    every 0.05 s (about 30 probes in 1.5 s without the back-off), and warned about once."""
    hits: list[float] = []

    async def info(request: Request) -> Response:
        hits.append(time.monotonic())
        return Response("down", status_code=500)

    sick = Starlette(routes=[Route("/e2e/info", info)])
    with run_app(sick) as sick_url:
        config = relay.RelayConfig(
            instances=(sick_url,), api_keys=(KEY_A,), startup_wait=0, probe_interval=0.05
        )
        with caplog.at_level(logging.WARNING, logger="pqe2ee"), run_app(relay.create_app(config)):
            time.sleep(1.6)
    assert 3 <= len(hits) <= 8, len(hits)
    gaps = [b - a for a, b in itertools.pairwise(hits)]
    assert gaps[-1] > 2 * gaps[0]
    lines = [r.getMessage() for r in caplog.records if "is unavailable" in r.getMessage()]
    assert lines == [f"instance {sick_url} is unavailable: /e2e/info answered 500"]


def _sample(text: str, name: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_instance_metrics_count_calls_without_labels_that_leak(stack: Any) -> None:
    base = stack.instances[0]
    invoke_ok = 'pqe2ee_instance_requests_total{endpoint="invoke",status="200"}'
    before = httpx2.get(base + "/metrics", timeout=10).text
    transport = pqe2ee.E2EETransport(api_key=KEY_A, api_base=stack.relay, models_base=stack.relay)
    with httpx2.Client(transport=transport, base_url=stack.relay, timeout=30) as client:
        body = {"model": "dev-echo", "messages": [{"role": "user", "content": "secret words"}]}
        for _ in range(2):  # (the second one counted through the child the first looked up)
            assert client.post("/v1/chat/completions", json=body).status_code == 200
    text = httpx2.get(base + "/metrics", timeout=10).text
    assert _sample(text, invoke_ok) == _sample(before, invoke_ok) + 2
    count = "pqe2ee_instance_invoke_seconds_count"
    assert _sample(text, count) == _sample(before, count) + 2
    assert _sample(text, "pqe2ee_instance_request_bytes_total") > 1000  # a sealed request
    for leak in ("secret", "dev-echo", KEY_A, "chute"):
        assert leak not in text
