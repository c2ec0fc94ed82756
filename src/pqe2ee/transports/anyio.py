"""An end-to-end encrypted inference client on raw anyio sockets (Chutes E2EE v1, profile v2).

For embedding where no HTTP library is wanted: HTTP/1.1 is framed by h11 over
``anyio.connect_tcp`` (TLS for ``https`` URLs), one connection per request. Nothing here imports
httpx, httpx2 or aiohttp; the orchestration is the same engine the other transports use. ::

    from pqe2ee.transports.anyio import E2EEClient

    async with E2EEClient(api_key=KEY) as client:
        reply = await client.chat(model="deepseek-ai/DeepSeek-V3", messages=[...])
        async with client.stream_chat(model=..., messages=[...]) as events:
            async for chunk in events:             # decoded chunk dicts
                print(chunk["choices"][0]["delta"].get("content") or "", end="")

Non-stream calls return the engine's decrypted JSON object. A stream yields the decoded JSON
object of every inner ``data:`` event and ends only after the authenticated ``[DONE]`` and a
clean end of the relay's stream; anything else raises a typed pqe2ee error (``StreamError``,
``DecryptError``, ``RemoteError``, ...), never a silently short answer.

Errors: relay answers are ``RelayError`` (``model_not_found``, ``path_forbidden``,
``retries_exhausted``, ``relay_error`` with its ``status``, ...); an engine error sealed by the
instance is ``RemoteError`` (code ``upstream_error``, the engine's status, its error object in
``detail``); network failures are :class:`E2EEConnectionError` (also an ``OSError``) and timeouts
:class:`E2EETimeoutError` (also a ``TimeoutError``), both code ``connection_lost``.

Timeouts are values, applied with ``anyio.fail_after`` around each network wait: ``timeout`` for
connecting, each write and each read of the client's own calls; ``read_timeout`` (default
``timeout``) for each read while waiting on an invoke's answer or the next bytes of a stream
(on asyncio the reads of a body share one timer instead of a cancel scope each, same limit).
Memory is bounded: response heads by ``max_header_size`` (h11's ``max_incomplete_event_size``),
bodies read whole by the engine's limits, streams by the decryptor's record and event limits.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Unpack
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11
import msgspec

from pqe2ee.errors import (
    ConnectionLost,
    ErrorCode,
    LocalProtocolError,
    MalformedError,
    RemoteError,
)
from pqe2ee.protocol._codec import MAX_JSON_DEPTH, json_decode, json_too_deep
from pqe2ee.protocol._events import Done
from pqe2ee.protocol.client import request_model
from pqe2ee.transports._async._engine import (
    AsyncEngine,
    AsyncPlainStream,
    Opened,
    Outcome,
    Streaming,
)
from pqe2ee.transports._async._stream import AsyncRawBody, reraise
from pqe2ee.transports._common import (
    EngineFacade,
    RequestHeaders,
    ResponseHead,
    RetriesExhausted,
)
from pqe2ee.transports._primitives import (
    AsyncReadTimer,
    AsyncResource,
    aclose_shielded,
    read_timer,
)
from pqe2ee.transports.options import (
    DEFAULT_API_BASE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MODELS_BASE,
    DEFAULT_TIMEOUT,
    ClientLimits,
    ClientOptions,
    ClientOptionsArgs,
    with_base_url,
)

__all__ = [
    "CHAT_PATH",
    "COMPLETIONS_PATH",
    "DEFAULT_API_BASE",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MODELS_BASE",
    "DEFAULT_TIMEOUT",
    "ClientLimits",
    "ClientOptions",
    "E2EEClient",
    "E2EEConnectionError",
    "E2EETimeoutError",
    "EventStream",
    "RetriesExhausted",
]

CHAT_PATH: Final = "/v1/chat/completions"
COMPLETIONS_PATH: Final = "/v1/completions"
DEFAULT_MAX_HEADER_SIZE: Final = 64 * 1024
_RECEIVE_SIZE: Final = 64 * 1024


class E2EEConnectionError(ConnectionLost, OSError):
    """The connection to the relay could not be made, or broke before the answer was complete
    (code ``connection_lost``). Chained (``__cause__``) to the underlying error."""


class E2EETimeoutError(E2EEConnectionError, TimeoutError):
    """A network wait took longer than its timeout (code ``connection_lost``)."""


# -- the port: HTTP/1.1 with h11 over anyio sockets ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Target:
    tls: bool
    host: str
    port: int
    authority: str  # the Host header
    target: str  # path and query

    @classmethod
    def parse(cls, url: str) -> _Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LocalProtocolError(
                "only http and https URLs can be reached", code=ErrorCode.INVALID_ARGUMENT
            )
        tls = parts.scheme == "https"
        try:
            explicit = parts.port
        except ValueError:
            raise LocalProtocolError(
                "the URL's port is invalid", code=ErrorCode.INVALID_ARGUMENT
            ) from None
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        authority = shown if explicit is None else f"{shown}:{explicit}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(tls, host, explicit or (443 if tls else 80), authority, target)


def _receive_error(exc: BaseException, what: str) -> E2EEConnectionError:
    return E2EEConnectionError(f"the relay connection failed while {what} ({type(exc).__name__})")


class _Response(ResponseHead):
    """One HTTP/1.1 answer on its own connection: the head is read, the body is pulled."""

    __slots__ = ("_closed", "_conn", "_read_timeout", "_stream", "_timer")

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        conn: h11.Connection,
        response: h11.Response,
        read_timeout: float,
    ) -> None:
        super().__init__(response.status_code, list(response.headers))
        self._stream = stream
        self._conn = conn
        self._read_timeout = read_timeout
        self._closed = False
        self._timer: AsyncReadTimer | None = None

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        # Each read waits at most read_timeout: on one timer for the whole body (asyncio).
        timer = self._timer = read_timer(TimeoutError)
        try:
            while True:
                event = _next_event(self._conn)
                if event is h11.NEED_DATA:
                    await _receive(self._stream, self._conn, self._read_timeout, timer)
                elif isinstance(event, h11.Data):
                    if event.data:
                        yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return
                else:
                    raise E2EEConnectionError(f"unexpected HTTP event {type(event).__name__}")
        finally:
            if timer is not None:
                timer.close()

    def raw_bytes(self) -> AsyncRawBody:
        return self.aiter_bytes(), reraise  # (the HTTP loop itself: no layer to remove)

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.close()
        if not self._closed:
            self._closed = True
            await anyio.aclose_forcefully(self._stream)


def _next_event(conn: h11.Connection) -> Any:
    try:
        return conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise E2EEConnectionError(f"the relay broke HTTP/1.1 framing: {exc}") from exc


async def _receive(
    stream: anyio.abc.ByteStream,
    conn: h11.Connection,
    wait: float,
    timer: AsyncReadTimer | None = None,
) -> None:
    """Feed ``conn`` the next bytes (``b""`` at EOF), waiting at most ``wait`` seconds (on
    ``timer``, a body's, if given: no cancel scope per read)."""
    try:
        with anyio.fail_after(wait) if timer is None else timer.after(wait):
            data = await stream.receive(_RECEIVE_SIZE)
    except anyio.EndOfStream:
        data = b""  # h11's EOF
    except TimeoutError as exc:
        raise E2EETimeoutError(f"no data from the relay within {wait:g}s") from exc
    except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
        raise _receive_error(exc, "reading") from exc
    try:
        conn.receive_data(data)
    except h11.RemoteProtocolError as exc:
        raise E2EEConnectionError(f"the relay broke HTTP/1.1 framing: {exc}") from exc


class _Port:
    """The engine's way out: one fresh connection per request, ``Connection: close``."""

    __slots__ = ("_max_header", "_read_timeout", "_ssl", "_timeout")

    network_errors: tuple[type[BaseException], ...] = (E2EEConnectionError,)
    lost_errors: tuple[type[BaseException], ...] = (E2EEConnectionError,)
    timeout_errors: tuple[type[BaseException], ...] = (E2EETimeoutError,)

    def __init__(
        self,
        *,
        timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None,
        max_header_size: int,
    ) -> None:
        self._timeout = timeout
        self._read_timeout = read_timeout
        self._ssl = ssl_context
        self._max_header = max_header_size

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl = ctx
        return self._ssl

    async def _connect(self, target: _Target) -> anyio.abc.ByteStream:
        try:
            with anyio.fail_after(self._timeout):
                if target.tls:
                    return await anyio.connect_tcp(
                        target.host,
                        target.port,
                        tls=True,
                        ssl_context=self._ssl_context(),
                        tls_hostname=target.host,
                        tls_standard_compatible=False,
                    )
                return await anyio.connect_tcp(target.host, target.port)
        except TimeoutError as exc:
            raise E2EETimeoutError(
                f"connecting to the relay took longer than {self._timeout:g}s"
            ) from exc
        except (OSError, anyio.BrokenResourceError) as exc:
            raise _receive_error(exc, "connecting") from exc

    async def send(
        self, method: str, url: str, headers: RequestHeaders, body: bytes, *, control: bool
    ) -> _Response:
        target = _Target.parse(url)
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_header)
        head = [
            ("Host", target.authority),
            ("User-Agent", "pqe2ee"),
            ("Accept-Encoding", "identity"),
            ("Connection", "close"),
            *headers,
        ]
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(("Content-Length", str(len(body))))
        try:
            out = conn.send(h11.Request(method=method, target=target.target, headers=head))
            if body:
                out += conn.send(h11.Data(data=body))
            out += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(
                f"the request cannot be sent as HTTP/1.1: {exc}", code=ErrorCode.INVALID_ARGUMENT
            ) from None
        stream = await self._connect(target)
        try:
            try:
                with anyio.fail_after(self._timeout):
                    await stream.send(out)
            except TimeoutError as exc:
                raise E2EETimeoutError(
                    f"sending to the relay took longer than {self._timeout:g}s"
                ) from exc
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise _receive_error(exc, "sending") from exc
            wait = self._timeout if control else self._read_timeout
            while True:
                event = _next_event(conn)
                if event is h11.NEED_DATA:
                    await _receive(stream, conn, wait)
                elif isinstance(event, h11.Response):
                    return _Response(stream, conn, event, wait)
                elif not isinstance(event, h11.InformationalResponse):
                    raise E2EEConnectionError(
                        f"the relay closed the connection before answering ({type(event).__name__})"
                    )
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise


