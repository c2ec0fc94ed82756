"""The instance as an ASGI app: :class:`Instance` holds the state and serves the endpoints;
:func:`create_app` wraps it in Starlette with a lifespan; :func:`serve` runs it with uvicorn.

``POST /e2e/invoke`` runs the checks that come before any body is read (path allow-list,
``X-Instance-Id``, concurrency), reads the body under ``max_body``, and hands it to the v2
handler when it starts with ``"PQE2" 02`` (magic and version of the v2 context header), else to
the v1 handler. A streamed answer takes over the request's concurrency slot and releases it at
its end.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import anyio
import httpx2
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from pqe2ee import __version__
from pqe2ee.attest.tsm import TsmQuoteProvider
from pqe2ee.backends.base import AEAD, KEM, KEMPrivateKey
from pqe2ee.backends.xwing import XWing, XWingPrivateKey
from pqe2ee.errors import ErrorCode
from pqe2ee.protocol import looks_like_uuid
from pqe2ee.protocol.v2 import MAGIC, VERSION, InstanceV2, ReplayCache
from pqe2ee.server._asgi import (
    BodyTooLarge,
    Endpoint,
    InvalidContentLength,
    ServerApp,
    json_response,
    read_body,
)
from pqe2ee.server._ready import answer as ready_answer
from pqe2ee.server._ready import probe
from pqe2ee.server._stack import uvicorn_settings
from pqe2ee.server.instance.config import InstanceConfig, MiB
from pqe2ee.server.instance.evidence import EvidenceService, QuoteProvider
from pqe2ee.server.instance.exchange import Concurrency, Reject, RequestLog, logger
from pqe2ee.server.instance.keys import Keys
from pqe2ee.server.instance.metrics import InstanceMetrics
from pqe2ee.server.instance.upstream import Engine, EngineStream, safe_url
from pqe2ee.server.instance.v1 import V1Handler
from pqe2ee.server.instance.v2 import V2Handler

__all__ = ["V2_PREFIX", "Instance", "create_app", "serve", "server_settings"]

V2_PREFIX: Final = MAGIC + bytes((VERSION,))  # a blob starting with these 5 bytes is v2 (§8.2)
_LINGER_MAX: Final = 64 * MiB  # see Instance._read_body
_LINGER_SECONDS: Final = 10.0  # the longest a chunked oversize upload is drained for
_CHUNKED_LINGER_MAX: Final = 16 * MiB  # ... and drained for at most this many more bytes


class Instance:
    """State of one running instance: keys, engine client, model cache, concurrency count.

    ``private_key`` / ``v2_key`` and ``replay_cache`` override the v1 / v2 key and the replay
    cache (tests); a cache passed in is neither checked at start nor closed.
    """

    def __init__(
        self,
        config: InstanceConfig,
        *,
        private_key: KEMPrivateKey | None = None,
        v2_key: XWingPrivateKey | None = None,
        replay_cache: ReplayCache | None = None,
    ) -> None:
        self.config = config
        self.engine = Engine(config)
        self.keys = Keys(
            config,
            own_chutes=self.engine.own_chutes,
            private_key=private_key,
            v2_key=v2_key,
            replay_cache=replay_cache,
        )
        self._allowed = frozenset(config.allow_paths)
        self._budget = Concurrency(config.max_concurrency)
        self._v1 = V1Handler(config, self.keys, self.engine)
        self._v2 = V2Handler(self.keys, self.engine)

    # -- what the keys and the engine know ----------------------------------------------------

    @property
    def kem(self) -> KEM:
        return self.keys.kem

    @property
    def aead(self) -> AEAD:
        return self.keys.aead

    @property
    def xwing(self) -> XWing:
        return self.keys.xwing

    @property
    def key_source(self) -> str:
        return self.keys.key_source

    @property
    def v2_key_source(self) -> str:
        return self.keys.v2_key_source

    @property
    def public_key(self) -> bytes:
        return self.keys.public_key

    @property
    def instance_id(self) -> str:
        return self.keys.instance_id

    @property
    def v2(self) -> InstanceV2 | None:
        return self.keys.v2

    @property
    def rotates_v2(self) -> bool:
        """True when the v2 key is generated here (not from a file or given) and so rotates."""
        return self.keys.rotates_v2

    def rotate_v2(self) -> None:
        """Make a fresh v2 key current (see :meth:`Keys.rotate_v2`)."""
        self.keys.rotate_v2()

    def v2_offer(self, now: float | None = None) -> dict[str, Any] | None:
        """The ``e2e_v2`` discovery object (spec/v2.md §8.1), or None without v2."""
        return self.keys.v2_offer(now)

    async def rotation_loop(self) -> None:
        await self.keys.rotation_loop()

    @property
    def inflight(self) -> int:
        return self._budget.inflight

    @property
    def models(self) -> list[str]:
        return self.engine.models

    @property
    def _models_checked(self) -> float | None:
        return self.engine.models_checked

    @_models_checked.setter
    def _models_checked(self, value: float | None) -> None:
        self.engine.models_checked = value  # tests force a refresh with None

    def client(self) -> httpx2.AsyncClient:
        return self.engine.client()

    async def refresh_models(self, *, force: bool = False) -> list[str]:
        return await self.engine.refresh_models(force=force)

    @property
    def protocols(self) -> list[str]:
        if self.v2 is None:
            return ["v1"]
        return ["v2"] if self.config.v2_only else ["v1", "v2"]

    # -- lifecycle ----------------------------------------------------------------------------

    async def startup(self) -> None:
        await self.keys.check_cache()
        self.engine.client()
        await self.engine.refresh_models(force=True)
        cfg = self.config
        logger.info(
            "instance %s ready: key %s (sha256:%s), upstream %s, paths %s, backend %s",
            self.instance_id,
            self.key_source,
            self.keys.fingerprint(),
            safe_url(cfg.upstream),
            ",".join(cfg.allow_paths),
            self.kem.name,
        )
        if self.v2 is not None:
            logger.info(
                "v2 %s: key %s (sha256:%s), %s, replay cache %s, chute %s",
                "only (v1 refused)" if cfg.v2_only else "on",
                self.v2_key_source,
                self.keys.v2_fingerprint(),
                f"rotated every {cfg.v2_key_lifetime:g} s" if self.rotates_v2 else "not rotated",
                self.keys.replay_cache_kind,
                cfg.chute_id or "per model",
            )
        else:
            logger.info("v2 off: v1 only")

    async def aclose(self) -> None:
        await self.engine.aclose()
        await self.keys.aclose()

    # -- endpoints ----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        RequestLog("GET", "/health").emit(200, level=logging.DEBUG)
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Ready when the engine answers ``GET /v1/models`` with 200."""
        engine = self.engine
        reason = await probe(
            engine.client(), engine.config.upstream + "/v1/models", headers=engine.auth, ok={200}
        )
        return ready_answer({"engine": reason})

    async def info(self, request: Request) -> Response:
        log = RequestLog("GET", "/e2e/info")
        models = await self.engine.refresh_models()
        log.emit(200, level=logging.DEBUG)
        doc: dict[str, Any] = {
            "instance_id": self.instance_id,
            "e2e_pubkey": self.keys.pubkey_b64,
            "models": models,
            "paths": list(self.config.allow_paths),
            "version": f"pqe2ee/{__version__}",
            "protocols": self.protocols,
        }
        offer = self.v2_offer()
        if offer is not None:
            doc["e2e_v2"] = offer
        return json_response(doc)

    async def invoke(self, request: Request) -> Response:
        log = RequestLog("POST", "/e2e/invoke")
        slot = None
        try:
            headers = request.headers
            path = headers.get("x-e2e-path", "/")
            if path not in self._allowed:
                # Refused before the body is read or decrypted, as the Chutes runtime does.
                raise Reject.error(
                    403, "Path not available via E2E", ErrorCode.PATH_FORBIDDEN.value
                )
            log.path = path
            chute = headers.get("x-chute-id")
            if chute is not None and looks_like_uuid(chute):
                log.chute = chute.lower()
            wanted = headers.get("x-instance-id")
            if wanted is not None and wanted.strip().lower() != self.instance_id.lower():
                raise Reject.error(
                    400,
                    "X-Instance-Id names a different instance",
                    ErrorCode.INSTANCE_MISMATCH.value,
                )
            if self._budget.full:
                raise Reject(
                    json_response(
                        {"error": "RateLimitExceeded", "detail": "Instance is at maximum capacity"},
                        429,
                    ),
                    ErrorCode.INSTANCE_BUSY.value,
                )
            slot = self._budget.acquire()
            blob = await self._read_body(request, log)
            handler = self._v2 if blob[: len(V2_PREFIX)] == V2_PREFIX else self._v1
            response = await handler.invoke(request, path, blob, slot, log)
            if isinstance(response, EngineStream):
                slot = None  # the stream response owns it now and releases it at its end
            return response
        except Reject as rej:
            log.emit(rej.response.status_code, rej.code)
            return rej.response
        finally:
            if slot is not None:
                slot.release()

    async def _read_body(self, request: Request, log: RequestLog) -> bytes:
        """The body, never holding more than ``max_body`` bytes of it.

        Over the limit: 413. When the declared Content-Length is over the limit but modest
        (up to ``_LINGER_MAX``), the server discards the rest of the upload without storing it
        so the sender reliably reads the 413 (closing with unread data makes the kernel send a
        reset that can destroy the response). A chunked body that crosses the limit is drained
        the same way while it stays within ``_CHUNKED_LINGER_MAX`` bytes and ``_LINGER_SECONDS`` (so a
        relay in front reads the 413, not a reset it would report as 502); past either, or for
        a larger declared size, reading stops at once and the connection is closed.
        """
        limit = self.config.max_body
        try:
            blob = await read_body(request, limit)
        except InvalidContentLength:
            raise Reject.error(
                400, "Invalid Content-Length", ErrorCode.INVALID_BODY.value, close=True
            ) from None
        except BodyTooLarge as exc:
            log.bytes_in = exc.received
            if exc.declared is None:
                close = not await _drain(request, _CHUNKED_LINGER_MAX)
            else:
                close = exc.declared > _LINGER_MAX
            raise Reject.error(
                413, f"Request body exceeds {limit} bytes", ErrorCode.OVERSIZE.value, close=close
            ) from None
        except ClientDisconnect:
            raise Reject.error(
                400, "Client disconnected", ErrorCode.CONNECTION_LOST.value
            ) from None
        log.bytes_in = len(blob)
        return blob


