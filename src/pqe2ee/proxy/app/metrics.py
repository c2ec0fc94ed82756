"""Prometheus metrics and the access log, fed by the shared middleware that sees every exchange.

:class:`~pqe2ee.server._metrics.MetricsMiddleware` counts bytes in and out at the ASGI layer
and notes the status and the first byte; when the exchange ends, :class:`AccessLog` writes one
log line and the metrics. Lines and labels hold
method, fixed route names, status, byte counts and durations: never bodies, prompts, keys,
models or free-form paths.
"""

from __future__ import annotations

import logging
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pqe2ee.proxy.app.status import FailureLog
from pqe2ee.server._metrics import Exchange

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
        self.failures_by_code = Counter(
            p + "failures", "Upstream failures by stable error code", ["code"], registry=r
        )
        self.failure_log = FailureLog()
        self.open_streams = Gauge(p + "open_streams", "Streams being relayed now", registry=r)
        self.keys = Gauge(p + "pooled_keys", "API keys with a live upstream transport", registry=r)

    def failed(self, code: str) -> None:
        """An upstream call or stream failed with ``code`` (a stable error code)."""
        self.failures_by_code.labels(code).inc()
        self.failure_log.add(code)


class AccessLog:
    """The ``observe`` of a :class:`~pqe2ee.server._metrics.MetricsMiddleware`: one log line
    and the metrics per request, written when the exchange ends.

    The line holds method, route, status, byte counts and durations - nothing else."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        # The samples of each route (and route + status), looked up once: ``labels()`` checks
        # and converts its values and takes a lock, five times a request otherwise. The label
        # values are the fixed route names and the status codes, so the cache stays small.
        self._routes: dict[str, tuple[Histogram, Histogram, Counter, Counter]] = {}
        self._requests: dict[tuple[str, str], Counter] = {}

    def _of(self, route: str) -> tuple[Histogram, Histogram, Counter, Counter]:
        samples = self._routes.get(route)
        if samples is None:
            m = self.metrics
            samples = self._routes[route] = (
                m.first_byte.labels(route),
                m.duration.labels(route),
                m.bytes_in.labels(route),
                m.bytes_out.labels(route),
            )
        return samples

    def __call__(self, ex: Exchange) -> None:
        elapsed = ex.elapsed
        route = ROUTES.get(ex.path, "other")
        status = str(ex.status) if ex.status is not None else "499"
        requests = self._requests.get((route, status))
        if requests is None:
            requests = self._requests[route, status] = self.metrics.requests.labels(route, status)
        requests.inc()
        first_byte, duration, bytes_in, bytes_out = self._of(route)
        first_byte.observe(ex.first_byte if ex.first_byte is not None else elapsed)
        duration.observe(elapsed)
        bytes_in.inc(ex.bytes_in)
        bytes_out.inc(ex.bytes_out)
        failed = ex.status is None or ex.status >= 500 or not ex.complete
        log.log(
            logging.WARNING if failed else logging.INFO,
            "%s %s %s in=%dB out=%dB first=%.1fms total=%.1fms%s",
            ex.method,
            ex.path if route != "other" else "(other path)",
            status,
            ex.bytes_in,
            ex.bytes_out,
            (ex.first_byte or 0.0) * 1000,
            elapsed * 1000,
            "" if ex.complete else " incomplete",
        )
