"""``pqe2ee relay``: the control plane - discovery, single-use nonces, forwarding sealed bytes.

It plays the part of ``api.chutes.ai`` (``/e2e/instances``, ``/e2e/invoke``) and of
``llm.chutes.ai``'s ``/v1/models`` in front of one or more ``pqe2ee instance`` servers, on the
same wire contract, so the published Chutes clients work against it unchanged.

The relay holds no key that opens anything: it reads each instance's *public* key from
``GET {instance}/e2e/info`` and hands it out; request and response bodies are streamed through
as opaque bytes, never parsed, never buffered whole, never logged.

Endpoints::

    GET  /v1/models                  model list; chute_id = uuid5(URL, "pqe2ee:model:" + model)
    GET  /e2e/instances/{chute_id}   <= max_instances instances in random order, each with
                                     nonces_per_instance single-use nonces (Bearer auth,
                                     rate-limited per API key) and, for instances serving
                                     wire profile v2, their ``e2e_v2`` offer (spec/v2.md §8.1)
    POST /e2e/invoke                 consume the nonce, forward the blob to the instance,
                                     stream the answer back (Bearer auth)
    GET  /health                     {"status": "ok"|"degraded", "instances": {...}}
    GET  /metrics                    Prometheus text (counts and latencies only)

Error statuses follow the real relay (design notes ``chutes-v1-notes.md``, section 5), with two
deliberate improvements: an instance's *sealed* error (``application/octet-stream``,
any status) is passed through unchanged, so the client can open the engine's message; and an
instance's v2 plaintext hint (``{"detail":"e2e_v2:<code>"}``) keeps its text on 409 (replay) and
413 as on 400, nested in ``detail`` the way the real relay nests a 400.

v2 needs nothing else from the relay: its blobs and stream lines pass through like v1's (the
body is never parsed or rewritten; the headers are forwarded as for v1). Instances announce v2
in ``/e2e/info`` (``protocols``, ``e2e_v2``); the relay checks the offer when it reads it (an
invalid one is dropped, with a warning, from an instance that also serves v1; an instance that
serves only v2 and has no valid offer is unavailable) and copies it into discovery rows.

``confidential_compute`` in ``/v1/models`` is ``false`` unless :attr:`RelayConfig.tee` says the
instances run in attested TEEs; some third-party Chutes clients refuse models without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import random
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import anyio
import httpx2
import msgspec
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pqe2ee.backends.base import MLKEM768_PK_LEN
from pqe2ee.errors import ErrorCode, LocalProtocolError, MalformedError
from pqe2ee.protocol.codec import b64decode
from pqe2ee.protocol.v2.negotiation import DISCOVERY_FIELD, parse_v2_offer
from pqe2ee.server.noncestore import (
    MemoryNonceStore,
    NonceStore,
    NonceStoreError,
    RedisNonceStore,
    api_key_id,
)

__all__ = [
    "API_KEYS_ENV",
    "DEFAULT_PORT",
    "RelayConfig",
    "api_keys_from_env",
    "chute_id_for",
    "create_app",
    "serve",
]

log = logging.getLogger("pqe2ee.relay")

API_KEYS_ENV: Final = "PQE2EE_API_KEYS"
DEFAULT_PORT: Final = 8000
MIB: Final = 1024 * 1024
_ANONYMOUS: Final = "anonymous"
_MAX_INFO_BYTES: Final = 1 * MIB
_MAX_ERROR_BODY: Final = 64 * 1024
_MAX_NONCE_LEN: Final = 256
_KEY_RE: Final = re.compile(r"^[\x21-\x2b\x2d-\x7e]{1,512}$")  # printable, no space/comma
_INSTANCE_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_V2_HINT: Final = b'"e2e_v2:'  # an instance's v2 refusal: {"detail":"e2e_v2:<code>"}


def chute_id_for(model: str) -> str:
    """The chute_id the relay gives ``model``: stable for a model name, across relays."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "pqe2ee:model:" + model))


