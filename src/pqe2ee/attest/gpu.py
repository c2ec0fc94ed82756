"""NVIDIA GPU evidence: SPDM 1.1 GET_MEASUREMENTS, verified offline (pure: bytes, time, root).

Each ``gpu_evidence`` entry holds the SPDM GET_MEASUREMENTS request (37 bytes: version 0x11,
code 0xE0, param1 0x01 = signature requested, param2 = operation, 32-byte requester nonce,
slot) followed by the MEASUREMENTS response, whose last 96 bytes are a raw ``r || s`` ECDSA
P-384 signature over SHA-384(request || response-without-signature), made by the leaf of the
GPU's certificate chain. The chain must reach NVIDIA's Device Identity CA as **pinned here**
(never the root the chain carries), and the requester nonce must be ``report_data[0:32]`` of
the TDX quote, which binds the GPUs to the same nonce and key as the TD.

Not checked here: the measurement values themselves against NVIDIA's RIMs, and revocation
(OCSP) of the GPU certificates; both need NVIDIA's online services.
"""

from __future__ import annotations

import base64
import binascii
import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from pqe2ee.attest.policy import Check
from pqe2ee.errors import ErrorCode

__all__ = ["SpdmMeasurements", "nvidia_root", "parse_spdm", "verify_gpu"]

_REQUEST_LEN = 37
_SIG_LEN = 96
_MAX_CHAIN = 8
_MAX_EVIDENCE = 1 << 20


@dataclass(frozen=True)
class SpdmMeasurements:
    """A parsed GET_MEASUREMENTS exchange."""

    requester_nonce: bytes
    responder_nonce: bytes
    blocks: tuple[tuple[int, bytes], ...]  # (index, measurement bytes)
    signed: bytes  # request || response without signature
    signature: bytes  # raw r || s


class _Bad(Exception):
    pass


def parse_spdm(evidence: bytes) -> SpdmMeasurements:
    """Parse request + MEASUREMENTS response; :class:`ValueError` when malformed."""
    try:
        return _parse(evidence)
    except _Bad as exc:
        raise ValueError(str(exc)) from None


