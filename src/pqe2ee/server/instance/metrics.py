"""The instance's Prometheus metrics (``GET /metrics``): counts and latencies only - no ids,
keys, models, paths beyond a fixed set of endpoint names, or bodies in any label. Fed by
:class:`~pqe2ee.server._metrics.MetricsMiddleware` through :meth:`InstanceMetrics.observe`."""

from __future__ import annotations

from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import Response

from pqe2ee.server._metrics import Exchange

__all__ = ["InstanceMetrics"]

_ENDPOINTS: Final = frozenset({"/e2e/invoke", "/e2e/info", "/health", "/ready", "/metrics"})


class InstanceMetrics:
    """Requests by endpoint and status; invoke latency to the first byte and in total; bytes."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "pqe2ee_instance_"
        self.requests = Counter(
            p + "requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 600)
        self.first_byte = Histogram(
            p + "invoke_first_byte_seconds", "Invoke: time to the response start",
            registry=r, buckets=buckets,
        )  # fmt: skip
        self.duration = Histogram(
            p + "invoke_seconds", "Invoke: time to the end of the response",
            registry=r, buckets=buckets,
        )  # fmt: skip
        self.bytes_in = Counter(p + "request_bytes", "Sealed request bytes received", registry=r)
        self.bytes_out = Counter(p + "response_bytes", "Sealed response bytes sent", registry=r)
        # (endpoint path, status) -> its ``requests`` child: labels() converts the values and
        # takes the metric's lock on every call. Bounded: a fixed set of paths, HTTP statuses.
        self._counts: dict[tuple[str, int], Counter] = {}

    def observe(self, exchange: Exchange) -> None:
        """One request done (a response never started counts as 500)."""
        path = exchange.path if exchange.path in _ENDPOINTS else "other"
        status = exchange.status if exchange.status is not None else 500
        count = self._counts.get((path, status))
        if count is None:
            count = self.requests.labels(path.rsplit("/", 1)[-1] or "other", str(status))
            self._counts[(path, status)] = count
        count.inc()
        if path == "/e2e/invoke":
            elapsed = exchange.elapsed
            first = exchange.first_byte
            self.first_byte.observe(first if first is not None else elapsed)
            self.duration.observe(elapsed)
            self.bytes_in.inc(exchange.bytes_in)
            self.bytes_out.inc(exchange.bytes_out)

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
