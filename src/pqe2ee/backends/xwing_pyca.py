"""pyca/cryptography X-Wing adapter (the default): composed from ML-KEM-768 + X25519 + SHA3-256.

cryptography 50 has ``hpke.MLKEM768X25519PrivateKey`` but only for its single-shot HPKE
(no AAD, no context, no Export, no raw encapsulation), so X-Wing is composed here from the
primitives, as the draft defines it (see :mod:`pqe2ee.backends.xwing`). Encapsulation cannot be
derandomised: pyca's ML-KEM has no Encaps_internal with fixed ``m``.

ML-KEM needs an OpenSSL with ML-KEM-768 (3.5 or later; PyPI wheels have it). It is probed at
import so that a distro build without it reports ``backend_unavailable`` instead of failing
later.
"""

from __future__ import annotations

import os
from functools import lru_cache

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from pqe2ee.backends.base import MLKEM768_CT_LEN, MLKEM768_PK_LEN, unavailable
from pqe2ee.backends.xwing import (
    XWING_SEED_LEN,
    XWing,
    XWingHeldKey,
    XWingPrivateKey,
    check_xwing_public_key,
    check_xwing_seed,
    xwing_combine,
    xwing_expand_seed,
)
from pqe2ee.errors import DecryptError, ErrorCode, LocalProtocolError, UnavailableReason

__all__ = ["PycaXWing"]

try:
    mlkem.MLKEM768PrivateKey.from_seed_bytes(bytes(64))
except (UnsupportedAlgorithm, AttributeError):
    raise unavailable(
        UnavailableReason.NATIVE_LIBRARY_MISSING,
        "the OpenSSL linked by cryptography has no ML-KEM-768",
    ) from None


_Halves = tuple[mlkem.MLKEM768PrivateKey, x25519.X25519PrivateKey]


class _PycaXWingKey(XWingHeldKey[_Halves], XWingPrivateKey):
    """The key is the pair (ML-KEM-768 key, X25519 key) expanded from the seed."""

    __slots__ = ("_pk_x", "_seed")

    def __init__(self, seed: bytes) -> None:
        d_z, sk_x = xwing_expand_seed(seed)
        m = mlkem.MLKEM768PrivateKey.from_seed_bytes(d_z)
        x = x25519.X25519PrivateKey.from_private_bytes(sk_x)
        self._seed: bytes | None = bytes(seed)
        self._pk_x = x.public_key().public_bytes_raw()
        super().__init__((m, x), m.public_key().public_bytes_raw() + self._pk_x)

    def _decapsulate(self, key: _Halves, ciphertext: bytes) -> bytes:
        m, x = key
        ct_x = ciphertext[MLKEM768_CT_LEN:]
        ss_m = m.decapsulate(ciphertext[:MLKEM768_CT_LEN])
        try:
            ss_x = x.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
        except ValueError:  # all-zero output: a low-order point
            raise DecryptError("X-Wing ciphertext has a low-order X25519 point") from None
        return xwing_combine(ss_m, ss_x, ct_x, self._pk_x)

    def seed(self) -> bytes | None:
        return self._seed

    def wipe(self) -> None:
        super().wipe()
        self._seed = None


class PycaXWing(XWing):
    name = "pyca"

    def generate(self) -> XWingPrivateKey:
        return _PycaXWingKey(os.urandom(XWING_SEED_LEN))

    def from_seed(self, seed: bytes) -> XWingPrivateKey:
        check_xwing_seed(seed)
        return _PycaXWingKey(seed)

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        ek_m, pk_x, pk_x_obj = _parse_public(bytes(public_key))
        ss_m, ct_m = ek_m.encapsulate()  # pyca returns (ss, ct)
        eph = x25519.X25519PrivateKey.generate()
        ct_x = eph.public_key().public_bytes_raw()
        try:
            ss_x = eph.exchange(pk_x_obj)
        except ValueError:
            raise LocalProtocolError(
                "X-Wing public key has a low-order X25519 point", code=ErrorCode.INVALID_KEY
            ) from None
        return ct_m + ct_x, xwing_combine(ss_m, ss_x, ct_x, pk_x)


@lru_cache(maxsize=64)
def _parse_public(
    pk: bytes,
) -> tuple[mlkem.MLKEM768PublicKey, bytes, x25519.X25519PublicKey]:
    """Checked and parsed once per key: an instance key is used for many requests (the cache
    holds at most 64 public keys; errors are not cached)."""
    check_xwing_public_key(pk)
    try:
        ek_m = mlkem.MLKEM768PublicKey.from_public_bytes(pk[:MLKEM768_PK_LEN])
    except ValueError:  # already modulus-checked; belt and braces
        raise LocalProtocolError(
            "X-Wing public key: ML-KEM half rejected", code=ErrorCode.INVALID_KEY
        ) from None
    pk_x = pk[MLKEM768_PK_LEN:]
    return ek_m, pk_x, x25519.X25519PublicKey.from_public_bytes(pk_x)
