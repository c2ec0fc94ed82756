"""v2 negotiation (sans-IO; ``now`` in seconds is a parameter): the ``e2e_v2`` discovery field,
the client's version policy with per-chute pinning, and the attestation binding.

Discovery carries, per instance, next to ``e2e_pubkey`` and ``nonces``::

    "e2e_v2": {"v": 2, "kem_id": 25722, "kdf_id": 1, "aead_id": 3,
               "pk": "<std base64 of the 1216-byte X-Wing key>", "not_after": <unix s>}

Policy (:class:`E2EPolicy`):

* ``min_version=2`` (strict): only instances with a valid offer; none -> ``downgrade_refused``
  before any ``/e2e/invoke`` (no nonce is spent, v1 is never sent).
* ``min_version=1, prefer_v2=True`` (transition default): v2 instances when any exist, else v1.
  A chute that offered v2 is pinned for ``pin_ttl_s``; while pinned, a discovery without any
  valid offer raises ``downgrade_suspected`` (HSTS-like; a relay that strips the field from the
  first contact on is only caught by strict mode or attestation).
* ``prefer_v2=False``: v1 only (pins are neither set nor enforced).
"""

from __future__ import annotations

import collections
import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pqe2ee.backends.xwing import XWING_KEM_ID, XWING_PK_LEN, check_xwing_public_key
from pqe2ee.errors import ErrorCode, LocalProtocolError, MalformedError, RemoteProtocolError
from pqe2ee.protocol._codec import b64decode
from pqe2ee.protocol.clocks import UnixTime
from pqe2ee.protocol.discovery import InstanceInfo
from pqe2ee.protocol.v2.hpke import AEAD_ID, KDF_ID
from pqe2ee.protocol.v2.request import pk_hash

__all__ = [
    "DISCOVERY_FIELD",
    "EVIDENCE_LABEL",
    "Candidate",
    "Decision",
    "E2EPolicy",
    "Negotiator",
    "V2Offer",
    "evidence_report_data",
    "parse_v2_offer",
]

DISCOVERY_FIELD: Final = "e2e_v2"
EVIDENCE_LABEL: Final = b"pqe2ee/v2 evidence"


@dataclass(frozen=True, slots=True)
class V2Offer:
    public_key: bytes
    pk_hash: bytes
    not_after: int


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_v2_offer(
    extra: Mapping[str, Any], now: float, *, clock_skew_s: float = 300.0
) -> V2Offer | None:
    """The instance's v2 offer; ``None`` when the row has no ``e2e_v2`` field.

    Raises MalformedError (``malformed_discovery``) for a present but invalid field: wrong
    version or suite ids, a key that is not 1216 bytes of strict base64 or fails the FIPS 203
    modulus check, or ``not_after`` not in the future (``clock_skew_s`` allowed).
    """
    if DISCOVERY_FIELD not in extra:
        return None
    field = extra[DISCOVERY_FIELD]

    def bad(why: str) -> MalformedError:
        return MalformedError(f"e2e_v2: {why}", code=ErrorCode.MALFORMED_DISCOVERY)

    if not isinstance(field, Mapping):
        raise bad("not an object")
    if _int(field.get("v")) != 2:
        raise bad("v must be 2")
    if (_int(field.get("kem_id")), _int(field.get("kdf_id")), _int(field.get("aead_id"))) != (
        XWING_KEM_ID,
        KDF_ID,
        AEAD_ID,
    ):
        raise bad("suite must be (25722, 1, 3)")
    pk_b64 = field.get("pk")
    if not isinstance(pk_b64, str):
        raise bad("pk must be a string")
    pk, digest = _checked_key(pk_b64)
    not_after = _int(field.get("not_after"))
    if not_after is None:
        raise bad("not_after must be an integer")
    if not_after + clock_skew_s <= now:
        raise bad("key has expired (not_after is in the past)")
    return V2Offer(pk, digest, not_after)


