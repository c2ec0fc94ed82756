"""Discovery and nonce-pool state (sans-IO; ``now`` is always a parameter, in seconds).

* :func:`parse_models` turns ``GET {models_base}/v1/models`` into ``{model id: chute_id}``;
  :class:`ModelMap` caches it with a TTL; :func:`looks_like_uuid` lets a chute_id through as-is.
* :func:`parse_discovery` turns ``GET {api_base}/e2e/instances/{chute_id}`` into instances with
  decoded public keys and single-use nonces, and an absolute expiry.
* :class:`NoncePool` hands out ``(instance, nonce)`` leases for one chute, spreading load across
  instances, honouring expiry with a safety margin, dropping gone instances (410) and cooling
  down busy ones (429 / 502 key exchange), and saying when to refresh.
* :class:`RateLimiter` keeps discovery under the server's limit (10 per 60 s by default).
"""

from __future__ import annotations

import collections
import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import msgspec

from pqe2ee.backends.base import MLKEM768_PK_LEN
from pqe2ee.errors import ErrorCode, MalformedError
from pqe2ee.protocol._codec import b64decode, json_decode
from pqe2ee.protocol.clocks import Monotonic, UnixTime, to_monotonic

__all__ = [
    "DiscoveryResult",
    "InstanceInfo",
    "Lease",
    "ModelMap",
    "NoncePool",
    "RateLimiter",
    "looks_like_uuid",
    "parse_discovery",
    "parse_models",
]

DEFAULT_EXPIRES_IN: Final = 55.0  # what the reference client assumes when the server is silent
MODEL_MAP_TTL: Final = 300.0

_UUID_RE: Final = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


def looks_like_uuid(value: str) -> bool:
    """True for a 36-character hex UUID with dashes: such a model string *is* a chute_id."""
    return _UUID_RE.fullmatch(value) is not None  # fullmatch: "$" alone lets a final "\n" in


# -- /v1/models ----------------------------------------------------------------------------------


class _ModelRow(msgspec.Struct):
    id: Any = None
    chute_id: Any = None


class _ModelList(msgspec.Struct):
    data: list[_ModelRow]


_Doc = TypeVar("_Doc", bound=msgspec.Struct)


def _decode(doc: bytes, shape: type[_Doc], what: str) -> _Doc:
    """``doc`` as ``shape``; ``malformed_discovery`` naming ``what`` when it is not one."""
    try:
        decoded: _Doc = json_decode(doc, type=shape)
        return decoded
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        raise MalformedError(
            f"{what} is not a valid document", code=ErrorCode.MALFORMED_DISCOVERY
        ) from None


def parse_models(doc: bytes) -> dict[str, str]:
    """``{id: chute_id}`` for every row that has both as strings; other rows are skipped."""
    listing = _decode(doc, _ModelList, "model listing (/v1/models)")
    return {
        row.id: row.chute_id
        for row in listing.data
        if isinstance(row.id, str) and isinstance(row.chute_id, str) and row.id and row.chute_id
    }


class ModelMap:
    """Model name -> chute_id, cached for ``ttl`` seconds."""

    __slots__ = ("_loaded_at", "_map", "ttl")

    def __init__(self, ttl: float = MODEL_MAP_TTL) -> None:
        self.ttl = ttl
        self._map: dict[str, str] = {}
        self._loaded_at: float | None = None

    def update(self, mapping: dict[str, str], now: float) -> None:
        self._map = dict(mapping)
        self._loaded_at = now

    def stale(self, now: float) -> bool:
        return self._loaded_at is None or now - self._loaded_at >= self.ttl

    def names_of(self, chute_id: str) -> list[str]:
        """The model names that map to ``chute_id`` in the last listing."""
        return [m for m, c in self._map.items() if c == chute_id]

    def fresh(self, model: str, now: float) -> str | None:
        """:meth:`resolve` when it needs no refresh: ``model`` itself when it is a UUID, else
        its chute while the listing is younger than ``ttl``; ``None`` when a refresh is due."""
        if looks_like_uuid(model):
            return model
        if self.stale(now):
            return None
        return self._map.get(model)

    def resolve(self, model: str, now: float) -> str | None:
        """The chute_id for ``model``: itself when it is a UUID, else the cached mapping (even if
        stale; callers refresh on a miss or when :meth:`stale`)."""
        if looks_like_uuid(model):
            return model
        return self._map.get(model)


# -- /e2e/instances/{chute_id} ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    instance_id: str
    public_key: bytes
    nonces: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DiscoveryResult:
    instances: tuple[InstanceInfo, ...]
    expires_at: float  # on the caller's (monotonic) clock
    skipped: int  # malformed instance rows left out