async def _drain(request: Request, budget: int) -> bool:
    """Discard the rest of a refused upload: True once it ended within ``budget`` more bytes
    and ``_LINGER_SECONDS``, False when it did not (the connection is then closed)."""
    seen = 0
    with anyio.move_on_after(_LINGER_SECONDS):
        while True:
            message = await request.receive()
            if message["type"] != "http.request":
                return False
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
            if seen > budget:
                return False
    return False


def create_app(
    config: InstanceConfig,
    *,
    private_key: KEMPrivateKey | None = None,
    v2_key: XWingPrivateKey | None = None,
    replay_cache: ReplayCache | None = None,
    quote_provider: QuoteProvider | None = None,
) -> Starlette:
    """The instance as an ASGI app. The keys are loaded (or created) here, before serving.

    ``private_key`` / ``v2_key`` override the v1 / v2 key (tests); otherwise ``config.key_file``
    / ``config.v2_key_file`` or fresh keys. ``replay_cache`` overrides the v2 replay cache.
    ``quote_provider`` (or ``config.tee="tdx"``: configfs-tsm at ``config.tsm_path``) serves
    ``GET /evidence?nonce=`` (:mod:`pqe2ee.server.instance.evidence`).
    Raises :class:`~pqe2ee.server.keyfile.KeyFileError` / :class:`~pqe2ee.errors.BackendError`
    for a bad key file or backend. The lifespan checks a Redis replay cache (start-up fails
    when it does not answer) and rotates a generated v2 key. ``app.state.instance`` is the
    :class:`Instance`.
    """
    instance = Instance(config, private_key=private_key, v2_key=v2_key, replay_cache=replay_cache)
    metrics = InstanceMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await instance.startup()
        try:
            async with anyio.create_task_group() as tg:
                if instance.rotates_v2:
                    tg.start_soon(instance.rotation_loop)
                yield
                tg.cancel_scope.cancel()
        finally:
            await instance.aclose()

    routes = [
        Route("/health", instance.health, methods=["GET"]),
        Route("/ready", instance.ready, methods=["GET"]),
        Route("/e2e/info", instance.info, methods=["GET"]),
        Route("/e2e/invoke", Endpoint(instance.invoke), methods=["POST"]),  # a hot path
        Route("/metrics", metrics.endpoint, methods=["GET"]),
    ]
    if quote_provider is None and config.tee == "tdx":
        quote_provider = TsmQuoteProvider(Path(config.tsm_path))
    if quote_provider is not None:
        service = EvidenceService(instance, quote_provider)
        routes.append(Route("/evidence", service.evidence, methods=["GET"]))
    app = ServerApp(routes=routes, observe=metrics.observe, lifespan=lifespan)
    app.state.instance = instance
    return app


