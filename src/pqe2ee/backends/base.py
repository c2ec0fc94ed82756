"""Small interfaces every crypto backend implements.

A KEM backend does ML-KEM-768 (FIPS 203); an AEAD backend does ChaCha20-Poly1305 (RFC 8439).
Byte conventions are fixed here so that adapters hide each library's quirks (argument order,
return order, key formats):

* public (encapsulation) key: 1184 bytes, FIPS 203 ``ek``;
* private key: an opaque :class:`KEMPrivateKey`; where the library can, it is built from the
  64-byte seed ``d || z`` (the form pyca/cryptography and the golden vectors use);
* ``encapsulate`` returns ``(ciphertext, shared_secret)`` - ciphertext first, always;
* AEAD ciphertexts are ``ct || tag`` (16-byte tag), nonces are 12 bytes.
"""

from __future__ import annotations

import abc
import hashlib

from pqe2ee.errors import BackendError, ErrorCode, LocalProtocolError, MalformedError

__all__ = [
    "AEAD",
    "KEM",
    "MLKEM768_CT_LEN",
    "MLKEM768_PK_LEN",
    "MLKEM768_SEED_LEN",
    "MLKEM768_SS_LEN",
    "AEADCipher",
    "KEMPrivateKey",
    "check_mlkem768_ciphertext",
    "check_mlkem768_coins",
    "check_mlkem768_expanded_key",
    "check_mlkem768_public_key",
    "check_mlkem768_seed",
    "mlkem768_expanded_public_key",
    "unsupported",
]

MLKEM768_PK_LEN = 1184
MLKEM768_CT_LEN = 1088
MLKEM768_SS_LEN = 32
MLKEM768_SEED_LEN = 64
MLKEM768_EXPANDED_SK_LEN = 2400
MLKEM768_COINS_LEN = 32  # the encapsulation randomness m

_MLKEM_Q = 3329
_MLKEM768_T_LEN = 1152  # ByteEncode_12 of the three NTT-domain polynomials t-hat
_MLKEM768_DK_PKE_LEN = 1152  # dk = dk_PKE || ek || H(ek) || z (FIPS 203, Algorithm 16)

CHACHA_KEY_LEN = 32
CHACHA_NONCE_LEN = 12
CHACHA_TAG_LEN = 16


def unsupported(backend: str, operation: str) -> BackendError:
    return BackendError(
        f"backend {backend!r} cannot {operation}", code=ErrorCode.UNSUPPORTED_OPERATION
    )


# FIPS 203 §7.2 modulus check, done on the 1152-byte t-hat as one big integer instead of a loop
# over 768 coefficients (a few microseconds instead of ~100). Coefficient i sits in bits
# 12i..12i+11. Even and odd coefficients are masked into 24-bit lanes with 12 bits of headroom;
# adding 2^12 - q to every lane carries into bit 12 of a lane exactly when its coefficient is >= q,
# and no lane can carry into the next one (max 4095 + 767 < 2^13).
_LANES = _MLKEM768_T_LEN * 8 // 24
_LANE_MASK = sum(0xFFF << (24 * i) for i in range(_LANES))
_LANE_BIAS = sum(((1 << 12) - _MLKEM_Q) << (24 * i) for i in range(_LANES))
_LANE_CARRY = sum(1 << (24 * i + 12) for i in range(_LANES))


def _coefficients_reduced(t_hat: bytes) -> bool:
    x = int.from_bytes(t_hat, "little")
    even = x & _LANE_MASK
    odd = (x >> 12) & _LANE_MASK
    return ((even + _LANE_BIAS) | (odd + _LANE_BIAS)) & _LANE_CARRY == 0


def check_mlkem768_public_key(public_key: bytes) -> None:
    """Length and FIPS 203 §7.2 modulus check of an encapsulation key.

    Every 12-bit coefficient of the first 1152 bytes must be < q = 3329 (the key must equal
    ByteEncode_12(ByteDecode_12(key))). Raises :class:`~pqe2ee.errors.LocalProtocolError`
    (code ``invalid_key``).
    """
    if len(public_key) != MLKEM768_PK_LEN:
        raise LocalProtocolError(
            f"ML-KEM-768 public key must be {MLKEM768_PK_LEN} bytes, got {len(public_key)}",
            code=ErrorCode.INVALID_KEY,
        )
    if not _coefficients_reduced(bytes(public_key[:_MLKEM768_T_LEN])):
        raise LocalProtocolError(
            "ML-KEM-768 public key failed the FIPS 203 modulus check", code=ErrorCode.INVALID_KEY
        )


def check_mlkem768_expanded_key(dk: bytes) -> None:
    """Length and FIPS 203 §7.3 hash check of a 2400-byte expanded decapsulation key.

    The ``H(ek)`` stored in ``dk`` must be SHA3-256 of the ``ek`` stored in ``dk``. Raises
    :class:`~pqe2ee.errors.LocalProtocolError` (code ``invalid_key``).
    """
    if len(dk) != MLKEM768_EXPANDED_SK_LEN:
        raise LocalProtocolError(
            f"ML-KEM-768 expanded decapsulation key must be {MLKEM768_EXPANDED_SK_LEN} bytes, "
            f"got {len(dk)}",
            code=ErrorCode.INVALID_KEY,
        )
    ek_end = _MLKEM768_DK_PKE_LEN + MLKEM768_PK_LEN
    ek = bytes(dk[_MLKEM768_DK_PKE_LEN:ek_end])
    if hashlib.sha3_256(ek).digest() != bytes(dk[ek_end : ek_end + 32]):
        raise LocalProtocolError(
            "ML-KEM-768 decapsulation key failed the FIPS 203 hash check",
            code=ErrorCode.INVALID_KEY,
        )


