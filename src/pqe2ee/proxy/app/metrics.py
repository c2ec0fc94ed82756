"""Prometheus metrics and the access log: one middleware that sees every exchange.

:class:`AccessLog` counts bytes in and out at the ASGI layer, notes the status and the first
byte, and when the exchange ends writes one log line and the metrics. Lines and labels hold
method, fixed route names, status, byte counts and durations: never bodies, prompts, keys,
models or free-form paths.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import Message, Receive, Scope, Send

__all__ = ["CHAT_PATH", "COMPLETIONS_PATH", "ROUTES", "AccessLog", "Metrics"]

log = logging.getLogger("pqe2ee.proxy")

CHAT_PATH: Final = "/v1/chat/completions"
COMPLETIONS_PATH: Final = "/v1/completions"

#: The route name (metrics label) of each path the proxy serves; any other path is "other".
ROUTES: Final = {
    CHAT_PATH: "chat",
    COMPLETIONS_PATH: "completions",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
    "/v1/models": "models",
    "/health": "health",
    "/metrics": "metrics",
}


class Metrics:
    """Counts and latencies only: no keys, models, paths beyond the fixed route names, bodies."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "pqe2ee_proxy_"
        self.requests = Counter(
            p + "requests", "Requests by route and status", ["route", "status"], registry=r
        )
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

        def latency(name: str, doc: str) -> Histogram:
            return Histogram(p + name, doc, ["route"], registry=r, buckets=buckets)

        self.first_byte = latency(
            "first_byte_seconds", "Time from request to the first response byte"
        )
        self.duration = latency("duration_seconds", "Time from request to the last response byte")
        self.bytes_in = Counter(p + "request_bytes", "Request body bytes", ["route"], registry=r)
        self.bytes_out = Counter(p + "response_bytes", "Response body bytes", ["route"], registry=r)
        self.stream_faults = Counter(
            p + "stream_faults", "Streams ended by an upstream fault", ["route"], registry=r
        )
        self.disconnects = Counter(
            p + "client_disconnects",
            "Streams cancelled by the client hanging up",
            ["route"],
            registry=r,
        )
        self.open_streams = Gauge(p + "open_streams", "Streams being relayed now", registry=r)
        self.keys = Gauge(p + "pooled_keys", "API keys with a live upstream transport", registry=r)


@dataclass(slots=True)
class _Exchange:
    started: float
    status: int | None = None
    first: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    complete: bool = False


class AccessLog:
    """ASGI middleware: one log line and the metrics per request, written when the body ends.

    The line holds method, route, status, byte counts and durations - nothing else."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex = _Exchange(time.perf_counter())
        path: str = scope.get("path", "")
        route = ROUTES.get(path, "other")

        async def receive_counting() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                ex.bytes_in += len(message.get("body", b""))
            return message

        async def send_counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.status = int(message["status"])
                ex.first = time.perf_counter() - ex.started
            elif message["type"] == "http.response.body":
                ex.bytes_out += len(message.get("body", b""))
                if not message.get("more_body", False):
                    ex.complete = True
            await send(message)

        try:
            await self.app(scope, receive_counting, send_counting)
        finally:
            elapsed = time.perf_counter() - ex.started
            m = self.metrics
            status = str(ex.status) if ex.status is not None else "499"
            m.requests.labels(route, status).inc()
            m.first_byte.labels(route).observe(ex.first if ex.first is not None else elapsed)
            m.duration.labels(route).observe(elapsed)
            m.bytes_in.labels(route).inc(ex.bytes_in)
            m.bytes_out.labels(route).inc(ex.bytes_out)
            log.info(
                "%s %s %s in=%dB out=%dB first=%.1fms total=%.1fms%s",
                scope.get("method", "-"),
                path if route != "other" else "(other path)",
                status,
                ex.bytes_in,
                ex.bytes_out,
                (ex.first or 0.0) * 1000,
                elapsed * 1000,
                "" if ex.complete else " incomplete",
            )
