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

import inspect
from typing import Any

from pqe2ee.backends.base import (
    AEAD,
    CHACHA_KEY_LEN,
    CHACHA_NONCE_LEN,
    CHACHA_TAG_LEN,
    KEM,
    MLKEM768_PK_LEN,
    AEADCipher,
    KEMPrivateKey,
    check_mlkem768_ciphertext,
    check_mlkem768_coins,
    check_mlkem768_expanded_key,
    check_mlkem768_seed,
    unsupported,
)
from pqe2ee.errors import BackendError, DecryptError, ErrorCode, LocalProtocolError

__all__ = ["PycryptodomeAEAD", "PycryptodomeKEM"]

_MIN_VERSION = (4, 4)

try:
    import Crypto
except ImportError:
    raise BackendError(
        "pycryptodome is not installed", code=ErrorCode.BACKEND_UNAVAILABLE
    ) from None

_version_info: tuple[Any, ...] = tuple(getattr(Crypto, "version_info", (0, 0)))
if tuple(int(v) for v in _version_info[:2]) < _MIN_VERSION:
    raise BackendError(
        f"pycryptodome {'.'.join(map(str, _version_info))} is too old (need >= 4.4)",
        code=ErrorCode.BACKEND_UNAVAILABLE,
    )

try:
    from Crypto.Cipher import ChaCha20_Poly1305 as _chacha
    from Crypto.PublicKey import MLKEM as _mlkem_mod
except ImportError:
    raise BackendError(
        "this pycryptodome has no Crypto.PublicKey.MLKEM", code=ErrorCode.BACKEND_UNAVAILABLE
    ) from None

_MLKEM: Any = _mlkem_mod
_CHACHA: Any = _chacha
_KEY_CLASS: Any = getattr(_MLKEM, "MLKEMKey", None)
if (
    _KEY_CLASS is None
    or not callable(getattr(_KEY_CLASS, "_encaps", None))
    or not callable(getattr(_KEY_CLASS, "_decaps", None))
    or not hasattr(_MLKEM, "ML_KEM_768")
):
    raise BackendError(
        "pycryptodome's MLKEMKey lacks the private _encaps/_decaps methods this adapter needs "
        "(tested with 4.4.x)",
        code=ErrorCode.BACKEND_UNAVAILABLE,
    )
_PARAMS: Any = _MLKEM.ML_KEM_768


def _takes_coins() -> bool:
    try:
        params = inspect.signature(_KEY_CLASS._encaps).parameters
    except (TypeError, ValueError):
        return False
    return len(params) >= 2  # (self, coins)


_DERAND = _takes_coins()


class _PycryptodomePrivateKey(KEMPrivateKey):
    __slots__ = ("_key", "_pk")

    def __init__(self, key: Any) -> None:
        self._key: Any = key
        self._pk = bytes(key.ek)

    @property
    def public_key(self) -> bytes:
        return self._pk

    def decapsulate(self, ciphertext: bytes) -> bytes:
        check_mlkem768_ciphertext(ciphertext)
        if self._key is None:
            raise LocalProtocolError("key was wiped", code=ErrorCode.INVALID_KEY)
        return bytes(self._key._decaps(bytes(ciphertext)))

    def seed(self) -> bytes | None:
        if self._key is None:
            return None
        try:
            return bytes(self._key.seed)
        except ValueError:  # built from the expanded form only
            return None

    def expanded_key(self) -> bytes | None:
        return None if self._key is None else bytes(self._key.expanded_dk)

    def wipe(self) -> None:
        self._key = None


def _public_key(public_key: bytes) -> Any:
    if len(public_key) != MLKEM768_PK_LEN:
        raise LocalProtocolError(
            f"ML-KEM-768 public key must be {MLKEM768_PK_LEN} bytes, got {len(public_key)}",
            code=ErrorCode.INVALID_KEY,
        )
    try:
        return _MLKEM.construct(param_set=_PARAMS, ek=bytes(public_key))
    except ValueError:
        raise LocalProtocolError(
            "ML-KEM-768 public key failed the FIPS 203 modulus check", code=ErrorCode.INVALID_KEY
        ) from None


class PycryptodomeKEM(KEM):
    name = "pycryptodome"

    def generate(self) -> KEMPrivateKey:
        return _PycryptodomePrivateKey(_MLKEM.generate(param_set=_PARAMS))

    def from_seed(self, seed: bytes) -> KEMPrivateKey:
        check_mlkem768_seed(seed)
        return _PycryptodomePrivateKey(_MLKEM.construct(param_set=_PARAMS, seed=bytes(seed)))

    def from_expanded(self, dk: bytes) -> KEMPrivateKey:
        check_mlkem768_expanded_key(dk)
        try:
            key = _MLKEM.construct(param_set=_PARAMS, expanded_dk=bytes(dk))
        except ValueError:
            raise LocalProtocolError(
                "ML-KEM-768 decapsulation key failed the FIPS 203 checks",
                code=ErrorCode.INVALID_KEY,
            ) from None
        return _PycryptodomePrivateKey(key)

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        shared_secret, ciphertext = _public_key(public_key)._encaps()  # (ss, ct)
        return bytes(ciphertext), bytes(shared_secret)

    def encapsulate_derand(self, public_key: bytes, m: bytes) -> tuple[bytes, bytes]:
        if not _DERAND:
            raise unsupported(self.name, "encapsulate with fixed randomness")
        check_mlkem768_coins(m)
        shared_secret, ciphertext = _public_key(public_key)._encaps(bytes(m))  # (ss, ct)
        return bytes(ciphertext), bytes(shared_secret)


class _PycryptodomeCipher(AEADCipher):
    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes | None = None) -> bytes:
        if len(nonce) != CHACHA_NONCE_LEN:
            raise LocalProtocolError("nonce must be 12 bytes", code=ErrorCode.INVALID_ARGUMENT)
        cipher = _CHACHA.new(key=self._key, nonce=bytes(nonce))
        if aad:
            cipher.update(aad)
        ciphertext, tag = cipher.encrypt_and_digest(plaintext)
        return bytes(ciphertext) + bytes(tag)

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None = None) -> bytes:
        if len(nonce) != CHACHA_NONCE_LEN or len(data) < CHACHA_TAG_LEN:
            raise DecryptError("record too short or bad nonce length")
        cipher = _CHACHA.new(key=self._key, nonce=bytes(nonce))
        if aad:
            cipher.update(aad)
        split = len(data) - CHACHA_TAG_LEN
        try:
            return bytes(cipher.decrypt_and_verify(data[:split], data[split:]))
        except ValueError:
            raise DecryptError("authentication tag did not verify") from None


class PycryptodomeAEAD(AEAD):
    name = "pycryptodome"

    def new(self, key: bytes) -> AEADCipher:
        if len(key) != CHACHA_KEY_LEN:
            raise LocalProtocolError(
                "ChaCha20-Poly1305 key must be 32 bytes", code=ErrorCode.INVALID_KEY
            )
        return _PycryptodomeCipher(bytes(key))
