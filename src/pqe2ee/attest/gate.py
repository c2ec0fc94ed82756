"""The client's attestation state: modes, cached verdicts and evidence, pinned chutes (pure).

The transports do the fetching (:mod:`pqe2ee.transports._async._attest`); this module decides.
Verification happens once per (chute, instance, key) and its verdict is reused until the
policy's ``max_age`` or the collateral's earliest ``nextUpdate``, whichever comes first. A chute
once verified is pinned: if it later comes back without evidence, that is ``attest_downgrade``,
never a quiet unattested send. So is a chute the model listing ever called confidential compute
(``confidential_compute: true`` in ``/v1/models``, :func:`confidential_chutes`): it is expected to
serve evidence from its first request on, and stays expected when a later listing drops the flag. Not thread-safe by itself: callers hold :attr:`AttestationGate.lock`
around each call (never across I/O).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from pqe2ee._json import json_decode
from pqe2ee.attest.collateral import Collateral
from pqe2ee.attest.nras import NRAS_JWKS_URL, NRAS_URL
from pqe2ee.attest.policy import Policy, Verdict
from pqe2ee.attest.verify import EvidenceBundle, new_nonce
from pqe2ee.errors import AttestationError, ErrorCode

__all__ = [
    "INTEL_PCS_URL",
    "INTEL_ROOT_CA_CRL_URL",
    "AttestMode",
    "AttestOptions",
    "AttestationGate",
    "ChuteAttestation",
    "confidential_chutes",
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
    #: GPU mode ``nras`` (policy ``gpu="nras"``): where the GPU evidence is POSTed with H, and
    #: NVIDIA's JWKS whose keys must have signed the answer (cached ``nras_jwks_ttl`` seconds;
    #: fetched again once when a token names a key not in it).
    nras_url: str = NRAS_URL
    nras_jwks_url: str = NRAS_JWKS_URL
    nras_jwks_ttl: float = 3600.0

    #: The verdicts, evidence and pins of every client made with these options (shared, like
    #: a Negotiator: the proxy's per-key transports share one gate).
    gate: AttestationGate = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", AttestMode(self.mode))
        object.__setattr__(self, "gate", AttestationGate(self))


def confidential_chutes(doc: bytes) -> frozenset[str]:
    """The chute ids a ``/v1/models`` listing marks ``confidential_compute: true`` (the field
    Chutes sets on TEE chutes); rows of another shape are skipped, and a listing that is not
    JSON lists none (the model resolver reports that)."""
    try:
        listing = json_decode(doc)
    except (ValueError, UnicodeDecodeError):
        return frozenset()
    rows = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(rows, list):
        return frozenset()
    return frozenset(
        row["chute_id"].lower()
        for row in rows
        if isinstance(row, dict)
        and row.get("confidential_compute") is True
        and isinstance(row.get("chute_id"), str)
    )


@functools.lru_cache(maxsize=64)
def key_id(e2e_pubkey: str) -> str:
    """The SHA-256 (hex) of the keys a verdict is for: kept, as every request to an instance
    already judged looks its verdict up by it."""
    return hashlib.sha256(e2e_pubkey.encode("ascii")).hexdigest()


@dataclass
class _Evidence:
    nonce_hex: str
    bundle: EvidenceBundle
    fetched_at: float


@dataclass(frozen=True)
class ChuteAttestation:
    """What the gate knows about one chute (for a status page; no key, no evidence bytes).

    ``state``: ``trusted`` (an instance's newest verdict is trusted), ``rejected`` (verdicts,
    none trusted), ``unattested`` (the chute served no evidence: ``why``) or ``not yet``.
    ``verdicts``: the newest verdict per instance with the time it may be reused until;
    ``pending``: instances named in the evidence fetched but not verified yet.
    """

    chute: str
    state: str
    verdicts: tuple[tuple[Verdict, float], ...] = ()
    pending: tuple[str, ...] = ()
    why: str | None = None
    pinned: bool = False


class AttestationGate:
    """Cached verdicts and evidence per chute; the pinned chutes; the chutes warned about."""

    def __init__(self, options: AttestOptions) -> None:
        self.options = options
        self.lock = threading.Lock()
        self.collateral = options.collateral
        self._verdicts: dict[tuple[str, str, str], tuple[Verdict, float]] = {}
        self._evidence: dict[str, _Evidence] = {}
        self.pinned: set[str] = set()
        self.listed: set[str] = set()  # listed as confidential compute, ever (sticky)
        self.nras_keys: dict[
            str, ec.EllipticCurvePublicKey
        ] = {}  # NVIDIA's JWKS keys by kid (GPU mode nras)
        self.nras_keys_at: float | None = None  # when they were fetched (wall clock)
        self.loaded: set[Path] = set()  # cache directories already read
        self._warned: dict[str, str] = {}  # chutes that served no evidence: why
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

    def note_listing(self, confidential: Iterable[str]) -> None:
        """Chutes a model listing called confidential compute: from now on they must serve
        evidence (never forgotten, so a listing that later hides the flag changes nothing)."""
        for chute in confidential:
            if len(self.listed) >= _MAX_ENTRIES:
                break  # a hostile listing cannot grow memory without bound
            self.listed.add(chute.lower())

    def known_unattested(self, chute: str, now: float) -> bool:
        """The chute served no evidence less than :data:`UNATTESTED_RECHECK` seconds ago (and is
        not pinned since): ``auto`` mode sends to it without asking again. Never true while a
        verdict on one of its instances may still hold (so no such verdict needs looking up)."""
        until = self._unattested.get(chute)
        return (
            until is not None
            and now < until
            and chute not in self.pinned
            and chute.lower() not in self.listed
        )

    def unattested(self, chute: str, why: str, now: float | None = None) -> bool:
        """The chute served no evidence (``why``). Raises in ``require`` mode, and
        ``attest_downgrade`` for a pinned chute or one listed as confidential compute; else
        remembers that (from ``now``, see :meth:`known_unattested`) and returns True the first
        time (warn once)."""
        if chute in self.pinned:
            raise AttestationError(
                f"chute {chute} was verified before but now {why}",
                code=ErrorCode.ATTEST_DOWNGRADE,
            )
        if chute.lower() in self.listed:
            raise AttestationError(
                f"chute {chute} is listed as confidential compute but {why}",
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
        self._warned[chute] = why
        if now is not None and not self.rejected(chute, now):
            if len(self._unattested) >= _MAX_ENTRIES:
                self._unattested.clear()
            self._unattested[chute] = now + min(UNATTESTED_RECHECK, self.policy.max_age)
        return first

    def summary(self) -> dict[str, ChuteAttestation]:
        """Every chute the gate has seen, by chute id (call under :attr:`lock`)."""
        newest: dict[str, dict[str, tuple[Verdict, float]]] = {}
        for (chute, instance, _), (verdict, until) in self._verdicts.items():
            got = newest.setdefault(chute, {}).get(instance)
            if got is None or verdict.verified_at >= got[0].verified_at:
                newest[chute][instance] = (verdict, until)
        out: dict[str, ChuteAttestation] = {}
        for chute in {*newest, *self._evidence, *self._warned, *self.pinned}:
            verdicts = tuple(sorted(newest.get(chute, {}).values(), key=lambda v: v[0].instance_id))
            ev = self._evidence.get(chute)
            named = set(ev.bundle.entries) | set(ev.bundle.failed) if ev else set()
            pending = tuple(sorted(named - set(newest.get(chute, {}))))
            if any(v.trusted for v, _ in verdicts):
                state = "trusted"
            elif verdicts:
                state = "rejected"
            elif chute in self._warned:
                state = "unattested"
            else:
                state = "not yet"
            why = self._warned.get(chute) if state == "unattested" else None
            out[chute] = ChuteAttestation(
                chute, state, verdicts, pending, why, chute in self.pinned
            )
        return out

    def add_collateral(self, extra: Collateral) -> None:
        self.collateral = self.collateral.merged(extra)
