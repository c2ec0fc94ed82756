"""Evidence -> verdicts: the whole per-instance verification, pure (bytes, time, policy).

The Chutes evidence answer (``GET /chutes/{chute}/evidence?nonce=<64 hex>``) is
``{"evidence": [{"instance_id", "quote", "gpu_evidence": [...], "certificate"}],
"failed_instance_ids": [...]}``. Entries are matched to discovery by ``instance_id``; the quote's
``report_data`` must bind our nonce and the **discovered** key:

* ``report_data[0:32] = SHA-256(ascii(nonce_hex) || ascii(e2e_pubkey exactly as discovered))``
* ``report_data[32:64] = SHA-256(SPKI DER of the entry's certificate)``
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pqe2ee._json import json_decode
from pqe2ee.attest.collateral import Collateral
from pqe2ee.attest.gpu import nvidia_root, verify_gpu
from pqe2ee.attest.nras import NrasResult, check_nras
from pqe2ee.attest.policy import Check, GpuMode, Policy, Verdict
from pqe2ee.attest.tdx import check_quote, load_qvl, parse_quote
from pqe2ee.errors import AttestationError, ErrorCode

__all__ = [
    "EvidenceBundle",
    "new_nonce",
    "nonce_binding",
    "parse_evidence",
    "verify_evidence",
    "verify_instance",
]

_MAX_EVIDENCE = 16 << 20


def new_nonce() -> str:
    """A fresh evidence nonce: 64 lowercase hex digits."""
    return secrets.token_hex(32)


def nonce_binding(nonce_hex: str, e2e_pubkey: str, e2e_v2_pk: str | None = None) -> bytes:
    """``report_data[0:32]`` for this nonce and key (H; also the GPUs' requester nonce).

    Chutes: ``SHA-256(ascii(nonce_hex) || ascii(e2e_pubkey))``. An instance that offers v2
    binds its X-Wing key too (spec/v2.md §8.3): ``SHA-256(ascii(nonce_hex) || ascii(e2e_pubkey)
    || "," || ascii(e2e_v2.pk))`` (',' is in neither alphabet, so the forms cannot collide).
    """
    data = nonce_hex.encode("ascii") + e2e_pubkey.encode("ascii")
    if e2e_v2_pk is not None:
        data += b"," + e2e_v2_pk.encode("ascii")
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class EvidenceBundle:
    """A parsed evidence answer: entries by instance id, and the ids the API says failed."""

    entries: Mapping[str, Mapping[str, object]]
    failed: frozenset[str]


def parse_evidence(body: bytes) -> EvidenceBundle:
    """Parse the evidence answer; ``attest_evidence_malformed`` for a wrong shape."""

    def bad(message: str) -> AttestationError:
        return AttestationError(f"evidence: {message}", code=ErrorCode.ATTEST_EVIDENCE_MALFORMED)

    if len(body) > _MAX_EVIDENCE:
        raise bad(f"{len(body)} bytes")
    try:
        doc = json_decode(body)
    except (ValueError, UnicodeDecodeError):
        raise bad("not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("evidence", []), list):
        raise bad("not an object with an 'evidence' list")
    entries: dict[str, Mapping[str, object]] = {}
    for entry in doc.get("evidence", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("instance_id"), str):
            raise bad("an entry without an instance_id")
        if entry["instance_id"] in entries:
            raise bad("two entries for one instance")
        entries[entry["instance_id"]] = entry
    failed = doc.get("failed_instance_ids") or []
    if not isinstance(failed, list) or not all(isinstance(i, str) for i in failed):
        raise bad("failed_instance_ids is not a list of ids")
    return EvidenceBundle(entries, frozenset(failed))


def _b64(value: object) -> bytes:
    if not isinstance(value, str):
        raise ValueError("not a string")
    return base64.b64decode(value, validate=True)


def verify_instance(
    instance_id: str,
    e2e_pubkey: str,
    entry: Mapping[str, object] | None,
    nonce_hex: str,
    collateral: Collateral,
    policy: Policy,
    now: float,
    *,
    qvl: ModuleType | None = None,
    gpu_root: x509.Certificate | None = None,
    intel_root_der: bytes | None = None,
    e2e_v2_pk: str | None = None,
    nras: NrasResult | None = None,
) -> Verdict:
    """Every check for one discovered instance; never raises for bad evidence (the verdict
    says what failed). ``e2e_v2_pk``: the row's v2 key (base64) when it offers v2, which the
    quote must then bind too. ``nras``: NRAS's answer for this entry's GPUs sent with H (GPU
    mode ``nras``; without it that mode fails ``attest_gpu_unsupported``). ``intel_root_der`` / ``gpu_root`` replace the pinned roots only
    in tests with the test signer."""
    qvl = qvl or load_qvl()
    if entry is None:
        return Verdict.from_checks(
            instance_id,
            [Check("evidence", False, ErrorCode.ATTEST_EVIDENCE_MISSING, "no evidence entry")],
            now,
        )
    checks: list[Check] = []
    try:
        raw = _b64(entry.get("quote"))
        quote = parse_quote(raw, qvl)
    except (ValueError, binascii.Error):
        return Verdict.from_checks(
            instance_id,
            [Check("quote", False, ErrorCode.ATTEST_EVIDENCE_MALFORMED, "quote is not base64")],
            now,
        )
    except AttestationError as exc:
        return Verdict.from_checks(instance_id, [Check("quote", False, exc.code, exc.message)], now)
    result = check_quote(raw, quote, collateral, policy, now, qvl, intel_root_der)
    checks.extend(result.checks)
    h = nonce_binding(nonce_hex, e2e_pubkey, e2e_v2_pk)
    bound = hmac.compare_digest(quote.report_data[:32], h)
    checks.append(
        Check(
            "nonce_binding",
            bound,
            None if bound else ErrorCode.ATTEST_NONCE_BINDING,
            "report_data[0:32]",
        )
    )
    if policy.require_cert_binding:
        checks.append(_cert_binding(entry.get("certificate"), quote.report_data[32:64]))
    gpus_checked = gpus_ok = 0
    notes: list[str] = []
    if policy.gpu is GpuMode.VERIFY:
        gpu_entries = entry.get("gpu_evidence") or []
        if not isinstance(gpu_entries, list) or not gpu_entries:
            checks.append(Check("gpus", False, ErrorCode.ATTEST_GPU_MISSING, "no GPU evidence"))
        else:
            root = gpu_root or nvidia_root()
            for i, gpu in enumerate(gpu_entries[:64]):
                check = verify_gpu(i, gpu, h, root, now)
                checks.append(check)
                gpus_checked += 1
                gpus_ok += check.ok
    elif policy.gpu is GpuMode.NRAS:
        gpu_entries = entry.get("gpu_evidence") or []
        if not isinstance(gpu_entries, list) or not gpu_entries:
            checks.append(Check("gpus", False, ErrorCode.ATTEST_GPU_MISSING, "no GPU evidence"))
        elif nras is None or (nras.answer is None and nras.error is None):
            checks.append(
                Check("gpus", False, ErrorCode.ATTEST_GPU_UNSUPPORTED, "no NRAS answer at hand")
            )
        elif nras.answer is None:
            checks.append(Check("nras", False, nras.code, str(nras.error)))
        else:
            found = check_nras(nras.answer, nras.keys, h, min(len(gpu_entries), 64), now)
            checks.extend(found)
            per_gpu = [c for c in found if c.name.startswith("gpu")]
            gpus_checked, gpus_ok = len(per_gpu), sum(c.ok for c in per_gpu)
    else:
        notes.append("gpus_not_checked")
    if policy.measurements is None:
        notes.append("measurements_not_pinned")
    return Verdict.from_checks(
        instance_id,
        checks,
        now,
        tcb_status=result.tcb_status,
        advisory_ids=result.advisory_ids,
        fmspc=quote.fmspc,
        measurements=quote.measurements,
        measurements_pinned=policy.measurements is not None,
        gpus_checked=gpus_checked,
        gpus_ok=gpus_ok,
        notes=tuple(notes),
        v2_bound=e2e_v2_pk is not None,
    )


def _cert_binding(value: object, expected: bytes) -> Check:
    try:
        cert = x509.load_der_x509_certificate(_b64(value))
        spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, binascii.Error, TypeError):
        return Check(
            "cert_binding", False, ErrorCode.ATTEST_CERT_BINDING, "no readable certificate"
        )
    ok = hmac.compare_digest(hashlib.sha256(spki).digest(), expected)
    return Check(
        "cert_binding", ok, None if ok else ErrorCode.ATTEST_CERT_BINDING, "report_data[32:64]"
    )


def verify_evidence(
    instances: Mapping[str, str],
    evidence: EvidenceBundle,
    nonce_hex: str,
    collateral: Collateral,
    policy: Policy,
    now: float,
    *,
    gpu_root: x509.Certificate | None = None,
    intel_root_der: bytes | None = None,
    v2_keys: Mapping[str, str] | None = None,
) -> list[Verdict]:
    """One verdict per discovered instance (``instance_id -> e2e_pubkey``), in order;
    ``v2_keys``: ``instance_id -> e2e_v2.pk`` of the rows that offer v2."""
    qvl = load_qvl()
    verdicts = []
    for instance_id, pubkey in instances.items():
        entry = None if instance_id in evidence.failed else evidence.entries.get(instance_id)
        verdict = verify_instance(
            instance_id,
            pubkey,
            entry,
            nonce_hex,
            collateral,
            policy,
            now,
            qvl=qvl,
            gpu_root=gpu_root,
            intel_root_der=intel_root_der,
            e2e_v2_pk=(v2_keys or {}).get(instance_id),
        )
        verdicts.append(verdict)
    return verdicts
