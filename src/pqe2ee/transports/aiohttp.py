"""End-to-end encryption for aiohttp users (Chutes E2EE v1 and pqe2ee profile v2).

::

    from pqe2ee.transports.aiohttp import E2EEClientSession

    async with E2EEClientSession(api_key=KEY) as session:
        async with session.post("/v1/chat/completions", json=body) as resp:
            reply = await resp.json()                     # decrypted

        body["stream"] = True
        async with session.post("/v1/chat/completions", json=body) as resp:
            async for line in resp.content:               # the engine's own SSE lines
                ...

:class:`E2EEClientSession` wraps an :class:`aiohttp.ClientSession` (yours, or one it makes)
and answers with :class:`E2EEResponse` (``status``, ``headers``, ``read()``, ``text()``,
``json()``, ``content`` iteration, ``raise_for_status()``), the shape of aiohttp's own
response. Every decision - what is encrypted, model -> chute, discovery, nonces, retries,
decryption - is the shared engine's, exactly as in the httpx transports.

Why a session wrapper and not a client middleware: an aiohttp client middleware must return
an :class:`aiohttp.ClientResponse`, and aiohttp has no public way to build one or to replace
its body and headers; a decrypted answer would mean patching private attributes (``_body``,
``_headers``, the ``content`` StreamReader) that change between releases.

A broken encrypted stream raises :class:`E2EEStreamError`: a
:class:`~pqe2ee.errors.PQE2EEError` (and the original pqe2ee class, e.g. ``DecryptError``) and
an :class:`aiohttp.ClientPayloadError` at once, so ``except aiohttp.ClientError`` catches it.
The session is configured like every transport: a
:class:`~pqe2ee.transports.options.ClientOptions` (``options=``) and/or its fields as keywords.
"""

from __future__ import annotations

import json as _json
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Mapping
from typing import Any, Final, Unpack

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from pqe2ee.errors import (
    ConnectionLost,
    DeadlineExceeded,
    DecryptError,
    ErrorCode,
    LimitExceeded,
    LocalProtocolError,
    MalformedError,
    PQE2EEError,
    RelayError,
    RemoteError,
    RemoteProtocolError,
    StreamError,
)
from pqe2ee.protocol.client import e2e_request
from pqe2ee.transports._answers import error_answer
from pqe2ee.transports._async._engine import (
    AsyncEngine,
    AsyncPlainStream,
    Opened,
    Streaming,
    body_refused,
    plaintext_refused,
)
from pqe2ee.transports._async._stream import AsyncRawBody, reraise
from pqe2ee.transports._common import (
    KEEPALIVE_EXPIRY,
    STREAM_HEADERS,
    EngineFacade,
    RawHeaders,
    RequestHeaders,
    ResponseHead,
    RetriesExhausted,
    bearer_token,
    end_to_end_headers,
    join_url,
)
from pqe2ee.transports._primitives import AsyncResource, aclose_shielded
from pqe2ee.transports._stream_errors import StreamErrorBase
from pqe2ee.transports.options import (
    DEFAULT_API_BASE,
    DEFAULT_E2E_PATHS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MODELS_BASE,
    DEFAULT_TIMEOUT,
    ClientLimits,
    ClientOptions,
    ClientOptionsArgs,
    bind_origin,
    uses_default_bases,
    with_base_url,
)

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_E2E_PATHS",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MODELS_BASE",
    "DEFAULT_TIMEOUT",
    "ClientLimits",
    "ClientOptions",
    "E2EEClientSession",
    "E2EEContent",
    "E2EEResponse",
    "E2EEStreamConnectionLost",
    "E2EEStreamDeadlineExceeded",
    "E2EEStreamDecryptError",
    "E2EEStreamError",
    "E2EEStreamIntegrityError",
    "E2EEStreamLimitExceeded",
    "E2EEStreamMalformedError",
    "E2EEStreamProtocolError",
    "E2EEStreamRelayError",
    "E2EEStreamRemoteError",
    "RetriesExhausted",
]

#: Largest line :meth:`E2EEContent.readline` (and line iteration) returns.
MAX_LINE: Final = 16 * 1024 * 1024


