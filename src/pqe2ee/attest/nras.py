"""GPU mode ``nras``: NVIDIA's Remote Attestation Service judges the GPUs; we check its tokens.

Pure: building the request, reading the JWKS and checking the answer are functions of bytes,
keys, H and time; the POST and the JWKS fetch are the transports' job
(:mod:`pqe2ee.transports._async._attest`).

* Request: ``POST {nras_url}`` (``/v3/attest/gpu``) with ``{"nonce": H.hex(), "arch",
  "evidence_list": [{"arch", "certificate", "evidence"}...]}``: the entry's GPU evidence as the
  Chutes API serves it, and **H = report_data[0:32]**, the GPUs' requester nonce (never the
  client nonce: NRAS then answers ``NONCE_NOT_MATCHING``, as the real capture shows).
* Answer: ``[["JWT", <overall token>], {"GPU-0": <token>, ...}]``. Every token is a JWS
  ``ES384`` signed by a key of NVIDIA's JWKS (``kid`` in the header; ``alg`` must be ``ES384``:
  no other algorithm is accepted, so no algorithm confusion). The overall token must say
  ``x-nvidia-overall-att-result: true`` for ``eat_nonce == H.hex()``, and its ``submods`` must
  hold ``SHA-256`` digests of exactly the GPU tokens returned (one per GPU sent). Each GPU token
  must carry ``eat_nonce == H.hex()``, ``measres: success``, ``secboot: true``,
  ``dbgstat: disabled``, and ``true`` for the report's nonce match, signature and arch check,
  with no ``x-nvidia-error-details``. ``iss``, ``nbf`` and ``exp`` are checked against the
  verification time.

Trust: the JWKS is taken from the configured URL over TLS; its ``x5c`` chain is not checked
against an NVIDIA root here (none is pinned). What NRAS checks (RIMs, OCSP) is NVIDIA's word.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from pqe2ee._json import json_decode
from pqe2ee.attest.policy import Check
from pqe2ee.errors import AttestationError, ErrorCode

__all__ = [
    "NRAS_ISSUER",
    "NRAS_JWKS_URL",
    "NRAS_URL",
    "NrasResult",
    "check_nras",
    "nras_request",
    "parse_jwks",
    "token_kids",
]

NRAS_URL = "https://nras.attestation.nvidia.com/v3/attest/gpu"
NRAS_JWKS_URL = "https://nras.attestation.nvidia.com/.well-known/jwks.json"
NRAS_ISSUER = "https://nras.attestation.nvidia.com"

#: Seconds of clock skew tolerated on ``nbf`` / ``exp``.
LEEWAY = 60.0
_MAX_TOKEN = 256 << 10
_MAX_KEYS = 256
_MAX_GPUS = 64
_GPU_TRUE = (
    "secboot",
    "x-nvidia-gpu-attestation-report-nonce-match",
    "x-nvidia-gpu-attestation-report-signature-verified",
    "x-nvidia-gpu-arch-check",
)

Keys = Mapping[str, ec.EllipticCurvePublicKey]


@dataclass(frozen=True)
class NrasResult:
    """What the transport got from NRAS for one instance: the answer body and the JWKS keys
    (by ``kid``), or ``error`` when NRAS or its JWKS could not be reached or read."""

    answer: bytes | None = None
    keys: Keys = field(default_factory=dict)
    error: str | None = None
    #: The reason code of ``error`` (``attest_unavailable``: NRAS or its JWKS not reachable).
    code: ErrorCode = ErrorCode.ATTEST_UNAVAILABLE


def nras_request(gpu_evidence: Sequence[object], h: bytes) -> bytes:
    """The NRAS request body for an entry's ``gpu_evidence`` and ``H`` (32 bytes).
    ``attest_evidence_malformed`` when an item is not ``{"certificate", "evidence"}`` strings."""
    items = []
    for gpu in gpu_evidence[:_MAX_GPUS]:
        if not isinstance(gpu, dict) or not all(
            isinstance(gpu.get(k), str) for k in ("certificate", "evidence")
        ):
            raise AttestationError(
                "evidence: a GPU item is not {certificate, evidence}",
                code=ErrorCode.ATTEST_EVIDENCE_MALFORMED,
            )
        arch = gpu.get("arch") if isinstance(gpu.get("arch"), str) else "HOPPER"
        items.append({"arch": arch, "certificate": gpu["certificate"], "evidence": gpu["evidence"]})
    arch = items[0]["arch"] if items else "HOPPER"
    return json.dumps({"nonce": h.hex(), "arch": arch, "evidence_list": items}).encode()


def parse_jwks(body: bytes) -> dict[str, ec.EllipticCurvePublicKey]:
    """The P-384 EC keys of a JWKS document, by ``kid`` (other keys are skipped);
    ``attest_unavailable`` when it is not a JWKS with at least one such key."""
    try:
        doc = json_decode(body)
        rows = doc["keys"]
        if not isinstance(rows, list):
            raise TypeError
    except (ValueError, UnicodeDecodeError, TypeError, KeyError):
        raise _unavailable("NRAS JWKS is not a JSON key set") from None
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for row in rows[:_MAX_KEYS]:
        if not isinstance(row, dict) or row.get("kty") != "EC" or row.get("crv") != "P-384":
            continue
        kid, x, y = row.get("kid"), row.get("x"), row.get("y")
        if not (isinstance(kid, str) and isinstance(x, str) and isinstance(y, str)):
            continue
        try:
            numbers = ec.EllipticCurvePublicNumbers(
                int.from_bytes(_b64url(x)), int.from_bytes(_b64url(y)), ec.SECP384R1()
            )
            keys[kid] = numbers.public_key()
        except (ValueError, binascii.Error):
            continue  # not a point on the curve
    if not keys:
        raise _unavailable("NRAS JWKS has no P-384 key")
    return keys


def _unavailable(message: str) -> AttestationError:
    return AttestationError(message, code=ErrorCode.ATTEST_UNAVAILABLE)


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token_kids(answer: bytes) -> frozenset[str]:
    """The ``kid`` of every token in an NRAS answer (unverified: only to know whether the
    cached JWKS can check them); empty for an answer of another shape."""
    try:
        doc = json_decode(answer)
        tokens = [doc[0][1], *doc[1].values()]
    except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
        return frozenset()
    kids = set()
    for token in tokens[: _MAX_GPUS + 1]:
        try:
            header = json_decode(_b64url(str(token).split(".", 1)[0]))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            continue
        if isinstance(header, dict) and isinstance(header.get("kid"), str):
            kids.add(header["kid"])
    return frozenset(kids)


class _TokenError(Exception):
    pass


def _verified_claims(token: object, keys: Keys) -> dict[str, Any]:
    """The claims of ``token`` once its ES384 signature verifies with a JWKS key."""
    if not isinstance(token, str) or len(token) > _MAX_TOKEN:
        raise _TokenError("not a token")
    parts = token.split(".")
    if len(parts) != 3:
        raise _TokenError("not a compact JWS")
    try:
        header = json_decode(_b64url(parts[0]))
        claims = json_decode(_b64url(parts[1]))
        signature = _b64url(parts[2])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise _TokenError("not base64url JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise _TokenError("header or claims not an object")
    if header.get("alg") != "ES384":
        raise _TokenError(f"alg {str(header.get('alg'))[:16]!r} is not ES384")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise _TokenError("signed by a key not in NVIDIA's JWKS")
    if len(signature) != 96:
        raise _TokenError("ES384 signature is not 96 bytes")
    der = encode_dss_signature(int.from_bytes(signature[:48]), int.from_bytes(signature[48:]))
    try:
        key.verify(der, f"{parts[0]}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, UnicodeEncodeError):
        raise _TokenError("signature does not verify") from None
    return claims


def _window(claims: Mapping[str, Any], issuer: str, now: float) -> str | None:
    """Why the claims' issuer or validity window is wrong at ``now``, or ``None``."""
    if claims.get("iss") != issuer:
        return f"issuer {str(claims.get('iss'))[:60]!r}"
    exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
    if not isinstance(exp, int | float) or isinstance(exp, bool) or now > exp + LEEWAY:
        return "expired (or no exp)"
    if isinstance(nbf, int | float) and not isinstance(nbf, bool) and now + LEEWAY < nbf:
        return "not yet valid"
    return None