def _parse(ev: bytes) -> SpdmMeasurements:
    if len(ev) > _MAX_EVIDENCE or len(ev) < _REQUEST_LEN + 8 + 32 + 2 + _SIG_LEN:
        raise _Bad(f"SPDM evidence of {len(ev)} bytes")
    req, resp = ev[:_REQUEST_LEN], ev[_REQUEST_LEN:]
    if req[0] != 0x11 or req[1] != 0xE0 or not req[2] & 1:
        raise _Bad("not an SPDM 1.1 signed GET_MEASUREMENTS request")
    if resp[0] != 0x11 or resp[1] != 0x60:
        raise _Bad("not an SPDM 1.1 MEASUREMENTS response")
    n_blocks = resp[4]
    rec_len = int.from_bytes(resp[5:8], "little")
    off = 8 + rec_len
    if off + 32 + 2 > len(resp):
        raise _Bad("measurement record runs past the end")
    record = resp[8:off]
    responder_nonce = resp[off : off + 32]
    off += 32
    opaque_len = int.from_bytes(resp[off : off + 2], "little")
    off += 2 + opaque_len
    if off + _SIG_LEN != len(resp):
        raise _Bad("response length does not match its fields")
    blocks: list[tuple[int, bytes]] = []
    pos = 0
    for _ in range(n_blocks):
        if pos + 4 > len(record):
            raise _Bad("measurement block header runs past the record")
        size = int.from_bytes(record[pos + 2 : pos + 4], "little")
        if pos + 4 + size > len(record):
            raise _Bad("measurement block runs past the record")
        blocks.append((record[pos], record[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    if pos != len(record):
        raise _Bad("measurement record has trailing bytes")
    return SpdmMeasurements(
        requester_nonce=req[4:36],
        responder_nonce=responder_nonce,
        blocks=tuple(blocks),
        signed=req + resp[:off],
        signature=resp[off:],
    )


def nvidia_root() -> x509.Certificate:
    """NVIDIA's Device Identity CA (self-signed P-384), pinned in this package."""
    pem = resources.files("pqe2ee.attest").joinpath("nvidia-device-identity-root.pem")
    return x509.load_pem_x509_certificate(pem.read_bytes())


def _valid_at(cert: x509.Certificate, now: float) -> bool:
    when = datetime.fromtimestamp(now, UTC)
    return cert.not_valid_before_utc <= when <= cert.not_valid_after_utc


@functools.lru_cache(maxsize=256)
def _issued_by(cert_der: bytes, issuer_der: bytes) -> bool:
    """``cert`` carries ``issuer``'s name as its issuer and its signature verifies with that
    key. A pure function of the two certificates' bytes, so its answer is kept: the
    intermediates of a host's GPUs are the same certificates (times are checked per call)."""
    cert = x509.load_der_x509_certificate(cert_der)
    issuer = x509.load_der_x509_certificate(issuer_der)
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _chain_ok(chain: list[x509.Certificate], root: x509.Certificate, now: float) -> str | None:
    """``None`` when chain[0] leads to ``root`` (each link valid at ``now``), else why not."""
    root_der = root.public_bytes(Encoding.DER)
    ders = [cert.public_bytes(Encoding.DER) for cert in chain]
    for i, cert in enumerate(chain):
        if ders[i] == root_der:
            return None if i > 0 else "the leaf is the root"
        if not _valid_at(cert, now):
            return f"certificate {i} is not valid at the verification time"
        if _issued_by(ders[i], root_der):
            return None
        if i + 1 == len(chain):
            return "the chain does not reach the pinned NVIDIA root"
        if not _issued_by(ders[i], ders[i + 1]):
            return f"certificate {i} is not issued by certificate {i + 1}"
    return "empty chain"


def verify_gpu(
    index: int,
    entry: object,
    expected_nonce: bytes,
    root: x509.Certificate,
    now: float,
) -> Check:
    """Verify one ``gpu_evidence`` entry; the :class:`Check` says why it failed."""
    name = f"gpu[{index}]"
    if not isinstance(entry, dict):
        return Check(name, False, ErrorCode.ATTEST_EVIDENCE_MALFORMED, "not an object")
    try:
        evidence = base64.b64decode(entry.get("evidence", ""), validate=True)
        chain_pem = base64.b64decode(entry.get("certificate", ""), validate=True)
        exchange = parse_spdm(evidence)
        chain = x509.load_pem_x509_certificates(chain_pem)
    except (binascii.Error, ValueError, TypeError) as exc:
        return Check(name, False, ErrorCode.ATTEST_EVIDENCE_MALFORMED, _short(exc))
    if len(chain) > _MAX_CHAIN:
        return Check(name, False, ErrorCode.ATTEST_GPU_CHAIN, f"{len(chain)} certificates")
    why = _chain_ok(chain, root, now)
    if why is not None:
        return Check(name, False, ErrorCode.ATTEST_GPU_CHAIN, why)
    key = chain[0].public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        return Check(name, False, ErrorCode.ATTEST_GPU_CHAIN, "leaf key is not P-384")
    r = int.from_bytes(exchange.signature[:48], "big")
    s = int.from_bytes(exchange.signature[48:], "big")
    try:
        key.verify(encode_dss_signature(r, s), exchange.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return Check(name, False, ErrorCode.ATTEST_GPU_SIGNATURE, "SPDM signature")
    if exchange.requester_nonce != expected_nonce:
        return Check(name, False, ErrorCode.ATTEST_GPU_NONCE, "requester nonce is not H")
    arch = entry.get("arch")
    return Check(
        name,
        True,
        detail=f"{arch if isinstance(arch, str) else '?'}, {len(exchange.blocks)} measurements",
    )


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]
