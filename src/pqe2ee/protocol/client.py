"""Sans-IO client logic shared by every transport: what to encrypt, which lease to use, how to
read a relay's answer, and what to do about it.

A transport (httpx2, httpx, aiohttp, anyio) does only I/O around this::

    state = ClientState()
    chute = state.resolve_chute(model, now)          # None -> fetch /v1/models, state.update_models
    lease, neg, _ = state.negotiated_lease(chute, negotiator, now, wall_clock)
                                                     # None -> discovery (state.discovery_wait,
                                                     #   state.record_discovery, state.load_discovery)
    v1: sealed = seal_request(body, lease.public_key, ...); headers = invoke_headers(...)
    v2: sealed = seal_request_v2(body, neg.offers[lease.instance_id].public_key, ...);
        headers = sealed.invoke_headers(api_key)
    ... POST {api_base}/e2e/invoke ...
    error = classify_v2_hint(status, body) or classify_invoke_error(status, body)  # non-200
    state.report(lease, error, now); retry while error.retryable and attempts remain

Version negotiation (spec/v2.md §8) happens before a lease is taken: :meth:`ClientState.negotiate`
applies a :class:`~pqe2ee.protocol.v2.Negotiator` to the instances of the chute's pool and keeps
the decision until the next discovery, so a strict client refuses v1 (``downgrade_refused``) and
a pinned chute without v2 refuses (``downgrade_suspected``) before any nonce is spent.

:class:`ClientState` holds no lock: each method is one short step with no I/O, and a caller
shared by threads holds its own lock around each call. Time is always a parameter, in two
types kept apart (:mod:`pqe2ee.protocol.clocks`): ``now`` is the caller's :data:`Monotonic`
clock, ``wall`` is :data:`UnixTime`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from pqe2ee.errors import ErrorCode, LocalProtocolError, RelayError
from pqe2ee.protocol._codec import json_decode
from pqe2ee.protocol.clocks import Monotonic, UnixTime
from pqe2ee.protocol.discovery import (
    Lease,
    ModelMap,
    NoncePool,
    RateLimiter,
    parse_discovery,
    parse_models,
)
from pqe2ee.protocol.v1.envelope import BLOB_OVERHEAD, SealedRequest
from pqe2ee.protocol.v2.negotiation import Decision, Negotiator, V2Offer
from pqe2ee.protocol.v2.request import parse_instance_hint

__all__ = [
    "DEFAULT_E2E_PATHS",
    "INVOKE_PATH",
    "RETRYABLE",
    "RETRYABLE_ONCE_V2",
    "ClientLimits",
    "ClientState",
    "Negotiated",
    "classify_discovery_error",
    "classify_invoke_error",
    "classify_v2_hint",
    "discovery_path",
    "e2e_model",
    "e2e_request",
    "invoke_headers",
    "is_sealed_error",
    "may_be_sealed",
    "media_type",
    "request_model",
]

INVOKE_PATH: Final = "/e2e/invoke"
MODELS_PATH: Final = "/v1/models"
DEFAULT_E2E_PATHS: Final = frozenset({"/v1/chat/completions", "/v1/completions"})

#: Codes after which a request may be retried with another lease (nothing reached the caller).
RETRYABLE: Final = frozenset(
    {
        ErrorCode.NONCE_REJECTED,
        ErrorCode.INSTANCE_GONE,
        ErrorCode.INSTANCE_BUSY,
        ErrorCode.KEY_EXCHANGE_REQUIRED,
    }
)

#: v2 instance hints after which a request is retried - once per request - as a new request
#: (new nonce, ts, request_id, response key and seal): ``unknown_key`` (the instance rotated its
#: key: the pool is dropped so that the retry rediscovers) and ``stale`` (clock skew or the
#: replay cache's floor under load: a fresh ``ts`` passes). Every other hint (``replay``,
#: ``context_mismatch``, ``decrypt_failed``, ``bad_header``, ``malformed_blob``,
#: ``malformed_payload``, ``bad_padding``, ``oversize``) means the request or the path to the
#: instance is broken, or someone replayed or altered it: retrying cannot help, it is raised.
RETRYABLE_ONCE_V2: Final = frozenset({ErrorCode.UNKNOWN_KEY, ErrorCode.STALE})

# How long to avoid an instance after it said it is busy / needs key exchange.
BUSY_COOLDOWN: Final = 5.0
KEY_EXCHANGE_COOLDOWN: Final = 60.0

_NONCE_MARKERS: Final = (b"nonce",)
_KEY_EXCHANGE_MARKER: Final = b"key exchange"


def discovery_path(chute_id: str) -> str:
    return f"/e2e/instances/{chute_id}"


def e2e_model(method: str, path: str, body: bytes, e2e_paths: Collection[str]) -> str | None:
    """The model to route by when a request must go encrypted, else ``None``.

    A request is encrypted when it is a ``POST`` to one of ``e2e_paths`` (query ignored) with a
    body; that body must be a JSON object with a non-empty string ``model``, or the request is
    refused as in :func:`e2e_request`.
    """
    found = e2e_request(method, path, body, e2e_paths)
    return None if found is None else found[0]


def e2e_request(
    method: str, path: str, body: bytes, e2e_paths: Collection[str]
) -> tuple[str, dict[str, Any]] | None:
    """:func:`e2e_model` and the decoded body (for ``seal_request``'s ``decoded``: the body
    is then parsed once per request), else ``None``: not a ``POST`` to an E2EE path, or one
    without a body (blank).

    A body for an E2EE path that cannot be sealed raises
    :class:`~pqe2ee.errors.LocalProtocolError` (``invalid_body``): not JSON the client can
    decode (invalid, NaN, bad UTF-8, nested deeper than
    :data:`~pqe2ee._json.MAX_JSON_DEPTH`, which no instance accepts), or not an object with a
    non-empty string ``model``. It may hold a prompt, so it is neither sealed nor sent in
    plaintext.
    """
    if method.upper() != "POST" or path.split("?", 1)[0] not in e2e_paths:
        return None
    try:
        obj = json_decode(body)
    except msgspec.DecodeError as exc:
        if not body.strip():
            return None
        raise _unsealable(path, f"not JSON the client can decode: {exc}") from None
    model = request_model(obj) if isinstance(obj, dict) else None
    if model is None:
        raise _unsealable(path, "not a JSON object with a non-empty string 'model'")
    return model, obj


def _unsealable(path: str, why: str) -> LocalProtocolError:
    return LocalProtocolError(
        f"the body of POST {path.split('?', 1)[0][:100]} cannot be sealed ({why}); "
        "refused rather than sent in plaintext",
        code=ErrorCode.INVALID_BODY,
    )


def invoke_headers(
    api_key: str | None, lease: Lease, sealed: SealedRequest, path: str
) -> list[tuple[str, str]]:
    """The exact v1 invoke headers. ``X-E2E-Stream`` always comes from the sealed body's flag."""
    headers = [
        ("X-Chute-Id", lease.chute_id),
        ("X-Instance-Id", lease.instance_id),
        ("X-E2E-Nonce", lease.nonce),
        ("X-E2E-Stream", "true" if sealed.stream else "false"),
        ("X-E2E-Path", path.split("?", 1)[0]),
        ("Content-Type", "application/octet-stream"),
    ]
    if api_key:
        headers.insert(0, ("Authorization", f"Bearer {api_key}"))
    return headers