def check_nras(
    answer: bytes, keys: Keys, h: bytes, gpus: int, now: float, *, issuer: str = NRAS_ISSUER
) -> list[Check]:
    """The checks of an NRAS answer for ``gpus`` GPUs sent with requester nonce ``h``: one
    ``nras`` check (the overall token) and one ``gpu<i>`` check per GPU token."""
    token_bad = ErrorCode.ATTEST_GPU_NRAS_TOKEN
    try:
        doc = json_decode(answer)
        overall_token = doc[0][1]
        detached = doc[1]
        if doc[0][0] != "JWT" or not isinstance(detached, dict):
            raise TypeError
    except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError):
        return [Check("nras", False, token_bad, "answer is not [[JWT, token], {GPU-i: token}]")]
    try:
        overall = _verified_claims(overall_token, keys)
    except _TokenError as exc:
        return [Check("nras", False, token_bad, f"overall token: {exc}")]
    why = _window(overall, issuer, now)
    if why is not None:
        return [Check("nras", False, token_bad, f"overall token: {why}")]
    expected = h.hex()
    checks: list[Check] = []
    nonce = overall.get("eat_nonce")
    if not isinstance(nonce, str) or not hmac.compare_digest(nonce.lower(), expected):
        checks.append(Check("nras", False, ErrorCode.ATTEST_GPU_NONCE, "eat_nonce is not H"))
    elif overall.get("x-nvidia-overall-att-result") is not True:
        checks.append(Check("nras", False, ErrorCode.ATTEST_GPU_NRAS, "overall result false"))
    else:
        checks.append(Check("nras", True, None, "overall result true"))
    submods = overall.get("submods")
    if not isinstance(submods, dict) or set(submods) != set(detached) or len(detached) != gpus:
        checks.append(
            Check("nras", False, token_bad, f"{len(detached)} GPU tokens for {gpus} GPUs sent")
        )
        return checks
    for name in sorted(detached)[:_MAX_GPUS]:
        checks.append(_gpu(name, detached[name], submods[name], keys, expected, issuer, now))
    return checks