class E2EEStreamError(StreamErrorBase, aiohttp.ClientPayloadError):
    """An encrypted stream failed after its response was handed over.

    Both a :class:`~pqe2ee.errors.PQE2EEError` (``code`` is the original error's code, e.g.
    ``decrypt_failed``, ``duplicate_record``, ``stream_truncated``, ``connection_lost``,
    ``remote_error``) and an :class:`aiohttp.ClientPayloadError`, so code that handles broken
    aiohttp transfers handles it too. What is raised is the subclass below for the original
    pqe2ee class (``except pqe2ee.DecryptError`` works); ``error`` is the original exception.
    """


class E2EEStreamProtocolError(E2EEStreamError, RemoteProtocolError):
    """aiohttp's stream error for a :class:`~pqe2ee.errors.RemoteProtocolError`."""


class E2EEStreamDecryptError(E2EEStreamError, DecryptError):
    """aiohttp's stream error for a :class:`~pqe2ee.errors.DecryptError` (tampered data)."""


class E2EEStreamMalformedError(E2EEStreamError, MalformedError):
    """aiohttp's stream error for a :class:`~pqe2ee.errors.MalformedError`."""


class E2EEStreamIntegrityError(E2EEStreamError, StreamError):
    """aiohttp's stream error for a :class:`~pqe2ee.errors.StreamError` (truncated, reordered,
    duplicated records; a lost connection)."""


class E2EEStreamConnectionLost(E2EEStreamIntegrityError, ConnectionLost):
    """aiohttp's stream error for a :class:`~pqe2ee.errors.ConnectionLost` (the connection to the
    relay broke mid-stream; ``__cause__`` is the network error)."""


class E2EEStreamRelayError(E2EEStreamError, RelayError):
    """aiohttp's stream error for a :class:`~pqe2ee.errors.RelayError` (an unauthenticated error
    the relay put into a v2 stream before its end)."""


class E2EEStreamLimitExceeded(E2EEStreamError, LimitExceeded):
    """aiohttp's stream error for a :class:`~pqe2ee.errors.LimitExceeded`."""


class E2EEStreamDeadlineExceeded(E2EEStreamLimitExceeded, DeadlineExceeded):
    """aiohttp's stream error for a :class:`~pqe2ee.errors.DeadlineExceeded` (the stream
    outlived the client's total ``deadline``)."""


class E2EEStreamRemoteError(E2EEStreamError, RemoteError):
    """aiohttp's stream error for a :class:`~pqe2ee.errors.RemoteError` (the far side gave up)."""


# -- the port: the engine's way out through aiohttp ------------------------------------------------


class _PortResponse(ResponseHead):
    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        super().__init__(response.status, response.raw_headers)
        self._response = response

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return self._response.content.iter_any()  # (ends at the first empty read: EOF)

    def raw_bytes(self) -> AsyncRawBody:
        return self.aiter_bytes(), reraise

    async def aclose(self) -> None:
        # Returns the connection to the pool after a whole body, closes it otherwise.
        self._response.release()


class _Port:
    """Invokes use the caller's timeout (``None``: the session's); the engine's own calls
    (model listing, discovery) are bounded by the settings' ``timeout`` in total."""

    __slots__ = ("_control", "_invoke", "_session")

    network_errors: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError)
    lost_errors: tuple[type[BaseException], ...] = (aiohttp.ClientError,)
    # aiohttp's socket timeouts (ServerTimeoutError) are TimeoutErrors too.
    timeout_errors: tuple[type[BaseException], ...] = (TimeoutError,)

    def __init__(
        self,
        session: aiohttp.ClientSession,
        invoke: aiohttp.ClientTimeout | None,
        control: aiohttp.ClientTimeout,
    ) -> None:
        self._session = session
        self._invoke = invoke
        self._control = control

    async def send(
        self, method: str, url: str, headers: RequestHeaders, body: bytes, *, control: bool
    ) -> _PortResponse:
        timeout = self._control if control else self._invoke
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        response = await self._session.request(
            method,
            url,
            headers=CIMultiDict(headers),
            data=body or None,
            allow_redirects=False,
            raise_for_status=False,  # the engine reads and classifies every relay answer
            **kwargs,
        )
        return _PortResponse(response)


