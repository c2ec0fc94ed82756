"""pycryptodome X-Wing adapter (second backend, and the one that can derandomise encapsulation).

Pinned to pycryptodome **4.4.x**: ``Crypto.PublicKey.Hybrid`` keys are only meant for its HPKE
("Not public yet"), so this adapter uses private API, checked at import:

* ``Hybrid._construct(param_set=Hybrid.MLKEM768_X25519, seed=32 bytes | pk=1216 bytes)`` builds a
  key; ``pk=`` runs the FIPS 203 modulus check and refuses a low-order X25519 point
  (``ValueError``);
* ``key._encaps(randomness: 64 bytes | None) -> (shared_secret, ciphertext)``, shared secret
  FIRST; ``randomness`` is ``m (32) || ek_X (32)``, the draft's ``eseed``;
* ``key._decaps(ct) -> shared_secret``; a low-order X25519 half raises ``ValueError``;
* ``key._pk`` is the 1216-byte public key.

A newer pycryptodome (4.5+) is refused as ``backend_unavailable`` until re-tested.
"""

from __future__ import annotations

from typing import Any

from pqe2ee.backends._pycryptodome import encaps, has_kem_methods, version
from pqe2ee.backends.base import unavailable
from pqe2ee.backends.xwing import (
    XWing,
    XWingHeldKey,
    XWingPrivateKey,
    check_xwing_eseed,
    check_xwing_public_key,
    check_xwing_seed,
)
from pqe2ee.errors import DecryptError, ErrorCode, LocalProtocolError, UnavailableReason

__all__ = ["SUPPORTED_VERSIONS", "PycryptodomeXWing"]

SUPPORTED_VERSIONS = ((4, 4),)

_VERSION = version()
if _VERSION not in SUPPORTED_VERSIONS:
    raise unavailable(
        UnavailableReason.UNSUPPORTED_VERSION,
        f"pycryptodome {'.'.join(map(str, _VERSION))} is not a tested version for X-Wing "
        "(the adapter uses private API; supported: 4.4.x)",
    )

try:
    from Crypto.PublicKey import Hybrid as _hybrid_mod
except ImportError:
    raise unavailable(
        UnavailableReason.MISSING_API, "this pycryptodome has no Crypto.PublicKey.Hybrid"
    ) from None

_HYBRID: Any = _hybrid_mod
if not (
    has_kem_methods(_HYBRID, "HybridKey", "MLKEM768_X25519")
    and callable(getattr(_HYBRID, "_construct", None))
):
    raise unavailable(
        UnavailableReason.MISSING_API,
        "this pycryptodome lacks Hybrid._construct / HybridKey._encaps / _decaps",
    )
_PARAMS: Any = _HYBRID.MLKEM768_X25519


class _PycryptodomeXWingKey(XWingHeldKey[Any], XWingPrivateKey):
    __slots__ = ()

    def __init__(self, key: Any) -> None:
        super().__init__(key, bytes(key._pk))

    def _decapsulate(self, key: Any, ciphertext: bytes) -> bytes:
        try:
            return bytes(key._decaps(ciphertext))
        except ValueError:  # only the X25519 point check can fail after the length check
            raise DecryptError("X-Wing ciphertext has a low-order X25519 point") from None

    def seed(self) -> bytes | None:
        return None if self._key is None else bytes(self._key._seed)


def _public(public_key: bytes) -> Any:
    check_xwing_public_key(public_key)
    try:
        return _HYBRID._construct(param_set=_PARAMS, pk=bytes(public_key))
    except ValueError:
        raise LocalProtocolError(
            "X-Wing public key rejected (low-order X25519 point)", code=ErrorCode.INVALID_KEY
        ) from None


class PycryptodomeXWing(XWing):
    name = "pycryptodome"

    def generate(self) -> XWingPrivateKey:
        return _PycryptodomeXWingKey(_HYBRID.generate(param_set=_PARAMS))

    def from_seed(self, seed: bytes) -> XWingPrivateKey:
        check_xwing_seed(seed)
        return _PycryptodomeXWingKey(_HYBRID._construct(param_set=_PARAMS, seed=bytes(seed)))

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        return encaps(_public(public_key))

    def encapsulate_derand(self, public_key: bytes, eseed: bytes) -> tuple[bytes, bytes]:
        check_xwing_eseed(eseed)
        return encaps(_public(public_key), eseed)
