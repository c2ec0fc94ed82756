"""Which event loop and HTTP parser uvicorn runs the servers (instance, relay, proxy) on.

The ``[server]`` and ``[proxy]`` extras install uvloop and httptools, and the servers use them
by default: on these machines they cut the server CPU per encrypted request by about a fifth
(benchmarks/bench_server.py). ``pure_python=True`` (``--pure-python`` /
``PQE2EE_PURE_PYTHON=1`` on the command line) forces asyncio + h11, e.g. to rule the C
extensions out when chasing a bug; so does a missing extension (uvloop has no Windows build),
without an error.

:func:`uvicorn_settings` is the rest of what the instance and the relay run with (their
``server_settings``, called by ``serve`` and by benchmarks/bench_server.py alike).

Every stack also closes a connection that sends no complete request head within
``_http.HEADER_TIMEOUT`` seconds (:mod:`pqe2ee.server._http`).

Limits: bodies are bounded by the app (:mod:`pqe2ee.server._asgi`) whatever the parser. The
request head is not: uvicorn's h11 stack refuses an oversized head, but its httptools stack
buffers any amount (an 8 MB header is accepted). :class:`BoundedHttpTools` closes that gap:
a request whose line and headers are still incomplete after :data:`MAX_HEAD` bytes gets a 400
and the connection is closed, as on h11.
"""

from __future__ import annotations

import asyncio
import importlib.util
from functools import cache
from typing import Any, Final, TypedDict

__all__ = ["MAX_HEAD", "UvicornStack", "bounded_httptools", "uvicorn_settings", "uvicorn_stack"]

#: Bytes of request line + headers the httptools stack buffers before refusing the request.
MAX_HEAD: Final = 64 * 1024


class UvicornStack(TypedDict):
    """uvicorn's ``loop`` and ``http`` settings (``uvicorn.run(app, **stack)``)."""

    loop: str
    http: str | type[asyncio.Protocol]


def _pure_python() -> UvicornStack:
    """asyncio + uvicorn's h11 protocol with the header read timeout (:mod:`._http`)."""
    from pqe2ee.server._http import HeaderTimeoutH11

    return UvicornStack(loop="asyncio", http=HeaderTimeoutH11)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def uvicorn_stack(pure_python: bool = False) -> UvicornStack:
    """uvicorn's ``loop`` and ``http`` settings: uvloop and (bounded) httptools where
    installed, unless ``pure_python``."""
    if pure_python or not _installed("httptools"):
        stack = _pure_python()
    else:
        stack = UvicornStack(loop="asyncio", http=bounded_httptools())
    if not pure_python and _installed("uvloop"):
        stack["loop"] = "uvloop"
    return stack


def uvicorn_settings(*, pure_python: bool = False, **kw: Any) -> dict[str, Any]:
    """``uvicorn.run`` settings of a pqe2ee server, ``kw`` added: its stack
    (:func:`uvicorn_stack`), no ``Server`` header, and no X-Forwarded-* rewriting of the
    client's address and scheme - the servers read neither from those headers (the relay's
    per-address discovery limit of an open relay counts the connection's peer), and the layer
    would run on every request."""
    return {"proxy_headers": False, "server_header": False, **uvicorn_stack(pure_python), **kw}


@cache
def bounded_httptools() -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the header read timeout (:mod:`._http`) and the
    request head bounded by :data:`MAX_HEAD`."""
    from pqe2ee.server._http import HeaderTimeoutHttpTools

    assert HeaderTimeoutHttpTools is not None  # httptools is installed (checked by the caller)

    class BoundedHttpTools(HeaderTimeoutHttpTools):  # type: ignore[misc, valid-type]
        # Bytes fed while the current request's head is incomplete (``_in_head``, kept by the
        # header-timeout base). A chunk that completes a head is not counted (it may carry body
        # bytes); pipelined bytes of an earlier request in the same chunk as a new head may be,
        # which only makes the bound stricter.
        _head_bytes = 0

        def on_message_begin(self) -> None:
            self._head_bytes = 0
            super().on_message_begin()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._in_head or self.transport.is_closing():
                return
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                msg = "Request line and headers too large."
                self.logger.warning(msg)
                self.send_400_response(msg)

    return BoundedHttpTools
