"""Running the proxy: uvicorn settings, a server class that ends open streams on shutdown, and
:func:`serve` (what ``pqe2ee proxy`` calls)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import uvicorn
from starlette.applications import Starlette

from pqe2ee.proxy.app.config import ProxyConfig
from pqe2ee.proxy.app.routes import create_app
from pqe2ee.proxy.app.streaming import OpenStreams
from pqe2ee.server._stack import uvicorn_settings, uvicorn_stack

__all__ = ["ProxyServer", "serve", "server_config"]

log = logging.getLogger("pqe2ee.proxy")


class ProxyServer(uvicorn.Server):
    """uvicorn's server, plus: on shutdown, streams still open after ``grace`` seconds are
    ended with their dialect's error event (rather than cancelled mid-write by uvicorn)."""

    def __init__(self, config: uvicorn.Config, *, grace: float) -> None:
        super().__init__(config)
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        streams = getattr(getattr(self.config.app, "state", None), "streams", None)

        async def end_streams() -> None:
            await asyncio.sleep(self.grace)
            if isinstance(streams, OpenStreams) and len(streams):
                log.info("ending %d open stream(s) for shutdown", len(streams))
                streams.close_all()

        ender = asyncio.ensure_future(end_streams())
        try:
            await super().shutdown(sockets)
        finally:
            ender.cancel()


def server_config(app: Starlette, config: ProxyConfig, **kw: Any) -> uvicorn.Config:
    """The uvicorn settings the proxy runs with: the servers' (:func:`uvicorn_settings`: no
    X-Forwarded-* rewriting - the proxy reads neither client address nor scheme -, uvloop +
    httptools) but uvicorn's ``Server`` header, and access lines are the proxy's own; ``kw``
    overrides any of them."""
    defaults = {
        "access_log": False,
        "server_header": True,  # (uvicorn's default: the proxy's answers have always said it)
        "timeout_graceful_shutdown": int(config.shutdown_grace) + 5,
    }
    return uvicorn.Config(
        app, host=config.host, port=config.port, **uvicorn_settings(**{**defaults, **kw})
    )


def serve(config: ProxyConfig, *, log_level: str = "info", pure_python: bool = False) -> None:
    """Run the proxy until interrupted (Ctrl-C / SIGTERM: see :class:`ProxyServer`), on
    uvloop + httptools unless ``pure_python`` (:mod:`pqe2ee.server._stack`)."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if log_level != "debug":
        # httpx2 logs each model call as "POST {models_base}/v1/chat/completions", the URL the
        # transport is handed, not where the encrypted call goes: misleading, and our access
        # line already says it.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    if config.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "listening on %s: callers reach the proxy over plain HTTP%s",
            config.host,
            " and may use the configured API key" if config.api_key else "",
        )
    log.info(
        "model calls end-to-end encrypted via %s; model list in plaintext from %s",
        config.api_base,
        config.models_base,
    )
    app = create_app(config)
    server = ProxyServer(
        server_config(app, config, log_level=log_level, **uvicorn_stack(pure_python)),
        grace=config.shutdown_grace,
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
        server.run()
