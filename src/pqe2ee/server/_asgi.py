"""ASGI plumbing shared by every app in pqe2ee (instance, relay, proxy, dev engine).

Written once, with one behaviour each, so no app can drift into its own variant:

* **Bounded reads.** :func:`declared_length` reads ``Content-Length`` (absent: ``None``, the
  body is chunked; not a non-negative integer: :class:`InvalidContentLength`; over the limit:
  :class:`BodyTooLarge` before a byte is read). :func:`iter_body` streams a request body and
  raises :class:`BodyTooLarge` the moment the running total passes the limit;
  :func:`read_body` is both, collected. :func:`read_bounded` collects any byte iterator (an
  upstream ``httpx2`` response) under the same rule. A body over its limit is *refused*, never
  truncated: each app maps the typed error to its own answer (413 for requests).
* **Disconnect watch.** :func:`watch_disconnect` runs a block that is cancelled as soon as the
  client hangs up (``http.disconnect``), even while the block waits on a silent upstream.
* **Streamed answers.** :class:`StreamedResponse` sends a body written by a subclass while
  watching for the disconnect, turns the ``OSError`` an ASGI 2.4 server raises for a gone
  client into :attr:`StreamOutcome.CLIENT_GONE`, and always runs the subclass's cleanup,
  shielded from cancellation.
* :func:`json_response`: compact JSON (msgspec), ``application/json``.
* **Hot paths.** :class:`ServerApp` (the instance's, the relay's and the proxy's Starlette app)
  measures every request with one :class:`~pqe2ee.server._metrics.MetricsMiddleware` and sends
  a POST to a route whose endpoint is an :class:`Endpoint` straight to that route's own chain.

Starlette's :class:`~starlette.requests.ClientDisconnect` passes through the readers unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Mapping,
    Sequence,
)
from typing import Any, Final

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pqe2ee.errors import ErrorCode, LimitExceeded, MalformedError
from pqe2ee.server._metrics import Exchange, MetricsMiddleware, exchange_of
from pqe2ee.transports._primitives import read_timer

__all__ = [
    "BodyTooLarge",
    "ClientGone",
    "DisconnectWatch",
    "Endpoint",
    "Handler",
    "InvalidContentLength",
    "ServerApp",
    "SlowUpload",
    "StreamOutcome",
    "StreamedResponse",
    "declared_length",
    "iter_body",
    "json_response",
    "read_body",
    "read_bounded",
    "watch_disconnect",
]

_ENCODER: Final = msgspec.json.Encoder()


# --------------------------------------------------------------------------------------------
# bounded reads


class BodyTooLarge(LimitExceeded):
    """A body is longer than its limit. ``declared`` is the ``Content-Length`` that announced
    it (refused before reading), else ``None`` and ``received`` counts the bytes seen up to and
    including the chunk that crossed the limit."""

    def __init__(self, limit: int, *, declared: int | None = None, received: int = 0) -> None:
        size = declared if declared is not None else received
        super().__init__(f"body of {size} bytes exceeds {limit}", code=ErrorCode.OVERSIZE)
        self.limit = limit
        self.declared = declared
        self.received = received


class InvalidContentLength(MalformedError):
    """The ``Content-Length`` header is not a non-negative integer (the server answers 400
    ``invalid_body``)."""

    def __init__(self) -> None:
        super().__init__("Content-Length is not a non-negative integer")


def declared_length(headers: Mapping[str, str], limit: int) -> int | None:
    """The request's ``Content-Length``: ``None`` when absent (a chunked body, bounded while it
    streams), else the size; raises :class:`InvalidContentLength` or :class:`BodyTooLarge`."""
    raw = headers.get("content-length")
    if raw is None:
        return None
    try:
        size = int(raw)
    except ValueError:
        raise InvalidContentLength from None
    if size < 0:
        raise InvalidContentLength
    if size > limit:
        raise BodyTooLarge(limit, declared=size)
    return size


async def read_bounded(chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """All of ``chunks`` joined; :class:`BodyTooLarge` once they pass ``limit`` bytes."""
    buf = bytearray()
    async for chunk in chunks:
        if len(buf) + len(chunk) > limit:
            raise BodyTooLarge(limit, received=len(buf) + len(chunk))
        buf += chunk
    return bytes(buf)


#: The longest silence mid-upload, and the lowest average rate (bytes/s) an upload may keep up
#: once ``BODY_RATE_GRACE`` seconds have passed: a 1 byte/s sender cannot hold a connection and
#: a request slot open (issue 16). Read at call time (tests shorten them).
BODY_IDLE_TIMEOUT: float = 30.0
BODY_MIN_RATE: int = 1024
BODY_RATE_GRACE: float = 10.0


class SlowUpload(ClientDisconnect):
    """The upload stalled (``BODY_IDLE_TIMEOUT``) or crawled (below ``BODY_MIN_RATE``): treated
    like a client that hung up (each app's answer to that, e.g. 400 ``connection_lost``)."""


class _Upload:
    """The size and pace rules of one request body, checked as each chunk arrives."""

    __slots__ = ("limit", "started", "total")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.started = time.monotonic()
        self.total = 0

    def took(self, chunk: bytes) -> None:
        """Count ``chunk``: :class:`BodyTooLarge` past the limit, :class:`SlowUpload` when the
        average rate is too low after the grace period."""
        self.total += len(chunk)
        if self.total > self.limit:
            raise BodyTooLarge(self.limit, received=self.total)
        elapsed = time.monotonic() - self.started
        if elapsed > BODY_RATE_GRACE and self.total < BODY_MIN_RATE * elapsed:
            raise SlowUpload()


async def iter_body(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body's non-empty chunks as they arrive; :class:`BodyTooLarge` as soon as the
    total passes ``limit`` (call :func:`declared_length` first to refuse an announced size);
    :class:`SlowUpload` when the sender stalls (no chunk for ``BODY_IDLE_TIMEOUT``) or crawls."""
    upload = _Upload(limit)
    chunks = request.stream().__aiter__()
    # The body is read between yields to its reader, so no one cancel scope can span it: on
    # asyncio one loop timer watches every read (an anyio scope per chunk costs ~10 us, getpid
    # system calls among it), elsewhere (trio) each read gets its own scope.
    timer = read_timer(SlowUpload)
    try:
        while True:
            # (the timer raises SlowUpload itself; a scope, entered, is the scope to look at)
            with (
                timer.after(BODY_IDLE_TIMEOUT)
                if timer is not None
                else anyio.move_on_after(BODY_IDLE_TIMEOUT)
            ) as idle:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
            if idle is not None and idle.cancelled_caught:
                raise SlowUpload()
            upload.took(chunk)
            if chunk:
                yield chunk
    finally:
        if timer is not None:
            timer.close()


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, never holding more than ``limit`` bytes of it (the rules of
    :func:`declared_length` and :func:`iter_body`)."""
    declared_length(request.headers, limit)
    return b"".join([chunk async for chunk in iter_body(request, limit)])


# --------------------------------------------------------------------------------------------
# disconnect watch


class DisconnectWatch:
    """Handle of :func:`watch_disconnect`: ``disconnected`` tells whether the client hung up;
    ``cancel_scope`` ends the block early (a shutdown, say) when cancelled."""

    __slots__ = ("cancel_scope", "disconnected")

    def __init__(self, cancel_scope: anyio.CancelScope) -> None:
        self.cancel_scope = cancel_scope
        self.disconnected = False


@contextlib.asynccontextmanager
async def watch_disconnect(
    receive: Receive, *, after: anyio.Event | None = None
) -> AsyncIterator[DisconnectWatch]:
    """Run the block; cancel it (and set ``disconnected``) when the client hangs up.

    ``after``: start listening only once it is set - while the request body is still being
    read, ``receive`` belongs to the reader. The block's cancellation does not propagate: the
    code after the ``async with`` checks ``watch.disconnected``. An exception raised in the block
    (or by ``receive``) propagates as itself (not wrapped in an exception group).
    """
    scope = anyio.CancelScope()
    watch = DisconnectWatch(scope)
    failed: list[Exception] = []

    async def listen() -> None:
        try:
            if after is not None:
                await after.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            watch.disconnected = True
        except Exception as exc:  # receive() broke: end the block, raise it afterwards
            failed.append(exc)
        scope.cancel()

    error: Exception | None = None
    async with beside(listen):
        with scope:
            try:
                yield watch
            except Exception as exc:  # cancellation is a BaseException and stays inside
                error = exc
    if error is not None:
        raise error
    if failed:
        raise failed[0]


@contextlib.asynccontextmanager
async def beside(
    task: Callable[[], Coroutine[Any, Any, None]], *, join: bool = False
) -> AsyncIterator[None]:
    """Run ``task()`` beside the block (which must not raise ``Exception``) and cancel it when
    the block ends. On asyncio that is a bare loop task: with an anyio task group the watch
    cost ~60 us of CPU per use, ~14 us without (uvloop, measured), and a task that only waits
    on ``receive`` needs none of its bookkeeping. Other backends (trio) get a task group.

    ``join``: the block is left only once the task is gone (it may hold what the caller closes
    next). A task that already ended costs no wait: on asyncio the block is left at once, where
    a task group would take two more loop iterations to notice the task's end."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio
        loop = None
    if loop is not None:
        running = loop.create_task(task())
        try:
            yield
        finally:
            if not running.done():
                running.cancel()
                if join:
                    with anyio.CancelScope(shield=True):
                        await asyncio.wait((running,))
    else:
        async with anyio.create_task_group() as tg:
            tg.start_soon(task)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------
# streamed answers


class ClientGone(Exception):
    """Raised by :meth:`StreamedResponse.send_start` / :meth:`~StreamedResponse.send_body`
    when the server reports the client gone (ASGI spec 2.4: ``OSError`` from ``send``)."""


class StreamOutcome(enum.Enum):
    """How a :class:`StreamedResponse` ended."""

    COMPLETE = "complete"  # write() returned
    CLIENT_GONE = "client_gone"  # the client hung up or could not be written to
    CANCELLED = "cancelled"  # the watch's cancel scope was cancelled from outside
    FAILED = "failed"  # write() raised (the exception propagates after cleanup)


class StreamedResponse(Response):
    """A response whose headers and body :meth:`write` sends while the client is watched.

    Subclasses implement :meth:`write` (use :meth:`send_start` and :meth:`send_body`) and
    :meth:`finish`, which runs whatever happened, shielded, with the :class:`StreamOutcome`.
    Optional hooks: :meth:`watching` gets the watch before writing starts (register its cancel
    scope to end the stream from outside, e.g. at shutdown); :meth:`cancelled` runs, before
    :meth:`finish`, when that happened and may still write (an error event; ``started`` says
    whether the response start went out). ``bytes_sent`` counts the body bytes sent.

    :meth:`send_body` sends the start first when it has not gone out: a subclass may hold the
    start back for the first body message (the peer then reads both at once, not in two
    wake-ups) and say with :meth:`start_due` that it must still go out, before :meth:`finish`,
    if no body message follows (write() ended early by a break, a hang-up or a failure).

    Under a :class:`~pqe2ee.server._metrics.MetricsMiddleware` with ``direct_bodies``, the body
    messages after the start go straight beneath it (:meth:`Exchange.send_body`).
    """

    def __init__(self, status_code: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self.status_code = status_code
        self.background = None
        self.raw_headers = list(headers)
        self.started = False
        self.bytes_sent = 0
        self._exchange: Exchange | None = None

    async def send_start(self, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
        except OSError:
            raise ClientGone from None
        self.started = True

    async def send_body(self, send: Send, data: bytes, *, more: bool = True) -> None:
        if not self.started:
            await self.send_start(send)
        exchange = self._exchange
        try:
            if exchange is not None:
                await exchange.send_body(data, more)
            else:
                await send({"type": "http.response.body", "body": data, "more_body": more})
        except OSError:
            raise ClientGone from None
        self.bytes_sent += len(data)

    async def write(self, send: Send) -> None:
        raise NotImplementedError

    async def finish(self, outcome: StreamOutcome) -> None:
        """Release what the stream holds; runs once, shielded from cancellation."""

    def start_due(self) -> bool:
        """Whether the start must go out even if :meth:`write` sent no body message."""
        return False

    def watching(self, watch: DisconnectWatch) -> None:
        """Called once the watch is running, before :meth:`write`."""

    async def cancelled(self, send: Send) -> None:
        """Called when the watch's scope was cancelled from outside, before :meth:`finish`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = StreamOutcome.FAILED
        self._exchange = exchange_of(scope)
        try:
            async with watch_disconnect(receive) as watch:
                self.watching(watch)
                try:
                    await self.write(send)
                    outcome = StreamOutcome.COMPLETE
                except ClientGone:
                    outcome = StreamOutcome.CLIENT_GONE
            if outcome is StreamOutcome.FAILED:  # write() was cancelled: by whom?
                outcome = (
                    StreamOutcome.CLIENT_GONE if watch.disconnected else StreamOutcome.CANCELLED
                )
            if outcome is StreamOutcome.CANCELLED:
                await self.cancelled(send)
        finally:
            with anyio.CancelScope(shield=True):
                if not self.started and self.start_due():
                    with contextlib.suppress(ClientGone):
                        await self.send_start(send)
                await self.finish(outcome)


# --------------------------------------------------------------------------------------------
# JSON


def json_response(
    obj: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """``obj`` as compact JSON (``application/json``)."""
    return Response(
        _ENCODER.encode(obj), status_code=status, headers=headers, media_type="application/json"
    )


# --------------------------------------------------------------------------------------------
# hot paths

#: A route's handler: the request in, the response to send out.
Handler = Callable[[Request], Awaitable[Response]]


class Endpoint:
    """A route's handler as a raw ASGI app: the handler's response is sent.

    ``answer`` is the route's own answer to an exception its handler raises (a proxy failure
    in the caller's dialect, say); without it the exception propagates, to the app's 500
    answer (see :class:`ServerApp`). Under a :class:`ServerApp` a POST to the route's path
    calls it directly; through Starlette's router (another method's 405, a root_path) it is
    the route's ASGI app, in place of Starlette's request/response wrapper.
    """

    __slots__ = ("_answer", "_handler")

    def __init__(self, handler: Handler, answer: Callable[[Exception], Response] | None = None):
        self._handler = handler
        self._answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self._handler(Request(scope, receive))
        except Exception as exc:
            if self._answer is None:
                raise
            response = self._answer(exc)
        await response(scope, receive, send)


class ServerApp(Starlette):
    """A server's Starlette app: every HTTP request is measured by one
    :class:`~pqe2ee.server._metrics.MetricsMiddleware` (``observe``; ``direct_bodies``, so
    nothing in ``middleware`` may change a response body), outside ``middleware``; and its
    hot paths skip Starlette's own stack.

    A hot path is a POST-only route of an exact path whose endpoint is an :class:`Endpoint`
    (the instance's and the relay's ``/e2e/invoke``, the proxy's model calls). A POST to it
    (no root_path) goes straight to the endpoint inside the app's middleware - the chain the
    router would reach, built from the same ``user_middleware`` - without Starlette's error
    and exception middleware, its router's matching and its request/response wrappers, which
    add a frame and a ``send`` wrapper per message each (issue 14: ~5-7 % of a server's
    profile samples at one client; 80-150 Python calls per request). They have nothing else to do there: no
    ``HTTPException`` is raised on these paths, and an exception that escapes the chain is
    answered as Starlette's ``ServerErrorMiddleware`` answers it - the app's handler for
    ``Exception`` (or 500), else a plain-text 500, if the response has not started (the
    metrics layer's exchange knows), then re-raised for the server to log. Everything else
    (other methods, other paths, a root_path, lifespan) goes through Starlette as before.
    """

    def __init__(
        self,
        *,
        observe: Callable[[Exchange], None],
        middleware: Sequence[Middleware] = (),
        **kw: Any,
    ) -> None:
        measure = Middleware(MetricsMiddleware, observe=observe, direct_bodies=True)
        super().__init__(middleware=[measure, *middleware], **kw)
        self._direct: dict[str, ASGIApp] | None = None

    def _chains(self) -> dict[str, ASGIApp]:
        """Each hot path's chain: the app's middleware around its endpoint (built with
        Starlette's stack, so that no middleware can be added to one and not the other)."""
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        chains: dict[str, ASGIApp] = {}
        for route in self.routes:
            if (
                isinstance(route, Route)
                and isinstance(route.endpoint, Endpoint)
                and route.methods == {"POST"}
                and not route.param_convertors
            ):
                app: ASGIApp = route.endpoint
                for cls, args, kwargs in reversed(self.user_middleware):
                    app = cls(app, *args, **kwargs)
                chains[route.path] = app
        return chains

    async def _server_error(self, scope: Scope, exc: Exception) -> Response:
        handler = None
        for key, value in self.exception_handlers.items():
            if key in (500, Exception):  # (the last one given wins, as in Starlette)
                handler = value
        if handler is None:
            return PlainTextResponse("Internal Server Error", status_code=500)
        response = handler(Request(scope), exc)
        return await response if inspect.isawaitable(response) else response  # type: ignore[no-any-return]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            direct = self._direct
            if direct is None:
                direct = self._direct = self._chains()
            chain = direct.get(scope["path"])
            if chain is not None:
                scope["app"] = self
                try:
                    await chain(scope, receive, send)
                except Exception as exc:
                    exchange = exchange_of(scope)
                    if exchange is not None and exchange.status is None:  # nothing sent yet
                        response = await self._server_error(scope, exc)
                        await response(scope, receive, send)
                    raise
                return
        await super().__call__(scope, receive, send)
