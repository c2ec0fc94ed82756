"""The routes: each endpoint, the error guard around it, and :func:`create_app`.

Model calls take the caller's key (or the configured one), read the body bounded, and go out
through the key's pooled E2EE client: chat and completions byte for byte, Responses and
Anthropic Messages through their translation (:data:`RESPONSES`, :data:`MESSAGES`). Every
failure below a route is a :class:`~pqe2ee.proxy.app.failures.Failure`, answered by
:func:`_endpoint` in the caller's dialect; nothing escapes as a 500 page.

A POST to a model-call path skips Starlette's stack (a hot path of
:class:`~pqe2ee.server._asgi.ServerApp`): the extra HTTP hop is most of what the proxy adds over
calling the transport directly (issue 14).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import anyio
import httpx2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from pqe2ee.attest.gate import AttestationGate, AttestOptions
from pqe2ee.errors import PQE2EEError
from pqe2ee.proxy.app._plumbing import (
    ENCODER,
    JSON_TYPE,
    decode_json,
    parse_object,
    read_body,
    read_upstream,
)
from pqe2ee.proxy.app.browser_guard import BrowserGuard, browser_policy
from pqe2ee.proxy.app.config import ProxyConfig
from pqe2ee.proxy.app.failures import (
    Dialect,
    Failure,
    dialect_of,
    fail_of,
    fail_of_upstream_body,
    kind_of,
)
from pqe2ee.proxy.app.metrics import CHAT_PATH, COMPLETIONS_PATH, ROUTES, AccessLog, Metrics
from pqe2ee.proxy.app.pool import (
    ClientPool,
    PoolEntry,
    client_factory,
    client_timeout,
    upstream_options,
)
from pqe2ee.proxy.app.status import status_page
from pqe2ee.proxy.app.streaming import (
    OpenStreams,
    PassthroughBody,
    StreamBody,
    StreamResponse,
    TranslatedBody,
    Translator,
)
from pqe2ee.proxy.translate.anthropic import (
    chat_to_message,
    count_tokens_estimate,
    messages_to_chat,
)
from pqe2ee.proxy.translate.chat import ChatReply
from pqe2ee.proxy.translate.errors import TranslationError
from pqe2ee.proxy.translate.responses import chat_to_response, responses_to_chat
from pqe2ee.proxy.translate.streams import MessagesStreamTranslator, ResponsesStreamTranslator
from pqe2ee.proxy.translate.tool_names import HostedPolicy, prepare_responses
from pqe2ee.server._asgi import Endpoint, Handler, ServerApp, json_response
from pqe2ee.server._ready import answer as ready_answer
from pqe2ee.server._ready import probe
from pqe2ee.transports._answers import ERROR_EXTENSION
from pqe2ee.transports.options import ClientOptions

__all__ = ["MESSAGES", "RESPONSES", "Translation", "create_app"]

log = logging.getLogger("pqe2ee.proxy")


@dataclass(frozen=True, slots=True)
class Translation:
    """A translated dialect: its metrics route name, the request and reply translations, and
    its stream translator (built per call from the client's request)."""

    route: str
    to_chat: Callable[[dict[str, Any]], dict[str, Any]]
    from_chat: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
    translator: Callable[[dict[str, Any]], Translator]


RESPONSES = Translation("responses", responses_to_chat, chat_to_response, ResponsesStreamTranslator)


class _NamespacedTranslator:
    """A Responses stream translator whose events get their tools' namespaces back."""

    def __init__(self, inner: ResponsesStreamTranslator, restore: Any) -> None:
        self._inner = inner
        self._restore = restore

    @property
    def closed(self) -> bool:
        return self._inner.closed

    def feed(self, chunk: dict[str, Any] | ChatReply) -> list[Any]:
        return [self._restore(e) for e in self._inner.feed(chunk)]

    def finish(self) -> list[Any]:
        return [self._restore(e) for e in self._inner.finish()]

    def error(self, status: int, type: str, message: str) -> list[Any]:
        return [self._restore(e) for e in self._inner.error(status, type, message)]


def responses_translation(hosted: HostedPolicy) -> Translation:
    """:data:`RESPONSES` with namespaced tools flattened (and restored on the way back) and
    hosted tools dropped - logged once per type - or refused (see
    :mod:`pqe2ee.proxy.translate.tool_names`)."""
    warned: set[str] = set()

    def to_chat(req: dict[str, Any]) -> dict[str, Any]:
        prepared = prepare_responses(req, hosted)
        for kind in sorted(set(prepared.dropped) - warned):
            warned.add(kind)
            log.warning("hosted tool %r dropped: the engine cannot run it (--hosted-tools)", kind)
        return responses_to_chat(prepared.req)

    def from_chat(reply: dict[str, Any], req: dict[str, Any]) -> dict[str, Any]:
        prepared = prepare_responses(req, hosted)
        return prepared.names.restore_response(chat_to_response(reply, prepared.req))

    def translator(req: dict[str, Any]) -> Translator:
        prepared = prepare_responses(req, hosted)
        inner = ResponsesStreamTranslator(prepared.req)
        if not prepared.names.by_flat:  # no namespaced tools: nothing to restore per event
            return inner
        return _NamespacedTranslator(inner, prepared.names.restore_event)

    return Translation("responses", to_chat, from_chat, translator)


MESSAGES = Translation("messages", messages_to_chat, chat_to_message, MessagesStreamTranslator)


def _answer(fail: Failure, dialect: Dialect) -> Response:
    return json_response(fail.body(dialect), fail.status)


def _caller_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
    key = request.headers.get("x-api-key", "").strip()
    return key or None


def _require_model(obj: Mapping[str, Any]) -> None:
    """A model call must name its model: that is what routes (and encrypts) it."""
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise Failure(
            400,
            "invalid_request_error",
            "model: a non-empty string is required",
            param="model",
            code="missing_model",
        )


class _Proxy:
    """The endpoints, over one config, pool of per-key clients, plaintext client and metrics."""

    def __init__(
        self,
        config: ProxyConfig,
        pool: ClientPool,
        plain: httpx2.AsyncClient,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.pool = pool
        self.plain = plain  # the public model listing only; never a model call
        self.metrics = metrics
        self.streams = OpenStreams()
        self._urls: dict[str, httpx2.URL] = {}  # model-call path -> its URL on the base URL
        self._timeout = client_timeout(config).as_dict()  # (every pooled client's timeouts)

    def _key(self, request: Request) -> str:
        key = _caller_key(request) or self.config.api_key
        if key is None:
            raise Failure(
                401,
                "authentication_error",
                "no API key: send Authorization: Bearer <key> or x-api-key, or start the "
                "proxy with --api-key",
                code="missing_api_key",
            )
        return key

    async def _send(self, client: httpx2.AsyncClient, request: httpx2.Request) -> httpx2.Response:
        try:
            resp = await client.send(request, stream=True)
        except (PQE2EEError, httpx2.HTTPError, httpx2.StreamError) as exc:
            fail = fail_of(exc)
            self.metrics.failed(fail.code or "unknown")
            log.warning("upstream call failed: %s", fail.code)
            raise fail from None
        # A relay failure the transport answered as an HTTP error: in the caller's dialect.
        relay_error = resp.extensions.get(ERROR_EXTENSION)
        if isinstance(relay_error, PQE2EEError):
            await resp.aclose()
            fail = fail_of(relay_error)
            self.metrics.failed(fail.code or "unknown")
            log.warning("upstream call failed: %s", fail.code)
            raise fail from None
        return resp

    def _post(self, entry: PoolEntry, path: str, body: bytes) -> httpx2.Request:
        """The model call for the key's client: its path and body are all the transport takes
        from it (sealed; the API key is the transport's own, and a strict transport sends
        nothing in plaintext), so it is built as a bare request - no client headers, cookies
        or query merged in per call, only the timeouts the client would add."""
        # Every pooled client has the same base URL: each path is merged with it (and parsed)
        # once, not per call.
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = entry.client.build_request("POST", path).url
        return httpx2.Request("POST", url, content=body, extensions={"timeout": self._timeout})

    def _stream(
        self, body: StreamBody, upstream: httpx2.Response, entry: PoolEntry, route: str
    ) -> StreamResponse:
        """The streamed answer; it closes ``upstream`` and releases ``entry`` when it ends."""
        return StreamResponse(
            body,
            upstream=upstream,
            release=lambda: self.pool.release(entry),
            metrics=self.metrics,
            streams=self.streams,
            route=route,
        )

    # -- OpenAI passthrough ------------------------------------------------------------------

    async def passthrough(self, request: Request) -> Response:
        """Chat Completions / Completions: the body goes through byte for byte."""
        path = request.scope["path"]  # (request.url would parse the whole URL)
        route = ROUTES[path]
        key = self._key(request)
        raw = await read_body(request, self.config.max_body)
        obj = parse_object(raw)
        _require_model(obj)
        mapped = self.config.map_model(obj["model"])
        if mapped != obj["model"]:
            raw = ENCODER.encode({**obj, "model": mapped})
        stream = obj.get("stream") is True
        entry = await self.pool.acquire(key)
        handed_over = False
        try:
            resp = await self._send(entry.client, self._post(entry, path, raw))
            if resp.status_code != 200 or not stream:
                # Upstream errors keep their status and body.
                body = await read_upstream(resp, self.config.max_response)
                ctype = resp.headers.get("content-type", JSON_TYPE)
                return Response(body, status_code=resp.status_code, media_type=ctype)
            handed_over = True
            return self._stream(PassthroughBody(resp, self.metrics, route), resp, entry, route)
        finally:
            if not handed_over:
                await self.pool.release(entry)

    # -- translated dialects -----------------------------------------------------------------

    def translated(self, dialect: Translation) -> Handler:
        """The endpoint of a translated dialect: its request becomes a Chat Completions call,
        the reply (or stream) is translated back."""

        async def call(request: Request) -> Response:
            return await self._translated_call(request, dialect)

        return call

    async def _translated_call(self, request: Request, dialect: Translation) -> Response:
        key = self._key(request)
        req = parse_object(await read_body(request, self.config.max_body))
        try:
            chat = dialect.to_chat(req)
        except TranslationError as exc:
            raise Failure.of_translation(exc) from None
        _require_model(chat)
        chat["model"] = self.config.map_model(chat["model"])
        stream = chat.get("stream") is True
        body = ENCODER.encode(chat)
        entry = await self.pool.acquire(key)
        handed_over = False
        try:
            resp = await self._send(entry.client, self._post(entry, CHAT_PATH, body))
            if resp.status_code != 200:
                raw = await read_upstream(resp, self.config.max_response)
                raise fail_of_upstream_body(resp.status_code, raw)
            if not stream:
                raw = await read_upstream(resp, self.config.max_response)
                not_json = Failure(
                    502, "server_error", "upstream reply is not JSON", code="bad_upstream_reply"
                )
                reply = decode_json(raw, not_json)
                try:
                    return json_response(dialect.from_chat(reply, req))
                except TranslationError as exc:
                    raise Failure.of_translation(exc) from None
            translated = TranslatedBody(
                resp,
                dialect.translator(req),
                max_event=self.config.max_event,
                metrics=self.metrics,
                route=dialect.route,
            )
            handed_over = True
            return self._stream(translated, resp, entry, dialect.route)
        finally:
            if not handed_over:
                await self.pool.release(entry)

    async def count_tokens(self, request: Request) -> Response:
        """A local estimate (see :func:`pqe2ee.proxy.translate.anthropic.count_tokens_estimate`)."""
        self._key(request)
        req = parse_object(await read_body(request, self.config.max_body))
        try:
            return json_response(count_tokens_estimate(req))
        except TranslationError as exc:
            raise Failure.of_translation(exc) from None

    # -- plaintext and local -----------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        """The public model list, in plaintext from models_base (with the caller's key, if
        any, as Chutes clients send it; it works without one)."""
        key = _caller_key(request) or self.config.api_key
        headers = {"accept": JSON_TYPE}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        params = request.url.query or None
        plain = self.plain.build_request("GET", "/v1/models", params=params, headers=headers)
        resp = await self._send(self.plain, plain)
        body = await read_upstream(resp, self.config.max_response)
        ctype = resp.headers.get("content-type", JSON_TYPE)
        return Response(body, status_code=resp.status_code, media_type=ctype)

    async def root(self, request: Request) -> Response:
        """``HEAD /``: clients (Claude Code) probe the base URL before their first call."""
        return Response(status_code=200)

    async def responses_upgrade(self, request: Request) -> Response:
        """``GET /v1/responses`` (a WebSocket upgrade, when the server takes it as HTTP): 426,
        so clients such as Codex fall back to HTTP streaming at once instead of retrying."""
        return _answer(
            Failure(
                426,
                "invalid_request_error",
                "WebSocket responses are not served; use POST /v1/responses",
                code="websocket_not_supported",
            ),
            dialect_of(request.url.path),
        )

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Ready when the relay answers HTTP at all (any status: Chutes' root is a 404) and the
        model list answers 200 (model names are resolved to chutes through it)."""
        models = self.config.models_base + "/v1/models"
        return ready_answer(
            {
                "relay": await probe(self.plain, self.config.api_base + "/"),
                "models": await probe(self.plain, models, ok={200}),
            }
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        self.metrics.keys.set(len(self.pool))
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _refuse_websocket(websocket: WebSocket) -> None:
    """A WebSocket upgrade of ``/v1/responses`` is denied with a plain HTTP 426 where the
    server supports denial responses (else closed before accept, a 403), so the client falls
    back to HTTP at once."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(
            json_response({"error": {"message": "use POST /v1/responses"}}, 426)
        )
    else:
        await websocket.close()


def _endpoint(handler: Handler, path: str) -> Endpoint:
    """A route whose every failure is an answer in its dialect: nothing escapes as a 500
    page."""
    dialect = dialect_of(path)

    def answer(exc: Exception) -> Response:
        if isinstance(exc, Failure):
            return _answer(exc, dialect)
        if isinstance(exc, ClientDisconnect):
            return Response(status_code=499)
        log.error("internal error (%s)", type(exc).__name__)
        return _answer(
            Failure(500, "server_error", "internal proxy error", code="internal"), dialect
        )

    return Endpoint(handler, answer)


def _gate(options: ClientOptions) -> AttestationGate | None:
    """The attestation gate every per-key transport shares (one ``AttestOptions``)."""
    attest = options.attest
    return attest.gate if isinstance(attest, AttestOptions) else None


def create_app(config: ProxyConfig | None = None) -> Starlette:
    """Build the proxy's Starlette app (its endpoints: see :mod:`pqe2ee.proxy.app`)."""
    config = config or ProxyConfig()
    metrics = Metrics()
    options = upstream_options(config)
    # One set of response-key pools for all the per-key transports (unless the caller brought
    # its own in transport_options: then it owns them). Closed after the transports.
    key_pools = None if options.key_pools is not None else options.make_key_pools()
    if key_pools is not None:
        options = ClientOptions.of(options, key_pools=key_pools)
    pool = ClientPool(
        client_factory(config, options), max_size=config.max_keys, idle_ttl=config.key_idle_ttl
    )
    plain = httpx2.AsyncClient(base_url=config.models_base, timeout=client_timeout(config))
    proxy = _Proxy(config, pool, plain, metrics)
    hosted = cast(HostedPolicy, config.hosted_tools)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:

            async def sweeper() -> None:
                interval = max(1.0, min(60.0, config.key_idle_ttl / 4))
                while True:
                    await anyio.sleep(interval)
                    await pool.sweep()

            tg.start_soon(sweeper)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await pool.aclose()
                    await plain.aclose()
                    if key_pools is not None:  # joins the fillers: off the event loop
                        await anyio.to_thread.run_sync(key_pools.close)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = kind_of(exc.status_code)
        message = {404: "no such endpoint", 405: "method not allowed"}.get(
            exc.status_code, "request refused"
        )
        fail = Failure(exc.status_code, kind, message)
        return _answer(fail, dialect_of(request.url.path))

    status = status_page(
        config, options.negotiator, pool.fingerprints, metrics.failure_log, _gate(options)
    )
    model_calls = {
        CHAT_PATH: proxy.passthrough,
        COMPLETIONS_PATH: proxy.passthrough,
        "/v1/responses": proxy.translated(responses_translation(hosted)),
        "/v1/messages": proxy.translated(MESSAGES),
        "/v1/messages/count_tokens": proxy.count_tokens,
    }
    observe = AccessLog(metrics)
    app = ServerApp(
        routes=[
            # the hot paths (ServerApp): straight to the guard and the endpoint on a POST
            *(
                Route(path, _endpoint(handler, path), methods=["POST"])
                for path, handler in model_calls.items()
            ),
            Route("/v1/responses", proxy.responses_upgrade, methods=["GET"]),
            WebSocketRoute("/v1/responses", _refuse_websocket),
            Route("/", proxy.root, methods=["HEAD"]),
            Route("/v1/models", _endpoint(proxy.models, "/v1/models"), methods=["GET"]),
            Route("/", status),
            Route("/health", proxy.health, methods=["GET"]),
            Route("/ready", proxy.ready, methods=["GET"]),
            Route("/metrics", proxy.metrics_endpoint, methods=["GET"]),
        ],
        # A streamed answer's body messages go straight beneath the metrics layer (the browser
        # guard inside it only adds headers to the response start).
        observe=observe,
        middleware=[Middleware(BrowserGuard, policy=browser_policy(config))],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.pool = pool
    app.state.key_pools = options.key_pools
    app.state.metrics = metrics
    app.state.streams = proxy.streams
    return app