def mlkem768_expanded_public_key(dk: bytes) -> bytes:
    """The ``ek`` embedded in an expanded decapsulation key (no checks)."""
    return bytes(dk[_MLKEM768_DK_PKE_LEN : _MLKEM768_DK_PKE_LEN + MLKEM768_PK_LEN])


def check_mlkem768_seed(seed: bytes) -> None:
    """Raise :class:`~pqe2ee.errors.LocalProtocolError` (``invalid_key``) unless 64 bytes."""
    if len(seed) != MLKEM768_SEED_LEN:
        raise LocalProtocolError(
            f"ML-KEM-768 seed must be {MLKEM768_SEED_LEN} bytes, got {len(seed)}",
            code=ErrorCode.INVALID_KEY,
        )


def check_mlkem768_ciphertext(ciphertext: bytes) -> None:
    """Raise :class:`~pqe2ee.errors.MalformedError` (``malformed_blob``) unless 1088 bytes."""
    if len(ciphertext) != MLKEM768_CT_LEN:
        raise MalformedError(
            f"KEM ciphertext must be {MLKEM768_CT_LEN} bytes, got {len(ciphertext)}",
            code=ErrorCode.MALFORMED_BLOB,
        )


def check_mlkem768_coins(m: bytes) -> None:
    """Raise :class:`~pqe2ee.errors.LocalProtocolError` unless ``m`` is 32 bytes."""
    if len(m) != MLKEM768_COINS_LEN:
        raise LocalProtocolError(
            f"encapsulation randomness must be {MLKEM768_COINS_LEN} bytes, got {len(m)}",
            code=ErrorCode.INVALID_ARGUMENT,
        )


class KEMPrivateKey(abc.ABC):
    """A decapsulation key. Opaque; only the backend that made it can use it."""

    __slots__ = ()

    @property
    @abc.abstractmethod
    def public_key(self) -> bytes:
        """The 1184-byte encapsulation key."""

    @abc.abstractmethod
    def decapsulate(self, ciphertext: bytes) -> bytes:
        """Return the 32-byte shared secret (implicit rejection on a bad ciphertext).

        Raises :class:`~pqe2ee.errors.MalformedError` (code ``malformed_blob``) when the
        ciphertext has the wrong length.
        """

    def seed(self) -> bytes | None:
        """The 64-byte ``d || z`` seed when the backend keeps it, else ``None``."""
        return None

    def expanded_key(self) -> bytes | None:
        """The 2400-byte expanded decapsulation key when the backend exposes it, else ``None``."""
        return None

    def wipe(self) -> None:  # noqa: B027 - optional hook
        """Best-effort: drop references to key material (Python cannot zeroise reliably)."""


class KEM(abc.ABC):
    """ML-KEM-768."""

    name: str = "?"

    @abc.abstractmethod
    def generate(self) -> KEMPrivateKey:
        """A fresh key pair."""

    def from_seed(self, seed: bytes) -> KEMPrivateKey:
        """Deterministic KeyGen_internal(d, z) from the 64-byte seed ``d || z``.

        Raises :class:`~pqe2ee.errors.LocalProtocolError` (code ``invalid_key``) for a seed of
        the wrong length.
        """
        raise unsupported(self.name, "derive a key from a seed")

    @abc.abstractmethod
    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """Return ``(ciphertext, shared_secret)``.

        Raises :class:`~pqe2ee.errors.LocalProtocolError` (code ``invalid_key``) for a key of the
        wrong length or one that fails the FIPS 203 modulus check.
        """

    def encapsulate_derand(self, public_key: bytes, m: bytes) -> tuple[bytes, bytes]:
        """Encaps_internal with fixed 32-byte randomness ``m`` (for test vectors only).

        Same key checks as :meth:`encapsulate`; returns ``(ciphertext, shared_secret)``.
        """
        raise unsupported(self.name, "encapsulate with fixed randomness")

    def from_expanded(self, dk: bytes) -> KEMPrivateKey:
        """A key from the 2400-byte expanded decapsulation key (for test vectors only).

        Raises :class:`~pqe2ee.errors.LocalProtocolError` (code ``invalid_key``) for a key of the
        wrong length or one that fails the FIPS 203 §7.3 hash check.
        """
        raise unsupported(self.name, "import an expanded decapsulation key")


class AEADCipher(abc.ABC):
    """ChaCha20-Poly1305 bound to one 32-byte key."""

    __slots__ = ()

    @abc.abstractmethod
    def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes | None = None) -> bytes:
        """Return ``ciphertext || tag``."""

    @abc.abstractmethod
    def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None = None) -> bytes:
        """Open ``ciphertext || tag``; raise :class:`~pqe2ee.errors.DecryptError` on any failure."""


class AEAD(abc.ABC):
    """ChaCha20-Poly1305 factory."""

    name: str = "?"

    @abc.abstractmethod
    def new(self, key: bytes) -> AEADCipher:
        """A cipher for this 32-byte key; raises LocalProtocolError on a wrong key length."""
