"""pycryptodome adapter: ML-KEM-768 (``Crypto.PublicKey.MLKEM``) and ChaCha20-Poly1305.

Tested with pycryptodome 4.4.0 (supported range: >= 4.4, < 5 - the KEM operations are private
methods and may change in any release; the import-time checks below turn a change into
``backend_unavailable`` / ``unsupported_operation`` instead of a crash). API facts for 4.4.0:

* ``MLKEM.generate(param_set=MLKEM.ML_KEM_768)`` -> ``MLKEMKey`` (from a random 64-byte seed);
* ``MLKEM.construct(param_set=..., seed=d||z | expanded_dk=dk | ek=ek)``; ``ek`` gets the FIPS 203
  modulus check, ``expanded_dk`` the §7.3 hash check plus a pairwise consistency check; all raise
  ``ValueError``;
* ``key.seed`` / ``key.expanded_dk`` / ``key.ek`` properties;
* ``key._encaps(coins: bytes | None = None) -> (shared_secret, ciphertext)`` - shared secret
  FIRST; ``coins`` is the 32-byte FIPS 203 ``m`` (Encaps_internal);
* ``key._decaps(ct: bytes) -> shared_secret`` (implicit rejection on a bad ciphertext).

The AEAD is ``Crypto.Cipher.ChaCha20_Poly1305.new(key=, nonce=)``; it also accepts 8-byte and
24-byte (XChaCha) nonces, which this adapter refuses. It is much slower than pyca on small records,
so "auto" never picks it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from pqe2ee.backends._pycryptodome import encaps, has_kem_methods, version
from pqe2ee.backends.base import (
    AEAD,
    CHACHA_TAG_LEN,
    KEM,
    CheckedCipher,
    HeldKey,
    KEMPrivateKey,
    check_mlkem768_coins,
    check_mlkem768_expanded_key,
    check_mlkem768_seed,
    refused_public_key,
    unavailable,
    unsupported,
)
from pqe2ee.errors import ErrorCode, LocalProtocolError, UnavailableReason

__all__ = ["PycryptodomeAEAD", "PycryptodomeKEM"]

_MIN_VERSION = (4, 4)

_VERSION = version()
if _VERSION < _MIN_VERSION:
    raise unavailable(
        UnavailableReason.UNSUPPORTED_VERSION,
        f"pycryptodome {'.'.join(map(str, _VERSION))} is too old (need >= 4.4)",
    )

try:
    from Crypto.Cipher import ChaCha20_Poly1305 as _chacha
    from Crypto.PublicKey import MLKEM as _mlkem_mod
except ImportError:
    raise unavailable(
        UnavailableReason.MISSING_API, "this pycryptodome has no Crypto.PublicKey.MLKEM"
    ) from None

_MLKEM: Any = _mlkem_mod
_CHACHA: Any = _chacha
if not has_kem_methods(_MLKEM, "MLKEMKey", "ML_KEM_768"):
    raise unavailable(
        UnavailableReason.MISSING_API,
        "pycryptodome's MLKEMKey lacks the private _encaps/_decaps methods this adapter needs "
        "(tested with 4.4.x)",
    )
_KEY_CLASS: Any = _MLKEM.MLKEMKey
_PARAMS: Any = _MLKEM.ML_KEM_768


def _takes_coins() -> bool:
    try:
        params = inspect.signature(_KEY_CLASS._encaps).parameters
    except (TypeError, ValueError):
        return False
    return len(params) >= 2  # (self, coins)


_DERAND = _takes_coins()


class _PycryptodomePrivateKey(HeldKey[Any], KEMPrivateKey):
    __slots__ = ()

    def __init__(self, key: Any) -> None:
        super().__init__(key, bytes(key.ek))

    def _decapsulate(self, key: Any, ciphertext: bytes) -> bytes:
        return bytes(key._decaps(ciphertext))

    def seed(self) -> bytes | None:
        if self._key is None:
            return None
        try:
            return bytes(self._key.seed)
        except ValueError:  # built from the expanded form only
            return None

    def expanded_key(self) -> bytes | None:
        return None if self._key is None else bytes(self._key.expanded_dk)


def _construct(what: str, **key: bytes) -> Any:
    """``MLKEM.construct`` for ML-KEM-768; its ``ValueError`` becomes ``invalid_key``."""
    try:
        return _MLKEM.construct(param_set=_PARAMS, **key)
    except ValueError:
        raise LocalProtocolError(
            f"ML-KEM-768 {what} failed the FIPS 203 checks", code=ErrorCode.INVALID_KEY
        ) from None


def _public_key(public_key: bytes) -> Any:
    try:
        return _parsed_public_key(bytes(public_key))
    except ValueError:
        raise refused_public_key(public_key, "pycryptodome") from None


@functools.lru_cache(maxsize=64)
def _parsed_public_key(public_key: bytes) -> Any:
    """A parsed encapsulation key, kept (64 at most, as the pyca adapter does): a client
    encapsulates to the same few instance keys request after request; each encapsulation
    makes its own buffers, so a parsed key is safe to share. A refused key is not kept."""
    return _MLKEM.construct(param_set=_PARAMS, ek=public_key)


class PycryptodomeKEM(KEM):
    name = "pycryptodome"

    def generate(self) -> KEMPrivateKey:
        return _PycryptodomePrivateKey(_MLKEM.generate(param_set=_PARAMS))

    def from_seed(self, seed: bytes) -> KEMPrivateKey:
        check_mlkem768_seed(seed)
        return _PycryptodomePrivateKey(_construct("seed", seed=bytes(seed)))

    def from_expanded(self, dk: bytes) -> KEMPrivateKey:
        check_mlkem768_expanded_key(dk)
        return _PycryptodomePrivateKey(_construct("decapsulation key", expanded_dk=bytes(dk)))

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        return encaps(_public_key(public_key))

    def encapsulate_derand(self, public_key: bytes, m: bytes) -> tuple[bytes, bytes]:
        if not _DERAND:
            raise unsupported(self.name, "encapsulate with fixed randomness")
        check_mlkem768_coins(m)
        return encaps(_public_key(public_key), m)


def _cipher(key: bytes, nonce: bytes, aad: bytes | None) -> Any:
    cipher = _CHACHA.new(key=key, nonce=bytes(nonce))
    if aad:
        cipher.update(aad)
    return cipher


def _seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes | None) -> bytes:
    ciphertext, tag = _cipher(key, nonce, aad).encrypt_and_digest(plaintext)
    return bytes(ciphertext) + bytes(tag)


def _open(key: bytes, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
    split = len(data) - CHACHA_TAG_LEN
    return bytes(_cipher(key, nonce, aad).decrypt_and_verify(data[:split], data[split:]))


class PycryptodomeAEAD(AEAD):
    name = "pycryptodome"

    def _cipher(self, key: bytes) -> CheckedCipher:
        return CheckedCipher(functools.partial(_seal, key), functools.partial(_open, key))
