"""The E2EE transport for httpx2: a thin adapter over the shared engine.

Written once, as async code; ``scripts/unasync.py`` generates the blocking twin and the
legacy-httpx pair from it. Edit only the async httpx2 source and run
``python scripts/unasync.py``. Public names live in :mod:`pqe2ee.transports.httpx2`.

The request orchestration (models, discovery, leases, sealing, retries, stream decryption)
is :class:`~pqe2ee.transports._async._engine.AsyncEngine`; this module only moves httpx2
requests through it and maps errors onto httpx2's types.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import AsyncIterator
from typing import NoReturn, Unpack

import httpx2

from pqe2ee.backends.base import KEMPrivateKey
from pqe2ee.errors import ErrorCode, PQE2EEError, RelayError
from pqe2ee.protocol.client import e2e_request
from pqe2ee.transports._answers import ERROR_EXTENSION, error_answer
from pqe2ee.transports._async._engine import (
    AsyncEngine,
    AsyncPlainStream,
    Opened,
    Streaming,
    body_refused,
    plaintext_refused,
)
from pqe2ee.transports._async._stream import AsyncRawBody
from pqe2ee.transports._common import (
    STREAM_HEADERS,
    EngineFacade,
    RequestHeaders,
    ResponseHead,
    Settings,
    bearer_token,
)
from pqe2ee.transports._httpx2_common import (
    E2EEStreamError,
    as_stream_error,
    default_limits,
    json_response,
    passthrough_response,
    raise_mapped,
)
from pqe2ee.transports.options import (
    ClientOptions,
    ClientOptionsArgs,
    bind_origin,
    uses_default_bases,
)

__all__ = ["AsyncDecryptingStream", "AsyncE2EETransport"]

_NETWORK_ERRORS: tuple[type[BaseException], ...] = (httpx2.HTTPError,)
_LOST_ERRORS: tuple[type[BaseException], ...] = (httpx2.TransportError,)
_TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (httpx2.TimeoutException,)
#: Parsed URLs kept per transport (invoke, model listing, discovery per chute, evidence).
_MAX_URLS = 256


def _attach_request(exc: httpx2.RequestError, response: httpx2.Response) -> None:
    """What httpx2's raw iterator does to an error of the stream: name the response's
    request, when it has one."""
    with contextlib.suppress(RuntimeError):  # (no request set)
        exc.request = response.request


class _AsyncPortResponse(ResponseHead):
    """An httpx2 response as the engine's port response (errors mapped to httpx2's)."""

    __slots__ = ("_response",)

    def __init__(self, response: httpx2.Response) -> None:
        # ResponseHead's fields set here: one frame less per request.
        self.status = response.status_code
        self.headers = response.headers.raw
        self._response = response

    def raw_bytes(self) -> AsyncRawBody:
        response = self._response
        stream = response.stream
        if (
            response.is_stream_consumed
            or response.is_closed  # (httpx2's iterators say what is wrong)
            or "content-encoding" in response.headers
            or not isinstance(stream, httpx2.AsyncByteStream)
        ):
            return response.aiter_bytes(), self._failed
        # Without a content coding the body is the transport's own stream: read it as
        # ``aiter_raw`` would (closed once read: the reader closes it), without its generator,
        # chunker and byte count per chunk, which a streamed answer pays per event.
        response.is_stream_consumed = True
        try:
            chunks = stream.__aiter__()  # (a stream's __aiter__ may raise as it starts)
        except Exception as exc:
            self._failed(exc)
        return chunks, self._failed

    def _failed(self, exc: Exception) -> NoReturn:
        if isinstance(exc, httpx2.RequestError):
            _attach_request(exc, self._response)
        raise_mapped(exc, "read")

    async def aclose(self) -> None:
        await self._response.aclose()


class _AsyncPort:
    """The engine's way out through an inner httpx2 transport. Invokes carry the caller's
    request extensions (timeouts); the engine's own calls carry the transport's timeout.

    ``urls`` caches each URL the engine sends to, parsed, with its ``Host`` header (the invoke
    URL is the same for every request): a request is then built from the body's bytes as
    its stream, with the headers ``content=`` would have added (``Host`` first,
    ``Content-Length`` last), left as ``content=`` leaves it (``request.content`` is the
    body), without parsing the URL or encoding the content again."""

    __slots__ = ("_control", "_extensions", "_inner", "_urls")

    network_errors = _NETWORK_ERRORS
    lost_errors = _LOST_ERRORS
    timeout_errors = _TIMEOUT_ERRORS

    def __init__(
        self,
        inner: httpx2.AsyncBaseTransport,
        extensions: dict[str, object],
        control: dict[str, object],
        urls: dict[str, tuple[httpx2.URL, str]],
    ) -> None:
        self._inner = inner
        self._extensions = extensions
        self._control = control
        self._urls = urls

    async def send(
        self, method: str, url: str, headers: RequestHeaders, body: bytes, *, control: bool
    ) -> _AsyncPortResponse:
        extensions = self._control if control else self._extensions
        known = self._urls.get(url)
        if known is None:
            request = httpx2.Request(
                method, url, headers=headers, content=body or None, extensions=extensions
            )
            host = request.headers.get("host")
            if host is not None and "?" not in url:  # (an evidence URL's nonce: once only)
                if len(self._urls) >= _MAX_URLS:
                    self._urls.clear()
                self._urls[url] = (request.url, host)
        else:
            parsed, host = known
            fields = [("Host", host), *headers]
            if body or method == "POST":
                fields.append(("Content-Length", str(len(body))))
            request = httpx2.Request(
                method,
                parsed,
                headers=fields,
                stream=httpx2.ByteStream(body),
                extensions=extensions,
            )
            # As content= (read()) leaves it: ``request.content`` is there for the inner.
            request._content = body
        try:
            response = await self._inner.handle_async_request(request)
        except Exception as exc:  # (no frames unless it raises)
            raise_mapped(exc, "connect")
        return _AsyncPortResponse(response)


def _stream_error(
    request: httpx2.Request, exc: PQE2EEError
) -> tuple[E2EEStreamError, BaseException | None]:
    """``exc`` raised mid-stream, as httpx2's stream error for ``request``, and its cause."""
    # A lost connection is caused by httpx2's own error; anything else by itself.
    lost = exc.code is ErrorCode.CONNECTION_LOST and exc.__cause__ is not None
    return as_stream_error(exc, request), exc.__cause__ if lost else exc


