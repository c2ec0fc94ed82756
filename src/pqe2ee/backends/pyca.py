"""pyca/cryptography adapter (the default backend): ML-KEM-768 and ChaCha20-Poly1305."""

from __future__ import annotations

from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pqe2ee.backends.base import (
    AEAD,
    CHACHA_KEY_LEN,
    CHACHA_NONCE_LEN,
    CHACHA_TAG_LEN,
    KEM,
    CheckedCipher,
    HeldKey,
    KEMPrivateKey,
    check_mlkem768_seed,
    refused_public_key,
    tag_mismatch,
)

__all__ = ["PycaAEAD", "PycaKEM"]


class _PycaPrivateKey(HeldKey[mlkem.MLKEM768PrivateKey], KEMPrivateKey):
    __slots__ = ()

    def __init__(self, key: mlkem.MLKEM768PrivateKey) -> None:
        super().__init__(key, key.public_key().public_bytes_raw())

    def _decapsulate(self, key: mlkem.MLKEM768PrivateKey, ciphertext: bytes) -> bytes:
        return key.decapsulate(ciphertext)

    def seed(self) -> bytes | None:
        return None if self._key is None else self._key.private_bytes_raw()


@lru_cache(maxsize=64)
def _public_key(public_key: bytes) -> mlkem.MLKEM768PublicKey:
    """A parsed encapsulation key, kept: a client encapsulates to the same few instance keys
    request after request, and parsing (with its modulus check) is ~16 of pyca's ~35 us. A key
    pyca refuses raises and is not kept."""
    return mlkem.MLKEM768PublicKey.from_public_bytes(public_key)


class PycaKEM(KEM):
    name = "pyca"

    def generate(self) -> KEMPrivateKey:
        return _PycaPrivateKey(mlkem.MLKEM768PrivateKey.generate())

    def from_seed(self, seed: bytes) -> KEMPrivateKey:
        check_mlkem768_seed(seed)
        return _PycaPrivateKey(mlkem.MLKEM768PrivateKey.from_seed_bytes(seed))

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        try:
            pk = _public_key(bytes(public_key))
        except ValueError:
            raise refused_public_key(public_key, "cryptography") from None
        shared_secret, ciphertext = pk.encapsulate()  # pyca returns (ss, ct)
        return ciphertext, shared_secret


class _PycaCipher(CheckedCipher):
    __slots__ = ()
    tag_error = InvalidTag

    def __init__(self, key: bytes) -> None:
        cipher = ChaCha20Poly1305(key)
        super().__init__(cipher.encrypt, cipher.decrypt)


class PycaAEAD(AEAD):
    name = "pyca"

    def _cipher(self, key: bytes) -> CheckedCipher:
        return _PycaCipher(key)

    # One message per key (a v1 envelope): pyca's cipher called at once, no object of ours.
    # Arguments the checked path would refuse take it, for its typed error.

    def seal(self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes | None = None) -> bytes:
        if len(key) != CHACHA_KEY_LEN or len(nonce) != CHACHA_NONCE_LEN:
            return super().seal(key, nonce, plaintext, aad)
        return ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)

    def open(self, key: bytes, nonce: bytes, data: bytes, aad: bytes | None = None) -> bytes:
        if (
            len(key) != CHACHA_KEY_LEN
            or len(nonce) != CHACHA_NONCE_LEN
            or len(data) < CHACHA_TAG_LEN
        ):
            return super().open(key, nonce, data, aad)
        try:
            return ChaCha20Poly1305(key).decrypt(nonce, data, aad)
        except InvalidTag:
            raise tag_mismatch() from None
