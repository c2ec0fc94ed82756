"""pqcrypto adapter: ML-KEM-768 only (no AEAD).

API facts (pqcrypto 1.0.0, a Rust extension; checked against the ACVP/Wycheproof vectors):

* ``pqcrypto.kem.ml_kem_768.keygen() -> (pk, sk)`` with ``pk`` the 1184-byte ``ek`` and ``sk`` the
  2400-byte expanded ``dk``; there is no seed (``d || z``) key generation, so ``from_seed`` stays
  unsupported;
* ``encaps(pk) -> (ct, ss)`` - ciphertext first; it performs the FIPS 203 modulus check and raises
  ``ValueError("invalid public key")``;
* ``decaps(sk, ct) -> ss`` - performs the FIPS 203 §7.3 hash check on ``sk``;
* arguments must be exactly ``bytes`` (``bytearray``/``memoryview`` raise ``TypeError``).

pqcrypto before 1.0 had a different API (``generate_keypair``/``encrypt``/``decrypt``) and is
refused with :class:`~pqe2ee.errors.BackendError`.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from pqe2ee.backends.base import (
    KEM,
    KEMPrivateKey,
    check_mlkem768_ciphertext,
    check_mlkem768_expanded_key,
    check_mlkem768_public_key,
    mlkem768_expanded_public_key,
)
from pqe2ee.errors import BackendError, ErrorCode, LocalProtocolError

__all__ = ["PqcryptoKEM"]


def _version() -> str:
    try:
        return importlib.metadata.version("pqcrypto")
    except importlib.metadata.PackageNotFoundError:
        import pqcrypto

        return str(getattr(pqcrypto, "__version__", "0"))


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


try:
    _VERSION = _version()
except ImportError:
    raise BackendError("pqcrypto is not installed", code=ErrorCode.BACKEND_UNAVAILABLE) from None
if _major(_VERSION) < 1:
    raise BackendError(
        f"pqcrypto {_VERSION} is too old (need >= 1.0)", code=ErrorCode.BACKEND_UNAVAILABLE
    )

try:
    from pqcrypto.kem import ml_kem_768 as _mlkem
except ImportError:
    raise BackendError(
        f"pqcrypto {_VERSION} has no ml_kem_768", code=ErrorCode.BACKEND_UNAVAILABLE
    ) from None

_lib: Any = _mlkem
for _fn in ("keygen", "encaps", "decaps"):
    if not callable(getattr(_lib, _fn, None)):
        raise BackendError(
            f"pqcrypto {_VERSION} ml_kem_768 lacks {_fn}()", code=ErrorCode.BACKEND_UNAVAILABLE
        )


class _PqcryptoPrivateKey(KEMPrivateKey):
    __slots__ = ("_pk", "_sk")

    def __init__(self, public_key: bytes, secret_key: bytes) -> None:
        self._pk = public_key
        self._sk: bytes | None = secret_key

    @property
    def public_key(self) -> bytes:
        return self._pk

    def decapsulate(self, ciphertext: bytes) -> bytes:
        check_mlkem768_ciphertext(ciphertext)
        if self._sk is None:
            raise LocalProtocolError("key was wiped", code=ErrorCode.INVALID_KEY)
        try:
            return bytes(_lib.decaps(self._sk, bytes(ciphertext)))
        except ValueError:
            raise LocalProtocolError(
                "pqcrypto refused the decapsulation key", code=ErrorCode.INVALID_KEY
            ) from None

    def expanded_key(self) -> bytes | None:
        return self._sk

    def wipe(self) -> None:
        self._sk = None


class PqcryptoKEM(KEM):
    name = "pqcrypto"

    def generate(self) -> KEMPrivateKey:
        pk, sk = _lib.keygen()
        return _PqcryptoPrivateKey(bytes(pk), bytes(sk))

    def from_expanded(self, dk: bytes) -> KEMPrivateKey:
        check_mlkem768_expanded_key(dk)
        return _PqcryptoPrivateKey(mlkem768_expanded_public_key(dk), bytes(dk))

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        check_mlkem768_public_key(public_key)  # pqcrypto checks too; this gives the typed error
        try:
            ciphertext, shared_secret = _lib.encaps(bytes(public_key))  # (ct, ss) in 1.0
        except ValueError:
            raise LocalProtocolError(
                "ML-KEM-768 public key refused by pqcrypto", code=ErrorCode.INVALID_KEY
            ) from None
        return bytes(ciphertext), bytes(shared_secret)
