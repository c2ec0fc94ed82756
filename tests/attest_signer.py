"""A TEST-ONLY TDX quote signer: quotes and Intel-shaped collateral under a test root of trust.

Never imported by src/: production code verifies against Intel's root (dcap-qvl's built-in);
only tests pass this signer's root to ``dcap_qvl.verify_with_root_ca`` (through
``verify_instance(..., intel_root_der=...)``), so the *real* verifier checks every signature,
chain, CRL, TCB level and QE identity. What is real here comes from a captured quote
(../shared/attestation): the TD report's TCB fields, the QE report, the PCK certificate's SGX
extension (FMSPC, TCB SVNs) and Intel's TCB info / QE identity text, which the test TCB signer
re-signs. What is ours: every key, certificate and CRL, the attestation key, the report_data.

Quote v4 layout used (Intel TDX DCAP Quote Generation Library, "Quote Format"): 48-byte header,
584-byte TD report, u32 signature-data length, then ECDSA signature (64) over header+report,
attestation public key (64, raw x||y), certification data type 6 (u16) and size (u32) holding
the QE report (384), its signature by the PCK key (64), QE auth data (u16 size + bytes) and
certification data type 5 (PCK chain, PEM).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from attest_support import capture
from pqe2ee.attest.collateral import Collateral

SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
HEADER, TD_REPORT = 48, 584
REPORT_DATA_AT = HEADER + 520  # report_data: the last 64 bytes of the TD 1.0 report
TD_ATTRIBUTES_AT = HEADER + 120


def _raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pqe2ee test only"),
        ]
    )


@dataclass
class _Node:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()


def _cert(
    cn: str,
    issuer: _Node | None,
    *,
    ca: bool,
    extra: list[x509.ExtensionType] = (),  # type: ignore[assignment]
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> _Node:
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=not ca,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
    )
    signer = issuer.key if issuer else key
    aki_key = issuer.key.public_key() if issuer else key.public_key()
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(aki_key), critical=False
    )
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return _Node(key, builder.sign(signer, hashes.SHA256()))


def _crl(issuer: _Node, this: datetime.datetime, nxt: datetime.datetime) -> bytes:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(this)
        .next_update(nxt)
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.DER)


class TestQuoteSigner:
    """Test root -> PCK Platform CA -> PCK leaf (with a real SGX extension); root -> TCB signer;
    an attestation key; a real captured quote as the template. :meth:`quote` signs a TDX quote
    for any report_data; :attr:`collateral` verifies it (with :attr:`root_der`) while the
    template's TCB info is valid, i.e. at :attr:`now`."""

    __test__ = False  # not a pytest class

    def __init__(self, template_capture: str = "glm-5-tee-2026-06-29") -> None:
        cap = capture(template_capture)
        self.now = cap.captured_at.timestamp()
        entry = next(iter(cap.evidence.entries.values()))
        self.template = base64.b64decode(str(entry["quote"]))
        t0 = cap.captured_at - datetime.timedelta(days=30)
        t1 = cap.captured_at + datetime.timedelta(days=3650)
        self.root = _cert("pqe2ee TEST SGX Root CA", None, ca=True, not_before=t0, not_after=t1)
        self.platform = _cert(
            "pqe2ee TEST SGX PCK Platform CA", self.root, ca=True, not_before=t0, not_after=t1
        )
        real_pck = self._template_pck()
        sgx_ext = real_pck.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value
        self.pck = _cert(
            "pqe2ee TEST SGX PCK Certificate",
            self.platform,
            ca=False,
            extra=[sgx_ext],
            not_before=t0,
            not_after=t1,
        )
        self.tcb_signer = _cert(
            "pqe2ee TEST SGX TCB Signing", self.root, ca=False, not_before=t0, not_after=t1
        )
        self.attestation_key = ec.generate_private_key(ec.SECP256R1())
        self.root_der = self.root.cert.public_bytes(serialization.Encoding.DER)
        crl_next = cap.captured_at + datetime.timedelta(days=30)
        real = cap.collateral
        tcb = next(t for t in real.tcb_infos if t.valid_at(self.now))
        qe = next(q for q in real.qe_identities if q.valid_at(self.now))
        chain = self.tcb_signer.pem + self.root.pem
        self.collateral = Collateral(
            tcb_infos=(self._resigned(tcb, chain),),
            qe_identities=(self._resigned(qe, chain),),
            pck_crls=(
                ("platform", _crl(self.platform, t0, crl_next), self.platform.pem + self.root.pem),
            ),
            root_ca_crl=_crl(self.root, t0, crl_next),
        )

    def _resigned(self, doc: Any, chain: str) -> Any:
        """Intel's document text as it is, signed by the test TCB signer."""
        signature = _raw_sig(self.tcb_signer.key, doc.raw.encode())
        return dataclasses.replace(doc, signature=signature, issuer_chain=chain)

    def _template_pck(self) -> x509.Certificate:
        q = self.template
        pos = HEADER + TD_REPORT + 4 + 64 + 64
        ctype6 = struct.unpack_from("<H", q, pos)[0]
        assert ctype6 == 6  # QE report certification data
        inner = pos + 6
        qe_auth_len = struct.unpack_from("<H", q, inner + 384 + 64)[0]
        cert_at = inner + 384 + 64 + 2 + qe_auth_len
        ctype, csize = struct.unpack_from("<HI", q, cert_at)
        assert ctype == 5
        pem = q[cert_at + 6 : cert_at + 6 + csize]
        return x509.load_pem_x509_certificates(pem)[0]

    def quote(self, report_data: bytes, *, debug: bool = False) -> bytes:
        """A TDX quote v4 of the template TD with ``report_data`` (64 bytes), signed by the
        attestation key, certified by the test PCK chain."""
        assert len(report_data) == 64
        q = self.template
        body = bytearray(q[: HEADER + TD_REPORT])
        body[REPORT_DATA_AT : REPORT_DATA_AT + 64] = report_data
        if debug:
            body[TD_ATTRIBUTES_AT] |= 1
        signature = _raw_sig(self.attestation_key, bytes(body))
        nums = self.attestation_key.public_key().public_numbers()
        att_pub = nums.x.to_bytes(32, "big") + nums.y.to_bytes(32, "big")
        pos = HEADER + TD_REPORT + 4 + 64 + 64 + 6
        qe_report = bytearray(q[pos : pos + 384])
        qe_auth_len = struct.unpack_from("<H", q, pos + 384 + 64)[0]
        qe_auth = q[pos + 384 + 64 + 2 : pos + 384 + 64 + 2 + qe_auth_len]
        qe_report[320:384] = hashlib.sha256(att_pub + qe_auth).digest() + bytes(32)
        qe_sig = _raw_sig(self.pck.key, bytes(qe_report))
        chain = (self.pck.pem + self.platform.pem + self.root.pem).encode()
        cert5 = struct.pack("<HI", 5, len(chain)) + chain
        cert6_body = bytes(qe_report) + qe_sig + struct.pack("<H", len(qe_auth)) + qe_auth + cert5
        cert6 = struct.pack("<HI", 6, len(cert6_body)) + cert6_body
        sig_data = signature + att_pub + cert6
        return bytes(body) + struct.pack("<I", len(sig_data)) + sig_data
