"""Every key derivation of both wire profiles, in one place, over one HKDF-SHA256.

The keyed hash itself is a backend primitive (:mod:`pqe2ee.backends.kdf`); this module only
arranges labels:

* v1 (ML-KEM-768 envelopes and streams)::

      key = HKDF-SHA256(ikm=shared_secret, salt=kem_ciphertext[:16], info=label, L=32)

  with the labels :data:`INFO_REQUEST`, :data:`INFO_RESPONSE`, :data:`INFO_STREAM`;
* v2 (RFC 9180 HPKE, suite X-Wing / HKDF-SHA256 / ChaCha20-Poly1305): ``LabeledExtract`` and
  ``LabeledExpand`` (RFC 9180 §4) with the ``HPKE-v1`` version label and the suite id; the v2
  response keys (``pqe2ee.protocol.v2.records``) use the plain :func:`hkdf_extract` /
  :func:`hkdf_expand`.
"""

from __future__ import annotations

from typing import Final

from pqe2ee.backends.kdf import HASH_LEN, hkdf, hkdf_expand, hkdf_extract
from pqe2ee.errors import ErrorCode, LocalProtocolError

__all__ = [
    "HASH_LEN",
    "HPKE_VERSION_LABEL",
    "INFO_REQUEST",
    "INFO_RESPONSE",
    "INFO_STREAM",
    "KEY_LEN",
    "SALT_LEN",
    "derive_key",
    "hkdf_expand",
    "hkdf_extract",
    "labeled_expand",
    "labeled_extract",
]

# -- v1 ----------------------------------------------------------------------------------------

INFO_REQUEST: Final = b"e2e-req-v1"
INFO_RESPONSE: Final = b"e2e-resp-v1"
INFO_STREAM: Final = b"e2e-stream-v1"
SALT_LEN: Final = 16
KEY_LEN: Final = 32


def derive_key(shared_secret: bytes, kem_ciphertext: bytes, info: bytes) -> bytes:
    """The 32-byte ChaCha20-Poly1305 key for one direction of one v1 exchange."""
    return hkdf(kem_ciphertext[:SALT_LEN], shared_secret, info, KEY_LEN)


# -- v2 (HPKE) ---------------------------------------------------------------------------------

HPKE_VERSION_LABEL: Final = b"HPKE-v1"


def labeled_extract(salt: bytes, label: bytes, ikm: bytes, *, suite_id: bytes) -> bytes:
    """``LabeledExtract(salt, label, ikm)`` of RFC 9180 §4 for ``suite_id``."""
    return hkdf_extract(salt, b"".join((HPKE_VERSION_LABEL, suite_id, label, ikm)))


def labeled_expand(prk: bytes, label: bytes, info: bytes, length: int, *, suite_id: bytes) -> bytes:
    """``LabeledExpand(prk, label, info, L)`` of RFC 9180 §4 for ``suite_id``."""
    if length > 0xFFFF:
        raise LocalProtocolError(
            "LabeledExpand length out of range", code=ErrorCode.INVALID_ARGUMENT
        )
    labeled_info = b"".join((length.to_bytes(2, "big"), HPKE_VERSION_LABEL, suite_id, label, info))
    return hkdf_expand(prk, labeled_info, length)