# -- the response ----------------------------------------------------------------------------------


class E2EEContent:
    """The body of an :class:`E2EEResponse`, read the ways aiohttp's ``StreamReader`` is:
    ``async for line in content`` (lines, ``\\n`` kept), :meth:`iter_any`, :meth:`iter_chunked`,
    :meth:`read`, :meth:`readany`, :meth:`readline`. For an encrypted stream the bytes are the
    engine's own SSE, decrypted as they arrive; a broken stream raises
    :class:`E2EEStreamError` from whichever read meets the fault, and every later read raises
    it again (a failed body never looks finished). Read it once.
    """

    __slots__ = ("_buf", "_eof", "_error", "_source")

    def __init__(self, source: AsyncIterator[bytes]) -> None:
        self._source = source
        self._buf = bytearray()
        self._eof = False
        self._error: Exception | None = None

    async def _pull(self) -> bool:
        """Append the next chunk to the buffer; False at the end."""
        if self._error is not None:
            raise self._error
        if self._eof:
            return False
        try:
            chunk = await self._source.__anext__()
        except StopAsyncIteration:
            self._eof = True
            return False
        except Exception as exc:
            self._error = exc
            self._buf.clear()
            raise
        self._buf += chunk
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def at_eof(self) -> bool:
        return self._eof and not self._buf

    async def readany(self) -> bytes:
        """What is buffered, or the next chunk; ``b""`` at the end."""
        if not self._buf:
            await self._pull()
        return self._take(len(self._buf))

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``-1``: everything until the end)."""
        if n < 0:
            while await self._pull():
                pass
            return self._take(len(self._buf))
        if not self._buf:
            await self._pull()
        return self._take(n)

    async def readline(self) -> bytes:
        """One line with its ``\\n`` (the last one may lack it); ``b""`` at the end."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                return self._take(end + 1)
            if len(self._buf) > MAX_LINE:
                raise LimitExceeded(f"line longer than {MAX_LINE} bytes")
            if not await self._pull():
                return self._take(len(self._buf))

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk

    async def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        if n <= 0:
            raise LocalProtocolError("chunk size must be > 0", code=ErrorCode.INVALID_ARGUMENT)
        while True:
            while len(self._buf) < n and await self._pull():
                pass
            chunk = self._take(n)
            if not chunk:
                return
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while line := await self.readline():
            yield line


