"""The engine's attestation step: before a prompt is sealed, the leased instance's key must be
vouched for by TEE evidence (or the chute must be one that serves none, in ``auto`` mode).

Written once, as async code; ``scripts/unasync.py`` generates the blocking twin
(``_sync/_attest.py``). The decisions are :class:`~pqe2ee.attest.gate.AttestationGate`'s and
the checks :func:`~pqe2ee.attest.verify.verify_instance`'s (pure); this module does the I/O:
``GET {api_base}/chutes/{chute}/evidence?nonce=<fresh 64 hex>`` and, for a quote whose FMSPC has
no collateral at hand, Intel's TCB info, QE identity and CRLs from ``pcs_url``.

:meth:`AsyncAttestor.admit` takes the engine's lease: a trusted instance passes; a rejected one
is dropped from the pool (it is never sent a prompt) and another lease is tried; when none is
left, ``attest_failed`` is raised (with the verdicts) before any byte of the prompt leaves.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from pqe2ee.attest.capture import load_collateral_dir, save_answer
from pqe2ee.attest.collateral import Collateral, collateral_from_answer, collateral_urls
from pqe2ee.attest.gate import AttestationGate, AttestMode, AttestOptions, confidential_chutes
from pqe2ee.attest.nras import NrasResult, nras_request, parse_jwks, token_kids
from pqe2ee.attest.policy import GpuMode, Verdict
from pqe2ee.attest.tdx import parse_quote
from pqe2ee.attest.verify import EvidenceBundle, nonce_binding, parse_evidence, verify_instance
from pqe2ee.errors import AttestationError, ErrorCode, MalformedError, PQE2EEError, RelayError
from pqe2ee.protocol.client import Negotiated
from pqe2ee.protocol.discovery import Lease
from pqe2ee.protocol.v2.negotiation import parse_v2_offer
from pqe2ee.transports._common import MAX_DOC, MAX_ERROR_BODY
from pqe2ee.transports._offload import async_offload

if TYPE_CHECKING:
    from pqe2ee.transports._async._bounded import AsyncBoundedPort

__all__ = ["AsyncAttestor"]

log = logging.getLogger("pqe2ee.attest")

_MAX_ROUNDS = 64
_JWKS_REFETCH = 60.0  # an unknown kid refetches NVIDIA's JWKS at most this often (seconds)


class _AsyncLeaser(Protocol):
    """What the attestor needs from the engine."""

    def drop(self, lease: Lease) -> None: ...

    async def _lease(
        self, port: AsyncBoundedPort, chute: str, auth: str | None, deadline: float
    ) -> tuple[Lease, Negotiated]: ...


class AsyncAttestor:
    """One engine's attestation: its gate (verdicts, evidence, pins) and the fetching."""

    def __init__(self, options: AttestOptions, api_base: str) -> None:
        self.options = options
        self.gate: AttestationGate = options.gate  # shared by every client of these options
        self.api_base = api_base
        self._guard = options.gate.lock
        cache = options.cache_dir
        if cache is not None and cache.is_dir() and cache not in self.gate.loaded:
            try:
                cached = load_collateral_dir(cache)
            except AttestationError as exc:  # a damaged cache is refetched, not fatal
                log.warning("collateral cache %s unusable: %s", cache, exc.message)
                cached = Collateral()
            with self._guard:  # once per gate: what earlier runs fetched (select() skips stale)
                self.gate.loaded.add(cache)
                self.gate.add_collateral(cached)

    async def admit(
        self,
        engine: _AsyncLeaser,
        port: AsyncBoundedPort,
        chute: str,
        found: tuple[Lease, Negotiated],
        auth: str | None,
        deadline: float,
    ) -> tuple[Lease, Negotiated]:
        """``found``, or another lease whose instance passed; raises before anything is sent
        when no instance passes (``attest_failed``) or the chute cannot be verified."""
        if self.options.mode is AttestMode.OFF:
            return found
        rejected: list[Verdict] = []
        gate = self.gate
        for _ in range(_MAX_ROUNDS):
            lease, negotiated = found
            now = self.options.wall_clock()
            with self._guard:  # (looked at here: no call of _verdict for an unattested chute)
                if gate.known_unattested(chute, now):  # auto: no evidence a moment ago (warned)
                    return found
            verdict = await self._verdict(port, chute, lease, auth, now)
            if verdict is None:  # auto mode, a chute without evidence (warned once)
                return found
            if verdict.trusted:
                if negotiated.version != 1 and not verdict.v2_bound:
                    raise AttestationError(
                        "the quote binds only the v1 e2e_pubkey; this request would be sealed "
                        "to an unattested v2 key (spec/v2.md §8.3)",
                        code=ErrorCode.ATTEST_FAILED,
                    )
                return found
            rejected.append(verdict)
            log.warning(
                "chute %s instance %s failed attestation: %s",
                chute,
                lease.instance_id,
                ",".join(r.value for r in verdict.reasons),
            )
            engine.drop(lease)
            try:
                found = await engine._lease(port, chute, auth, deadline)
            except RelayError as exc:
                if exc.code is not ErrorCode.NO_INSTANCES:
                    raise
                break
        raise _failed(chute, rejected)

    def note_listing(self, doc: bytes) -> None:
        """A model listing was loaded: its confidential-compute chutes must serve evidence."""
        listed = confidential_chutes(doc)
        if listed:
            with self._guard:
                self.gate.note_listing(listed)

    def no_instances(self, chute: str, exc: RelayError) -> None:
        """The pool has no instance left: when that is because they failed attestation, say so
        (``attest_failed``) instead of ``no_instances``."""
        if exc.code is not ErrorCode.NO_INSTANCES or self.options.mode is AttestMode.OFF:
            return
        with self._guard:
            rejected = self.gate.rejected(chute, self.options.wall_clock())
        if rejected:
            raise _failed(chute, rejected) from exc

    async def _verdict(
        self, port: AsyncBoundedPort, chute: str, lease: Lease, auth: str | None, now: float
    ) -> Verdict | None:
        """The verdict on ``lease``'s instance at ``now`` (its chute not known unattested)."""
        gate = self.gate
        pubkey, v2_pk, keys = _key_strings(lease.public_key, _v2_public_key(lease, now))
        with self._guard:
            verdict = gate.verdict(chute, lease.instance_id, keys, now)
            cached = gate.evidence(chute, lease.instance_id, now)
        if verdict is not None:
            return verdict
        if cached is None:
            nonce_hex = self.options.nonce_factory()
            bundle = await self._fetch_evidence(port, chute, nonce_hex, auth, now)
            if bundle is None:
                return None
            with self._guard:
                gate.store_evidence(chute, nonce_hex, bundle, now)
        else:
            nonce_hex, bundle = cached
        entry = (
            None if lease.instance_id in bundle.failed else bundle.entries.get(lease.instance_id)
        )
        expires = None
        if entry is not None:
            expires = await self._ensure_collateral(port, entry.get("quote"), now)
        nras = None
        if entry is not None and gate.policy.gpu is GpuMode.NRAS:
            h = nonce_binding(nonce_hex, pubkey, v2_pk)  # the GPUs' requester nonce
            nras = await self._nras(port, entry.get("gpu_evidence"), h)
        collateral, policy = gate.collateral, gate.policy
        verdict = await async_offload(
            functools.partial(
                verify_instance,
                lease.instance_id,
                pubkey,
                entry,
                nonce_hex,
                collateral,
                policy,
                now,
                e2e_v2_pk=v2_pk,
                intel_root_der=self.options.test_intel_root_der,
                nras=nras,
            )
        )
        with self._guard:
            gate.record(chute, keys, verdict, expires)
        return verdict

    async def _fetch_evidence(
        self, port: AsyncBoundedPort, chute: str, nonce_hex: str, auth: str | None, now: float
    ) -> EvidenceBundle | None:
        url = f"{self.api_base}/chutes/{chute}/evidence?nonce={nonce_hex}"
        headers = [("Accept", "application/json")]
        if auth:
            headers.append(("Authorization", f"Bearer {auth}"))
        response = await port.send("GET", url, headers, b"", control=True)
        status = response.status
        body = await port.aread(response, MAX_DOC * 4 if status == 200 else MAX_ERROR_BODY)
        why = None
        if status != 200:
            why = f"answered {status} for its evidence"
        else:
            bundle = parse_evidence(body)  # malformed evidence: fail closed
            if not bundle.entries and not bundle.failed:
                why = "served an empty evidence list"
        if why is not None:
            with self._guard:
                first = self.gate.unattested(chute, why, now)
            if first:
                log.warning("chute %s %s: its instances are NOT attested", chute, why)
            return None
        return bundle

    async def _nras(
        self, port: AsyncBoundedPort, gpu_evidence: object, h: bytes
    ) -> NrasResult | None:
        """NRAS's answer for these GPUs sent with ``h``, and the JWKS keys to check it with;
        ``None`` when there is no GPU evidence (the verdict says ``attest_gpu_missing``)."""
        if not isinstance(gpu_evidence, list) or not gpu_evidence:
            return None
        try:
            body = nras_request(gpu_evidence, h)
        except AttestationError as exc:
            return NrasResult(error=exc.message, code=exc.code)
        headers = [("Content-Type", "application/json"), ("Accept", "application/json")]
        forgiven: tuple[type[BaseException], ...] = (PQE2EEError, *port.port.network_errors)
        try:
            response = await port.send("POST", self.options.nras_url, headers, body, control=True)
            status = response.status
            answer = await port.aread(response, MAX_DOC * 4 if status == 200 else MAX_ERROR_BODY)
        except forgiven as exc:
            return NrasResult(error=f"NRAS unreachable ({type(exc).__name__})")
        if status != 200:
            return NrasResult(error=f"NRAS answered {status}")
        try:
            keys = await self._nras_keys(port, token_kids(answer))
        except forgiven as exc:
            why = exc.message if isinstance(exc, AttestationError) else type(exc).__name__
            return NrasResult(error=f"NVIDIA JWKS unusable ({why})")
        return NrasResult(answer=answer, keys=keys)

    async def _nras_keys(
        self, port: AsyncBoundedPort, kids: frozenset[str]
    ) -> dict[str, ec.EllipticCurvePublicKey]:
        """NVIDIA's JWKS keys, cached ``nras_jwks_ttl`` seconds; fetched again (at most every
        minute) when the answer names a key the cache lacks (NVIDIA rotates them daily)."""
        gate, now = self.gate, self.options.wall_clock()
        with self._guard:
            keys, fetched_at = dict(gate.nras_keys), gate.nras_keys_at
        fresh = fetched_at is not None and now - fetched_at < self.options.nras_jwks_ttl
        lacking = not kids <= keys.keys()
        recent = fetched_at is not None and now - fetched_at < _JWKS_REFETCH
        if keys and fresh and not (lacking and not recent):
            return keys
        response = await port.send(
            "GET", self.options.nras_jwks_url, [("Accept", "application/json")], b"", control=True
        )
        status = response.status
        body = await port.aread(response, MAX_DOC if status == 200 else MAX_ERROR_BODY)
        if status != 200:
            raise AttestationError(f"answered {status}", code=ErrorCode.ATTEST_UNAVAILABLE)
        keys = parse_jwks(body)
        with self._guard:
            gate.nras_keys, gate.nras_keys_at = keys, now
        return keys

    async def _ensure_collateral(
        self, port: AsyncBoundedPort, quote_b64: object, now: float
    ) -> float | None:
        """Fetch Intel collateral for this quote's FMSPC when none at hand is valid now;
        returns the earliest nextUpdate of what will be used (``None`` if there is none)."""
        try:
            quote = parse_quote(base64.b64decode(str(quote_b64), validate=True))
        except (ValueError, AttestationError) as exc:
            if isinstance(exc, AttestationError) and exc.code is ErrorCode.ATTEST_UNAVAILABLE:
                raise
            return None  # the verdict will say the quote is malformed
        selected = self.gate.collateral.select(quote.fmspc, quote.ca, now)
        if selected is None and self.options.pcs_url is not None:
            fetched = await self._fetch_collateral(port, quote.fmspc, quote.ca)
            with self._guard:
                self.gate.add_collateral(fetched)
            selected = self.gate.collateral.select(quote.fmspc, quote.ca, now)
        return None if selected is None else selected.expires

    async def _fetch_collateral(self, port: AsyncBoundedPort, fmspc: str, ca: str) -> Collateral:
        pcs = self.options.pcs_url
        assert pcs is not None
        urls = collateral_urls(pcs, fmspc, ca)
        if self.options.root_ca_crl_url and not self.gate.collateral.root_crl_valid(
            self.options.wall_clock()
        ):
            urls["intel-root-ca-crl"] = self.options.root_ca_crl_url
        found = Collateral()
        forgiven: tuple[type[BaseException], ...] = (PQE2EEError, *port.port.network_errors)
        for name, url in urls.items():
            try:
                response = await port.send("GET", url, [], b"", control=True)
                status = response.status
                body = await port.aread(response, MAX_DOC)
            except forgiven as exc:
                log.warning("collateral fetch failed (%s): %s", url, type(exc).__name__)
                continue
            if status != 200:
                log.warning("collateral fetch answered %d: %s", status, url)
                continue
            headers: dict[str, list[str]] = {}
            for key, value in response.headers:
                headers.setdefault(key.decode("latin-1").lower(), []).append(
                    value.decode("latin-1")
                )
            try:
                found = found.merged(collateral_from_answer(url, headers, body))
            except AttestationError as exc:
                log.warning("collateral answer unusable (%s): %s", url, exc.message)
                continue
            if self.options.cache_dir is not None:
                tag = hashlib.sha256(url.encode()).hexdigest()[:12]
                try:
                    save_answer(self.options.cache_dir, f"{name}-{tag}", url, status, headers, body)
                except OSError as exc:
                    log.warning("collateral cache not written: %s", type(exc).__name__)
        return found


