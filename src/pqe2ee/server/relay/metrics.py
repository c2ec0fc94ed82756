"""The relay's Prometheus metrics: counts and latencies only - no ids, keys, paths or bodies in
any label. Requests are counted by :class:`~pqe2ee.server._metrics.MetricsMiddleware` through
:meth:`RelayMetrics.observe`, under a fixed set of endpoint names."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pqe2ee.server._metrics import Exchange

__all__ = ["RelayMetrics"]


_ENDPOINTS: Final = {
    "/v1/models": "models",
    "/e2e/invoke": "invoke",
    "/health": "health",
    "/metrics": "metrics",
}


def _endpoint(path: str) -> str:
    if path.startswith("/e2e/instances/"):
        return "instances"
    return _ENDPOINTS.get(path, "other")


class RelayMetrics:
    """Counts and latencies only: no ids, keys, paths or bodies in any label."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "pqe2ee_relay_"
        self.requests = Counter(
            p + "requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.invoke_seconds = Histogram(
            p + "invoke_seconds",
            "Time from an invoke request to the instance's response headers",
            ["stream"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.bytes_in = Counter(
            p + "request_bytes", "Sealed bytes forwarded to instances", registry=r
        )
        self.bytes_out = Counter(p + "response_bytes", "Bytes relayed back to clients", registry=r)
        self.nonces_issued = Counter(p + "nonces_issued", "Nonces handed out", registry=r)
        self.nonces_consumed = Counter(p + "nonces_consumed", "Nonces accepted", registry=r)
        self.nonces_rejected = Counter(
            p + "nonces_rejected", "Invalid, expired or reused nonces", registry=r
        )
        self.rate_limited = Counter(
            p + "discovery_rate_limited", "Discovery calls refused by the rate limit", registry=r
        )
        self.open_streams = Gauge(p + "open_responses", "Responses being relayed now", registry=r)
        self.instances_up = Gauge(p + "instances_available", "Instances available", registry=r)
        self.instances_total = Gauge(p + "instances_configured", "Instances configured", registry=r)
        self.store_pool_wait = Histogram(
            p + "store_pool_wait_seconds",
            "Waits for a free nonce-store (Redis) connection (hand-outs that waited > 1 ms)",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5),
        )
        self.store_unavailable = Counter(
            p + "store_unavailable", "Requests answered 503: the nonce store failed", registry=r
        )
        # labelled children, kept once made (labels() costs a lock and a lookup per call)
        self._requests: dict[tuple[str, int], Counter] = {}
        self._invoke_seconds: dict[bool, Histogram] = {}

    def invoke_timer(self, stream: bool) -> Histogram:
        """``invoke_seconds`` for a stream (or non-stream) invocation."""
        child = self._invoke_seconds.get(stream)
        if child is None:
            child = self.invoke_seconds.labels("true" if stream else "false")
            self._invoke_seconds[stream] = child
        return child

    def observe(self, exchange: Exchange) -> None:
        """One request done (a response never started counts as 500)."""
        status = exchange.status if exchange.status is not None else 500
        key = (_endpoint(exchange.path), status)
        child = self._requests.get(key)
        if child is None:  # at most one per endpoint name and status code
            child = self._requests[key] = self.requests.labels(key[0], str(status))
        child.inc()
