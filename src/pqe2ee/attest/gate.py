"""The client's attestation state: modes, cached verdicts and evidence, pinned chutes (pure).

The transports do the fetching (:mod:`pqe2ee.transports._async._attest`); this module decides.
Verification happens once per (chute, instance, key) and its verdict is reused until the
policy's ``max_age`` or the collateral's earliest ``nextUpdate``, whichever comes first. A chute
once verified is pinned: if it later comes back without evidence, that is ``attest_downgrade``,
never a quiet unattested send. Not thread-safe by itself: callers hold :attr:`AttestationGate.lock`
around each call (never across I/O).
"""

from __future__ import annotations

import enum
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pqe2ee.attest.collateral import Collateral
from pqe2ee.attest.policy import Policy, Verdict
from pqe2ee.attest.verify import EvidenceBundle, new_nonce
from pqe2ee.errors import AttestationError, ErrorCode

__all__ = [
    "INTEL_PCS_URL",
    "INTEL_ROOT_CA_CRL_URL",
    "AttestMode",
    "AttestOptions",
    "AttestationGate",
]

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
INTEL_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
_MAX_ENTRIES = 10_000
#: Seconds an ``auto``-mode client trusts "this chute serves no evidence" before asking again
#: (capped by the policy's ``max_age``): without it every request paid an evidence round trip.
UNATTESTED_RECHECK = 60.0


class AttestMode(enum.StrEnum):
    """``auto``: chutes that serve evidence are verified and fail closed (once verified, a chute
    stays pinned), others are sent to with one warning per chute; ``require``: never send to
    an unverified instance; ``off``: no attestation."""

    AUTO = "auto"
    REQUIRE = "require"
    OFF = "off"


@dataclass(frozen=True, kw_only=True)
class AttestOptions:
    """How a client attests instances.

    ``collateral``: Intel collateral at hand (e.g. :func:`~pqe2ee.attest.capture.
    load_collateral_dir`); ``pcs_url`` / ``root_ca_crl_url``: where missing collateral is
    fetched (``None``: offline, only what is at hand); ``wall_clock``: Unix seconds for the
    verification time (the client's own clock, never corrected by the relay's ``Date``);
    ``nonce_factory``: the evidence nonce (64 hex digits), fresh and random by default.
    """

    mode: AttestMode = AttestMode.AUTO
    policy: Policy = field(default_factory=Policy)
    collateral: Collateral = field(default_factory=Collateral, compare=False)
    pcs_url: str | None = INTEL_PCS_URL
    root_ca_crl_url: str | None = INTEL_ROOT_CA_CRL_URL
    wall_clock: Callable[[], float] = field(default=time.time, compare=False)
    #: Collateral fetched is also written here (capture layout) and read back at start, so a
    #: later run can verify offline until the collateral's nextUpdate.
    cache_dir: Path | None = None
    #: Replaces Intel's SGX root in dcap-qvl: only for a test root of trust (tests of the
    #: evidence endpoints with a test signer). Production leaves it None; no CLI flag sets it.
    test_intel_root_der: bytes | None = field(default=None, repr=False)
    #: A fresh evidence nonce per fetch (a test hook: a replayed capture needs its own nonce).
    nonce_factory: Callable[[], str] = field(default=new_nonce, compare=False)

    #: The verdicts, evidence and pins of every client made with these options (shared, like
    #: a Negotiator: the proxy's per-key transports share one gate).
    gate: AttestationGate = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", AttestMode(self.mode))
        object.__setattr__(self, "gate", AttestationGate(self))


def key_id(e2e_pubkey: str) -> str:
    return hashlib.sha256(e2e_pubkey.encode("ascii")).hexdigest()


@dataclass
class _Evidence:
    nonce_hex: str
    bundle: EvidenceBundle
    fetched_at: float