# -- the client --------------------------------------------------------------------------------


def _engine_error(status: int, body: bytes) -> RemoteError:
    """An engine error sealed by the instance (its status and decrypted body)."""
    try:
        detail: Any = json_decode(body)
    except msgspec.DecodeError:
        detail = body[:1000].decode("utf-8", "replace")
    label = ""
    inner = detail.get("error") if isinstance(detail, dict) else None
    for source in (inner, detail):
        value = source.get("type") if isinstance(source, dict) else None
        if isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable():
            label = f" ({value})"
            break
    return RemoteError(
        f"the engine answered {status}{label}",
        code=ErrorCode.UPSTREAM_ERROR,
        status=status,
        detail=detail,
    )


def _decode_object(data: bytes | str, what: str) -> dict[str, Any]:
    try:
        obj = json_decode(data)
    except msgspec.DecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise MalformedError(f"{what} is not a JSON object", code=ErrorCode.MALFORMED_PAYLOAD)
    return obj


class EventStream(AsyncResource):
    """The decoded events of one encrypted stream (from :meth:`E2EEClient.stream`).

    An async iterator of the JSON objects the engine sent (``chat.completion.chunk`` /
    ``text_completion`` dicts). The request is sent when iteration starts, so errors before
    the answer (``model_not_found``, ``path_forbidden``, ...) raise from the first step.
    Iteration ends only after the authenticated ``[DONE]`` and the end of the relay's stream;
    a broken, tampered, truncated or failed stream raises a typed pqe2ee error. An inner event
    carrying ``error`` (the engine gave up mid-stream) raises ``RemoteError``
    (``upstream_error``); once failed, every later step raises the same error. Close it
    (:meth:`aclose`, or ``async with``) when stopping early; it is closed automatically when
    iteration ends.
    """

    def __init__(self, client: E2EEClient, path: str, body: bytes, model: str) -> None:
        self._client = client
        self._path = path
        self._body = body
        self._model = model
        self._plain: AsyncPlainStream | None = None
        self._events: AsyncIterator[Any] | None = None
        self._closed = False
        self._error: Exception | None = None
        self.done = False  #: True once the authenticated [DONE] was seen

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise StopAsyncIteration
        try:
            if self._events is None:
                body, self._body = self._body, b""  # the prompt is not kept past sending
                self._plain = await self._client._open_stream(self._path, body, self._model)
                self._events = self._plain.aiter_events()
            while True:
                event = await self._events.__anext__()
                if isinstance(event, Done):
                    self.done = True
                    continue
                if not event.data:
                    continue
                obj = _decode_object(event.data, "an inner stream event")
                error = obj.get("error")
                if error and not obj.get("choices"):
                    raise RemoteError(
                        "the engine reported an error mid-stream",
                        code=ErrorCode.UPSTREAM_ERROR,
                        detail=error,
                    )
                return obj
        except StopAsyncIteration:
            await self.aclose()
            raise
        except BaseException as exc:
            if isinstance(exc, Exception):
                self._error = exc
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await aclose_shielded(self._events, self._plain)