async def _once(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


async def _decrypted(plain: AsyncPlainStream) -> AsyncIterator[bytes]:
    try:
        async for chunk in plain:
            yield chunk
    except PQE2EEError as exc:
        raise E2EEStreamError.wrap(exc) from exc
    finally:
        await plain.aclose()


class E2EEResponse(AsyncResource):
    """An answer of :class:`E2EEClientSession`, shaped like :class:`aiohttp.ClientResponse`.

    ``encrypted`` says whether the request went end-to-end encrypted. For an encrypted request
    the body is the engine's own JSON (``application/json``; an engine error sealed by the
    instance keeps the engine's status) or, for a stream, its SSE (``text/event-stream``); a
    relay answer that is neither (e.g. 401) is handed over as it was. A plaintext request's
    answer is the server's, streamed.

    ``error`` is the :class:`~pqe2ee.errors.RelayError` an answer stands for when the session
    answered a relay or discovery failure itself (see :class:`E2EEClientSession`), else None;
    :meth:`raise_for_status` chains it.
    """

    def __init__(
        self,
        *,
        method: str,
        url: URL,
        status: int,
        headers: CIMultiDictProxy[str],
        source: AsyncIterator[bytes],
        encrypted: bool,
        resource: object = None,
        error: PQE2EEError | None = None,
    ) -> None:
        self.method = method
        self.error = error
        self.url = url
        self.status = status
        self.headers = headers
        self.encrypted = encrypted
        self.content = E2EEContent(source)
        self._source = source
        self._resource = resource  # closed after the body: the connection, a stream's key
        self._body: bytes | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<E2EEResponse [{self.status}] encrypted={self.encrypted}>"

    @property
    def ok(self) -> bool:
        return self.status < 400

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    @property
    def request_info(self) -> aiohttp.RequestInfo:
        return aiohttp.RequestInfo(self.url, self.method, CIMultiDictProxy(CIMultiDict()))

    def raise_for_status(self) -> None:
        """Raise :class:`aiohttp.ClientResponseError` for a status of 400 or more."""
        if not self.ok:
            raise aiohttp.ClientResponseError(
                self.request_info, (), status=self.status, message="", headers=self.headers
            ) from self.error

    async def read(self) -> bytes:
        """The whole body (kept, so later calls return it again); closes the response."""
        if self._body is None:
            try:
                self._body = await self.content.read()
            finally:
                await self.aclose()
        return self._body

    async def text(self, encoding: str | None = None, errors: str = "strict") -> str:
        body = await self.read()
        if encoding is None:
            charset = ""
            for param in self.headers.get("Content-Type", "").split(";")[1:]:
                key, _, value = param.strip().partition("=")
                if key.lower() == "charset":
                    charset = value.strip('"')
            encoding = charset or "utf-8"
        return body.decode(encoding, errors)

    async def json(
        self,
        *,
        encoding: str | None = None,
        loads: Callable[[str], Any] = _json.loads,
        content_type: str | None = "application/json",
    ) -> Any:
        """The body decoded as JSON (``content_type=None`` skips the Content-Type check)."""
        body = await self.read()
        if content_type and content_type not in self.content_type:
            raise aiohttp.ContentTypeError(
                self.request_info,
                (),
                status=self.status,
                message=f"Attempt to decode JSON with unexpected mimetype: {self.content_type}",
                headers=self.headers,
            )
        stripped = body.strip()
        if not stripped:
            return None
        return loads(stripped.decode(encoding or "utf-8"))

    async def aclose(self) -> None:
        """Release the connection (and wipe a stream's key); idempotent."""
        if self._closed:
            return
        self._closed = True
        await aclose_shielded(self._source, self._resource)


class _RequestContext:
    """``await session.post(...)`` or ``async with session.post(...) as resp`` (closed on exit)."""

    __slots__ = ("_coro", "_response")

    def __init__(self, coro: Awaitable[E2EEResponse]) -> None:
        self._coro = coro
        self._response: E2EEResponse | None = None

    def __await__(self) -> Generator[Any, None, E2EEResponse]:
        return self._coro.__await__()

    async def __aenter__(self) -> E2EEResponse:
        self._response = await self._coro
        return self._response

    async def __aexit__(self, *exc_info: object) -> None:
        if self._response is not None:
            await self._response.aclose()


def _headers(pairs: Iterable[tuple[str, str]]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def _relay_headers(raw: RawHeaders) -> CIMultiDictProxy[str]:
    """A relay's own headers, minus the ones that described its framing."""
    pairs = end_to_end_headers(raw)
    return _headers((key.decode("latin-1"), value.decode("latin-1")) for key, value in pairs)


def _encode_json(obj: Any) -> bytes:
    try:
        # (allow_nan=False: NaN is not JSON; no instance would accept it)
        data = _json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return data.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise LocalProtocolError(
            f"the json body cannot be serialised ({type(exc).__name__})",
            code=ErrorCode.INVALID_BODY,
        ) from exc


# -- the session -----------------------------------------------------------------------------------


class E2EEClientSession(EngineFacade):
    """An aiohttp session that end-to-end encrypts inference requests (E2EE v1 and v2).

    What is encrypted, and where things go, is exactly as for
    :class:`~pqe2ee.transports.httpx2.AsyncE2EETransport`: a ``POST`` to one of ``e2e_paths``
    (default ``/v1/chat/completions`` and ``/v1/completions``) is sealed to an instance of the
    model's chute and sent to ``{api_base}/e2e/invoke``; a body goes sealed or nowhere (one that
    is not a JSON object with a ``model`` the client can decode: ``invalid_body``; a body for
    any other path or method: ``plaintext_refused``); requests without a body go in plaintext
    to ``models_base`` (same path and query), or are refused with ``strict=True``
    (``LocalProtocolError``, code ``plaintext_refused``). ``url`` may be a path
    (``"/v1/chat/completions"``) or a full URL; only its path and query are sent, to the bases.

    One base URL: ``base_url=`` (``"http://127.0.0.1:8000/v1"``, as given to an SDK) names the
    relay for both bases; without it and without ``api_base`` / ``models_base``, the first full
    URL requested names it (its origin becomes both bases; Chutes' ``llm.chutes.ai`` /
    ``api.chutes.ai`` keep their pair, as does a first request by path), and a full URL for
    another origin is then refused (``invalid_argument``). Bases given explicitly always stand.

    Retryable relay answers (nonce refused, instance gone / busy / needing key exchange) are
    retried on a fresh lease up to ``max_attempts`` in all. Relay and discovery failures before
    any byte of the answer are answered as the httpx transports answer them (see
    :mod:`pqe2ee.transports._answers`): 401/403 as the relay said, 404 ``model_not_found``, 429
    rate limited or busy, 503 no instance / retries exhausted, with a JSON body
    ``{"error": {"message", "type", "code": <pqe2ee code>}}``, an ``x-pqe2ee-error`` header and
    the :class:`~pqe2ee.errors.RelayError` itself in :attr:`E2EEResponse.error` (chained by
    ``raise_for_status()``). Other errors (the relay's catch-all ``relay_error``, v2 refusals,
    local refusals, downgrade refusals, bad crypto) raise typed pqe2ee errors; connection
    problems are aiohttp's own exceptions; a broken stream raises :class:`E2EEStreamError`.
    Plaintext usage events of a stream go to ``on_usage``.

    ``session`` is the :class:`aiohttp.ClientSession` used for all I/O (it is *not* closed by
    :meth:`close`); without one, a session is made on first use with ``connect``/``sock_read``
    timeouts of ``timeout`` seconds and no total limit (streams may be long), and closed by
    :meth:`close`. An invoke uses the per-request ``timeout`` if given, else the session's; the
    model listing and discovery calls are bounded by ``timeout`` in total.

    Protocol version: ``min_version``, ``prefer_v2`` and ``negotiator`` as for
    :class:`~pqe2ee.transports.httpx2.AsyncE2EETransport` (default: v2 where the chute offers
    it, pinned once seen; ``min_version=2`` refuses v1 before a nonce is spent).
    """

    _engine: AsyncEngine

    def __init__(
        self,
        *,
        options: ClientOptions | None = None,
        session: aiohttp.ClientSession | None = None,
        base_url: str | None = None,
        **kwargs: Unpack[ClientOptionsArgs],
    ) -> None:
        opts = with_base_url(ClientOptions.of(options, **kwargs), base_url)
        self._engine = self._start(AsyncEngine, opts)
        # Neither base given: the first full URL names the relay (see bind_origin).
        self._unbound = base_url is None and uses_default_bases(opts)
        self._bound: str | None = None
        self._session = session
        self._owns_session = session is None
        self._control = aiohttp.ClientTimeout(total=self.settings.timeout)

    # -- requests -------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str | URL,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> _RequestContext:
        """Send a request; await the result, or use it as ``async with``."""
        return _RequestContext(self._request(method, url, json, data, headers, timeout))

    def post(self, url: str | URL, **kwargs: Any) -> _RequestContext:
        return self.request("POST", url, **kwargs)

    def get(self, url: str | URL, **kwargs: Any) -> _RequestContext:
        return self.request("GET", url, **kwargs)

    async def close(self) -> None:
        """Wipe the pooled keys and close the session if this object made it; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._close_keys()
        if self._owns_session and self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> E2EEClientSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- internals ------------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            t = self.settings.timeout
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t),
                connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_EXPIRY),
            )
        return self._session

    async def _request(
        self,
        method: str,
        url: str | URL,
        json: Any,
        data: bytes | str | None,
        headers: Mapping[str, str] | None,
        client_timeout: aiohttp.ClientTimeout | None,
    ) -> E2EEResponse:
        if self._closed:
            raise self._closed_error("session")
        if json is not None and data is not None:
            raise LocalProtocolError("pass json or data, not both", code=ErrorCode.INVALID_ARGUMENT)
        method = method.upper()
        target = URL(url) if isinstance(url, str) else url
        self._bind(target)
        path = target.raw_path or "/"
        user_headers: CIMultiDict[str] = CIMultiDict(headers or {})
        if json is not None:
            body = _encode_json(json)
            user_headers.setdefault("Content-Type", "application/json")
        elif isinstance(data, str):
            body = data.encode("utf-8")
        else:
            body = data or b""
        e2e_paths = self.settings.e2e_paths
        found = e2e_request(method, target.path, body, e2e_paths) if body else None
        if found is not None:
            return await self._encrypted(method, target, body, found, user_headers, client_timeout)
        if self.settings.strict:
            raise plaintext_refused(method, target.path)
        if body:
            raise body_refused(method, target.path)
        return await self._plaintext(method, path, target, body, user_headers, client_timeout)

    def _bind(self, target: URL) -> None:
        """Without bases, the first full URL's origin becomes both (nothing has been sent yet:
        no await since the check); a later full URL for another origin is refused."""
        if not self._unbound and self._bound is None:
            return  # bases given (or a Chutes / by-path first request): hosts not looked at
        if not target.is_absolute():
            self._unbound = False  # by path: the default pair, as for a Chutes origin
            return
        options, self._bound = bind_origin(
            self.options, str(target.origin()), unbound=self._unbound, bound=self._bound
        )
        self._unbound = False
        if options is not self.options:
            self._close_keys()
            self._engine = self._start(AsyncEngine, options)

    async def _plaintext(
        self,
        method: str,
        path: str,
        target: URL,
        body: bytes,
        headers: CIMultiDict[str],
        client_timeout: aiohttp.ClientTimeout | None,
    ) -> E2EEResponse:
        url = join_url(self.settings.models_base, path, target.raw_query_string)
        headers.popall("Host", None)
        kwargs: dict[str, Any] = {} if client_timeout is None else {"timeout": client_timeout}
        response = await self._http().request(
            method, URL(url, encoded=True), headers=headers, data=body or None, **kwargs
        )
        port_response = _PortResponse(response)
        return E2EEResponse(
            method=method,
            url=target,
            status=response.status,
            headers=response.headers,
            source=port_response.aiter_bytes(),
            encrypted=False,
            resource=port_response,
        )

    async def _encrypted(
        self,
        method: str,
        target: URL,
        body: bytes,
        found: tuple[str, dict[str, Any]],
        headers: CIMultiDict[str],
        client_timeout: aiohttp.ClientTimeout | None,
    ) -> E2EEResponse:
        auth = self.settings.api_key or bearer_token(headers.get("Authorization"))
        port = _Port(self._http(), client_timeout, self._control)
        model, decoded = found
        try:
            outcome = await self._engine.invoke(
                port, path=target.path, body=body, model=model, auth=auth, decoded=decoded
            )
        except RelayError as exc:
            answer = error_answer(exc)  # the answer SDK-style clients expect (see _answers)
            if answer is None:
                raise
            status, pairs, content = answer
            return E2EEResponse(
                method=method,
                url=target,
                status=status,
                headers=_headers(pairs),
                source=_once(content),
                encrypted=True,
                error=exc,
            )
        if isinstance(outcome, Streaming):
            plain = outcome.stream
            return E2EEResponse(
                method=method,
                url=target,
                status=200,
                headers=_headers(STREAM_HEADERS),
                source=_decrypted(plain),
                encrypted=True,
                resource=plain,
            )
        if isinstance(outcome, Opened):
            pairs = [
                ("Content-Type", outcome.content_type),
                ("Content-Length", str(len(outcome.body))),
            ]
            return E2EEResponse(
                method=method,
                url=target,
                status=outcome.status,
                headers=_headers(pairs),
                source=_once(outcome.body),
                encrypted=True,
            )
        return E2EEResponse(
            method=method,
            url=target,
            status=outcome.status,
            headers=_relay_headers(outcome.headers),
            source=_once(outcome.body),
            encrypted=True,
        )