class AttestationGate:
    """Cached verdicts and evidence per chute; the pinned chutes; the chutes warned about."""

    def __init__(self, options: AttestOptions) -> None:
        self.options = options
        self.lock = threading.Lock()
        self.collateral = options.collateral
        self._verdicts: dict[tuple[str, str, str], tuple[Verdict, float]] = {}
        self._evidence: dict[str, _Evidence] = {}
        self.pinned: set[str] = set()
        self.loaded: set[Path] = set()  # cache directories already read
        self._warned: set[str] = set()
        self._unattested: dict[str, float] = {}  # chute -> until when "no evidence" holds

    @property
    def policy(self) -> Policy:
        return self.options.policy

    def verdict(self, chute: str, instance_id: str, e2e_pubkey: str, now: float) -> Verdict | None:
        """A verdict still valid for this (chute, instance, key), or ``None``."""
        hit = self._verdicts.get((chute, instance_id, key_id(e2e_pubkey)))
        if hit is None or now >= hit[1]:
            return None
        return hit[0]

    def record(self, chute: str, e2e_pubkey: str, verdict: Verdict, expires: float | None) -> None:
        """Keep ``verdict`` until ``max_age`` (or the collateral's ``expires``) runs out; a
        trusted one pins the chute to verification."""
        until = verdict.verified_at + self.policy.max_age
        if expires is not None:
            until = min(until, expires)
        if len(self._verdicts) >= _MAX_ENTRIES:
            self._verdicts.clear()
        self._verdicts[(chute, verdict.instance_id, key_id(e2e_pubkey))] = (verdict, until)
        self._unattested.pop(chute, None)
        if verdict.trusted:
            self.pinned.add(chute)

    def rejected(self, chute: str, now: float) -> tuple[Verdict, ...]:
        """The still-valid rejections of this chute's instances."""
        return tuple(
            verdict
            for (c, _, _), (verdict, until) in self._verdicts.items()
            if c == chute and not verdict.trusted and now < until
        )

    def evidence(
        self, chute: str, instance_id: str, now: float
    ) -> tuple[str, EvidenceBundle] | None:
        """Evidence fetched for this chute within ``max_age`` that covers ``instance_id``."""
        got = self._evidence.get(chute)
        if got is None or now - got.fetched_at >= self.policy.max_age:
            return None
        bundle = got.bundle
        if instance_id not in bundle.entries and instance_id not in bundle.failed:
            return None  # a new instance: ask again (with a new nonce)
        return got.nonce_hex, bundle

    def store_evidence(
        self, chute: str, nonce_hex: str, bundle: EvidenceBundle, now: float
    ) -> None:
        if len(self._evidence) >= _MAX_ENTRIES:
            self._evidence.clear()
        self._evidence[chute] = _Evidence(nonce_hex, bundle, now)
        self._unattested.pop(chute, None)

    def known_unattested(self, chute: str, now: float) -> bool:
        """The chute served no evidence less than :data:`UNATTESTED_RECHECK` seconds ago (and is
        not pinned since): ``auto`` mode sends to it without asking again. Never true while a
        verdict on one of its instances may still hold (so no such verdict needs looking up)."""
        until = self._unattested.get(chute)
        return until is not None and now < until and chute not in self.pinned

    def unattested(self, chute: str, why: str, now: float | None = None) -> bool:
        """The chute served no evidence (``why``). Raises in ``require`` mode and for a pinned
        chute (``attest_downgrade``); else remembers that (from ``now``, see
        :meth:`known_unattested`) and returns True the first time (warn once)."""
        if chute in self.pinned:
            raise AttestationError(
                f"chute {chute} was verified before but now {why}",
                code=ErrorCode.ATTEST_DOWNGRADE,
            )
        if self.options.mode is AttestMode.REQUIRE:
            raise AttestationError(
                f"attestation required but chute {chute} {why}",
                code=ErrorCode.ATTEST_EVIDENCE_MISSING,
            )
        first = chute not in self._warned
        if len(self._warned) >= _MAX_ENTRIES:
            self._warned.clear()
        self._warned.add(chute)
        if now is not None and not self.rejected(chute, now):
            if len(self._unattested) >= _MAX_ENTRIES:
                self._unattested.clear()
            self._unattested[chute] = now + min(UNATTESTED_RECHECK, self.policy.max_age)
        return first

    def add_collateral(self, extra: Collateral) -> None:
        self.collateral = self.collateral.merged(extra)