def api_keys_from_env(environ: Mapping[str, str]) -> tuple[str, ...]:
    """API keys from ``PQE2EE_API_KEYS`` (comma-separated; blanks ignored)."""
    raw = environ.get(API_KEYS_ENV, "")
    return tuple(k.strip() for k in raw.split(",") if k.strip())


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Everything the relay needs. Durations are seconds; sizes are bytes.

    ``api_keys`` is required unless ``no_auth`` is set explicitly (then anyone who can reach
    the relay may use it; nonces are still single use, rate limits are per client address).
    ``tee`` only sets ``confidential_compute`` in ``/v1/models``: set it when every instance
    runs in an attested TEE.
    """

    instances: tuple[str, ...]
    api_keys: tuple[str, ...] = ()
    no_auth: bool = False
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    rate_limit: int = 10  # discovery calls per API key per rate_window
    rate_window: float = 60.0
    nonces_per_instance: int = 10
    nonce_expires_in: int = 60  # what clients are told
    nonce_store_ttl: int = 75  # how long the store keeps them (as the real relay)
    max_instances: int = 5
    max_body: int = 64 * MIB
    connect_timeout: float = 5.0
    read_timeout: float = 900.0  # longest silence from an instance mid-response
    write_timeout: float = 60.0
    info_timeout: float = 5.0
    startup_wait: float = 3.0  # how long start-up keeps retrying instances that are down
    probe_interval: float = 2.0  # re-probe instances that are down this often
    refresh_interval: float = 30.0  # re-read /e2e/info of healthy instances this often
    gone_for: float = 5.0  # after a failed connect, wait this long before probing again
    tee: bool = False
    max_connections: int = 1000  # to all instances together
    max_memory_nonces: int = 1_000_000

    def __post_init__(self) -> None:
        urls = (self.instances,) if isinstance(self.instances, str) else self.instances
        object.__setattr__(self, "instances", tuple(_normalise_url(u) for u in urls))
        keys = (self.api_keys,) if isinstance(self.api_keys, str) else self.api_keys
        object.__setattr__(self, "api_keys", tuple(keys))
        if not self.instances:
            raise _config_error("at least one --instance URL is required")
        if len(set(self.instances)) != len(self.instances):
            raise _config_error("the same instance URL is listed twice")
        for key in self.api_keys:
            if not isinstance(key, str) or not _KEY_RE.match(key):
                raise _config_error(
                    "API keys must be non-empty printable ASCII, without spaces or commas"
                )
        if self.api_keys and self.no_auth:
            raise _config_error("--no-auth and API keys exclude each other")
        positive_ints = {
            "port": self.port,
            "rate_limit": self.rate_limit,
            "nonces_per_instance": self.nonces_per_instance,
            "nonce_expires_in": self.nonce_expires_in,
            "nonce_store_ttl": self.nonce_store_ttl,
            "max_instances": self.max_instances,
            "max_body": self.max_body,
            "max_connections": self.max_connections,
            "max_memory_nonces": self.max_memory_nonces,
        }
        for name, value in positive_ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _config_error(f"{name} must be a positive integer")
        if self.port > 65535:
            raise _config_error("port must be at most 65535")
        if self.nonces_per_instance > 1000:
            raise _config_error("nonces_per_instance must be at most 1000")
        if self.nonce_store_ttl < self.nonce_expires_in:
            raise _config_error("nonce_store_ttl must be at least nonce_expires_in")
        for name in (
            "rate_window",
            "connect_timeout",
            "read_timeout",
            "write_timeout",
            "info_timeout",
            "probe_interval",
            "refresh_interval",
            "gone_for",
        ):
            if not float(getattr(self, name)) > 0:
                raise _config_error(f"{name} must be positive")
        if not float(self.startup_wait) >= 0:
            raise _config_error("startup_wait must be >= 0")


def _config_error(message: str) -> LocalProtocolError:
    return LocalProtocolError(message, code=ErrorCode.INVALID_ARGUMENT)


def _normalise_url(url: str) -> str:
    if not isinstance(url, str):
        raise _config_error("instance URLs must be strings")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise _config_error(f"not an http(s) base URL: {url!r}")
    return url.strip().rstrip("/")


# --------------------------------------------------------------------------------------------
# instance registry


class _Info(msgspec.Struct):
    instance_id: str
    e2e_pubkey: str
    models: list[str]
    paths: list[str] = msgspec.field(default_factory=list)
    version: str = ""
    protocols: list[str] = msgspec.field(default_factory=lambda: ["v1"])
    e2e_v2: dict[str, Any] | None = None


def _parse_info(doc: bytes, now: float) -> tuple[_Info, str | None]:
    """The instance's document, and why its v2 offer was dropped (None if it was not).

    ``e2e_pubkey`` is required even from a v2-only instance: every client's discovery parser
    needs a valid v1 key in each row (the instance never opens anything with it).
    """
    try:
        info = msgspec.json.decode(doc, type=_Info)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise MalformedError(
            "/e2e/info is not a valid document", code=ErrorCode.MALFORMED_DISCOVERY
        ) from None
    if not _INSTANCE_ID_RE.match(info.instance_id):
        raise MalformedError("/e2e/info has an unusable instance_id")
    v1 = "v1" in info.protocols
    v2 = "v2" in info.protocols
    if not v1 and not v2:
        raise MalformedError("instance speaks neither protocol v1 nor v2")
    key = b64decode(info.e2e_pubkey, what="e2e_pubkey", code=ErrorCode.MALFORMED_DISCOVERY)
    if len(key) != MLKEM768_PK_LEN:
        raise MalformedError(f"e2e_pubkey must hold {MLKEM768_PK_LEN} bytes")
    if not info.models or any(not m or len(m) > 512 for m in info.models):
        raise MalformedError("/e2e/info must list at least one model name")
    dropped: str | None = None
    if info.e2e_v2 is not None or v2:
        try:
            offer = (
                None if info.e2e_v2 is None else parse_v2_offer({DISCOVERY_FIELD: info.e2e_v2}, now)
            )
        except MalformedError as exc:
            offer, dropped = None, exc.message
        if offer is None:
            dropped = dropped or "protocols lists v2 but there is no e2e_v2 offer"
            if not v1:
                raise MalformedError(f"v2-only instance without a valid offer: {dropped}")
            info.e2e_v2 = None
        elif not v2:
            info.e2e_v2, dropped = None, "e2e_v2 offered but protocols does not list v2"
    return info, dropped


@dataclass(slots=True, eq=False)
class _Instance:
    url: str
    instance_id: str | None = None
    pubkey: str | None = None
    v2: dict[str, Any] | None = None  # the e2e_v2 offer, copied into discovery rows
    models: frozenset[str] = frozenset()
    up: bool = False
    next_probe: float = 0.0  # monotonic
    reason: str = "not probed yet"


class _Registry:
    """What the relay knows about its instances. Only touched from the event loop."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.instances = [_Instance(u) for u in urls]
        self.by_id: dict[str, _Instance] = {}
        self.retired: deque[str] = deque(maxlen=4096)  # ids an instance had before a restart
        self.models: dict[str, int] = {}  # model -> created (first seen, unix seconds)
        self.chutes: dict[str, str] = {}  # chute_id -> model

    def update(self, inst: _Instance, info: _Info) -> None:
        owner = self.by_id.get(info.instance_id)
        if owner is not None and owner is not inst:
            raise MalformedError("another instance URL already uses this instance_id")
        if inst.instance_id is not None and inst.instance_id != info.instance_id:
            self.by_id.pop(inst.instance_id, None)
            self.retired.append(inst.instance_id)
        inst.instance_id = info.instance_id
        inst.pubkey = info.e2e_pubkey
        inst.v2 = info.e2e_v2
        inst.models = frozenset(info.models)
        self.by_id[info.instance_id] = inst
        now = int(time.time())
        for model in info.models:
            if model not in self.models:
                self.models[model] = now
                self.chutes[chute_id_for(model)] = model

    def members(self, model: str) -> list[_Instance]:
        return [i for i in self.instances if i.up and model in i.models]

    @property
    def available(self) -> int:
        return sum(1 for i in self.instances if i.up)


