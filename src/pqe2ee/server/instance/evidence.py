"""``GET /evidence?nonce=<64 hex>``: the instance's TEE evidence in the Chutes shape.

``report_data[0:32]`` binds the caller's nonce and the instance's keys exactly as a verifying
client checks them (:func:`pqe2ee.attest.verify.nonce_binding`: the v1 ``e2e_pubkey`` string,
and the v2 key when v2 is served, spec/v2.md §8.3); ``report_data[32:64]`` is SHA-256 of the
SubjectPublicKeyInfo of a certificate made at start-up (its key stays in memory). The quote
comes from a provider: Linux configfs-tsm in a TDX guest (:mod:`pqe2ee.attest.tsm`); tests pass
their own. This instance has no GPU evidence (``gpu_evidence`` is empty).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio.to_thread
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from starlette.requests import Request
from starlette.responses import Response

from pqe2ee.attest.verify import nonce_binding
from pqe2ee.errors import AttestationError
from pqe2ee.server._asgi import json_response
from pqe2ee.server.instance.exchange import RequestLog

if TYPE_CHECKING:
    from pqe2ee.server.instance.app import Instance

__all__ = ["EvidenceService", "QuoteProvider"]

logger = logging.getLogger("pqe2ee.instance")

#: ``provider(report_data: 64 bytes) -> raw quote`` (blocking; run off the event loop).
QuoteProvider = Callable[[bytes], bytes]
_NONCE = re.compile(r"[0-9a-f]{64}")


def _certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attestation-service")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


class EvidenceService:
    """The evidence endpoint of one instance."""

    def __init__(self, instance: Instance, provider: QuoteProvider) -> None:
        self.instance = instance
        self.provider = provider
        self.certificate = _certificate()
        spki = (
            x509.load_der_x509_certificate(self.certificate)
            .public_key()
            .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        )
        self._spki_hash = hashlib.sha256(spki).digest()

    def report_data(self, nonce_hex: str) -> bytes:
        offer = self.instance.v2_offer()
        v2_pk = offer["pk"] if offer is not None else None
        keys = self.instance.keys
        return nonce_binding(nonce_hex, keys.pubkey_b64, v2_pk) + self._spki_hash

    async def evidence(self, request: Request) -> Response:
        log = RequestLog("GET", "/evidence")
        nonce = request.query_params.get("nonce", "")
        if not _NONCE.fullmatch(nonce):
            log.emit(400, "invalid_argument")
            return json_response({"detail": "nonce must be 64 lowercase hex digits"}, 400)
        try:
            quote = await anyio.to_thread.run_sync(self.provider, self.report_data(nonce))
        except AttestationError as exc:
            logger.warning("evidence: %s", exc.message)
            log.emit(503, exc.code.value)
            return json_response({"detail": "evidence unavailable"}, 503)
        log.emit(200, level=logging.DEBUG)
        return json_response(
            {
                "instance_id": self.instance.instance_id,
                "quote": base64.b64encode(quote).decode("ascii"),
                "certificate": base64.b64encode(self.certificate).decode("ascii"),
                "gpu_evidence": [],
            }
        )
