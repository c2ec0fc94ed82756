"""RFC 9180 HPKE, base mode, for the one v2 suite: X-Wing (0x647A), HKDF-SHA256 (0x0001),
ChaCha20-Poly1305 (0x0003).

Written once here over :mod:`pqe2ee.protocol.kdf` (the one HKDF of both profiles) and the AEAD
backend, because no installed library offers a context with AAD, sequence numbers and Export
for this suite (cryptography 50 only has single-shot encrypt/decrypt without AAD;
pycryptodome's HPKE hides Encap and its AEAD is slow).
Checked against the draft-ietf-hpke-pq test vector for this suite (key, base_nonce,
exporter_secret, every encryption, every export).

The X-Wing shared secret is the KEM shared secret as is (draft-ietf-hpke-pq: the KEM is used
directly, there is no DHKEM ExtractAndExpand step).
"""

from __future__ import annotations

from typing import Final

from pqe2ee.backends.base import AEAD, AEADCipher
from pqe2ee.backends.xwing import XWING_KEM_ID, XWing, XWingPrivateKey
from pqe2ee.errors import LimitExceeded
from pqe2ee.protocol import kdf
from pqe2ee.protocol.kdf import hkdf_expand, hkdf_extract

__all__ = [
    "AEAD_ID",
    "HPKE_SUITE_ID",
    "KDF_ID",
    "KEM_ID",
    "MODE_BASE",
    "NH",
    "NK",
    "NN",
    "RecipientContext",
    "SenderContext",
    "hkdf_expand",
    "hkdf_extract",
    "key_schedule_base",
    "labeled_expand",
    "labeled_extract",
    "open_base",
    "seal_base",
    "setup_base_r",
    "setup_base_s",
]

KEM_ID: Final = XWING_KEM_ID  # 0x647A
KDF_ID: Final = 0x0001  # HKDF-SHA256
AEAD_ID: Final = 0x0003  # ChaCha20-Poly1305
MODE_BASE: Final = 0x00
NK: Final = 32
NN: Final = 12
NH: Final = 32
HPKE_SUITE_ID: Final = (
    b"HPKE" + KEM_ID.to_bytes(2, "big") + KDF_ID.to_bytes(2, "big") + AEAD_ID.to_bytes(2, "big")
)
_MAX_SEQ: Final = (1 << (8 * NN)) - 1


def labeled_extract(
    salt: bytes, label: bytes, ikm: bytes, *, suite_id: bytes = HPKE_SUITE_ID
) -> bytes:
    """``LabeledExtract`` (RFC 9180 §4), by default for this suite."""
    return kdf.labeled_extract(salt, label, ikm, suite_id=suite_id)


def labeled_expand(
    prk: bytes, label: bytes, info: bytes, length: int, *, suite_id: bytes = HPKE_SUITE_ID
) -> bytes:
    """``LabeledExpand`` (RFC 9180 §4), by default for this suite."""
    return kdf.labeled_expand(prk, label, info, length, suite_id=suite_id)


class _Context:
    """Key, base nonce, exporter secret and sequence number of one HPKE context."""

    __slots__ = ("_cipher", "base_nonce", "exporter_secret", "key", "seq")

    def __init__(self, key: bytes, base_nonce: bytes, exporter_secret: bytes, aead: AEAD) -> None:
        self.key = key
        self.base_nonce = base_nonce
        self.exporter_secret = exporter_secret
        self.seq = 0
        self._cipher: AEADCipher = aead.new(key)

    def compute_nonce(self, seq: int) -> bytes:
        """``base_nonce XOR I2OSP(seq, Nn)`` (RFC 9180 §5.2)."""
        return (int.from_bytes(self.base_nonce, "big") ^ seq).to_bytes(NN, "big")

    def _next(self) -> None:
        if self.seq >= _MAX_SEQ:
            raise LimitExceeded("HPKE sequence number overflow")
        self.seq += 1

    def export(self, exporter_context: bytes, length: int) -> bytes:
        """``Export(exporter_context, L)`` (RFC 9180 §5.3)."""
        return labeled_expand(self.exporter_secret, b"sec", exporter_context, length)


class SenderContext(_Context):
    __slots__ = ()

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        """``ContextS.Seal(aad, pt)``: ciphertext || tag; advances the sequence number."""
        ct = self._cipher.encrypt(self.compute_nonce(self.seq), plaintext, aad)
        self._next()
        return ct


class RecipientContext(_Context):
    __slots__ = ()

    def open(self, aad: bytes, ciphertext: bytes) -> bytes:
        """``ContextR.Open(aad, ct)``; raises DecryptError; advances only on success."""
        pt = self._cipher.decrypt(self.compute_nonce(self.seq), ciphertext, aad)
        self._next()
        return pt


_PSK_ID_HASH: Final = labeled_extract(b"", b"psk_id_hash", b"")  # base mode: psk_id = ""


def _schedule(shared_secret: bytes, info: bytes) -> tuple[bytes, bytes, bytes]:
    info_hash = labeled_extract(b"", b"info_hash", info)
    ks_context = bytes((MODE_BASE,)) + _PSK_ID_HASH + info_hash
    secret = labeled_extract(shared_secret, b"secret", b"")
    return (
        labeled_expand(secret, b"key", ks_context, NK),
        labeled_expand(secret, b"base_nonce", ks_context, NN),
        labeled_expand(secret, b"exp", ks_context, NH),
    )


def key_schedule_base(shared_secret: bytes, info: bytes) -> tuple[bytes, bytes, bytes]:
    """``(key, base_nonce, exporter_secret)`` of KeySchedule(mode_base, ss, info, "", "")."""
    return _schedule(shared_secret, info)


def setup_base_s(
    public_key: bytes,
    info: bytes,
    *,
    xwing: XWing,
    aead: AEAD,
    eseed: bytes | None = None,
) -> tuple[bytes, SenderContext]:
    """``SetupBaseS(pkR, info)`` -> ``(enc, context)``. ``eseed`` derandomises (vectors only)."""
    if eseed is None:
        enc, shared_secret = xwing.encapsulate(public_key)
    else:
        enc, shared_secret = xwing.encapsulate_derand(public_key, eseed)
    return enc, SenderContext(*_schedule(shared_secret, info), aead)


def setup_base_r(
    enc: bytes, private_key: XWingPrivateKey, info: bytes, *, aead: AEAD
) -> RecipientContext:
    """``SetupBaseR(enc, skR, info)``."""
    shared_secret = private_key.decapsulate(enc)
    return RecipientContext(*_schedule(shared_secret, info), aead)


def seal_base(
    public_key: bytes,
    info: bytes,
    aad: bytes,
    plaintext: bytes,
    *,
    xwing: XWing,
    aead: AEAD,
    eseed: bytes | None = None,
) -> tuple[bytes, bytes, SenderContext]:
    """Single-shot ``Seal`` (seq 0): ``(enc, ciphertext, context)``; the context stays usable
    for Export."""
    enc, ctx = setup_base_s(public_key, info, xwing=xwing, aead=aead, eseed=eseed)
    return enc, ctx.seal(aad, plaintext), ctx


def open_base(
    enc: bytes,
    private_key: XWingPrivateKey,
    info: bytes,
    aad: bytes,
    ciphertext: bytes,
    *,
    aead: AEAD,
) -> tuple[bytes, RecipientContext]:
    """Single-shot ``Open`` (seq 0): ``(plaintext, context)``."""
    ctx = setup_base_r(enc, private_key, info, aead=aead)
    return ctx.open(aad, ciphertext), ctx