def _gpu(
    name: str, token: object, digest: object, keys: Keys, expected: str, issuer: str, now: float
) -> Check:
    label = name.lower().replace("-", "")
    bad = ErrorCode.ATTEST_GPU_NRAS_TOKEN
    wanted = _sha256_digest(digest)
    if wanted is None or not isinstance(token, str):
        return Check(label, False, bad, "submods entry is not a SHA-256 digest")
    if not hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), wanted):
        return Check(label, False, bad, "token does not match the overall token's digest")
    try:
        claims = _verified_claims(token, keys)
    except _TokenError as exc:
        return Check(label, False, bad, str(exc))
    why = _window(claims, issuer, now)
    if why is not None:
        return Check(label, False, bad, why)
    errors = claims.get("x-nvidia-error-details")
    if errors is not None:
        message = errors.get("message") if isinstance(errors, dict) else errors
        code = ErrorCode.ATTEST_GPU_NRAS
        if message == "NONCE_NOT_MATCHING":
            code = ErrorCode.ATTEST_GPU_NONCE
        return Check(label, False, code, f"NRAS: {str(message)[:80]}")
    nonce = claims.get("eat_nonce")
    if not isinstance(nonce, str) or not hmac.compare_digest(nonce.lower(), expected):
        return Check(label, False, ErrorCode.ATTEST_GPU_NONCE, "eat_nonce is not H")
    failed = [k for k in _GPU_TRUE if claims.get(k) is not True]
    if str(claims.get("measres", "")).lower() != "success":
        failed.append("measres")
    if claims.get("dbgstat") != "disabled":
        failed.append("dbgstat")
    if failed:
        return Check(label, False, ErrorCode.ATTEST_GPU_NRAS, "NRAS: " + ",".join(failed))
    return Check(label, True, None, "NRAS")


def _sha256_digest(entry: object) -> str | None:
    """``["DIGEST", ["SHA-256", hex]]`` -> hex (lowercase), else ``None``."""
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == "DIGEST"):
        return None
    inner = entry[1]
    if isinstance(inner, list) and len(inner) == 2 and inner[0] == "SHA-256":
        return inner[1].lower() if isinstance(inner[1], str) else None
    return None
