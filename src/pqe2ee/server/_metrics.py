"""One ASGI middleware that measures every HTTP exchange, for the relay's and the proxy's metrics.

:class:`MetricsMiddleware` watches the ASGI messages going past (it never reads or changes
them) and fills an :class:`Exchange`: status, time to the response start, body bytes in and
out, and whether the body ended cleanly. When the app returns - normally, by an exception or
by cancellation - it hands the exchange to ``observe``, which turns it into Prometheus samples
or a log line. Labels are the observer's business: it should map ``path`` onto a fixed set of
route names so that no id, key or free text becomes a label value.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Exchange", "MetricsMiddleware"]


@dataclass(slots=True)
class Exchange:
    """What one HTTP exchange did. Times are ``time.perf_counter`` seconds.

    ``status`` is None when the app never started a response (it failed, or the client left).
    """

    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None
    first_byte: float | None = None  # seconds from the request to the response start
    bytes_in: int = 0  # request body bytes the app received
    bytes_out: int = 0  # response body bytes the app sent
    complete: bool = False  # the response body ended (more_body false)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class MetricsMiddleware:
    """Calls ``observe(exchange)`` once per HTTP request, after the app is done with it.

    Non-HTTP scopes (lifespan) pass through untouched. ``observe`` must not raise.
    """

    def __init__(self, app: ASGIApp, observe: Callable[[Exchange], None]) -> None:
        self.app = app
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex = Exchange(scope.get("method", "-"), scope.get("path", ""))

        async def receive_counting() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                ex.bytes_in += len(message.get("body", b""))
            return message

        async def send_counting(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                ex.status = int(message["status"])
                ex.first_byte = time.perf_counter() - ex.started
            elif kind == "http.response.body":
                ex.bytes_out += len(message.get("body", b""))
                if not message.get("more_body", False):
                    ex.complete = True
            await send(message)

        try:
            await self.app(scope, receive_counting, send_counting)
        finally:
            self.observe(ex)
