"""Small interfaces every crypto backend implements.

A KEM backend does ML-KEM-768 (FIPS 203); an AEAD backend does ChaCha20-Poly1305 (RFC 8439).
Byte conventions are fixed here so that adapters hide each library's quirks (argument order,
return order, key formats):

* public (encapsulation) key: 1184 bytes, FIPS 203 ``ek``;
* private key: an opaque :class:`KEMPrivateKey`; where the library can, it is built from the
  64-byte seed ``d || z`` (the form pyca/cryptography and the golden vectors use);
* ``encapsulate`` returns ``(ciphertext, shared_secret)`` - ciphertext first, always;
* AEAD ciphertexts are ``ct || tag`` (16-byte tag), nonces are 12 bytes.

What adapters share is here too, so each adapter holds only its library's calls:
:class:`HeldKey` (public key, ciphertext length check, wiped-key refusal), :class:`CheckedCipher`
(nonce and record checks, the library's tag failure turned into ``DecryptError``),
:func:`require_length` (the error class chosen by the code's owner), :func:`refused_public_key`
(the library checks first; ours only names its failure) and :func:`unavailable` /
:func:`unsupported` (``BackendError`` with an :class:`~pqe2ee.errors.UnavailableReason`).
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable
from typing import ClassVar, Generic, TypeVar

from pqe2ee.errors import (
    BackendError,
    DecryptError,
    ErrorCode,
    LocalProtocolError,
    UnavailableReason,
    error_class,
)

__all__ = [
    "AEAD",
    "KEM",
    "MLKEM768_CT_LEN",
    "MLKEM768_PK_LEN",
    "MLKEM768_SEED_LEN",
    "MLKEM768_SS_LEN",
    "AEADCipher",
    "CheckedCipher",
    "DecapsulationKey",
    "HeldKey",
    "KEMPrivateKey",
    "TagErrors",
    "check_chacha_key",
    "check_mlkem768_ciphertext",
    "check_mlkem768_coins",
    "check_mlkem768_expanded_key",
    "check_mlkem768_public_key",
    "check_mlkem768_seed",
    "mlkem768_expanded_public_key",
    "refused_public_key",
    "require_length",
    "tag_mismatch",
    "unavailable",
    "unsupported",
    "wiped",
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
    """The error for an operation ``backend`` cannot perform (``unsupported_operation``)."""
    return BackendError(
        f"backend {backend!r} cannot {operation}",
        code=ErrorCode.UNSUPPORTED_OPERATION,
        reason=UnavailableReason.UNSUPPORTED_OPERATION,
    )


def unavailable(reason: UnavailableReason, message: str) -> BackendError:
    """The error an adapter module raises at import when it cannot work here."""
    return BackendError(message, code=ErrorCode.BACKEND_UNAVAILABLE, reason=reason)


def wiped() -> LocalProtocolError:
    """The error for using a key after :meth:`KEMPrivateKey.wipe`."""
    return LocalProtocolError("key was wiped", code=ErrorCode.INVALID_KEY)


def require_length(data: bytes, size: int, what: str, code: ErrorCode) -> None:
    """Raise the class that owns ``code`` unless ``data`` is ``size`` bytes long."""
    if len(data) != size:
        raise error_class(code)(f"{what} must be {size} bytes, got {len(data)}", code=code)


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
    require_length(public_key, MLKEM768_PK_LEN, "ML-KEM-768 public key", ErrorCode.INVALID_KEY)
    if not _coefficients_reduced(bytes(public_key[:_MLKEM768_T_LEN])):
        raise LocalProtocolError(
            "ML-KEM-768 public key failed the FIPS 203 modulus check", code=ErrorCode.INVALID_KEY
        )


def refused_public_key(public_key: bytes, library: str) -> LocalProtocolError:
    """The ``invalid_key`` error for a public key ``library`` refused: raises the precise one
    (length, modulus) when our own check finds it, else returns a generic one to raise.

    Adapters call the library first and this only on failure, so a good key is checked once.
    """
    check_mlkem768_public_key(public_key)
    return LocalProtocolError(
        f"ML-KEM-768 public key refused by {library}", code=ErrorCode.INVALID_KEY
    )


def check_mlkem768_expanded_key(dk: bytes) -> None:
    """Length and FIPS 203 §7.3 hash check of a 2400-byte expanded decapsulation key.

    The ``H(ek)`` stored in ``dk`` must be SHA3-256 of the ``ek`` stored in ``dk``. Raises
    :class:`~pqe2ee.errors.LocalProtocolError` (code ``invalid_key``).
    """
    require_length(
        dk,
        MLKEM768_EXPANDED_SK_LEN,
        "ML-KEM-768 expanded decapsulation key",
        ErrorCode.INVALID_KEY,
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
    require_length(seed, MLKEM768_SEED_LEN, "ML-KEM-768 seed", ErrorCode.INVALID_KEY)


def check_mlkem768_ciphertext(ciphertext: bytes) -> None:
    """Raise :class:`~pqe2ee.errors.MalformedError` (``malformed_blob``) unless 1088 bytes."""
    require_length(ciphertext, MLKEM768_CT_LEN, "KEM ciphertext", ErrorCode.MALFORMED_BLOB)


def check_mlkem768_coins(m: bytes) -> None:
    """Raise :class:`~pqe2ee.errors.LocalProtocolError` unless ``m`` is 32 bytes."""
    require_length(m, MLKEM768_COINS_LEN, "encapsulation randomness", ErrorCode.INVALID_ARGUMENT)


def check_chacha_key(key: bytes) -> None:
    """Raise :class:`~pqe2ee.errors.LocalProtocolError` (``invalid_key``) unless 32 bytes."""
    if len(key) != CHACHA_KEY_LEN:
        raise LocalProtocolError(
            "ChaCha20-Poly1305 key must be 32 bytes", code=ErrorCode.INVALID_KEY
        )


class DecapsulationKey(abc.ABC):
    """What every private key (ML-KEM-768 or X-Wing) offers. Opaque; only the backend that
    made it can use it."""

    __slots__ = ()

    @property
    @abc.abstractmethod
    def public_key(self) -> bytes:
        """The encapsulation key (ML-KEM-768: 1184 bytes ``ek``; X-Wing: 1216 bytes
        ``ek_M || pk_X``)."""

    @abc.abstractmethod
    def decapsulate(self, ciphertext: bytes) -> bytes:
        """Return the 32-byte shared secret (ML-KEM implicit rejection on a bad ciphertext).

        Raises :class:`~pqe2ee.errors.MalformedError` (code ``malformed_blob``) when the
        ciphertext has the wrong length; for X-Wing, :class:`~pqe2ee.errors.DecryptError` when
        its X25519 half is a low-order point.
        """


class KEMPrivateKey(DecapsulationKey):
    """An ML-KEM-768 decapsulation key."""

    __slots__ = ()

    def seed(self) -> bytes | None:
        """The 64-byte ``d || z`` seed when the backend keeps it, else ``None``."""
        return None

    def expanded_key(self) -> bytes | None:
        """The 2400-byte expanded decapsulation key when the backend exposes it, else ``None``."""
        return None

    def wipe(self) -> None:
        """Best-effort: drop references to key material (Python cannot zeroise reliably)."""


K = TypeVar("K")


class HeldKey(Generic[K]):
    """What every adapter's private key (ML-KEM or X-Wing) does the same way.

    It holds the library's key object (``None`` once wiped) and the public key, checks the
    ciphertext length (``malformed_blob``) before the library sees it, and refuses a wiped key
    (``invalid_key``). An adapter lists it first in its bases and implements
    :meth:`_decapsulate`.
    """

    __slots__ = ("_key", "public_key")
    ciphertext_len: ClassVar[int] = MLKEM768_CT_LEN
    ciphertext_name: ClassVar[str] = "KEM ciphertext"

    def __init__(self, key: K, public_key: bytes) -> None:
        self._key: K | None = key
        #: The encapsulation key: an attribute (no property frame; read once per request).
        self.public_key: bytes = public_key

    def decapsulate(self, ciphertext: bytes) -> bytes:
        if len(ciphertext) != self.ciphertext_len:  # (the check inline: no call when it passes)
            require_length(
                ciphertext, self.ciphertext_len, self.ciphertext_name, ErrorCode.MALFORMED_BLOB
            )
        key = self._key
        if key is None:
            raise wiped()
        return self._decapsulate(key, bytes(ciphertext))

    def _decapsulate(self, key: K, ciphertext: bytes) -> bytes:
        raise NotImplementedError

    def wipe(self) -> None:
        """Drop the library's key object: later use raises ``invalid_key``. This is NOT a
        zeroisation: pyca, pycryptodome and pqcrypto keep secrets in memory Python cannot
        overwrite (freed, not cleared, when collected); only liboqs cleanses its buffer."""
        self._key = None


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


#: What :meth:`AEADCipher.opener`'s call raises for a tag that does not verify.
TagErrors = tuple[type[Exception], ...]


def tag_mismatch() -> DecryptError:
    """The error for a record whose authentication tag does not verify."""
    return DecryptError("authentication tag did not verify")


class AEADCipher(abc.ABC):
    """ChaCha20-Poly1305 bound to one 32-byte key."""

    __slots__ = ()

    @abc.abstractmethod
    def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes | None = None) -> bytes:
        """Return ``ciphertext || tag``."""

    @abc.abstractmethod
    def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None = None) -> bytes:
        """Open ``ciphertext || tag``; raise :class:`~pqe2ee.errors.DecryptError` on any failure."""

    def opener(self) -> tuple[Callable[[bytes, bytes, bytes | None], bytes], TagErrors]:
        """For a per-record hot path that has checked the nonce (12 bytes) and the data (at
        least a tag) itself: the call that opens ``ciphertext || tag`` and the exceptions it
        raises for a tag that does not verify (to be raised as
        :class:`~pqe2ee.errors.DecryptError`). By default :meth:`decrypt`, which raises its
        own errors."""
        return self.decrypt, ()

    def sealer(self) -> Callable[[bytes, bytes, bytes | None], bytes]:
        """For a per-record hot path whose nonces are 12 bytes by construction: the call that
        seals (``ciphertext || tag``). By default :meth:`encrypt`, which checks the nonce."""
        return self.encrypt


class CheckedCipher(AEADCipher):
    """The checks every adapter's cipher makes, around the library's own seal and open.

    ``seal(nonce, plaintext, aad)`` returns ``ct || tag``; ``open(nonce, data, aad)`` returns
    the plaintext or raises ``tag_error``, which becomes :class:`~pqe2ee.errors.DecryptError`.
    Passing the library's bound methods keeps one Python frame per record.
    """

    __slots__ = ("_open", "_seal")
    tag_error: ClassVar[type[Exception]] = ValueError

    def __init__(
        self,
        seal: Callable[[bytes, bytes, bytes | None], bytes],
        open: Callable[[bytes, bytes, bytes | None], bytes],
    ) -> None:
        self._seal = seal
        self._open = open

    def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes | None = None) -> bytes:
        if len(nonce) != CHACHA_NONCE_LEN:
            raise LocalProtocolError("nonce must be 12 bytes", code=ErrorCode.INVALID_ARGUMENT)
        return self._seal(nonce, plaintext, aad)

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None = None) -> bytes:
        if len(nonce) != CHACHA_NONCE_LEN or len(data) < CHACHA_TAG_LEN:
            raise DecryptError("record too short or bad nonce length")
        try:
            return self._open(nonce, data, aad)
        except self.tag_error:
            raise tag_mismatch() from None

    def opener(self) -> tuple[Callable[[bytes, bytes, bytes | None], bytes], TagErrors]:
        return self._open, (self.tag_error,)  # the library's own call: no frame of ours

    def sealer(self) -> Callable[[bytes, bytes, bytes | None], bytes]:
        return self._seal


class AEAD(abc.ABC):
    """ChaCha20-Poly1305 factory."""

    name: str = "?"

    def new(self, key: bytes) -> AEADCipher:
        """A cipher for this 32-byte key; raises LocalProtocolError on a wrong key length."""
        check_chacha_key(key)
        return self._cipher(bytes(key))

    def seal(self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes | None = None) -> bytes:
        """``new(key).encrypt(nonce, plaintext, aad)`` for a key that seals one message (a v1
        envelope), with the same checks and errors; an adapter may do it without a cipher
        object of ours."""
        return self.new(key).encrypt(nonce, plaintext, aad)

    def open(self, key: bytes, nonce: bytes, data: bytes, aad: bytes | None = None) -> bytes:
        """``new(key).decrypt(nonce, data, aad)`` for a key that opens one message, with the
        same checks and errors (see :meth:`seal`)."""
        return self.new(key).decrypt(nonce, data, aad)

    @abc.abstractmethod
    def _cipher(self, key: bytes) -> AEADCipher:
        """The library's cipher for a checked 32-byte key."""
