"""What every HTTP-library transport shares, whatever the library and sync or async.

Settings and their validation, the crypto context (backends and the key pool), URL and header
helpers. No I/O here: the transports in ``_async``/``_sync`` move the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar, cast
from urllib.parse import urlsplit

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.backends.base import AEAD, KEM
from pqe2ee.backends.xwing import XWing, get_xwing
from pqe2ee.errors import (
    BackendError,
    ErrorCode,
    LocalProtocolError,
    PQE2EEError,
    RelayError,
    RemoteError,
)
from pqe2ee.protocol.client import DEFAULT_E2E_PATHS, ClientLimits, ClientState
from pqe2ee.protocol.envelope import BLOB_OVERHEAD, DEFAULT_MAX_PLAINTEXT
from pqe2ee.protocol.v2.negotiation import E2EPolicy, Negotiator
from pqe2ee.transports._keypool import KeyPool, XWingKeyPool

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_E2E_PATHS",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MODELS_BASE",
    "DEFAULT_TIMEOUT",
    "HOP_HEADERS",
    "EngineFacade",
    "OnUsage",
    "RawHeaders",
    "RetriesExhausted",
    "Settings",
    "bearer_token",
    "header_value",
    "join_url",
    "make_settings",
    "remote_error",
    "retyped",
]

DEFAULT_API_BASE: Final = "https://api.chutes.ai"
DEFAULT_MODELS_BASE: Final = "https://llm.chutes.ai"
DEFAULT_TIMEOUT: Final = 30.0
DEFAULT_MAX_ATTEMPTS: Final = 4

#: Largest relay answer read whole: a sealed reply (response plaintext limit + blob overhead +
#: gzip slack) - anything larger is refused with ``oversize``.
MAX_BLOB: Final = DEFAULT_MAX_PLAINTEXT + BLOB_OVERHEAD + 1024 * 1024
#: Largest plaintext relay error body read (relay texts are short).
MAX_ERROR_BODY: Final = 1024 * 1024
#: Largest discovery document or model listing read.
MAX_DOC: Final = 16 * 1024 * 1024

OnUsage = Callable[[Any], object]
RawHeaders = Sequence[tuple[bytes, bytes]]


class _EngineParts(Protocol):
    settings: Settings
    state: ClientState
    negotiator: Negotiator
    keys: KeyPool


class EngineFacade:
    """The engine's shared parts, exposed the same way by every adapter (httpx2, httpx,
    aiohttp, anyio; sync and async). Adapters set ``_engine`` and ``_closed``."""

    _engine: _EngineParts
    _closed: bool

    @property
    def settings(self) -> Settings:
        return self._engine.settings

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
    """Validated transport settings (see the transport's docstring for each field)."""

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

    def new_key_pool(self) -> KeyPool:
        return KeyPool(self.kem, self.key_pool_size)

    def new_xwing_key_pool(self) -> XWingKeyPool | None:
        return None if self.xwing is None else XWingKeyPool(self.xwing, self.key_pool_size)

    @property
    def timeout_extension(self) -> dict[str, float]:
        """``request.extensions["timeout"]`` for the transport's own calls (discovery)."""
        t = self.timeout
        return {"connect": t, "read": t, "write": t, "pool": t}


def _base_url(value: str, name: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise LocalProtocolError(
            f"{name} must be an http(s) URL without query or fragment",
            code=ErrorCode.INVALID_ARGUMENT,
        )
    return value.rstrip("/")


def make_settings(
    *,
    api_key: str | None,
    api_base: str,
    models_base: str,
    backend: str,
    e2e_paths: Collection[str],
    strict: bool,
    max_attempts: int,
    timeout: float,
    on_usage: OnUsage | None,
    limits: ClientLimits | None,
    key_pool_size: int,
    min_version: int = 1,
    prefer_v2: bool = True,
    negotiator: Negotiator | None = None,
) -> Settings:
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise LocalProtocolError(
            "api_key must be a non-empty string or None", code=ErrorCode.INVALID_ARGUMENT
        )
    if isinstance(e2e_paths, str):
        raise LocalProtocolError(
            "e2e_paths must be a collection of paths, not one string",
            code=ErrorCode.INVALID_ARGUMENT,
        )
    paths = frozenset(e2e_paths)
    if not all(isinstance(p, str) and p.startswith("/") for p in paths):
        raise LocalProtocolError(
            "every e2e path must be a string starting with '/'", code=ErrorCode.INVALID_ARGUMENT
        )
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise LocalProtocolError("max_attempts must be >= 1", code=ErrorCode.INVALID_ARGUMENT)
    if not timeout > 0:
        raise LocalProtocolError("timeout must be > 0", code=ErrorCode.INVALID_ARGUMENT)
    if key_pool_size < 0:
        raise LocalProtocolError("key_pool_size must be >= 0", code=ErrorCode.INVALID_ARGUMENT)
    policy = _policy(min_version, prefer_v2, negotiator)
    return Settings(
        api_key=api_key,
        api_base=_base_url(api_base, "api_base"),
        models_base=_base_url(models_base, "models_base"),
        e2e_paths=paths,
        strict=strict,
        max_attempts=max_attempts,
        timeout=float(timeout),
        on_usage=on_usage,
        limits=limits or ClientLimits(),
        kem=get_kem(backend),
        aead=_aead(backend),
        key_pool_size=key_pool_size,
        policy=policy,
        xwing=_xwing(backend) if policy.prefer_v2 else None,
    )


def _policy(min_version: int, prefer_v2: bool, negotiator: Negotiator | None) -> E2EPolicy:
    """The version policy. A shared ``negotiator`` brings its own; ``min_version`` and
    ``prefer_v2`` may then only repeat it or keep their defaults (never weaken a strict one
    silently: ``min_version=2`` with a non-strict negotiator is refused)."""
    if not isinstance(min_version, int) or isinstance(min_version, bool):
        raise LocalProtocolError("min_version must be 1 or 2", code=ErrorCode.INVALID_ARGUMENT)
    if not isinstance(prefer_v2, bool):
        raise LocalProtocolError("prefer_v2 must be a bool", code=ErrorCode.INVALID_ARGUMENT)
    if negotiator is None:
        return E2EPolicy(min_version=min_version, prefer_v2=prefer_v2)
    if not isinstance(negotiator, Negotiator):
        raise LocalProtocolError(
            "negotiator must be a pqe2ee.protocol.v2.Negotiator", code=ErrorCode.INVALID_ARGUMENT
        )
    policy = negotiator.policy
    if (min_version != 1 and min_version != policy.min_version) or (
        not prefer_v2 and policy.prefer_v2
    ):
        raise LocalProtocolError(
            "min_version / prefer_v2 contradict the negotiator's policy: set them on its E2EPolicy",
            code=ErrorCode.INVALID_ARGUMENT,
        )
    return policy


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


def join_url(base: str, path: str, query: bytes = b"") -> str:
    """``base`` (no trailing slash, may carry a path prefix) + ``path`` (+ ``?query``)."""
    url = base + (path if path.startswith("/") else "/" + path)
    if query:
        url += "?" + query.decode("ascii")
    return url


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


def remote_error(error: Any) -> RemoteError:
    """A :class:`RemoteError` for an ``e2e_error`` / ``error`` event of an encrypted stream.

    The message names only the error's ``type``/``code`` (short strings); the whole object is
    kept in ``detail``. ``status`` is taken from an integer ``status``/``code`` field if any.
    """
    label = ""
    status: int | None = None
    if isinstance(error, dict):
        for field in ("type", "code"):
            value = error.get(field)
            if isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable():
                label = f" ({value})"
                break
        for field in ("status", "status_code", "code"):
            value = error.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
                status = value
                break
    return RemoteError(
        f"the far side reported an error mid-stream{label}",
        code=ErrorCode.REMOTE_ERROR,
        status=status,
        detail=error,
    )


_E = TypeVar("_E", bound=PQE2EEError)


def retyped(error: PQE2EEError, base: type[_E], cache: dict[type[PQE2EEError], type[_E]]) -> _E:
    """``error`` as an instance of a class that subclasses both ``base`` and ``type(error)``.

    ``base`` is a library's stream error (a :class:`PQE2EEError` that is also, say, an
    ``httpx2.TransportError`` or an ``aiohttp.ClientPayloadError``); the result keeps the
    original's code, message and attributes, and ``error`` holds the original. The generated
    classes are made once per original class and kept in ``cache``.
    """
    if isinstance(error, base):
        return error
    cls = cache.get(type(error))
    if cls is None:
        if type(error) is PQE2EEError:
            cls = base
        else:
            made: type[_E] = type(
                f"{base.__name__.removesuffix('Error')}{type(error).__name__}",
                (base, type(error)),
                {"__module__": base.__module__, "__doc__": base.__doc__},
            )
            cls = made
        cache[type(error)] = cls
    new: Any = cls.__new__
    exc = cast(_E, new(cls))
    exc.__dict__.update(error.__dict__)
    exc.args = error.args
    exc.__dict__["error"] = error
    return exc
