"""What every HTTP-library transport shares, whatever the library and sync or async.

The engine's :class:`Settings` (the validated :class:`~pqe2ee.transports.options.ClientOptions`
with the crypto backends resolved), the :class:`EngineFacade` every adapter exposes, URL and
header helpers. No I/O here: the transports in ``_async``/``_sync`` move the bytes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.backends.base import AEAD, KEM
from pqe2ee.backends.xwing import XWing, get_xwing
from pqe2ee.errors import BackendError, ErrorCode, LocalProtocolError, RelayError
from pqe2ee.protocol.client import ClientLimits, ClientState
from pqe2ee.protocol.v1.envelope import BLOB_OVERHEAD, DEFAULT_MAX_PLAINTEXT
from pqe2ee.protocol.v2.negotiation import E2EPolicy, Negotiator
from pqe2ee.transports._keypool import KeyPool, SharedKeyPools, XWingKeyPool
from pqe2ee.transports.options import ClientOptions, OnUsage

__all__ = [
    "HOP_HEADERS",
    "KEEPALIVE_EXPIRY",
    "STREAM_HEADERS",
    "EngineFacade",
    "OnUsage",
    "RawHeaders",
    "RequestHeaders",
    "ResponseHead",
    "RetriesExhausted",
    "Settings",
    "bearer_token",
    "end_to_end_headers",
    "header_value",
    "join_url",
    "make_settings",
]

#: Largest relay answer read whole: a sealed reply (response plaintext limit + blob overhead +
#: gzip slack) - anything larger is refused with ``oversize``.
MAX_BLOB: Final = DEFAULT_MAX_PLAINTEXT + BLOB_OVERHEAD + 1024 * 1024
#: Largest plaintext relay error body read (relay texts are short).
MAX_ERROR_BODY: Final = 1024 * 1024
#: Largest discovery document or model listing read.
MAX_DOC: Final = 16 * 1024 * 1024
#: Seconds an idle connection to the relay is kept for reuse by the transports' own pools:
#: below uvicorn's (and many servers') 5 s keep-alive. With httpx's default of 5 s both ends
#: give up on an idle connection at the same moment, and under load a few requests are sent
#: on a connection the relay is closing (``ReadError`` before any answer;
#: benchmarks/bench_redis_streams.py: 6 of 1,500 streams).
KEEPALIVE_EXPIRY: Final = 2.0

RawHeaders = Sequence[tuple[bytes, bytes]]
#: A request's headers as the engine hands them to a port.
RequestHeaders = list[tuple[str, str]]
#: The headers of a decrypted event stream handed to the caller.
STREAM_HEADERS: Final = (
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
)


class ResponseHead:
    """The status and headers of a port response (the engine's ``AsyncPortResponse``), read
    before its body; each adapter's port response adds ``raw_bytes`` and ``aclose``."""

    __slots__ = ("headers", "status")

    def __init__(self, status: int, headers: RawHeaders) -> None:
        self.status = status
        self.headers = headers


class _EngineParts(Protocol):
    settings: Settings
    state: ClientState
    negotiator: Negotiator
    keys: KeyPool

    def close_keys(self) -> None: ...


_E = TypeVar("_E", bound=_EngineParts)


class EngineFacade:
    """The engine's shared parts, exposed the same way by every adapter (httpx2, httpx,
    aiohttp, anyio; sync and async). Adapters start their engine with :meth:`_start`."""

    _engine: _EngineParts
    _closed: bool
    #: Stops the key fillers and wipes pooled keys (a shared pool: gives up this share).
    _close_keys: Callable[[], object]

    def _start(self, make: Callable[..., _E], options: ClientOptions) -> _E:
        """The engine for ``options`` (backends resolved; ``make`` is the adapter's engine
        class). Its key pools close with the adapter (:meth:`_close_keys`), or when it is
        collected unclosed."""
        engine = make(options.settings(), clock=options.clock, negotiator=options.negotiator)
        self._close_keys = weakref.finalize(self, engine.close_keys)  # runs at most once
        self._closed = False
        return engine

    @staticmethod
    def _closed_error(what: str) -> LocalProtocolError:
        """What a request to a closed adapter raises (checked inline: ``if self._closed``)."""
        return LocalProtocolError(f"the E2EE {what} is closed", code=ErrorCode.INVALID_ARGUMENT)

    @property
    def settings(self) -> Settings:
        return self._engine.settings

    @property
    def options(self) -> ClientOptions:
        """The options this client was made with."""
        return self._engine.settings.options

    @property
    def state(self) -> ClientState:
        """Model map, nonce pools and discovery limiter (shared by every request)."""
        return self._engine.state

    @property
    def negotiator(self) -> Negotiator:
        """The version policy and the per-chute v2 pins (``negotiator.pins()``)."""
        return self._engine.negotiator

    @property
    def keys(self) -> KeyPool:
        """The pool of one-use response keys."""
        return self._engine.keys

    @keys.setter
    def keys(self, pool: KeyPool) -> None:
        self._engine.keys = pool

    @property
    def closed(self) -> bool:
        return self._closed


#: Headers that describe one hop's framing; never copied onto a rebuilt answer.
HOP_HEADERS: Final = frozenset(
    {b"content-length", b"content-encoding", b"transfer-encoding", b"connection", b"keep-alive"}
)


@dataclass(frozen=True, slots=True)
class Settings:
    """What the engine reads: the client's options, narrowed and with its backends resolved
    (build it with :meth:`from_options`; see :class:`ClientOptions` for each field)."""

    api_key: str | None
    api_base: str
    models_base: str
    e2e_paths: frozenset[str]
    strict: bool
    max_attempts: int
    timeout: float
    on_usage: OnUsage | None
    limits: ClientLimits
    kem: KEM
    aead: AEAD
    key_pool_size: int
    #: The version policy (spec/v2.md §8.2): ``min_version``, ``prefer_v2``, pins.
    policy: E2EPolicy = field(default_factory=E2EPolicy)
    #: The X-Wing backend for v2 (``None`` with ``prefer_v2=False``: v1 only).
    xwing: XWing | None = None
    #: The options these settings were made from.
    options: ClientOptions = field(default_factory=ClientOptions, compare=False)

    @classmethod
    def from_options(cls, options: ClientOptions) -> Settings:
        policy = options.policy
        kem = get_kem(options.backend)
        xwing = _xwing(options.backend) if policy.prefer_v2 else None
        _check_shared_pools(options.key_pools, kem, xwing)
        return cls(
            api_key=options.api_key,
            api_base=options.api_base,
            models_base=options.models_base,
            e2e_paths=frozenset(options.e2e_paths),
            strict=options.strict,
            max_attempts=options.max_attempts,
            timeout=options.timeout,
            on_usage=options.on_usage,
            limits=options.limits or ClientLimits(),
            kem=kem,
            aead=_aead(options.backend),
            key_pool_size=options.key_pool_size,
            policy=policy,
            xwing=xwing,
            options=options,
        )

    def new_key_pool(self) -> KeyPool:
        """The engine's v1 key pool: its own, or a share of the options' shared pools."""
        shared = self.options.key_pools
        if shared is not None:
            return shared.v1.share()
        return KeyPool(self.kem, self.key_pool_size)

    def new_xwing_key_pool(self) -> XWingKeyPool | None:
        """The engine's v2 key pool (``None`` for v1 only), own or shared like the v1 pool."""
        if self.xwing is None:
            return None
        shared = self.options.key_pools
        if shared is not None and shared.v2 is not None:
            return shared.v2.share()
        return XWingKeyPool(self.xwing, self.key_pool_size)

    @property
    def timeout_extension(self) -> dict[str, float]:
        """``request.extensions["timeout"]`` for the transport's own calls (discovery)."""
        t = self.timeout
        return {"connect": t, "read": t, "write": t, "pool": t}


def _check_shared_pools(pools: SharedKeyPools | None, kem: KEM, xwing: XWing | None) -> None:
    """Shared pools must make keys with the backends the transport resolved."""
    if pools is None:
        return
    v2 = pools.v2
    if pools.v1.backend != kem.name or (
        v2 is not None and xwing is not None and v2.backend != xwing.name
    ):
        raise LocalProtocolError(
            "key_pools were made with other backends than this transport's",
            code=ErrorCode.INVALID_ARGUMENT,
        )


def make_settings(**kwargs: Any) -> Settings:
    """``ClientOptions(**kwargs).settings()`` (kept for callers that build an engine directly)."""
    return ClientOptions(**kwargs).settings()


def _xwing(backend: str) -> XWing:
    """The X-Wing backend matching ``backend`` when it has one, else the first that works."""
    try:
        return get_xwing(backend if backend in ("pyca", "pycryptodome") else "auto")
    except BackendError as exc:
        raise BackendError(
            f"profile v2 needs X-Wing, which is not available here ({exc.message}); pass "
            "prefer_v2=False to speak v1 only",
            code=exc.code,
        ) from None


def _aead(backend: str) -> AEAD:
    try:
        return get_aead(backend)
    except BackendError:  # a KEM-only backend (liboqs, pqcrypto): pair it with the default AEAD
        return get_aead("auto")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def header_value(headers: RawHeaders, name: bytes) -> str | None:
    """The first value of header ``name`` (give it in lower case), decoded as latin-1."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def end_to_end_headers(raw: RawHeaders) -> list[tuple[bytes, bytes]]:
    """A relay answer's headers without the ones that described its hop (:data:`HOP_HEADERS`):
    what an adapter copies onto the answer it hands over."""
    return [(key, value) for key, value in raw if key.lower() not in HOP_HEADERS]


def join_url(base: str, path: str, query: str = "") -> str:
    """``base`` (no trailing slash, may carry a path prefix) + ``path`` (+ ``?query``)."""
    url = base + (path if path.startswith("/") else "/" + path)
    return f"{url}?{query}" if query else url


class RetriesExhausted(RelayError):
    """Every attempt got a retryable relay answer (code ``retries_exhausted``).

    ``last_error`` is the last relay error (also ``__cause__``); ``attempts`` how many were made.
    """

    default_code = ErrorCode.RETRIES_EXHAUSTED

    def __init__(self, last_error: RelayError, attempts: int) -> None:
        super().__init__(
            f"gave up after {attempts} attempt(s); last: {last_error.code.value}",
            status=last_error.status,
        )
        self.last_error = last_error
        self.attempts = attempts