class E2EEClient(EngineFacade, AsyncResource):
    """Chat and completions over Chutes E2EE v1 or profile v2, with nothing but anyio and h11.

    Every request is sealed to an instance of the model's chute (found via
    ``{models_base}/v1/models`` and ``{api_base}/e2e/instances/{chute_id}``; a model that is a
    chute UUID is used as is) and sent to ``{api_base}/e2e/invoke``; nothing is ever sent in
    plaintext except the model listing and discovery calls, which carry no user data. Relay
    answers that refuse a nonce or report an instance gone, busy or needing key exchange are
    retried on a fresh lease up to ``max_attempts`` in all. ``on_usage`` receives the plaintext
    usage events of streams (unauthenticated: for display only). Safe to share between tasks.

    Configuration: ``options`` (a :class:`~pqe2ee.transports.options.ClientOptions`) and/or
    its fields as keyword arguments; the client is always ``strict`` (``strict=False`` is
    refused). ``ssl_context`` verifies ``https`` relays (default: the system's trust store).
    One base URL: ``base_url=`` (``"http://127.0.0.1:8000/v1"``, as given to an SDK) names the
    relay for both ``api_base`` and ``models_base`` (a trailing ``/v1`` is dropped; Chutes'
    hosts keep their default pair; together with either base it is refused). Relay failures
    stay exceptions here (``RelayError``, ``status`` and ``code`` set): this client hands back
    decoded objects, not HTTP answers.

    Protocol version: ``min_version``, ``prefer_v2`` and ``negotiator`` as for
    :class:`~pqe2ee.transports.httpx2.AsyncE2EETransport` (default: v2 where the chute offers
    it, pinned once seen; ``min_version=2`` refuses v1 before a nonce is spent). With v2 a
    stream ends only after its authenticated END record; an upstream failure reported there is
    ``RemoteError`` (``upstream_error``).
    """

    _engine: AsyncEngine

    def __init__(
        self,
        *,
        options: ClientOptions | None = None,
        read_timeout: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        base_url: str | None = None,
        **kwargs: Unpack[ClientOptionsArgs],
    ) -> None:
        opts = with_base_url(ClientOptions.of(options, **kwargs), base_url)
        if kwargs.get("strict") is False:
            raise LocalProtocolError(
                "the anyio client is always strict", code=ErrorCode.INVALID_ARGUMENT
            )
        if read_timeout is not None and not read_timeout > 0:
            raise LocalProtocolError("read_timeout must be > 0", code=ErrorCode.INVALID_ARGUMENT)
        if max_header_size < 1024:
            raise LocalProtocolError(
                "max_header_size must be >= 1024", code=ErrorCode.INVALID_ARGUMENT
            )
        self._engine = self._start(AsyncEngine, dataclasses.replace(opts, strict=True))
        timeout = self.settings.timeout
        self._port = _Port(
            timeout=timeout,
            read_timeout=timeout if read_timeout is None else float(read_timeout),
            ssl_context=ssl_context,
            max_header_size=max_header_size,
        )

    # -- non-stream -----------------------------------------------------------------------------

    async def chat(self, **body: Any) -> dict[str, Any]:
        """``POST /v1/chat/completions``; the engine's decrypted JSON answer."""
        return await self.request(CHAT_PATH, body)

    async def completions(self, **body: Any) -> dict[str, Any]:
        """``POST /v1/completions``; the engine's decrypted JSON answer."""
        return await self.request(COMPLETIONS_PATH, body)

    async def request(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A non-stream call to an E2EE ``path``; the decrypted JSON object."""
        data, model = self._prepare(path, body, stream=False)
        outcome = await self._invoke(path, data, model)
        if isinstance(outcome, Streaming):  # only a body asking for a stream gets one
            await outcome.stream.aclose()
            raise MalformedError("the relay streamed a non-stream answer")
        if isinstance(outcome, Opened):
            if outcome.status != 200:
                raise _engine_error(outcome.status, outcome.body)
            return _decode_object(outcome.body, "the engine's answer")
        raise outcome.error

    # -- stream ---------------------------------------------------------------------------------

    def stream_chat(self, **body: Any) -> EventStream:
        """A streamed ``POST /v1/chat/completions``: see :class:`EventStream`."""
        return self.stream(CHAT_PATH, body)

    def stream_completions(self, **body: Any) -> EventStream:
        """A streamed ``POST /v1/completions``: see :class:`EventStream`."""
        return self.stream(COMPLETIONS_PATH, body)

    def stream(self, path: str, body: Mapping[str, Any]) -> EventStream:
        """A streamed call to an E2EE ``path`` (``"stream": true`` is set for you)."""
        data, model = self._prepare(path, body, stream=True)
        return EventStream(self, path, data, model)

    # -- lifecycle ------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Wipe the pooled keys; idempotent. Open streams stay readable until closed."""
        self._closed = True
        self._close_keys()

    # -- internals ------------------------------------------------------------------------------

    def _prepare(self, path: str, body: Mapping[str, Any], *, stream: bool) -> tuple[bytes, str]:
        if path not in self.settings.e2e_paths:
            raise LocalProtocolError(
                f"{path[:100]!r} is not one of the E2EE paths", code=ErrorCode.INVALID_ARGUMENT
            )
        if not isinstance(body, Mapping):
            raise LocalProtocolError("the body must be a mapping", code=ErrorCode.INVALID_BODY)
        if stream:
            body = {**body, "stream": True}
        elif body.get("stream"):
            raise LocalProtocolError(
                "stream=True needs stream() / stream_chat()", code=ErrorCode.INVALID_ARGUMENT
            )
        model = request_model(body)
        if model is None:
            raise LocalProtocolError(
                "the body needs a non-empty string 'model'", code=ErrorCode.INVALID_BODY
            )
        try:
            data = msgspec.json.encode(body)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise LocalProtocolError(
                f"the body cannot be encoded as JSON ({type(exc).__name__})",
                code=ErrorCode.INVALID_BODY,
            ) from None
        if json_too_deep(data):
            raise LocalProtocolError(
                f"the body nests JSON deeper than {MAX_JSON_DEPTH} levels (no instance accepts it)",
                code=ErrorCode.INVALID_BODY,
            )
        return data, model

    async def _invoke(self, path: str, data: bytes, model: str) -> Outcome:
        if self._closed:
            raise self._closed_error("client")
        return await self._engine.invoke(
            self._port, path=path, body=data, model=model, auth=self.settings.api_key
        )

    async def _open_stream(self, path: str, data: bytes, model: str) -> AsyncPlainStream:
        outcome = await self._invoke(path, data, model)
        if isinstance(outcome, Streaming):
            return outcome.stream
        if isinstance(outcome, Opened):
            if outcome.status == 200:
                raise MalformedError("the relay answered a stream request without a stream")
            raise _engine_error(outcome.status, outcome.body)
        raise outcome.error