# --------------------------------------------------------------------------------------------
# metrics


_ENDPOINTS: Final = {
    "/v1/models": "models",
    "/e2e/invoke": "invoke",
    "/health": "health",
    "/metrics": "metrics",
}


def _endpoint(path: str) -> str:
    if path.startswith("/e2e/instances/"):
        return "instances"
    return _ENDPOINTS.get(path, "other")


class _Metrics:
    """Counts and latencies only: no ids, keys, paths or bodies in any label."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "pqe2ee_relay_"
        self.requests = Counter(
            p + "requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.invoke_seconds = Histogram(
            p + "invoke_seconds",
            "Time from an invoke request to the instance's response headers",
            ["stream"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.bytes_in = Counter(
            p + "request_bytes", "Sealed bytes forwarded to instances", registry=r
        )
        self.bytes_out = Counter(p + "response_bytes", "Bytes relayed back to clients", registry=r)
        self.nonces_issued = Counter(p + "nonces_issued", "Nonces handed out", registry=r)
        self.nonces_consumed = Counter(p + "nonces_consumed", "Nonces accepted", registry=r)
        self.nonces_rejected = Counter(
            p + "nonces_rejected", "Invalid, expired or reused nonces", registry=r
        )
        self.rate_limited = Counter(
            p + "discovery_rate_limited", "Discovery calls refused by the rate limit", registry=r
        )
        self.open_streams = Gauge(p + "open_responses", "Responses being relayed now", registry=r)
        self.instances_up = Gauge(p + "instances_available", "Instances available", registry=r)
        self.instances_total = Gauge(p + "instances_configured", "Instances configured", registry=r)


class _MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: _Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(_endpoint(scope.get("path", "")), str(status[0])).inc()


# --------------------------------------------------------------------------------------------
# responses


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        msgspec.json.encode(obj), status_code=status, headers=headers, media_type="application/json"
    )


def _detail(status: int, detail: Any, headers: Mapping[str, str] | None = None) -> Response:
    return _json({"detail": detail}, status, headers)


class _BodyTooLarge(Exception):
    pass


class _ForwardedResponse(Response):
    """Streams an instance's response to the client as it arrives (no buffering).

    A watcher task listens for the client's disconnect and cancels the copy at once, even while
    the instance is silent; the upstream response is then closed, so the instance sees the
    cancel. If the instance breaks off mid-body, the client's connection is closed without a
    clean end (the client's decryptor reports truncation), never made to look complete.
    """

    def __init__(
        self,
        upstream: httpx2.Response,
        status: int,
        headers: list[tuple[bytes, bytes]],
        metrics: _Metrics,
    ) -> None:
        self.status_code = status
        self.raw_headers = headers
        self.background = None
        self._upstream = upstream
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upstream = self._upstream
        metrics = self._metrics
        metrics.open_streams.inc()
        sent = 0
        try:
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch_disconnect)
                try:
                    await send(
                        {
                            "type": "http.response.start",
                            "status": self.status_code,
                            "headers": self.raw_headers,
                        }
                    )
                    async for chunk in upstream.aiter_raw():
                        if chunk:
                            sent += len(chunk)
                            await send(
                                {"type": "http.response.body", "body": chunk, "more_body": True}
                            )
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except httpx2.HTTPError as exc:
                    log.warning("instance response broke off mid-body (%s)", type(exc).__name__)
                except OSError:
                    pass  # the client went away while we wrote
                tg.cancel_scope.cancel()
        finally:
            metrics.open_streams.dec()
            metrics.bytes_out.inc(sent)
            with anyio.CancelScope(shield=True):
                await upstream.aclose()


async def _read_bounded(resp: httpx2.Response, limit: int) -> bytes:
    buf = bytearray()
    try:
        async for chunk in resp.aiter_raw():
            buf += chunk
            if len(buf) > limit:
                break
    except httpx2.HTTPError:
        pass
    finally:
        await resp.aclose()
    return bytes(buf[:limit])


# --------------------------------------------------------------------------------------------
# the app


class _Relay:
    def __init__(self, config: RelayConfig, store: NonceStore, owns_store: bool) -> None:
        self.config = config
        self.store = store
        self.owns_store = owns_store
        self.registry = _Registry(config.instances)
        self.metrics = _Metrics()
        self.metrics.instances_total.set(len(config.instances))
        # sha256(key) -> api_key_id; compared in constant time against every entry
        self.keys: list[tuple[bytes, str]] = [
            (hashlib.sha256(k.encode()).digest(), api_key_id(k)) for k in config.api_keys
        ]
        self.rng = random.Random(secrets.randbits(128))
        self.client: httpx2.AsyncClient | None = None

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

    # -- probing ---------------------------------------------------------------------------

    async def probe(self, inst: _Instance) -> None:
        assert self.client is not None
        cfg = self.config
        try:
            async with self.client.stream(
                "GET", inst.url + "/e2e/info", timeout=cfg.info_timeout
            ) as resp:
                if resp.status_code != 200:
                    raise MalformedError(f"/e2e/info answered {resp.status_code}")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_INFO_BYTES:
                        raise MalformedError("/e2e/info is too large")
            info, dropped = _parse_info(bytes(body), time.time())
            self.registry.update(inst, info)
            if dropped is not None:
                log.warning("instance %s: v2 offer ignored (%s)", inst.url, dropped)
        except (httpx2.HTTPError, MalformedError) as exc:
            reason = exc.message if isinstance(exc, MalformedError) else type(exc).__name__
            self.mark_down(inst, reason, cfg.probe_interval)
            return
        if not inst.up:
            log.info(
                "instance %s is available (id %s, models %s)",
                inst.url,
                inst.instance_id,
                ", ".join(sorted(inst.models)),
            )
        inst.up = True
        inst.reason = ""
        inst.next_probe = time.monotonic() + cfg.refresh_interval
        self.metrics.instances_up.set(self.registry.available)

    def mark_down(self, inst: _Instance, reason: str, retry_in: float) -> None:
        if inst.up or inst.reason != reason:
            log.warning("instance %s is unavailable: %s", inst.url, reason)
        inst.up = False
        inst.reason = reason
        inst.next_probe = time.monotonic() + retry_in
        self.metrics.instances_up.set(self.registry.available)

    async def probe_due(self) -> None:
        now = time.monotonic()
        due = [i for i in self.registry.instances if i.next_probe <= now]
        if due:
            async with anyio.create_task_group() as tg:
                for inst in due:
                    tg.start_soon(self.probe, inst)

    async def startup_probe(self) -> None:
        deadline = time.monotonic() + self.config.startup_wait
        while True:
            pending = [i for i in self.registry.instances if not i.up]
            async with anyio.create_task_group() as tg:
                for inst in pending:
                    tg.start_soon(self.probe, inst)
            if self.registry.available == len(self.registry.instances):
                break
            if time.monotonic() >= deadline:
                break
            await anyio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        down = [i for i in self.registry.instances if not i.up]
        for inst in down:
            inst.next_probe = time.monotonic() + self.config.probe_interval
        if down:
            log.warning(
                "%d of %d instances unavailable at start; retrying in the background",
                len(down),
                len(self.registry.instances),
            )

    async def background(self) -> None:
        while True:
            await anyio.sleep(min(self.config.probe_interval, 1.0))
            await self.probe_due()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        cfg = self.config
        try:
            await self.store.ping()
        except NonceStoreError as exc:
            raise RuntimeError(f"nonce store unavailable: {exc}") from None
        timeout = httpx2.Timeout(
            connect=cfg.connect_timeout,
            read=cfg.read_timeout,
            write=cfg.write_timeout,
            pool=cfg.connect_timeout,
        )
        limits = httpx2.Limits(
            max_connections=cfg.max_connections,
            max_keepalive_connections=min(cfg.max_connections, 256),
            # below uvicorn's 5 s keep-alive timeout: never reuse a connection the instance is
            # about to close (that race would turn into a 502 for a request never processed)
            keepalive_expiry=2.0,
        )
        async with httpx2.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
            self.client = client
            try:
                await self.startup_probe()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.background)
                    yield
                    tg.cancel_scope.cancel()
            finally:
                self.client = None
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
        return _json({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        total = len(self.registry.instances)
        up = self.registry.available
        return _json(
            {
                "status": "ok" if up else "degraded",
                "instances": {"available": up, "configured": total},
            }
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def instances(self, request: Request) -> Response:
        cfg = self.config
        key_id = self.authenticate(request)
        if key_id is None:
            return _unauthorized()
        try:
            allowed = await self.store.hit(
                self.rate_key(request, key_id), cfg.rate_window, cfg.rate_limit
            )
        except NonceStoreError:
            return _store_down()
        if not allowed:
            self.metrics.rate_limited.inc()
            return _detail(
                429,
                f"Rate limit exceeded: at most {cfg.rate_limit} instance discoveries "
                f"per {cfg.rate_window:g} s per API key",
                {"Retry-After": str(int(cfg.rate_window + 0.999))},
            )
        chute_id = request.path_params["chute_id"]
        model = self.registry.chutes.get(chute_id)
        if model is None:
            return _detail(404, "Chute not found")
        eligible = self.registry.members(model)
        if not eligible:
            return _detail(404, "No E2E-capable instances available")
        chosen = self.rng.sample(eligible, min(cfg.max_instances, len(eligible)))
        rows = []
        for inst in chosen:
            assert inst.instance_id is not None
            nonces = [secrets.token_urlsafe(24) for _ in range(cfg.nonces_per_instance)]
            try:
                await self.store.issue(
                    key_id, chute_id, inst.instance_id, nonces, cfg.nonce_store_ttl
                )
            except NonceStoreError:
                return _store_down()
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
        return _json(
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
            return _unauthorized()
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
            return _detail(422, missing)
        assert chute_id is not None and instance_id is not None and nonce is not None
        length_header = headers.get("content-length")
        length: int | None = None
        if length_header is not None:
            try:
                length = int(length_header)
            except ValueError:
                return _detail(400, "Invalid Content-Length")
            if length > cfg.max_body:
                return _too_large(cfg.max_body)

        # The nonce is consumed before any later check, as on the real relay.
        accepted = False
        if 0 < len(nonce) <= _MAX_NONCE_LEN:
            try:
                accepted = await self.store.consume(nonce, key_id, chute_id, instance_id)
            except NonceStoreError:
                return _store_down()
        if not accepted:
            self.metrics.nonces_rejected.inc()
            return _detail(403, "Invalid, expired, or already-used nonce")
        self.metrics.nonces_consumed.inc()

        model = self.registry.chutes.get(chute_id)
        if model is None:
            return _detail(404, "Chute not found")
        inst = self.registry.by_id.get(instance_id)
        if inst is None:
            if instance_id in self.registry.retired:
                return _gone()
            return _detail(404, "Instance not found")
        if model not in inst.models:
            return _detail(400, "Instance does not belong to the specified chute")
        if not inst.up:
            return _gone()
        if length == 0:
            return _detail(400, "Empty request body")
        return await self.forward(request, inst, length)

    async def forward(self, request: Request, inst: _Instance, length: int | None) -> Response:
        cfg = self.config
        client = self.client
        assert client is not None and inst.instance_id is not None
        headers = request.headers
        stream_flag = headers.get("x-e2e-stream", "false").strip().lower() == "true"
        out_headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/octet-stream"),
            (b"x-e2e-path", headers.get("x-e2e-path", "/").encode("latin-1")),
            (b"x-e2e-stream", b"true" if stream_flag else b"false"),
            (b"x-chute-id", headers["x-chute-id"].encode("latin-1")),
            (b"x-instance-id", inst.instance_id.encode("ascii")),
        ]
        if length is not None:
            out_headers.append((b"content-length", str(length).encode()))
        metrics = self.metrics
        limit = cfg.max_body
        uploaded = anyio.Event()

        async def body() -> AsyncIterator[bytes]:
            total = 0
            try:
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > limit:
                        raise _BodyTooLarge
                    if chunk:
                        yield chunk
            finally:
                uploaded.set()
                metrics.bytes_in.inc(min(total, limit))

        upstream_request = client.build_request(
            "POST", inst.url + "/e2e/invoke", headers=out_headers, content=body()
        )
        started = time.perf_counter()
        resp: httpx2.Response | None = None
        failure: Response | None = None
        # While the instance works on the request (a non-stream answer can take minutes), watch
        # for the client hanging up: cancelling the send closes the instance connection, so
        # the instance cancels the engine's generation too.
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                await uploaded.wait()
                while True:
                    if (await request.receive())["type"] == "http.disconnect":
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch_disconnect)
            try:
                resp = await client.send(upstream_request, stream=True)
            except _BodyTooLarge:
                failure = _too_large(limit)
            except ClientDisconnect:
                failure = _detail(400, "Client disconnected")
            except (httpx2.ConnectError, httpx2.ConnectTimeout):
                self.mark_down(inst, "connection refused or timed out", cfg.gone_for)
                failure = _gone()
            except httpx2.TimeoutException:
                failure = _detail(504, "Instance timed out")
            except httpx2.HTTPError as exc:
                log.warning("instance %s: request failed (%s)", inst.url, type(exc).__name__)
                failure = _detail(502, "Instance connection failed")
            tg.cancel_scope.cancel()
        if resp is None:
            return failure if failure is not None else Response(status_code=499)
        metrics.invoke_seconds.labels("true" if stream_flag else "false").observe(
            time.perf_counter() - started
        )
        return await self.answer(resp)

    async def answer(self, resp: httpx2.Response) -> Response:
        status = resp.status_code
        content_type = resp.headers.get("content-type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        if status == 200 or media == "application/octet-stream":
            passed = [
                (name.encode("latin-1"), resp.headers[name].encode("latin-1"))
                for name in ("content-type", "content-length", "content-encoding")
                if name in resp.headers
            ]
            passed.append((b"cache-control", b"no-store"))
            return _ForwardedResponse(resp, status, passed, self.metrics)
        text = await _read_bounded(resp, _MAX_ERROR_BODY)
        if status == 403:
            return _detail(403, "Instance returned status 403")
        if status == 429:
            return _detail(429, "Instance is at maximum capacity, try again later")
        if status == 426:
            return _detail(502, "Instance requires key exchange, try a different instance")
        if status == 400 and media == "application/json":
            return _detail(400, text.decode("utf-8", "replace"))
        if status in (409, 413) and media == "application/json" and _V2_HINT in text:
            return _detail(status, text.decode("utf-8", "replace"))
        return _detail(status, f"Instance returned status {status}")


def _unauthorized() -> Response:
    return _detail(401, "Invalid or missing API key", {"WWW-Authenticate": "Bearer"})


def _gone() -> Response:
    return _detail(410, "Instance is no longer active")


def _too_large(limit: int) -> Response:
    return _detail(413, f"Request body too large (limit {limit} bytes)")


def _store_down() -> Response:
    return _detail(503, "Nonce store unavailable, try again later")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _detail(exc.status_code, exc.detail, exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    return _detail(500, "Internal error during E2E invocation")


def create_app(config: RelayConfig, *, nonce_store: NonceStore | None = None) -> Starlette:
    """The relay as a Starlette app. Instances are probed in its lifespan (run it under uvicorn).

    ``nonce_store`` overrides the store (default: Redis when ``config.redis_url`` is set, else
    in memory); a store passed in is not closed by the app. Raises
    :class:`~pqe2ee.errors.LocalProtocolError` when no API key is configured and ``no_auth``
    is not set.
    """
    if not config.api_keys and not config.no_auth:
        raise _config_error(
            f"no API keys configured: pass --api-key KEY or set {API_KEYS_ENV}, "
            "or pass --no-auth explicitly to run an open relay"
        )
    owns = nonce_store is None
    store: NonceStore
    if nonce_store is not None:
        store = nonce_store
    elif config.redis_url:
        store = RedisNonceStore(config.redis_url)
    else:
        store = MemoryNonceStore(max_entries=config.max_memory_nonces)
    relay = _Relay(config, store, owns)

    app = Starlette(
        routes=[
            Route("/v1/models", relay.models, methods=["GET"]),
            Route("/e2e/instances/{chute_id}", relay.instances, methods=["GET"]),
            Route("/e2e/invoke", relay.invoke, methods=["POST"]),
            Route("/health", relay.health, methods=["GET"]),
            Route("/metrics", relay.metrics_endpoint, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        lifespan=relay.lifespan,
    )
    app.add_middleware(_MetricsMiddleware, metrics=relay.metrics)
    app.state.relay = relay
    return app


def serve(config: RelayConfig, *, log_level: str = "info") -> None:
    """Run the relay with uvicorn on ``config.host:config.port`` until interrupted."""
    import uvicorn

    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level=log_level,
        lifespan="on",
        proxy_headers=False,
        server_header=False,
    )
