"""Run an ASGI app on a real loopback socket for the duration of a test.

Usage::

    from servers import run_app

    with run_app(create_app()) as base_url:   # "http://127.0.0.1:<port>"
        httpx.get(base_url + "/health")

uvicorn serves the app in a daemon thread with its own event loop, on a port the kernel picks
(bound before the thread starts, so there is no race for it). The context manager returns once
the server accepts connections and, on exit, asks it to stop, waits for it, and forces it down
if open connections keep it busy past ``shutdown_timeout``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

__all__ = ["run_app"]


class _ThreadServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the main thread."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.contextmanager
def run_app(
    app: Any,
    *,
    startup_timeout: float = 10.0,
    shutdown_timeout: float = 5.0,
    **config: Any,
) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 in a background thread; yield its base URL.

    Extra keywords go to :class:`uvicorn.Config` (defaults: ``log_level="warning"``,
    ``lifespan="auto"``, ``http="h11"``, ``loop="asyncio"``,
    ``timeout_graceful_shutdown=1``).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this; without it, asyncio leaves Nagle on for a socket it
    # did not create and every small non-streaming response waits ~40 ms for a delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    port = sock.getsockname()[1]

    config.setdefault("log_level", "warning")
    config.setdefault("lifespan", "auto")
    config.setdefault("http", "h11")
    config.setdefault("loop", "asyncio")
    config.setdefault("timeout_graceful_shutdown", 1)
    server = _ThreadServer(uvicorn.Config(app, **config))
    errors: list[BaseException] = []

    def target() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit from a failed lifespan startup, too
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if errors or not thread.is_alive():
                raise RuntimeError(f"test server failed to start: {errors[:1]!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"test server did not start within {startup_timeout}s")
            time.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(shutdown_timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(shutdown_timeout)
        with contextlib.suppress(OSError):
            sock.close()
        if thread.is_alive():
            raise RuntimeError("test server thread did not stop")
