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
    HeldKey,
    KEMPrivateKey,
    check_mlkem768_expanded_key,
    mlkem768_expanded_public_key,
    refused_public_key,
    unavailable,
)
from pqe2ee.errors import ErrorCode, LocalProtocolError, UnavailableReason

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
    raise unavailable(UnavailableReason.NOT_INSTALLED, "pqcrypto is not installed") from None
if _major(_VERSION) < 1:
    raise unavailable(
        UnavailableReason.UNSUPPORTED_VERSION, f"pqcrypto {_VERSION} is too old (need >= 1.0)"
    )

try:
    from pqcrypto.kem import ml_kem_768 as _mlkem
except ImportError:
    raise unavailable(
        UnavailableReason.MISSING_API, f"pqcrypto {_VERSION} has no ml_kem_768"
    ) from None

_lib: Any = _mlkem
for _fn in ("keygen", "encaps", "decaps"):
    if not callable(getattr(_lib, _fn, None)):
        raise unavailable(
            UnavailableReason.MISSING_API, f"pqcrypto {_VERSION} ml_kem_768 lacks {_fn}()"
        )


class _PqcryptoPrivateKey(HeldKey[bytes], KEMPrivateKey):
    """The key is the 2400-byte expanded decapsulation key."""

    __slots__ = ()

    def _decapsulate(self, key: bytes, ciphertext: bytes) -> bytes:
        try:
            return bytes(_lib.decaps(key, ciphertext))
        except ValueError:
            raise LocalProtocolError(
                "pqcrypto refused the decapsulation key", code=ErrorCode.INVALID_KEY
            ) from None

    def expanded_key(self) -> bytes | None:
        return self._key


class PqcryptoKEM(KEM):
    name = "pqcrypto"

    def generate(self) -> KEMPrivateKey:
        pk, sk = _lib.keygen()
        return _PqcryptoPrivateKey(bytes(sk), bytes(pk))

    def from_expanded(self, dk: bytes) -> KEMPrivateKey:
        check_mlkem768_expanded_key(dk)
        return _PqcryptoPrivateKey(bytes(dk), mlkem768_expanded_public_key(dk))

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        try:
            ciphertext, shared_secret = _lib.encaps(bytes(public_key))  # (ct, ss) in 1.0
        except ValueError:  # pqcrypto runs the modulus check; ours names the failure
            raise refused_public_key(public_key, "pqcrypto") from None
        return bytes(ciphertext), bytes(shared_secret)