class _InstanceRow(msgspec.Struct):
    instance_id: Any = None
    e2e_pubkey: Any = None
    nonces: Any = None


class _Discovery(msgspec.Struct):
    instances: list[Any]
    nonce_expires_in: float | None = None
    nonce_expires_at: float | None = None


def parse_discovery(doc: bytes, now: Monotonic, wall: UnixTime | None = None) -> DiscoveryResult:
    """Parse a discovery document received at ``now`` (the caller's clock).

    Expiry is ``now + nonce_expires_in`` (55 s when absent). ``nonce_expires_at`` (the server's
    Unix time) shortens it when earlier, unless it is already past - that means clock skew, and
    the relative value is trusted instead. ``wall`` is the Unix time at ``now``: it places
    ``nonce_expires_at`` on the caller's clock. Without it ``now`` itself must be Unix time
    (scripts, tests); a monotonic ``now`` without ``wall`` would never honour
    ``nonce_expires_at``. Instance rows with a bad key or no usable nonces are skipped (counted
    in ``skipped``), not fatal.
    """
    d = _decode(doc, _Discovery, "discovery response")
    expires_in = (
        DEFAULT_EXPIRES_IN if d.nonce_expires_in is None else max(0.0, float(d.nonce_expires_in))
    )
    expires_at = now + expires_in
    if d.nonce_expires_at is not None:
        unix_now = UnixTime(now) if wall is None else wall
        at = UnixTime(float(d.nonce_expires_at))
        if unix_now < at < unix_now + expires_in:
            expires_at = to_monotonic(at, now=now, wall=unix_now)
    instances: list[InstanceInfo] = []
    skipped = 0
    for raw in d.instances:
        if not isinstance(raw, dict):
            skipped += 1
            continue
        try:
            row = msgspec.convert(raw, _InstanceRow)
        except msgspec.ValidationError:
            skipped += 1
            continue
        if (
            not isinstance(row.instance_id, str)
            or not row.instance_id
            or not isinstance(row.e2e_pubkey, str)
        ):
            skipped += 1
            continue
        try:
            pk = b64decode(row.e2e_pubkey, what="e2e_pubkey", code=ErrorCode.MALFORMED_DISCOVERY)
        except MalformedError:
            skipped += 1
            continue
        nonces = (
            tuple(n for n in (row.nonces or ()) if isinstance(n, str) and n)
            if isinstance(row.nonces, list)
            else ()
        )
        if len(pk) != MLKEM768_PK_LEN or not nonces:
            skipped += 1
            continue
        extra = {k: v for k, v in raw.items() if k not in ("instance_id", "e2e_pubkey", "nonces")}
        instances.append(InstanceInfo(row.instance_id, pk, nonces, extra))
    return DiscoveryResult(tuple(instances), expires_at, skipped)


# -- nonce pool ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lease:
    """One single-use right to invoke ``instance_id`` with ``nonce``."""

    chute_id: str
    instance_id: str
    public_key: bytes
    nonce: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Entry:
    info: InstanceInfo
    nonces: collections.deque[str]
    cool_until: float = 0.0


