"""Our own stack on loopback for ``conformance client``: dev-engine -> instances -> relay ->
:class:`~pqe2ee.conformance.hostile.HostileRelay`, each served by uvicorn in a daemon thread on
a port the kernel picks (the socket is bound before the thread starts)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pqe2ee.conformance.hostile import HostileRelay
from pqe2ee.conformance.rechunk import RechunkingEngine

__all__ = ["OwnStack", "own_stack", "serve_in_thread"]


@contextlib.contextmanager
def serve_in_thread(app: Any, *, startup_timeout: float = 15.0) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1; yield ``http://127.0.0.1:<port>``; stop it on exit."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # the main thread keeps its handlers
            yield

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    config = uvicorn.Config(
        app, log_level="warning", http="h11", loop="asyncio", timeout_graceful_shutdown=1
    )
    server = _Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("a loopback server of the conformance runner did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(5)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5)
        sock.close()


@dataclass
class OwnStack:
    relay: str  # the hostile relay's base URL (it serves /v1/models too)
    hostile: HostileRelay
    api_key: str
    model: str
    engine: RechunkingEngine  # the dev-engine, re-chunked on demand (v2 DATA records)


@contextlib.contextmanager
def own_stack(
    *, n_instances: int = 2, api_key: str = "cpk-conformance-0000", v2: bool = True
) -> Iterator[OwnStack]:
    """The dev-engine behind ``n_instances`` instances behind one relay behind the wrapper."""
    from pqe2ee.server import instance, relay
    from pqe2ee.testing import dev_engine

    with contextlib.ExitStack() as stack:
        rechunking = RechunkingEngine(dev_engine.create_app())
        engine = stack.enter_context(serve_in_thread(rechunking))
        urls = [
            stack.enter_context(
                serve_in_thread(
                    instance.create_app(instance.InstanceConfig(upstream=engine, v2=v2))
                )
            )
            for _ in range(n_instances)
        ]
        config = relay.RelayConfig(
            instances=tuple(urls), api_keys=(api_key,), startup_wait=10.0, rate_limit=1000
        )
        hostile = HostileRelay(relay.create_app(config))
        url = stack.enter_context(serve_in_thread(hostile))
        yield OwnStack(url, hostile, api_key, "dev-echo", rechunking)
