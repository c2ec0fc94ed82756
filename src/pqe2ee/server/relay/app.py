"""The relay as an ASGI app: authentication, discovery (``/e2e/instances``) with single-use
nonces and a rate limit, the nonce check of ``/e2e/invoke`` (then :mod:`.forward`), the model
list, health and metrics; :func:`create_app` and :func:`serve`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any, Final

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pqe2ee.protocol.v2.negotiation import DISCOVERY_FIELD
from pqe2ee.server._asgi import (
    BodyTooLarge,
    Endpoint,
    InvalidContentLength,
    ServerApp,
    declared_length,
    json_response,
)
from pqe2ee.server._client import backend_client
from pqe2ee.server._ready import answer as ready_answer
from pqe2ee.server._stack import uvicorn_settings
from pqe2ee.server.noncestore import (
    MemoryNonceStore,
    NonceStore,
    NonceStoreError,
    RedisNonceStore,
    api_key_id,
)
from pqe2ee.server.relay.answers import (
    detail,
    gone,
    http_error,
    internal_error,
    store_down,
    too_large,
    unauthorized,
)
from pqe2ee.server.relay.config import API_KEYS_ENV, RelayConfig, chute_id_for, config_error
from pqe2ee.server.relay.evidence import chute_evidence
from pqe2ee.server.relay.forward import Forwarder
from pqe2ee.server.relay.metrics import RelayMetrics
from pqe2ee.server.relay.registry import Prober, Registry

__all__ = ["create_app", "serve", "server_settings"]

log = logging.getLogger("pqe2ee.relay")

_ANONYMOUS: Final = "anonymous"
_MAX_NONCE_LEN: Final = 256
_NONCE_BYTES: Final = 24  # a nonce is 32 URL-safe base64 characters (no padding)


def _new_nonces(count: int) -> list[str]:
    """``count`` nonces, each what ``secrets.token_urlsafe(24)`` gives, from one read of the
    system CSPRNG (24 bytes encode to 32 characters exactly, so the pieces never mix)."""
    text = base64.urlsafe_b64encode(secrets.token_bytes(_NONCE_BYTES * count)).decode("ascii")
    step = _NONCE_BYTES // 3 * 4
    return [text[i : i + step] for i in range(0, len(text), step)]


class _Relay:
    def store_down(self, exc: NonceStoreError) -> Response:
        """The 503 of a nonce-store failure, counted and logged with its reason (never a key,
        nonce or URL: the reason names the failure's type only)."""
        self.metrics.store_unavailable.inc()
        log.warning("answering 503: nonce store unavailable (%s)", exc.message)
        return store_down()

    def __init__(self, config: RelayConfig, store: NonceStore, owns_store: bool) -> None:
        self.config = config
        self.store = store
        self.owns_store = owns_store
        self.registry = Registry(config.instances)
        self.metrics = RelayMetrics()
        self.metrics.instances_total.set(len(config.instances))
        self.prober = Prober(config, self.registry, self.metrics.instances_up)
        self.forwarder = Forwarder(config, self.metrics, self.prober)
        # sha256(key) -> api_key_id; compared in constant time against every entry
        self.keys: list[tuple[bytes, str]] = [
            (hashlib.sha256(k.encode()).digest(), api_key_id(k)) for k in config.api_keys
        ]
        self.rng = random.Random(secrets.randbits(128))

    # -- auth ------------------------------------------------------------------------------

    def authenticate(self, request: Request) -> str | None:
        """The caller's api_key_id, or None. Every configured key is compared (no early exit)."""
        if self.config.no_auth:
            return _ANONYMOUS
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            token = ""
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        found: str | None = None
        for key_digest, key_id in self.keys:
            if hmac.compare_digest(digest, key_digest) and token:
                found = key_id
        return found

    def rate_key(self, request: Request, key_id: str) -> str:
        if self.config.no_auth:
            client = request.client
            return "disc:ip:" + (client.host if client else "unknown")
        return "disc:" + key_id

    # -- lifespan --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        cfg = self.config
        try:
            await self.store.ping()
        except NonceStoreError as exc:
            raise RuntimeError(f"nonce store unavailable: {exc.message}") from None
        client = backend_client(
            connect=cfg.connect_timeout,
            read=cfg.read_timeout,
            write=cfg.write_timeout,
            max_connections=cfg.max_connections,
            max_keepalive=min(cfg.max_connections, 256),
            ca_file=cfg.instance_ca,
        )
        async with client:
            self.prober.client = self.forwarder.client = client
            try:
                await self.prober.startup_probe()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.prober.background)
                    yield
                    tg.cancel_scope.cancel()
            finally:
                self.prober.client = self.forwarder.client = None
                if self.owns_store:
                    with anyio.CancelScope(shield=True):
                        await self.store.aclose()

    # -- endpoints -------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        data = [
            {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "pqe2ee",
                "chute_id": chute_id_for(model),
                "confidential_compute": self.config.tee,
                "input_modalities": ["text"],
                "output_modalities": ["text"],
            }
            for model, created in sorted(self.registry.models.items())
        ]
        return json_response({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        total = len(self.registry.instances)
        up = self.registry.available
        return json_response(
            {
                "status": "ok" if up else "degraded",
                "instances": {"available": up, "configured": total},
            }
        )

    async def ready(self, request: Request) -> Response:
        """Ready when at least one instance is available; every instance listed with why not."""
        checks = {inst.url: None if inst.up else inst.reason for inst in self.registry.instances}
        if self.registry.available:
            checks = {url: reason for url, reason in checks.items() if reason is None}
        return ready_answer(checks)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def instances(self, request: Request) -> Response:
        cfg = self.config
        key_id = self.authenticate(request)
        if key_id is None:
            return unauthorized()
        try:
            allowed = await self.store.hit(
                self.rate_key(request, key_id), cfg.rate_window, cfg.rate_limit
            )
        except NonceStoreError as exc:
            return self.store_down(exc)
        if not allowed:
            self.metrics.rate_limited.inc()
            return detail(
                429,
                f"Rate limit exceeded: at most {cfg.rate_limit} instance discoveries "
                f"per {cfg.rate_window:g} s per API key",
                {"Retry-After": str(int(cfg.rate_window + 0.999))},
            )
        chute_id = request.path_params["chute_id"]
        model = self.registry.chutes.get(chute_id)
        if model is None:
            return detail(404, "Chute not found")
        eligible = self.registry.members(model)
        if not eligible:
            return detail(404, "No E2E-capable instances available")
        chosen = self.rng.sample(eligible, min(cfg.max_instances, len(eligible)))
        rows = []
        for inst in chosen:
            assert inst.instance_id is not None
            nonces = _new_nonces(cfg.nonces_per_instance)
            try:
                await self.store.issue(
                    key_id, chute_id, inst.instance_id, nonces, cfg.nonce_store_ttl
                )
            except NonceStoreError as exc:
                return self.store_down(exc)
            self.metrics.nonces_issued.inc(len(nonces))
            row: dict[str, Any] = {
                "instance_id": inst.instance_id,
                "e2e_pubkey": inst.pubkey,
                "nonces": nonces,
            }
            if inst.v2 is not None:
                row[DISCOVERY_FIELD] = inst.v2
            rows.append(row)
        now = time.time()
        return json_response(
            {
                "instances": rows,
                "nonce_expires_in": cfg.nonce_expires_in,
                "nonce_expires_at": int(now + cfg.nonce_expires_in),
            },
            headers={"Cache-Control": "no-store"},
        )

    async def invoke(self, request: Request) -> Response:
        cfg = self.config
        key_id = self.authenticate(request)
        if key_id is None:
            return unauthorized()
        headers = request.headers
        chute_id = headers.get("x-chute-id")
        instance_id = headers.get("x-instance-id")
        nonce = headers.get("x-e2e-nonce")
        missing = [
            {"type": "missing", "loc": ["header", name], "msg": "Field required", "input": None}
            for name, value in (
                ("x-chute-id", chute_id),
                ("x-instance-id", instance_id),
                ("x-e2e-nonce", nonce),
            )
            if value is None
        ]
        if missing:
            return detail(422, missing)
        assert chute_id is not None and instance_id is not None and nonce is not None
        try:
            length = declared_length(headers, cfg.max_body)
        except InvalidContentLength:
            return detail(400, "Invalid Content-Length")
        except BodyTooLarge:
            return too_large(cfg.max_body)

        # The nonce is consumed before any later check, as on the real relay.
        accepted = False
        if 0 < len(nonce) <= _MAX_NONCE_LEN:
            try:
                accepted = await self.store.consume(nonce, key_id, chute_id, instance_id)
            except NonceStoreError as exc:
                return self.store_down(exc)
        if not accepted:
            self.metrics.nonces_rejected.inc()
            return detail(403, "Invalid, expired, or already-used nonce")
        self.metrics.nonces_consumed.inc()

        model = self.registry.chutes.get(chute_id)
        if model is None:
            return detail(404, "Chute not found")
        inst = self.registry.by_id.get(instance_id)
        if inst is None:
            if instance_id in self.registry.retired:
                return gone()
            return detail(404, "Instance not found")
        if model not in inst.models:
            return detail(400, "Instance does not belong to the specified chute")
        if not inst.up:
            return gone()
        if length == 0:
            return detail(400, "Empty request body")
        return self.forwarder.forward(request, inst, length)


def create_app(config: RelayConfig, *, nonce_store: NonceStore | None = None) -> Starlette:
    """The relay as a Starlette app. Instances are probed in its lifespan (run it under uvicorn).

    ``nonce_store`` overrides the store (default: Redis when ``config.redis_url`` is set, else
    in memory); a store passed in is not closed by the app. Raises
    :class:`~pqe2ee.errors.LocalProtocolError` when no API key is configured and ``no_auth``
    is not set.
    """
    if not config.api_keys and not config.no_auth:
        raise config_error(
            f"no API keys configured: pass --api-key KEY or set {API_KEYS_ENV}, "
            "or pass --no-auth explicitly to run an open relay"
        )
    owns = nonce_store is None
    store: NonceStore
    if nonce_store is not None:
        store = nonce_store
    elif config.redis_url:
        store = RedisNonceStore(
            config.redis_url,
            on_pool_wait=lambda waited: relay.metrics.store_pool_wait.observe(waited),
        )
    else:
        store = MemoryNonceStore(max_entries=config.max_memory_nonces)
    relay = _Relay(config, store, owns)

    app = ServerApp(
        routes=[
            Route("/v1/models", relay.models, methods=["GET"]),
            Route("/e2e/instances/{chute_id}", relay.instances, methods=["GET"]),
            Route("/chutes/{chute_id}/evidence", partial(chute_evidence, relay), methods=["GET"]),
            # a hot path (ServerApp): every failure is a response of its own, or a 500
            Route("/e2e/invoke", Endpoint(relay.invoke), methods=["POST"]),
            Route("/health", relay.health, methods=["GET"]),
            Route("/ready", relay.ready, methods=["GET"]),
            Route("/metrics", relay.metrics_endpoint, methods=["GET"]),
        ],
        observe=relay.metrics.observe,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=relay.lifespan,
    )
    app.state.relay = relay
    return app


def server_settings(
    config: RelayConfig, *, log_level: str = "info", pure_python: bool = False, **uvicorn_kw: Any
) -> dict[str, Any]:
    """The ``uvicorn.run`` settings :func:`serve` runs the relay with (a failed lifespan start
    - the nonce store down - stops it; uvicorn's access log, at ``info``)."""
    return uvicorn_settings(
        pure_python=pure_python,
        host=config.host,
        port=config.port,
        log_level=log_level,
        lifespan="on",
        **uvicorn_kw,
    )


def serve(
    config: RelayConfig, *, log_level: str = "info", pure_python: bool = False, **uvicorn_kw: Any
) -> None:
    """Run the relay with uvicorn on ``config.host:config.port`` until interrupted, on uvloop +
    httptools unless ``pure_python`` (:mod:`pqe2ee.server._stack`); ``uvicorn_kw``: more
    ``uvicorn.run`` settings (e.g. ``ssl_certfile``/``ssl_keyfile``)."""
    import uvicorn

    settings = server_settings(config, log_level=log_level, pure_python=pure_python, **uvicorn_kw)
    uvicorn.run(create_app(config), **settings)