@functools.lru_cache(maxsize=256)
def _checked_key(pk_b64: str) -> tuple[bytes, bytes]:
    """An offer's key decoded and checked, with its hash; kept per base64 text (256 at most):
    the same instance keys come back in every discovery and attestation lookup, and the
    modulus check costs tens of microseconds. A refused key raises and is not kept."""
    pk = b64decode(pk_b64, what="e2e_v2.pk", code=ErrorCode.MALFORMED_DISCOVERY)
    if len(pk) != XWING_PK_LEN:
        raise MalformedError(
            f"e2e_v2: pk must be {XWING_PK_LEN} bytes, got {len(pk)}",
            code=ErrorCode.MALFORMED_DISCOVERY,
        )
    try:
        check_xwing_public_key(pk)
    except LocalProtocolError:
        raise MalformedError(
            "e2e_v2: pk failed the ML-KEM modulus check", code=ErrorCode.MALFORMED_DISCOVERY
        ) from None
    return pk, pk_hash(pk)


@dataclass(frozen=True, slots=True)
class E2EPolicy:
    min_version: int = 1
    prefer_v2: bool = True
    pin_ttl_s: float = 24 * 3600.0
    max_pins: int = 10_000
    clock_skew_s: float = 300.0

    def __post_init__(self) -> None:
        if self.min_version not in (1, 2):
            raise LocalProtocolError("min_version must be 1 or 2", code=ErrorCode.INVALID_ARGUMENT)
        if self.min_version == 2 and not self.prefer_v2:
            raise LocalProtocolError(
                "min_version=2 needs prefer_v2=True", code=ErrorCode.INVALID_ARGUMENT
            )


@dataclass(frozen=True, slots=True)
class Candidate:
    instance: InstanceInfo
    offer: V2Offer | None  # None: use v1 with instance.public_key


@dataclass(frozen=True, slots=True)
class Decision:
    """Which version to speak with a chute, and the instances that may be used for it."""

    version: int
    candidates: tuple[Candidate, ...]
    downgraded: bool  # v1 chosen although the policy prefers v2 (warn the user)
    invalid_offers: int  # instances whose e2e_v2 field was present but invalid


