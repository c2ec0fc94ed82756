"""uvicorn's HTTP/1.1 protocols with a header read timeout (issue 16): a connection that has
not sent a complete request head within ``HEADER_TIMEOUT`` seconds of opening (or of its last
response, on keep-alive) is closed. uvicorn has none: a client that connects and sends nothing,
or one header byte at a time, otherwise holds the connection for ever. Bodies are bounded
separately (``_asgi.iter_body``: idle timeout and minimum rate).

:func:`pqe2ee.server._stack.uvicorn_stack` picks the flavour every pqe2ee server runs: the
httptools one (with the head bound of ``_stack``) where httptools is installed, else h11.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HEADER_TIMEOUT", "HeaderTimeoutH11", "HeaderTimeoutHttpTools"]

#: Seconds a connection may take to send a request head. Read at arm time (tests shorten it).
HEADER_TIMEOUT: float = 15.0


class _HeaderTimer:
    """The timer both protocol flavours share: armed when a connection opens and after each
    response, disarmed when a request head is complete, closing the connection if it fires."""

    _header_timer: asyncio.TimerHandle | None = None
    transport: Any
    loop: Any

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()

    def _waiting_for_head(self) -> bool:
        raise NotImplementedError


class HeaderTimeoutH11(_HeaderTimer, H11Protocol):
    def _waiting_for_head(self) -> bool:
        import h11

        return bool(self.conn.their_state is h11.IDLE)

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def handle_events(self) -> None:
        super().handle_events()
        if not self._waiting_for_head():
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting_for_head():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


def _httptools_flavour() -> type[Any] | None:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools not installed
        return None

    class HeaderTimeoutHttpTools(_HeaderTimer, HttpToolsProtocol):
        _in_head = True  # a fresh connection, or a request begun and its head not complete

        def _waiting_for_head(self) -> bool:
            return self._in_head

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_message_begin(self) -> None:
            self._in_head = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm_header_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()  # for the next request's head (idle: keep-alive)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

    return HeaderTimeoutHttpTools


HeaderTimeoutHttpTools: type[Any] | None = _httptools_flavour()
