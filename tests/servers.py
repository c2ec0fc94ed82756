"""Run an ASGI app on a real loopback socket for the duration of a test.

Usage::

    from servers import run_app

    with run_app(create_app()) as base_url:   # "http://127.0.0.1:<port>"
        httpx.get(base_url + "/health")

uvicorn serves the app in a daemon thread with its own event loop, on a port the kernel picks
(bound before the thread starts, so there is no race for it). The context manager returns once
the server accepts connections and, on exit, asks it to stop, waits for it, and forces it down
if open connections keep it busy past ``shutdown_timeout``.

:func:`serve_chain` runs the whole server side every end-to-end test needs - dev-engine ->
real instances -> real relay - with each file's variation as a parameter (instance settings,
a wrapper around each instance or the relay). The stack fixtures (tests/conftest.py,
relay_support.serve_stack, faults.serve_faulty_stack and the files with their own wrappers)
are built on it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn

__all__ = ["Chain", "StackSpy", "run_app", "serve_chain"]


class StackSpy:
    """Stands in for an app's Starlette stack (``app.middleware_stack``): records each HTTP
    request it is handed and passes it on - which requests skipped it (hot paths)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.seen.append((scope["method"], scope["path"]))
        await self.app(scope, receive, send)


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
    port: int = 0,
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
    sock.bind(("127.0.0.1", port))  # 0: one the kernel picks
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


@dataclass
class Chain:
    """A running dev-engine -> instances -> relay chain. ``instance_apps`` and ``relay_app``
    are the apps as served (after any wrapper); ``exits`` holds the servers, and more may be
    entered into it (a proxy in front) to live as long as the chain."""

    engine: str
    engine_app: Any
    instances: list[str]
    instance_apps: list[Any]
    relay: str
    relay_app: Any
    exits: contextlib.ExitStack


@contextlib.contextmanager
def serve_chain(
    n_instances: int = 1,
    *,
    api_keys: Sequence[str],
    instance_kw: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    instance_models: Sequence[Sequence[str] | None] | None = None,
    make_instance: Callable[[Any], Any] | None = None,
    wrap_instance: Callable[[Any], Any] | None = None,
    wrap_relay: Callable[[Any], Any] | None = None,
    engine_kw: Mapping[str, Any] | None = None,
    **relay_kw: Any,
) -> Iterator[Chain]:
    """dev-engine, ``n_instances`` real instances in front of it, one real relay in front of
    those (``relay_kw``: :class:`~pqe2ee.server.relay.RelayConfig` fields; ``startup_wait``
    defaults to 5 s).

    * ``instance_kw``: :class:`~pqe2ee.server.instance.InstanceConfig` fields for every
      instance, or one mapping per instance.
    * ``instance_models[i]``: instance i gets its own dev-engine serving only those models.
    * ``make_instance(config)`` builds an instance app (default ``instance.create_app``);
      ``wrap_instance`` / ``wrap_relay`` wrap the apps before they are served.
    * ``engine_kw``: :func:`pqe2ee.testing.dev_engine.create_app` keywords of the shared engine.
    """
    from pqe2ee.server import instance, relay
    from pqe2ee.testing import dev_engine

    if instance_kw is None or isinstance(instance_kw, Mapping):
        per_instance: list[Mapping[str, Any]] = [instance_kw or {}] * n_instances
    else:
        per_instance = list(instance_kw)
        assert len(per_instance) == n_instances
    make = make_instance or instance.create_app
    with contextlib.ExitStack() as exits:
        engine_app = dev_engine.create_app(**(engine_kw or {}))
        engine = exits.enter_context(run_app(engine_app))
        apps: list[Any] = []
        for i, kw in enumerate(per_instance):
            upstream = engine
            models = instance_models[i] if instance_models is not None else None
            if models is not None:
                upstream = exits.enter_context(run_app(dev_engine.create_app(models=list(models))))
            app = make(instance.InstanceConfig(upstream=upstream, **kw))
            apps.append(wrap_instance(app) if wrap_instance else app)
        urls = [exits.enter_context(run_app(app)) for app in apps]
        relay_kw.setdefault("startup_wait", 5.0)
        config = relay.RelayConfig(instances=tuple(urls), api_keys=tuple(api_keys), **relay_kw)
        relay_app = relay.create_app(config)
        if wrap_relay is not None:
            relay_app = wrap_relay(relay_app)
        relay_url = exits.enter_context(run_app(relay_app))
        yield Chain(engine, engine_app, urls, apps, relay_url, relay_app, exits)