class AsyncDecryptingStream(httpx2.AsyncByteStream):
    """The body of a streamed E2EE answer: decrypts the relay's outer stream lazily and yields
    the engine's own SSE bytes (events reassembled from records, nothing re-serialised).

    Plaintext usage events go to ``on_usage`` and never into the stream. Any failure - a bad
    record, a reported remote error, a connection lost, EOF before the inner ``[DONE]`` - is
    raised as an :class:`~pqe2ee.transports.httpx2.E2EEStreamError`.
    """

    def __init__(
        self,
        upstream: httpx2.Response,
        key: KEMPrivateKey,
        settings: Settings,
        request: httpx2.Request,
    ) -> None:
        plain = AsyncPlainStream(
            _AsyncPortResponse(upstream),
            key,
            settings,
            lost_errors=_LOST_ERRORS,
            timeout_errors=_TIMEOUT_ERRORS,
        )
        plain.stream_error = functools.partial(_stream_error, request)
        self._plain = plain

    @classmethod
    def _over(cls, plain: AsyncPlainStream, request: httpx2.Request) -> AsyncDecryptingStream:
        stream = cls.__new__(cls)
        plain.stream_error = functools.partial(_stream_error, request)
        stream._plain = plain
        return stream

    def __aiter__(self) -> AsyncIterator[bytes]:
        # The decrypting generator itself, raising E2EEStreamError (no layer of our own).
        return self._plain.__aiter__()

    async def aclose(self) -> None:
        await self._plain.aclose()


