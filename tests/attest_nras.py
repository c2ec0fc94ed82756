"""A loopback stand-in for NVIDIA's NRAS (``POST /v3/attest/gpu``, ``GET /.well-known/jwks.json``)
for the ``nras`` GPU mode tests. It signs ES384 tokens with a **test-only** P-384 key that its
own JWKS publishes; the production verifier (:mod:`pqe2ee.attest.nras`) checks them exactly as
it checks NVIDIA's. Its judgement is deliberately simple: a GPU passes when the SPDM requester
nonce inside its evidence equals the request's ``nonce`` (as NRAS answers NONCE_NOT_MATCHING
otherwise). ``mode`` turns on the faults the tests need; ``"capture"`` serves a real captured
NRAS answer and NVIDIA's real JWKS byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pqe2ee.attest.nras import NRAS_ISSUER

KID = "test-only-nras-key"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_token(key: ec.EllipticCurvePrivateKey, claims: dict[str, Any], kid: str = KID) -> str:
    head = _b64url(json.dumps({"kid": kid, "alg": "ES384"}).encode())
    body = _b64url(json.dumps(claims).encode())
    der = key.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    return f"{head}.{body}.{_b64url(r.to_bytes(48) + s.to_bytes(48))}"


def jwk(key: ec.EllipticCurvePrivateKey, kid: str = KID) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-384",
        "kid": kid,
        "x": _b64url(numbers.x.to_bytes(48)),
        "y": _b64url(numbers.y.to_bytes(48)),
    }


def gpu_claims(nonce: str, now: float, ok: bool) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": NRAS_ISSUER,
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + 3600,
        "eat_nonce": nonce,
        "hwmodel": "GH100 A01 GSP BROM",
        "secboot": True,
        "dbgstat": "disabled",
        "measres": "success",
        "x-nvidia-gpu-arch-check": True,
        "x-nvidia-gpu-attestation-report-nonce-match": True,
        "x-nvidia-gpu-attestation-report-signature-verified": True,
    }
    if not ok:
        claims["x-nvidia-gpu-attestation-report-nonce-match"] = False
        claims["x-nvidia-error-details"] = {"code": 4010, "message": "NONCE_NOT_MATCHING"}
    return claims


def nras_answer(
    key: ec.EllipticCurvePrivateKey,
    nonce: str,
    gpus: list[dict[str, Any]],
    now: float,
    *,
    kid: str = KID,
) -> list[Any]:
    """``[["JWT", overall], {"GPU-i": token}]`` for these per-GPU claims."""
    detached = {f"GPU-{i}": sign_token(key, claims, kid) for i, claims in enumerate(gpus)}
    overall = {
        "iss": NRAS_ISSUER,
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + 3600,
        "eat_nonce": nonce,
        "x-nvidia-ver": "2.0",
        "x-nvidia-overall-att-result": all(
            "x-nvidia-error-details" not in c and c["measres"] == "success" for c in gpus
        ),
        "submods": {
            name: ["DIGEST", ["SHA-256", hashlib.sha256(token.encode()).hexdigest()]]
            for name, token in detached.items()
        },
    }
    return [["JWT", sign_token(key, overall, kid)], detached]


@dataclass
class StandInNras:
    clock: float  # what iat/nbf/exp are made from (the tests' capture time)
    mode: str = "ok"  # ok | other-key | measurements | down | capture
    capture: Path | None = None  # for mode "capture": a folder with nvidia-nras-*.body
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP384R1())
    )
    kid: str = KID
    nonces: list[str] = field(default_factory=list)  # the nonce of every attest request
    jwks_fetches: int = 0

    def app(self) -> Starlette:
        async def attest(request: Request) -> Response:
            doc = json.loads(await request.body())
            self.nonces.append(doc["nonce"])
            if self.mode == "down":
                return JSONResponse({"detail": "unavailable"}, status_code=503)
            if self.mode == "capture":
                assert self.capture is not None
                body = (self.capture / "nvidia-nras-answer.body").read_bytes()
                return Response(body, media_type="application/json")
            gpus = []
            for item in doc["evidence_list"]:
                spdm = base64.b64decode(item["evidence"])
                claims = gpu_claims(doc["nonce"], self.clock, spdm[4:36].hex() == doc["nonce"])
                if self.mode == "measurements":
                    claims["measres"] = "fail"
                gpus.append(claims)
            signer = self.key
            if self.mode == "other-key":
                signer = ec.generate_private_key(ec.SECP384R1())
            return JSONResponse(nras_answer(signer, doc["nonce"], gpus, self.clock, kid=self.kid))

        async def jwks(request: Request) -> Response:
            self.jwks_fetches += 1
            if self.mode == "capture":
                assert self.capture is not None
                body = (self.capture / "nvidia-nras-jwks.body").read_bytes()
                return Response(body, media_type="application/json")
            return JSONResponse({"keys": [jwk(self.key, self.kid)]})

        return Starlette(
            routes=[
                Route("/v3/attest/gpu", attest, methods=["POST"]),
                Route("/.well-known/jwks.json", jwks),
            ]
        )
