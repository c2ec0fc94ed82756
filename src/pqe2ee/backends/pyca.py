"""pyca/cryptography adapter (the default backend): ML-KEM-768 and ChaCha20-Poly1305."""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pqe2ee.backends.base import (
    AEAD,
    CHACHA_KEY_LEN,
    CHACHA_NONCE_LEN,
    CHACHA_TAG_LEN,
    KEM,
    MLKEM768_CT_LEN,
    MLKEM768_PK_LEN,
    MLKEM768_SEED_LEN,
    AEADCipher,
    KEMPrivateKey,
)
from pqe2ee.errors import DecryptError, ErrorCode, LocalProtocolError, MalformedError

__all__ = ["PycaAEAD", "PycaKEM"]


class _PycaPrivateKey(KEMPrivateKey):
    __slots__ = ("_key", "_pk")

    def __init__(self, key: mlkem.MLKEM768PrivateKey) -> None:
        self._key: mlkem.MLKEM768PrivateKey | None = key
        self._pk = key.public_key().public_bytes_raw()

    @property
    def public_key(self) -> bytes:
        return self._pk

    def decapsulate(self, ciphertext: bytes) -> bytes:
        if len(ciphertext) != MLKEM768_CT_LEN:
            raise MalformedError(
                f"KEM ciphertext must be {MLKEM768_CT_LEN} bytes, got {len(ciphertext)}",
                code=ErrorCode.MALFORMED_BLOB,
            )
        if self._key is None:
            raise LocalProtocolError("key was wiped", code=ErrorCode.INVALID_KEY)
        return self._key.decapsulate(ciphertext)

    def seed(self) -> bytes | None:
        return None if self._key is None else self._key.private_bytes_raw()

    def wipe(self) -> None:
        self._key = None


class PycaKEM(KEM):
    name = "pyca"

    def generate(self) -> KEMPrivateKey:
        return _PycaPrivateKey(mlkem.MLKEM768PrivateKey.generate())

    def from_seed(self, seed: bytes) -> KEMPrivateKey:
        if len(seed) != MLKEM768_SEED_LEN:
            raise LocalProtocolError(
                f"ML-KEM-768 seed must be {MLKEM768_SEED_LEN} bytes, got {len(seed)}",
                code=ErrorCode.INVALID_KEY,
            )
        return _PycaPrivateKey(mlkem.MLKEM768PrivateKey.from_seed_bytes(seed))

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        if len(public_key) != MLKEM768_PK_LEN:
            raise LocalProtocolError(
                f"ML-KEM-768 public key must be {MLKEM768_PK_LEN} bytes, got {len(public_key)}",
                code=ErrorCode.INVALID_KEY,
            )
        try:
            pk = mlkem.MLKEM768PublicKey.from_public_bytes(public_key)
        except ValueError:
            raise LocalProtocolError(
                "ML-KEM-768 public key failed the FIPS 203 modulus check",
                code=ErrorCode.INVALID_KEY,
            ) from None
        shared_secret, ciphertext = pk.encapsulate()  # pyca returns (ss, ct)
        return ciphertext, shared_secret


class _PycaCipher(AEADCipher):
    __slots__ = ("_c",)

    def __init__(self, key: bytes) -> None:
        self._c = ChaCha20Poly1305(key)

    def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes | None = None) -> bytes:
        if len(nonce) != CHACHA_NONCE_LEN:
            raise LocalProtocolError("nonce must be 12 bytes", code=ErrorCode.INVALID_ARGUMENT)
        return self._c.encrypt(nonce, plaintext, aad)

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None = None) -> bytes:
        if len(nonce) != CHACHA_NONCE_LEN or len(data) < CHACHA_TAG_LEN:
            raise DecryptError("record too short or bad nonce length")
        try:
            return self._c.decrypt(nonce, data, aad)
        except InvalidTag:
            raise DecryptError("authentication tag did not verify") from None


class PycaAEAD(AEAD):
    name = "pyca"

    def new(self, key: bytes) -> AEADCipher:
        if len(key) != CHACHA_KEY_LEN:
            raise LocalProtocolError(
                "ChaCha20-Poly1305 key must be 32 bytes", code=ErrorCode.INVALID_KEY
            )
        return _PycaCipher(key)