class AsyncE2EETransport(EngineFacade, httpx2.AsyncBaseTransport):
    """An httpx2 transport that end-to-end encrypts inference requests (Chutes E2EE v1 and
    pqe2ee profile v2).

    Use it as ``httpx2.AsyncClient(transport=AsyncE2EETransport(api_key=...))``, e.g. as the
    ``http_client`` of ``openai.AsyncOpenAI``.

    What is encrypted: a ``POST`` to one of ``e2e_paths`` (default ``/v1/chat/completions`` and
    ``/v1/completions``) whose JSON body has a string ``model``. It is sealed to an instance of
    the model's chute (found via ``{models_base}/v1/models`` and
    ``{api_base}/e2e/instances/{chute_id}``) and sent to ``{api_base}/e2e/invoke``; the answer
    is decrypted before the caller sees it. A model that is a chute UUID is used as is.

    A body goes sealed or nowhere: one for an E2EE path that is not a JSON object with a
    ``model`` the transport can decode (invalid JSON, NaN, nested deeper than the 128 levels
    instances accept) is refused with ``LocalProtocolError`` code ``invalid_body``; a request
    with a body for any other path or method (the Responses API, embeddings, Anthropic
    Messages: use ``pqe2ee proxy`` for those dialects) with code ``plaintext_refused``.

    Requests without a body - e.g. ``GET /v1/models`` - go in **plaintext** to ``models_base``
    (same path and query, the request's own headers). With ``strict=True`` they are refused too
    (``LocalProtocolError``, code ``plaintext_refused``) and nothing leaves in plaintext except
    the transport's own model listing and discovery calls (which carry no user data).

    Answers:

    * non-stream 200: the engine's JSON bytes exactly as produced (``application/json``);
    * an engine error sealed by the instance: the engine's status and decrypted body, so SDKs
      raise their usual status errors with the engine's message;
    * stream 200: a lazily decrypted ``text/event-stream`` of the engine's SSE bytes; usage
      events outside the encryption go to ``on_usage(usage)`` (unauthenticated: for display
      only), never into the stream; failures mid-stream raise ``E2EEStreamError``;
    * other relay answers: nonce rejected, instance gone (410), busy (429) or needing key
      exchange (502) are retried on a fresh nonce / another instance, up to ``max_attempts``
      in all (then a 503 answer, code ``retries_exhausted``); a refused path is a 403 answer
      (``path_forbidden``); any other status is handed over unchanged.

    Relay and discovery failures before any byte reaches the caller (``model_not_found``,
    ``no_instances``, ``discovery_rate_limited``, ``discovery_failed``, a refused path,
    exhausted retries: a :class:`~pqe2ee.errors.RelayError`) are answered as HTTP errors the
    SDKs map onto their own classes - 401/403 as the relay said, 404 unknown model, 429 rate
    limited or busy, 503 no instance / retries exhausted, 502 otherwise - with a JSON body
    ``{"error": {"message", "type", "code": <pqe2ee code>}}``, an ``x-pqe2ee-error`` header,
    and the error itself in ``response.extensions["pqe2ee_error"]`` (an SDK error's
    ``.response``); other errors (local refusals, downgrade refusals, bad crypto) raise typed pqe2ee
    errors, and connection problems with the relay are httpx2's own exceptions. Discovery keeps to ``limits`` (10 per
    minute by default), waiting for a slot at most ``timeout`` seconds, which also bounds each
    discovery call. Every request seals its answer to a fresh one-use key (ML-KEM-768 for v1,
    X-Wing for v2).

    Protocol version (spec/v2.md §8): by default (``prefer_v2=True``) a chute whose instances
    offer v2 (``e2e_v2`` in discovery) is spoken to in v2, only on those instances, and is
    *pinned* (24 h): if it later shows up without any v2 offer the call raises
    ``RemoteProtocolError`` (``downgrade_suspected``) instead of falling back; chutes that never
    offered v2 get v1 (a warning is logged). ``min_version=2`` is strict: a chute without a v2
    offer raises ``downgrade_refused`` before a nonce is spent - the setting for instances you
    run yourself. ``prefer_v2=False`` speaks v1 only. ``negotiator`` shares one set of pins
    (and its policy) between transports. v2 adds: the routing context bound into the key
    schedule, replay refusal at the instance, live-checked stream record order, count and end,
    the engine's status and errors authenticated, and the relay's plaintext usage copy checked
    against the authenticated usage (``usage_mismatch``). Plaintext v2 refusals are
    ``RelayError`` s with the instance's code (``replay``, ``context_mismatch``, ...);
    ``unknown_key`` (a key rotation) and ``stale`` are retried once.

    Configuration: ``options`` (a :class:`~pqe2ee.transports.options.ClientOptions`) and/or
    its fields as keyword arguments (``api_key=``, ``strict=``, ...; a keyword replaces that
    field of ``options``). Without ``api_base`` and ``models_base`` the SDK's own base URL is
    the relay: the first request's origin becomes both (Chutes' ``llm.chutes.ai`` /
    ``api.chutes.ai`` keep their pair), and a request for another origin is then refused. ``api_key`` authenticates discovery and invocation; ``None`` takes
    each request's own ``Authorization: Bearer`` token. ``inner`` is the transport used to
    reach the relay (default ``httpx2.AsyncHTTPTransport()`` with httpx2's pool limits, idle
    connections kept 2 s instead of 5: below a 5 s server keep-alive); it is closed with this one, as
    are the key pools' filler threads.
    """

    _engine: AsyncEngine

    def __init__(
        self,
        *,
        options: ClientOptions | None = None,
        inner: httpx2.AsyncBaseTransport | None = None,
        **kwargs: Unpack[ClientOptionsArgs],
    ) -> None:
        self._engine = self._start(AsyncEngine, ClientOptions.of(options, **kwargs))
        if inner is None:
            inner = httpx2.AsyncHTTPTransport(limits=default_limits())
        self._inner = inner
        self._control: dict[str, object] = {"timeout": self.settings.timeout_extension}
        # Neither base given: the first request's own URL names the relay (see bind_origin).
        self._unbound = uses_default_bases(self.options)
        self._bound: str | None = None
        self._bind_lock = threading.Lock()
        self._urls: dict[str, tuple[httpx2.URL, str]] = {}

    # -- httpx2 transport API -------------------------------------------------------------------

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if self._closed:
            raise self._closed_error("transport")
        if self._unbound or self._bound is not None:  # (bases given: the host is not looked at)
            self._bind(request)
        engine = self._engine  # (the engine _bind left: no property)
        e2e_paths = engine.settings.e2e_paths
        # (url.path is decoded on each access: once here)
        if request.method != "POST" or (path := request.url.path) not in e2e_paths:
            return await self._plaintext(request)
        body = await request.aread()
        found = e2e_request("POST", path, body, e2e_paths)
        if found is None:  # (a blank body)
            return await self._plaintext(request)
        # Encrypted: written here, not in a method of its own (one frame less per request).
        model, decoded = found
        auth = engine.settings.api_key or bearer_token(request.headers.get("authorization"))
        port = _AsyncPort(self._inner, request.extensions, self._control, self._urls)
        try:
            outcome = await engine.invoke(
                port, path=path, body=body, model=model, auth=auth, decoded=decoded
            )
        except RelayError as exc:
            # An HTTP answer the SDKs map onto their own error classes (see _answers).
            answer = error_answer(exc)
            if answer is None:
                raise
            status, headers, content = answer
            return httpx2.Response(
                status,
                headers=headers,
                content=content,
                request=request,
                extensions={ERROR_EXTENSION: exc},
            )
        if isinstance(outcome, Streaming):
            stream = AsyncDecryptingStream._over(outcome.stream, request)
            return httpx2.Response(200, headers=STREAM_HEADERS, stream=stream, request=request)
        if isinstance(outcome, Opened):
            return json_response(outcome.status, outcome.body, request, outcome.content_type)
        return passthrough_response(outcome.status, outcome.headers, outcome.body, request)

    def _bind(self, request: httpx2.Request) -> None:
        """Without ``api_base`` / ``models_base``, the SDK's own base URL is the relay: the
        first request to a host other than Chutes' rebinds both there (before anything is
        sent); a later request to yet another host is refused. Not called when the bases were
        given."""
        url = request.url
        origin = f"{url.scheme}://{url.netloc.decode('ascii')}"
        with self._bind_lock:
            options, self._bound = bind_origin(
                self.options, origin, unbound=self._unbound, bound=self._bound
            )
            self._unbound = False
            if options is not self.options:
                self._close_keys()
                self._engine = self._start(AsyncEngine, options)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_keys()
        await self._inner.aclose()

    # -- plaintext ------------------------------------------------------------------------------

    async def _plaintext(self, request: httpx2.Request) -> httpx2.Response:
        if self.settings.strict:
            raise plaintext_refused(request.method, request.url.path)
        headers_in = request.headers
        if "transfer-encoding" in headers_in or headers_in.get("content-length", "0") != "0":
            raise body_refused(request.method, request.url.path)
        url = httpx2.URL(self.settings.models_base + request.url.raw_path.decode("ascii"))
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"host"]
        headers.insert(0, (b"Host", url.netloc))
        forwarded = httpx2.Request(
            request.method,
            url,
            headers=headers,
            stream=request.stream,
            extensions=request.extensions,
        )
        try:
            return await self._inner.handle_async_request(forwarded)
        except Exception as exc:
            raise_mapped(exc, "connect")
