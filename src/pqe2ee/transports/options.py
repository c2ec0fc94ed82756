"""What a client of any transport is configured with: one frozen, validated value.

Like ``httpx.Limits`` or ``httpx.Timeout``, :class:`ClientOptions` is a small immutable object
with its defaults, validation and documentation in one place. Every adapter (httpx2 and httpx,
sync and async; aiohttp; anyio) takes it whole, or the same names as keyword arguments::

    opts = ClientOptions(api_key=KEY, strict=True, min_version=2)
    E2EETransport(options=opts)                  # the value, shared between transports
    E2EETransport(api_key=KEY, strict=True)      # the keywords, as before
    E2EETransport(options=opts, timeout=10.0)    # a keyword replaces that field of the value

The keywords are typed by :class:`ClientOptionsArgs` (``**kwargs: Unpack[ClientOptionsArgs]``),
so a misspelt name or a wrong type is a type-checker error, and at run time a ``TypeError``.
Options only an adapter has (httpx's ``inner``, aiohttp's ``session``, anyio's ``ssl_context``)
stay keyword arguments of that adapter.

Backends are resolved when a transport is built (:meth:`ClientOptions.settings`), not here, so
a value can be made, compared and shared without touching a crypto library.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypedDict, Unpack
from urllib.parse import urlsplit

from pqe2ee.attest.gate import AttestMode, AttestOptions
from pqe2ee.errors import ErrorCode, LocalProtocolError
from pqe2ee.protocol.client import DEFAULT_E2E_PATHS, ClientLimits
from pqe2ee.protocol.v2.negotiation import E2EPolicy, Negotiator
from pqe2ee.transports._keypool import DEFAULT_KEY_POOL_SIZE, SharedKeyPools

if TYPE_CHECKING:
    from pqe2ee.transports._common import Settings

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_DEADLINE",
    "DEFAULT_E2E_PATHS",
    "DEFAULT_KEY_POOL_SIZE",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MODELS_BASE",
    "DEFAULT_TIMEOUT",
    "ClientLimits",
    "ClientOptions",
    "ClientOptionsArgs",
    "OnUsage",
    "SharedKeyPools",
]

DEFAULT_API_BASE: Final = "https://api.chutes.ai"
DEFAULT_MODELS_BASE: Final = "https://llm.chutes.ai"
DEFAULT_TIMEOUT: Final = 30.0
#: The total time one E2EE request may take, its streamed answer included (seconds).
DEFAULT_DEADLINE: Final = 600.0
DEFAULT_MAX_ATTEMPTS: Final = 4

#: Receives the plaintext (unauthenticated) usage object of a stream.
OnUsage = Callable[[Any], object]


class ClientOptionsArgs(TypedDict, total=False):
    """The fields of :class:`ClientOptions` as keyword arguments (all optional)."""

    api_key: str | None
    api_base: str
    models_base: str
    backend: str
    e2e_paths: Collection[str]
    strict: bool
    max_attempts: int
    timeout: float
    deadline: float
    on_usage: OnUsage | None
    limits: ClientLimits | None
    key_pool_size: int
    key_pools: SharedKeyPools | None
    clock: Callable[[], float]
    min_version: int
    prefer_v2: bool
    negotiator: Negotiator | None
    attest: AttestOptions | str


def _invalid(message: str) -> LocalProtocolError:
    return LocalProtocolError(message, code=ErrorCode.INVALID_ARGUMENT)


def _base_url(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise _invalid(f"{name} must be an http(s) URL without query or fragment")
    return value.rstrip("/")


def _paths(value: Collection[str]) -> frozenset[str]:
    if isinstance(value, str):
        raise _invalid("e2e_paths must be a collection of paths, not one string")
    paths = frozenset(value)
    if not all(isinstance(p, str) and p.startswith("/") for p in paths):
        raise _invalid("every e2e path must be a string starting with '/'")
    return paths


def _policy(min_version: int, prefer_v2: bool, negotiator: Negotiator | None) -> E2EPolicy:
    """The version policy. A shared ``negotiator`` brings its own; ``min_version`` and
    ``prefer_v2`` may then only repeat it or keep their defaults (never weaken a strict one
    silently: ``min_version=2`` with a non-strict negotiator is refused)."""
    if not isinstance(min_version, int) or isinstance(min_version, bool):
        raise _invalid("min_version must be 1 or 2")
    if not isinstance(prefer_v2, bool):
        raise _invalid("prefer_v2 must be a bool")
    if negotiator is None:
        return E2EPolicy(min_version=min_version, prefer_v2=prefer_v2)
    if not isinstance(negotiator, Negotiator):
        raise _invalid("negotiator must be a pqe2ee.protocol.v2.Negotiator")
    policy = negotiator.policy
    if (min_version != 1 and min_version != policy.min_version) or (
        not prefer_v2 and policy.prefer_v2
    ):
        raise _invalid(
            "min_version / prefer_v2 contradict the negotiator's policy: set them on its E2EPolicy"
        )
    return policy


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    """How an E2EE client behaves, whatever HTTP library carries it (validated when made).

    * ``api_key`` authenticates discovery and invocation; ``None`` takes each request's own
      ``Authorization: Bearer`` token (where the adapter sees one).
    * ``api_base`` is the relay (discovery and ``/e2e/invoke``); ``models_base`` serves the
      model listing and every plaintext request. http(s) URLs, a trailing ``/`` is dropped.
    * ``backend`` names the ML-KEM backend (``"auto"``: the first that works here).
    * ``e2e_paths``: the ``POST`` paths whose JSON body with a ``model`` is encrypted.
    * ``strict``: refuse anything that would leave in plaintext (``plaintext_refused``).
    * ``max_attempts``: tries in all for retryable relay answers (>= 1).
    * ``timeout`` (seconds, > 0) bounds the transport's own calls (model listing, discovery)
      and the wait for a discovery slot.
    * ``deadline`` (seconds, > 0, finite; default 600) bounds one encrypted request in total:
      model lookup, discovery, retries, the invoke and the whole answer, a streamed body
      included. Past it the request fails with
      :class:`~pqe2ee.errors.DeadlineExceeded` (``deadline_exceeded``; mid-stream, as the
      library's stream error), whatever pace the relay keeps. Async transports cancel the wait
      at the deadline; the blocking ones check it around every network step, so a single read
      may overrun it by at most the library's read timeout.
    * ``on_usage`` receives the plaintext usage events of streams (display only).
    * ``limits``: the discovery rate limits (default :class:`ClientLimits`).
    * ``key_pool_size``: one-use response keys kept ready (>= 0).
    * ``key_pools``: pools shared with other transports instead of the transport's own
      (:class:`SharedKeyPools`, e.g. from :meth:`make_key_pools`; their size applies).
    * ``clock``: monotonic seconds, for deadlines and cool-downs (a test hook).
    * ``min_version``, ``prefer_v2``, ``negotiator``: the version policy (spec/v2.md §8); a
      ``negotiator`` shares its pins and policy between transports, and is the one the
      transport's engine uses.
    * ``attest``: TEE attestation of instance keys before sealing (:mod:`pqe2ee.attest`):
      ``"auto"`` (default: chutes that serve evidence are verified, fail closed and stay
      pinned; others get one warning), ``"require"``, ``"off"``, or an
      :class:`~pqe2ee.attest.gate.AttestOptions` (policy, collateral, PCS URL, clock).
    """

    api_key: str | None = None
    api_base: str = DEFAULT_API_BASE
    models_base: str = DEFAULT_MODELS_BASE
    backend: str = "auto"
    e2e_paths: Collection[str] = DEFAULT_E2E_PATHS
    strict: bool = False
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout: float = DEFAULT_TIMEOUT
    deadline: float = DEFAULT_DEADLINE
    on_usage: OnUsage | None = None
    limits: ClientLimits | None = None
    key_pool_size: int = DEFAULT_KEY_POOL_SIZE
    key_pools: SharedKeyPools | None = field(default=None, compare=False)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
    min_version: int = 1
    prefer_v2: bool = True
    negotiator: Negotiator | None = None
    attest: AttestOptions | str = "auto"
    #: The policy ``min_version``/``prefer_v2``/``negotiator`` add up to (derived).
    policy: E2EPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        attest: object = self.attest
        if isinstance(attest, str):
            if attest not in tuple(AttestMode):
                raise _invalid("attest must be 'auto', 'require', 'off' or an AttestOptions")
            object.__setattr__(self, "attest", AttestOptions(mode=AttestMode(attest)))
        elif not isinstance(attest, AttestOptions):
            raise _invalid("attest must be 'auto', 'require', 'off' or an AttestOptions")
        api_key = self.api_key
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise _invalid("api_key must be a non-empty string or None")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise _invalid("max_attempts must be >= 1")
        if not self.timeout > 0:
            raise _invalid("timeout must be > 0")
        if not isinstance(self.deadline, int | float) or not 0 < self.deadline < math.inf:
            raise _invalid("deadline must be a finite number of seconds > 0")
        if not isinstance(self.key_pool_size, int) or self.key_pool_size < 0:
            raise _invalid("key_pool_size must be >= 0")
        normal = {
            "api_base": _base_url(self.api_base, "api_base"),
            "models_base": _base_url(self.models_base, "models_base"),
            "e2e_paths": _paths(self.e2e_paths),
            "timeout": float(self.timeout),
            "deadline": float(self.deadline),
            "limits": self.limits or ClientLimits(),
            "policy": _policy(self.min_version, self.prefer_v2, self.negotiator),
        }
        for name, value in normal.items():
            object.__setattr__(self, name, value)

    @classmethod
    def of(
        cls, options: ClientOptions | None, **changes: Unpack[ClientOptionsArgs]
    ) -> ClientOptions:
        """``options`` (default: all defaults) with the fields named in ``changes`` replaced:
        how an adapter combines its ``options=`` argument with its keyword arguments."""
        if options is None:
            return cls(**changes)
        return dataclasses.replace(options, **changes) if changes else options

    def make_key_pools(self) -> SharedKeyPools:
        """New key pools for transports that share them, with the backends and size these
        options give (pass them on as ``key_pools=``; the caller owns and closes them)."""
        s = self.settings()
        return SharedKeyPools.make(s.kem, s.xwing, s.key_pool_size)

    @property
    def attestation(self) -> AttestOptions:
        """``attest`` as an :class:`AttestOptions` (a mode string is made into one)."""
        assert isinstance(self.attest, AttestOptions)  # __post_init__ made it one
        return self.attest

    def settings(self) -> Settings:
        """The engine's settings: these options with the crypto backends resolved (raises
        :class:`~pqe2ee.errors.BackendError` when the named backend is not available)."""
        from pqe2ee.transports._common import Settings

        return Settings.from_options(self)


#: Chutes' hosts: a request to one of them keeps the default pair (models on llm.chutes.ai,
#: the relay on api.chutes.ai).
CHUTES_HOSTS: Final = frozenset({"llm.chutes.ai", "api.chutes.ai"})


def uses_default_bases(options: ClientOptions) -> bool:
    """Whether ``options`` name no relay of their own (both bases are Chutes' defaults)."""
    return options.api_base == DEFAULT_API_BASE and options.models_base == DEFAULT_MODELS_BASE


def bind_origin(
    options: ClientOptions, origin: str, *, unbound: bool, bound: str | None
) -> tuple[ClientOptions, str | None]:
    """``(options, bound origin)`` for a request to ``origin`` (``scheme://host[:port]``).

    ``unbound`` (the first request of a transport made without bases): a non-Chutes origin
    becomes both ``api_base`` and ``models_base`` - one base URL, the SDK's own - and is
    remembered; a Chutes origin keeps the default pair. A transport bound that way refuses a
    request for another origin (``invalid_argument``): a call meant for one relay never goes
    to another. Bases given explicitly always stand (the request's host is not looked at).
    """
    if unbound:
        if (urlsplit(origin).hostname or "") in CHUTES_HOSTS:
            return options, None
        return ClientOptions.of(options, api_base=origin, models_base=origin), origin
    if bound is not None and origin != bound:
        raise _invalid(
            f"this transport sends to {bound} (the first request's base URL); the request is "
            f"for {origin}: use one transport per relay, or pass api_base/models_base"
        )
    return options, bound


def with_base_url(options: ClientOptions, base_url: str | None) -> ClientOptions:
    """``options`` with one SDK-style ``base_url`` (``http://127.0.0.1:8000/v1``) as both
    ``api_base`` and ``models_base``: the URL less a trailing ``/v1`` (a path prefix before it
    stays). Chutes' hosts keep their default pair. Giving ``base_url`` together with
    ``api_base`` / ``models_base`` is refused (``invalid_argument``): one would silently lose.
    """
    if base_url is None:
        return options
    base = _base_url(base_url, "base_url")
    if not uses_default_bases(options):
        raise _invalid("pass base_url, or api_base/models_base, not both")
    if (urlsplit(base).hostname or "") in CHUTES_HOSTS:
        return options
    base = base.removesuffix("/v1")
    return ClientOptions.of(options, api_base=base, models_base=base)
