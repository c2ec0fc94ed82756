"""v1 key schedule: HKDF-SHA256 over the ML-KEM-768 shared secret.

key = HKDF-SHA256(ikm=shared_secret, salt=kem_ciphertext[:16], info=label, L=32)
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "INFO_REQUEST",
    "INFO_RESPONSE",
    "INFO_STREAM",
    "KEY_LEN",
    "SALT_LEN",
    "derive_key",
]

INFO_REQUEST: Final = b"e2e-req-v1"
INFO_RESPONSE: Final = b"e2e-resp-v1"
INFO_STREAM: Final = b"e2e-stream-v1"
SALT_LEN: Final = 16
KEY_LEN: Final = 32


def derive_key(shared_secret: bytes, kem_ciphertext: bytes, info: bytes) -> bytes:
    """The 32-byte ChaCha20-Poly1305 key for one direction of one exchange."""
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_LEN, salt=kem_ciphertext[:SALT_LEN], info=info
    ).derive(shared_secret)