def server_settings(
    config: InstanceConfig, *, log_level: str = "info", pure_python: bool = False, **uvicorn_kw: Any
) -> dict[str, Any]:
    """The ``uvicorn.run`` settings :func:`serve` runs the instance with (uvicorn's access log
    off: the instance writes its own line per request)."""
    return uvicorn_settings(
        pure_python=pure_python,
        host=config.host,
        port=config.port,
        log_level=log_level,
        access_log=False,
        **uvicorn_kw,
    )


def serve(
    config: InstanceConfig,
    *,
    log_level: str = "info",
    pure_python: bool = False,
    before_bind: Callable[[], None] | None = None,
    **uvicorn_kw: Any,
) -> None:
    """Run the instance with uvicorn until interrupted (key errors raise before binding;
    ``before_bind`` runs once the keys are loaded, before the port is bound), on uvloop +
    httptools unless ``pure_python`` (:mod:`pqe2ee.server._stack`); ``uvicorn_kw``: more
    ``uvicorn.run`` settings (e.g. ``ssl_certfile``/``ssl_keyfile``)."""
    import uvicorn

    app = create_app(config)
    if before_bind is not None:
        before_bind()
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    settings = server_settings(config, log_level=log_level, pure_python=pure_python, **uvicorn_kw)
    uvicorn.run(app, **settings)
