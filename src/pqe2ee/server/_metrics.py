"""One ASGI middleware that measures every HTTP exchange, for the relay's and the proxy's metrics.

:class:`MetricsMiddleware` watches the ASGI messages going past (it never reads or changes
them) and fills an :class:`Exchange`: status, time to the response start, body bytes in and
out, and whether the body ended cleanly. When the app returns - normally, by an exception or
by cancellation - it hands the exchange to ``observe``, which turns it into Prometheus samples
or a log line. Labels are the observer's business: it should map ``path`` onto a fixed set of
route names so that no id, key or free text becomes a label value.

Built with ``direct_bodies=True`` (only where no middleware inside it changes response bodies),
the middleware also leaves the exchange in the scope (:func:`exchange_of`): a
:class:`~pqe2ee.server._asgi.StreamedResponse` then sends its body messages through
:meth:`Exchange.send_body`, counted the same way but without the per-message wrappers of this
middleware and of Starlette's routing (a streamed answer sends one message per event).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Exchange", "MetricsMiddleware", "exchange_of"]

_SCOPE_KEY: Final = "pqe2ee.exchange"


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
    send: Send | None = None  # the send beneath the middleware (direct_bodies only)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def sent(self, message: Message) -> None:
        """Count a response message on its way out."""
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            self.first_byte = time.perf_counter() - self.started
        elif kind == "http.response.body":
            self.body_sent(len(message.get("body", b"")), message.get("more_body", False))

    def body_sent(self, size: int, more: bool) -> None:
        self.bytes_out += size
        if not more:
            self.complete = True

    async def send_body(self, data: bytes, more: bool) -> None:
        """Send (and count) one body message straight beneath the middleware, once the
        response start has gone out through every layer."""
        assert self.send is not None
        self.body_sent(len(data), more)
        await self.send({"type": "http.response.body", "body": data, "more_body": more})


def exchange_of(scope: Scope) -> Exchange | None:
    """The exchange a ``direct_bodies`` middleware left in ``scope``, else None."""
    exchange: Exchange | None = scope.get(_SCOPE_KEY)
    return exchange


class MetricsMiddleware:
    """Calls ``observe(exchange)`` once per HTTP request, after the app is done with it.

    Non-HTTP scopes (lifespan) pass through untouched. ``observe`` must not raise.
    ``direct_bodies``: see the module's docstring.
    """

    def __init__(
        self, app: ASGIApp, observe: Callable[[Exchange], None], *, direct_bodies: bool = False
    ) -> None:
        self.app = app
        self.observe = observe
        self.direct_bodies = direct_bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex = Exchange(scope.get("method", "-"), scope.get("path", ""))
        if self.direct_bodies:
            ex.send = send
            scope[_SCOPE_KEY] = ex

        async def receive_counting() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                ex.bytes_in += len(message.get("body", b""))
            return message

        async def send_counting(message: Message) -> None:
            ex.sent(message)
            await send(message)

        try:
            await self.app(scope, receive_counting, send_counting)
        finally:
            self.observe(ex)
