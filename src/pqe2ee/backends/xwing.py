"""X-Wing (HPKE KEM 0x647A, "MLKEM768-X25519"): the hybrid KEM of wire profile v2.

Specification: draft-connolly-cfrg-xwing-kem (label last, as in -05 and later), identical to
MLKEM768-X25519 of draft-irtf-cfrg-concrete-hybrid-kems and to KEM 0x647A of draft-ietf-hpke-pq::

    expanded = SHAKE256(seed32, 96)
    (ek_M, dk_M) = ML-KEM-768.KeyGen_internal(expanded[0:32], expanded[32:64])
    sk_X = expanded[64:96];  pk_X = X25519(sk_X, 9)
    pk = ek_M (1184) || pk_X (32)                                       1216 bytes
    Encaps(pk; eseed64):  (ss_M, ct_M) = ML-KEM-768.Encaps_internal(ek_M, eseed[0:32])
                          ek_X = eseed[32:64]; ct_X = X25519(ek_X, 9); ss_X = X25519(ek_X, pk_X)
    ct = ct_M (1088) || ct_X (32)                                       1120 bytes
    ss = SHA3-256(ss_M || ss_X || ct_X || pk_X || "\\.//^\\")           32 bytes

Byte conventions follow :mod:`pqe2ee.backends.base`: ``encapsulate`` returns
``(ciphertext, shared_secret)``, ciphertext first; private keys are opaque objects made by one
backend. Errors, the same in every adapter:

* a public key of the wrong length, failing the FIPS 203 modulus check, or whose X25519 half is a
  low-order point: :class:`~pqe2ee.errors.LocalProtocolError` (``invalid_key``) from
  ``encapsulate``;
* a ciphertext of the wrong length: :class:`~pqe2ee.errors.MalformedError` (``malformed_blob``);
* a ciphertext whose X25519 half is a low-order point (the X25519 output is all zero):
  :class:`~pqe2ee.errors.DecryptError` (``decrypt_failed``) from ``decapsulate``. The draft does
  not require this check (ML-KEM alone carries the security); both libraries make it and the
  HPKE DHKEM rule (RFC 9180 §7.1.4) asks for it, so v2 makes it normative.

``get_xwing("auto")`` returns the pyca/cryptography adapter when the linked OpenSSL has
ML-KEM, else pycryptodome (pinned to 4.4.x: it needs private methods).
"""

from __future__ import annotations

import abc
import hashlib
from typing import Final, TypeVar, cast

from pqe2ee.backends._registry import Primitive, available, load
from pqe2ee.backends.base import (
    MLKEM768_CT_LEN,
    MLKEM768_PK_LEN,
    DecapsulationKey,
    HeldKey,
    check_mlkem768_public_key,
    require_length,
    unsupported,
)
from pqe2ee.errors import ErrorCode

__all__ = [
    "XWING_CT_LEN",
    "XWING_ESEED_LEN",
    "XWING_KEM_ID",
    "XWING_LABEL",
    "XWING_PK_LEN",
    "XWING_SEED_LEN",
    "XWING_SS_LEN",
    "XWing",
    "XWingHeldKey",
    "XWingPrivateKey",
    "available_xwing",
    "check_xwing_ciphertext",
    "check_xwing_eseed",
    "check_xwing_public_key",
    "check_xwing_seed",
    "get_xwing",
    "xwing_combine",
    "xwing_expand_seed",
]

XWING_KEM_ID: Final = 0x647A
XWING_PK_LEN: Final = MLKEM768_PK_LEN + 32  # 1216
XWING_CT_LEN: Final = MLKEM768_CT_LEN + 32  # 1120
XWING_SS_LEN: Final = 32
XWING_SEED_LEN: Final = 32
XWING_ESEED_LEN: Final = 64
XWING_LABEL: Final = b"\\.//^\\"  # 5c 2e 2f 2f 5e 5c, hashed last

HeldKeyT = TypeVar("HeldKeyT")


def xwing_expand_seed(seed: bytes) -> tuple[bytes, bytes]:
    """``(d || z, sk_X)``: the 64-byte ML-KEM-768 seed and the 32-byte X25519 scalar."""
    expanded = hashlib.shake_256(seed).digest(96)
    return expanded[:64], expanded[64:]


def xwing_combine(ss_m: bytes, ss_x: bytes, ct_x: bytes, pk_x: bytes) -> bytes:
    """The X-Wing combiner, label last."""
    return hashlib.sha3_256(b"".join((ss_m, ss_x, ct_x, pk_x, XWING_LABEL))).digest()


def check_xwing_public_key(public_key: bytes) -> None:
    """Length and FIPS 203 modulus check of the ML-KEM half (``invalid_key`` on failure).

    The X25519 half is checked when it is used (an all-zero X25519 output is refused).
    """
    require_length(public_key, XWING_PK_LEN, "X-Wing public key", ErrorCode.INVALID_KEY)
    check_mlkem768_public_key(bytes(public_key[:MLKEM768_PK_LEN]))


def check_xwing_ciphertext(ciphertext: bytes) -> None:
    """Raise :class:`~pqe2ee.errors.MalformedError` (``malformed_blob``) unless 1120 bytes."""
    require_length(ciphertext, XWING_CT_LEN, "X-Wing ciphertext", ErrorCode.MALFORMED_BLOB)


def check_xwing_seed(seed: bytes) -> None:
    require_length(seed, XWING_SEED_LEN, "X-Wing seed", ErrorCode.INVALID_KEY)


def check_xwing_eseed(eseed: bytes) -> None:
    require_length(
        eseed, XWING_ESEED_LEN, "X-Wing encapsulation randomness", ErrorCode.INVALID_ARGUMENT
    )


class XWingPrivateKey(DecapsulationKey):
    """An X-Wing decapsulation key (expanded once, then cached)."""

    __slots__ = ()

    @abc.abstractmethod
    def seed(self) -> bytes | None:
        """The 32-byte seed (the X-Wing decapsulation key), or ``None`` once wiped."""

    @abc.abstractmethod
    def wipe(self) -> None:
        """Best-effort: drop references to key material (Python cannot zeroise reliably)."""


class XWingHeldKey(HeldKey[HeldKeyT]):
    """:class:`~pqe2ee.backends.base.HeldKey` with X-Wing's ciphertext length."""

    __slots__ = ()
    ciphertext_len = XWING_CT_LEN
    ciphertext_name = "X-Wing ciphertext"


class XWing(abc.ABC):
    """X-Wing KEM backend."""

    name: str = "?"

    @abc.abstractmethod
    def generate(self) -> XWingPrivateKey:
        """A fresh key from a fresh 32-byte seed."""

    @abc.abstractmethod
    def from_seed(self, seed: bytes) -> XWingPrivateKey:
        """Deterministic key from its 32-byte seed (``invalid_key`` for another length)."""

    @abc.abstractmethod
    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """``(ciphertext 1120, shared_secret 32)``; ``invalid_key`` for a bad public key."""

    def encapsulate_derand(self, public_key: bytes, eseed: bytes) -> tuple[bytes, bytes]:
        """Encapsulation with fixed 64-byte randomness (test vectors only)."""
        raise unsupported(self.name, "encapsulate with fixed randomness")


def available_xwing() -> list[str]:
    """Names of the X-Wing backends that work here, the ``"auto"`` choice first."""
    return available(Primitive.XWING)


def get_xwing(name: str = "auto") -> XWing:
    """An X-Wing backend by name (``"pyca"``, ``"pycryptodome"``) or the first that works."""
    return cast(XWing, load(Primitive.XWING, name))