class Negotiator:
    """Applies an :class:`E2EPolicy` to discovery results; keeps the per-chute pins
    (bounded, least recently pinned dropped first). ``now`` is Unix time.

    Not thread-safe (no locks in the protocol layer): whoever shares one between threads
    serialises the calls - the transports' engines that share a negotiator share one lock."""

    def __init__(self, policy: E2EPolicy | None = None) -> None:
        self.policy = policy or E2EPolicy()
        self._pins: collections.OrderedDict[str, float] = collections.OrderedDict()
        # What the relay cannot rename (issue 16): the model names the user asked for and the
        # v1 keys of instances seen offering v2 ("model:<name>", "key:<sha256 prefix>").
        self._anchors: collections.OrderedDict[str, float] = collections.OrderedDict()
        # chute_id -> (version decided, when): the last decision per chute (bounded like pins)
        self._seen: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()

    def _anchor_pinned(self, anchor: str, now: UnixTime) -> bool:
        return _live(self._anchors, anchor, now)

    def _pin_anchor(self, anchor: str, now: UnixTime) -> None:
        self._add(self._anchors, anchor, now)

    def _add(self, table: collections.OrderedDict[str, float], key: str, now: UnixTime) -> None:
        """Pin ``key`` in ``table`` until ``now + pin_ttl_s`` (bounded: oldest out first)."""
        if self.policy.pin_ttl_s <= 0:
            return
        table[key] = now + self.policy.pin_ttl_s
        table.move_to_end(key)
        while len(table) > self.policy.max_pins:
            table.popitem(last=False)

    def pinned(self, chute_id: str, now: UnixTime) -> bool:
        return _live(self._pins, chute_id, now)

    def pin(self, chute_id: str, now: UnixTime) -> None:
        self._add(self._pins, chute_id, now)

    def unpin(self, chute_id: str) -> None:
        self._pins.pop(chute_id, None)

    def pins(self) -> dict[str, float]:
        """A copy of the pins (chute_id -> until), e.g. to persist them."""
        return dict(self._pins)

    def seen(self) -> dict[str, tuple[int, float]]:
        """The chutes decided for, newest last: chute_id -> (version, Unix time of the last
        decision). A status page's list; bounded by ``max_pins``."""
        return dict(self._seen)

    def _saw(self, chute_id: str, version: int, now: UnixTime) -> None:
        self._seen[chute_id] = (version, float(now))
        self._seen.move_to_end(chute_id)
        while len(self._seen) > self.policy.max_pins:
            self._seen.popitem(last=False)

    def decide(
        self,
        chute_id: str,
        instances: Iterable[InstanceInfo],
        now: UnixTime,
        *,
        models: Iterable[str] = (),
    ) -> Decision:
        """Raises RemoteProtocolError ``downgrade_refused`` (strict, no v2 instance) or
        ``downgrade_suspected`` (no v2 instance, and v2 was seen before for this chute, for
        one of ``models`` - the names the caller asked for that lead here - or for one of these
        instances' v1 keys: renaming the chute does not lift the pin)."""
        decision = self._decide(chute_id, instances, now, models=models)
        self._saw(chute_id, decision.version, now)
        return decision

    def _decide(
        self,
        chute_id: str,
        instances: Iterable[InstanceInfo],
        now: UnixTime,
        *,
        models: Iterable[str] = (),
    ) -> Decision:
        policy = self.policy
        rows = list(instances)
        anchors = [f"model:{m}" for m in models] + [_key_anchor(i) for i in rows]
        if not policy.prefer_v2:
            return Decision(1, tuple(Candidate(i, None) for i in rows), False, 0)
        v2: list[Candidate] = []
        invalid = 0
        for inst in rows:
            try:
                offer = parse_v2_offer(inst.extra, now, clock_skew_s=policy.clock_skew_s)
            except MalformedError:
                invalid += 1
                continue
            if offer is not None:
                v2.append(Candidate(inst, offer))
        if v2:
            self.pin(chute_id, now)
            for anchor in [f"model:{m}" for m in models] + [_key_anchor(c.instance) for c in v2]:
                self._pin_anchor(anchor, now)
            return Decision(2, tuple(v2), False, invalid)
        if policy.min_version >= 2:
            raise RemoteProtocolError(
                f"no instance of chute {chute_id} offers v2 and the policy requires it",
                code=ErrorCode.DOWNGRADE_REFUSED,
            )
        if self.pinned(chute_id, now) or any(self._anchor_pinned(a, now) for a in anchors):
            raise RemoteProtocolError(
                f"chute {chute_id} (or its model or instances) offered v2 before and no longer "
                "does: possible downgrade",
                code=ErrorCode.DOWNGRADE_SUSPECTED,
            )
        return Decision(1, tuple(Candidate(i, None) for i in rows), True, invalid)


def _live(table: collections.OrderedDict[str, float], key: str, now: UnixTime) -> bool:
    """Whether ``key`` is pinned in ``table`` at ``now`` (an expired pin is dropped)."""
    until = table.get(key)
    if until is None:
        return False
    if until <= now:
        del table[key]
        return False
    return True


def _key_anchor(instance: InstanceInfo) -> str:
    return "key:" + hashlib.sha256(instance.public_key).hexdigest()[:32]


def evidence_report_data(nonce: bytes, pk_v1: bytes, pk_v2: bytes) -> bytes:
    """``SHA-256("pqe2ee/v2 evidence" || nonce || SHA-256(pk_v1) || SHA-256(pk_v2))``: what a
    v2 runtime binds into its attestation report (proposal; the layout is to be confirmed)."""
    return hashlib.sha256(
        EVIDENCE_LABEL + nonce + hashlib.sha256(pk_v1).digest() + hashlib.sha256(pk_v2).digest()
    ).digest()