def media_type(content_type: str | None) -> str:
    """The media type of a ``Content-Type`` value, lower case, parameters dropped."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def may_be_sealed(status: int, content_type: str | None) -> bool:
    """Whether a v1 invoke answer may carry a sealed blob (read it up to the blob bound): a 200,
    or a sealed engine error (Content-Type ``application/octet-stream``)."""
    return status == 200 or media_type(content_type) == "application/octet-stream"


def is_sealed_error(status: int, content_type: str | None, body: bytes) -> bool:
    """A pqe2ee extension: a non-200 answer carrying an ``e2e-resp-v1`` blob of the engine's
    own error body (Content-Type ``application/octet-stream``)."""
    return (
        status != 200
        and media_type(content_type) == "application/octet-stream"
        and len(body) >= BLOB_OVERHEAD
    )


def _detail(body: bytes) -> str:
    """A short, printable excerpt of a relay error body (relay text, not user data)."""
    text = body[:300].decode("utf-8", "replace").replace("\n", " ").strip()
    return text or "(empty body)"


def classify_invoke_error(status: int, body: bytes) -> RelayError:
    """Turn a relay's non-200, non-sealed answer to ``/e2e/invoke`` into a typed error.

    403 whose body mentions a nonce -> ``nonce_rejected`` (retry with a fresh nonce); any other
    403 -> ``path_forbidden`` (not retried); 410 -> ``instance_gone``; 429 -> ``instance_busy``;
    502 saying "key exchange" -> ``key_exchange_required``; anything else -> ``relay_error``.
    """
    lowered = body[:2048].lower()
    if status == 403:
        if any(m in lowered for m in _NONCE_MARKERS):
            code = ErrorCode.NONCE_REJECTED
        else:
            code = ErrorCode.PATH_FORBIDDEN
    elif status == 410:
        code = ErrorCode.INSTANCE_GONE
    elif status == 429:
        code = ErrorCode.INSTANCE_BUSY
    elif status == 502 and _KEY_EXCHANGE_MARKER in lowered:
        code = ErrorCode.KEY_EXCHANGE_REQUIRED
    else:
        code = ErrorCode.RELAY_ERROR
    return RelayError(f"relay answered {status}: {_detail(body)}", code=code, status=status)


def classify_v2_hint(status: int, body: bytes) -> RelayError | None:
    """The typed error of a plaintext v2 instance refusal (``{"detail":"e2e_v2:<code>"}``, also
    when the relay wrapped it), else ``None`` (classify it as a v1 relay answer).

    The code is the hint's (``replay``, ``stale``, ``unknown_key``, ``context_mismatch``, ...);
    a 409 without a readable hint is ``replay`` (the only use of 409 in v2: a relay that
    rewrites instance errors keeps the status). Hints are unauthenticated: a relay can forge
    them, which is denial of service, never a wrong answer.
    """
    if status == 200:
        return None
    code = parse_instance_hint(body)
    if code is None and status == 409:
        code = ErrorCode.REPLAY
    if code is None:
        return None
    return RelayError(
        f"the instance refused the v2 request ({status}, e2e_v2:{code.value})",
        code=code,
        status=status,
    )


def classify_discovery_error(status: int, body: bytes) -> RelayError:
    """Turn a non-200 answer to ``GET /e2e/instances/{chute_id}`` into a typed error.

    404 "Chute not found" -> ``model_not_found``; any other 404 (no active / no E2E-capable
    instances) and 503 (chute disabled) -> ``no_instances``; 429 -> ``discovery_rate_limited``;
    anything else -> ``discovery_failed``.
    """
    lowered = body[:2048].lower()
    if status == 404 and b"chute not found" in lowered:
        code = ErrorCode.MODEL_NOT_FOUND
    elif status in (404, 503):
        code = ErrorCode.NO_INSTANCES
    elif status == 429:
        code = ErrorCode.DISCOVERY_RATE_LIMITED
    else:
        code = ErrorCode.DISCOVERY_FAILED
    return RelayError(f"discovery answered {status}: {_detail(body)}", code=code, status=status)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """A version decision for one chute's pool (see :meth:`ClientState.negotiate`).

    ``excluded``: instance ids a lease must not use (v1-only instances of a chute that offers
    v2); ``offers``: the v2 offer of each candidate instance (empty for v1).
    """

    decision: Decision
    generation: int
    valid_until: float  # Unix time: the earliest offer's expiry (+ skew), inf for v1
    excluded: frozenset[str]
    offers: Mapping[str, V2Offer]

    @property
    def version(self) -> int:
        return self.decision.version


@dataclass(frozen=True, slots=True)
class ClientLimits:
    discovery_per_window: int = 10
    discovery_window: float = 60.0
    model_ttl: float = 300.0
    safety_margin: float = 5.0
    prefetch_margin: float = 15.0
    low_watermark: int = 3


#: Back-off after a discovery answered 5xx: first wait, and the most it doubles to (seconds).
DISCOVERY_BACKOFF_MIN: Final = 0.25
DISCOVERY_BACKOFF_MAX: Final = 4.0
#: ``Negotiated.valid_until`` of a decision that relies on no offer (v1): it never expires.
_NEVER: Final = float("inf")


class ClientState:
    """Model map, nonce pools and the discovery rate limiter for one client.

    Not thread-safe (the protocol layer has no locks): the I/O layer serialises the calls (the
    blocking engine, used from many threads, holds one lock around each).
    ``now`` is always the caller's monotonic clock, ``wall`` Unix time."""

    def __init__(self, limits: ClientLimits | None = None) -> None:
        self.limits = limits or ClientLimits()
        self._models = ModelMap(self.limits.model_ttl)
        self._pools: dict[str, NoncePool] = {}
        self._limiter = RateLimiter(self.limits.discovery_per_window, self.limits.discovery_window)
        self._backoff = 0.0  # after discoveries the relay could not answer (5xx)
        self._backoff_until = 0.0
        self._models_generation = 0
        self._negotiated: dict[str, Negotiated] = {}

    # models ------------------------------------------------------------------------------------

    def resolve_chute(self, model: str, now: Monotonic) -> str | None:
        return self._models.resolve(model, now)

    def fresh_chute(self, model: str, now: Monotonic) -> str | None:
        """The chute for ``model`` when no listing refresh is due (a UUID: itself), else
        ``None`` (see :meth:`ModelMap.fresh`)."""
        return self._models.fresh(model, now)

    def update_models(self, doc: bytes, now: Monotonic) -> dict[str, str]:
        mapping = parse_models(doc)
        self._models.update(mapping, now)
        self._models_generation += 1
        return mapping

    @property
    def models_generation(self) -> int:
        """How many model listings have been loaded: lets concurrent callers that all missed
        the same model share one forced refresh (refresh only if it has not moved)."""
        return self._models_generation

    # leases ------------------------------------------------------------------------------------

    def _pool(self, chute_id: str) -> NoncePool:
        pool = self._pools.get(chute_id)
        if pool is None:
            lim = self.limits
            pool = self._pools[chute_id] = NoncePool(
                chute_id,
                safety_margin=lim.safety_margin,
                prefetch_margin=lim.prefetch_margin,
                low_watermark=lim.low_watermark,
            )
        return pool

    def lease(self, chute_id: str, now: Monotonic, *, exclude: Iterable[str] = ()) -> Lease | None:
        return self._pool(chute_id).take(now, exclude=exclude)

    def negotiate(
        self, chute_id: str, negotiator: Negotiator, now: Monotonic, wall: UnixTime
    ) -> Negotiated | None:
        """The protocol version for ``chute_id`` and the instances a lease may use, decided by
        ``negotiator`` on the instances of the last discovery; ``None`` when the pool has no
        usable nonce (discover first). ``now`` is the pool's clock, ``wall`` Unix seconds.

        The decision is kept until the next discovery, so pins are refreshed once per discovery;
        once an offer it relied on expires it is ``None`` again (rediscover). Raises
        RemoteProtocolError ``downgrade_refused`` (strict policy, no v2 instance) or
        ``downgrade_suspected`` (pinned chute, no v2 instance) - before any nonce is spent.
        """
        return self._negotiate(self._pool(chute_id), negotiator, now, lambda: wall)

    def _negotiate(
        self,
        pool: NoncePool,
        negotiator: Negotiator,
        now: Monotonic,
        wall: Callable[[], UnixTime],
    ) -> Negotiated | None:
        chute_id = pool.chute_id
        cached = self._negotiated.get(chute_id)
        if cached is not None and cached.generation == pool.generation:
            # A decision that relies on no offer (v1) never expires: no clock read for it.
            if cached.valid_until == _NEVER or wall() < cached.valid_until:
                return cached  # (an exhausted pool then gives no lease: discovery follows)
            return None  # an offer it relied on expired: decide on a fresh discovery
        if pool.available(now) == 0:
            return None  # nothing to decide on that could be used: discover first
        generation = pool.generation
        rows = pool.instances()
        # The model names that lead here: the pin follows them if the relay renames the chute.
        names = self._models.names_of(chute_id)
        decision = negotiator.decide(chute_id, rows, wall(), models=names)
        offers = {c.instance.instance_id: c.offer for c in decision.candidates if c.offer}
        skew = negotiator.policy.clock_skew_s
        valid_until = min((o.not_after + skew for o in offers.values()), default=_NEVER)
        allowed = {c.instance.instance_id for c in decision.candidates}
        negotiated = Negotiated(
            decision,
            generation,
            valid_until,
            frozenset(r.instance_id for r in rows if r.instance_id not in allowed),
            offers,
        )
        self._negotiated[chute_id] = negotiated
        return negotiated

    def negotiated_lease(
        self,
        chute_id: str,
        negotiator: Negotiator,
        now: Monotonic,
        wall: Callable[[], UnixTime],
    ) -> tuple[Lease, Negotiated, bool] | None:
        """:meth:`negotiate`, then a lease of an instance the decision allows, both from the
        same discovery, and whether the pool then wants a prefetch (:meth:`needs_discovery`,
        one pool lookup for both); ``None`` when there is none (discover first). ``wall``
        reads Unix seconds, only when the decision needs them (a new one, or one that relies
        on offers that expire)."""
        pool = self._pool(chute_id)
        negotiated = self._negotiate(pool, negotiator, now, wall)
        if negotiated is None:
            return None
        found = pool.lease(now, exclude=negotiated.excluded)
        return None if found is None else (found[0], negotiated, found[1])

    def needs_discovery(self, chute_id: str, now: Monotonic) -> bool:
        """True when the pool is empty, low, or close to expiry (prefetch)."""
        return self._pool(chute_id).needs_refresh(now)

    def busy_wait(self, chute_id: str, now: Monotonic) -> float:
        """Seconds until a busy instance of ``chute_id`` can be leased again (0: no point
        waiting); see :meth:`NoncePool.busy_wait`."""
        return self._pool(chute_id).busy_wait(now)

    def available(self, chute_id: str, now: Monotonic) -> int:
        return self._pool(chute_id).available(now)

    def discovery_wait(self, now: Monotonic) -> float:
        """Seconds to wait before the next discovery is allowed (0 = now): the rate budget,
        or the back-off after a 5xx."""
        return max(self._limiter.wait_time(now), self._backoff_until - now, 0.0)

    def discovery_failed(self, recorded_at: Monotonic, now: Monotonic) -> None:
        """A discovery (recorded at ``recorded_at``) the relay could not answer (5xx): it
        brought no nonces, so it is taken off the rate budget, and the next one waits a short
        back-off (0.25 s, doubling to 4 s) until a discovery succeeds. A relay blip of a few
        seconds then costs a few seconds, not the budget's minute."""
        self._limiter.refund(recorded_at)
        self._backoff = min(DISCOVERY_BACKOFF_MAX, self._backoff * 2 or DISCOVERY_BACKOFF_MIN)
        self._backoff_until = now + self._backoff

    def record_discovery(self, now: Monotonic) -> None:
        self._limiter.record(now)

    def try_record_discovery(self, now: Monotonic) -> float:
        """If a discovery is allowed now, record it and return 0; else return the seconds to
        wait (nothing recorded). One call: many callers racing for the last slot (under the
        caller's lock) cannot both take it."""
        wait = self.discovery_wait(now)
        if wait <= 0.0:
            self._limiter.record(now)
            return 0.0
        return wait

    def load_discovery(self, chute_id: str, doc: bytes, now: Monotonic, wall: UnixTime) -> int:
        """Load a discovery document received at ``now`` (pool clock), which was ``wall`` in
        Unix time (to place the server's ``nonce_expires_at`` on the pool clock); returns the
        number of usable instances."""
        result = parse_discovery(doc, now, wall)
        self._pool(chute_id).load(result, now)
        self._backoff = self._backoff_until = 0.0
        return len(result.instances)

    def report(self, lease: Lease, error: RelayError, now: Monotonic) -> None:
        """Feed a relay error back into the pool: spent nonce, gone or busy instance."""
        pool = self._pool(lease.chute_id)
        if error.code in (ErrorCode.NONCE_REJECTED, ErrorCode.UNKNOWN_KEY):
            pool.invalidate()  # unknown_key: the instance rotated its v2 key - rediscover
        elif error.code is ErrorCode.INSTANCE_GONE:
            pool.drop_instance(lease.instance_id, now)
        elif error.code is ErrorCode.INSTANCE_BUSY:
            pool.cool_down(lease.instance_id, now, BUSY_COOLDOWN)
        elif error.code is ErrorCode.KEY_EXCHANGE_REQUIRED:
            pool.cool_down(lease.instance_id, now, KEY_EXCHANGE_COOLDOWN)


def request_model(body: Mapping[str, Any]) -> str | None:
    model = body.get("model")
    return model if isinstance(model, str) and model else None