class NoncePool:
    """Leases for one chute. Not thread-safe by itself: callers hold a lock around it.

    ``safety_margin``: a nonce is not handed out within this many seconds of expiry.
    ``prefetch_margin`` / ``low_watermark``: :meth:`needs_refresh` turns true this long before
    expiry, or when this few usable nonces remain, so a refresh can run before the pool is empty.
    """

    def __init__(
        self,
        chute_id: str,
        *,
        safety_margin: float = 5.0,
        prefetch_margin: float = 15.0,
        low_watermark: int = 3,
        drop_for: float = 300.0,
    ) -> None:
        self.chute_id = chute_id
        self.safety_margin = safety_margin
        self.prefetch_margin = prefetch_margin
        self.low_watermark = low_watermark
        self.drop_for = drop_for
        self._entries: dict[str, _Entry] = {}
        self._dropped: dict[str, float] = {}  # instance_id -> until
        self._expires_at = 0.0
        self._turn = 0
        #: How many discovery results were loaded: a decision taken on :meth:`instances`
        #: holds until this moves.
        self.generation = 0

    # loading -------------------------------------------------------------------------------

    def load(self, result: DiscoveryResult, now: float) -> None:
        """Replace the pool with a fresh discovery result (dropped instances stay out)."""
        self._dropped = {k: t for k, t in self._dropped.items() if t > now}
        cool = {k: e.cool_until for k, e in self._entries.items()}
        self._entries = {
            inst.instance_id: _Entry(
                inst, collections.deque(inst.nonces), cool.get(inst.instance_id, 0.0)
            )
            for inst in result.instances
            if inst.instance_id not in self._dropped
        }
        self._expires_at = result.expires_at
        self.generation += 1

    def instances(self) -> tuple[InstanceInfo, ...]:
        """The rows of the last discovery still in the pool (gone instances dropped), whatever
        their nonces or cool-down: what a version decision is taken on."""
        return tuple(e.info for e in self._entries.values())

    # leasing -------------------------------------------------------------------------------

    @property
    def expires_at(self) -> float:
        return self._expires_at

    def _usable(self, now: float) -> list[_Entry]:
        if now >= self._expires_at - self.safety_margin:
            return []
        return [e for e in self._entries.values() if e.nonces and e.cool_until <= now]

    def available(self, now: float) -> int:
        if now >= self._expires_at - self.safety_margin:
            return 0
        count = 0  # (a loop: no generator frame; a lease looks twice)
        for e in self._entries.values():
            if e.cool_until <= now:
                count += len(e.nonces)
        return count

    def take(self, now: float, *, exclude: Iterable[str] = ()) -> Lease | None:
        """A lease from the instance with the most nonces left (ties rotate), or None."""
        found = self.lease(now, exclude=exclude)
        return None if found is None else found[0]

    def lease(self, now: float, *, exclude: Iterable[str] = ()) -> tuple[Lease, bool] | None:
        """:meth:`take`, and whether the pool then :meth:`needs_refresh` (counted in the same
        pass over the instances: a request's lease)."""
        if now >= self._expires_at - self.safety_margin:
            return None
        excluded = set(exclude)
        most = 0
        usable = 0  # nonces of instances not cooling down: available()
        top: list[_Entry] = []  # the usable instances with the most nonces, in pool order
        for e in self._entries.values():
            if e.cool_until > now:
                continue
            left = len(e.nonces)
            usable += left
            if left < most or not left or e.info.instance_id in excluded:
                continue
            if left > most:
                most, top = left, [e]
            else:
                top.append(e)
        if not top:
            return None
        entry = top[self._turn % len(top)]
        self._turn += 1
        info = entry.info
        lease = Lease(
            self.chute_id, info.instance_id, info.public_key, entry.nonces.popleft(), info.extra
        )
        # needs_refresh(now), after the nonce taken (usable - 1 left)
        refresh = now >= self._expires_at - self.prefetch_margin or usable - 1 <= self.low_watermark
        return lease, refresh

    def busy_wait(self, now: float) -> float:
        """Seconds until an instance that is only cooling down (busy, key exchange) and keeps
        nonces valid by then can be leased; 0 when one is usable now or none will be. A
        discovery would not help: a cool-down outlives it."""
        if self._usable(now):
            return 0.0
        last = self._expires_at - self.safety_margin
        ends = [
            e.cool_until for e in self._entries.values() if e.nonces and now < e.cool_until < last
        ]
        return min(ends) - now if ends else 0.0

    def needs_refresh(self, now: float) -> bool:
        if now >= self._expires_at - self.prefetch_margin:
            return True
        return self.available(now) <= self.low_watermark

    # feedback ------------------------------------------------------------------------------

    def drop_instance(self, instance_id: str, now: float) -> None:
        """The relay said the instance is gone (410): stop using it, even after a refresh."""
        self._entries.pop(instance_id, None)
        self._dropped[instance_id] = now + self.drop_for

    def cool_down(self, instance_id: str, now: float, seconds: float) -> None:
        """The instance is busy (429) or needs key exchange (502): skip it for ``seconds``."""
        entry = self._entries.get(instance_id)
        if entry is not None:
            entry.cool_until = max(entry.cool_until, now + seconds)

    def invalidate(self) -> None:
        """Forget every nonce (after the relay refused one): the next take needs a refresh."""
        for entry in self._entries.values():
            entry.nonces.clear()
        self._expires_at = 0.0


class RateLimiter:
    """At most ``limit`` events per sliding ``window`` seconds."""

    __slots__ = ("_times", "limit", "window")

    def __init__(self, limit: int = 10, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        self._times: collections.deque[float] = collections.deque()

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()

    def allowed(self, now: float) -> bool:
        self._trim(now)
        return len(self._times) < self.limit

    def record(self, now: float) -> None:
        self._trim(now)
        self._times.append(now)

    def refund(self, at: float) -> None:
        """Forget the event recorded at ``at`` (one that turned out not to count)."""
        with contextlib.suppress(ValueError):
            self._times.remove(at)

    def wait_time(self, now: float) -> float:
        """Seconds until one more event is allowed (0 when allowed now)."""
        self._trim(now)
        if len(self._times) < self.limit:
            return 0.0
        return max(0.0, self._times[0] + self.window - now)