def _v2_public_key(lease: Lease, now: float) -> bytes | None:
    """The row's valid ``e2e_v2`` key, which the quote must then bind; an invalid offer
    counts as absent (spec/v2.md §8.1)."""
    try:
        offer = parse_v2_offer(lease.extra, now)
    except MalformedError:
        return None
    return None if offer is None else offer.public_key


@functools.lru_cache(maxsize=64)
def _key_strings(public_key: bytes, v2_public_key: bytes | None) -> tuple[str, str | None, str]:
    """The v1 key and the v2 key (if any) in base64, and both as the gate keys its verdicts
    by (``"v1[,v2]"``). Kept: a client seals to the same few instance keys call after call,
    and the same string object lets the gate's :func:`~pqe2ee.attest.gate.key_id` find its
    digest without hashing ~3 KB again."""
    pubkey = base64.b64encode(public_key).decode("ascii")
    if v2_public_key is None:
        return pubkey, None, pubkey
    v2_pk = base64.b64encode(v2_public_key).decode("ascii")
    return pubkey, v2_pk, f"{pubkey},{v2_pk}"


def _failed(chute: str, rejected: Sequence[Verdict]) -> AttestationError:
    reasons = sorted({r.value for v in rejected for r in v.reasons})
    return AttestationError(
        f"no instance of chute {chute} passed attestation ({len(rejected)} rejected: "
        f"{', '.join(reasons)})",
        code=ErrorCode.ATTEST_FAILED,
        verdicts=tuple(rejected),
    )
