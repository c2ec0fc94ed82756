"""Key derivation and key material for the protocol layer: HKDF-SHA256 and the system CSPRNG.

``pqe2ee.protocol`` imports no crypto library and reads no randomness itself: the keyed hash
under both profiles' key schedules (RFC 5869 HKDF-SHA256, over pyca ``cryptography``'s HMAC,
and its HKDF for :func:`hkdf`) and the default source of random bytes live here, behind the
backend boundary. ``pqe2ee.protocol.kdf`` builds the v1 key schedule (on :func:`hkdf`, extract
and expand in one call) and HPKE's labeled extract / expand on these functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pqe2ee.errors import ErrorCode, LocalProtocolError

__all__ = ["HASH_LEN", "RandomBytes", "hkdf", "hkdf_expand", "hkdf_extract", "random_bytes"]

#: Output length of SHA-256 (HKDF's ``HashLen``).
HASH_LEN: Final = 32
_MAX_EXPAND: Final = 255 * HASH_LEN
_ZERO_SALT: Final = bytes(HASH_LEN)
_SHA256: Final = SHA256()

RandomBytes = Callable[[int], bytes]

#: The default randomness of every sealing function in ``pqe2ee.protocol`` (the OS CSPRNG).
random_bytes: Final[RandomBytes] = os.urandom


def _hmac(key: bytes, data: bytes) -> bytes:
    mac = HMAC(key, _SHA256)
    mac.update(data)
    return mac.finalize()


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-256 (RFC 5869 §2.2); an empty salt means 32 zero bytes."""
    return _hmac(salt or _ZERO_SALT, ikm)


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand with SHA-256 (RFC 5869 §2.3); ``length`` <= 255 * 32."""
    if not 0 <= length <= _MAX_EXPAND:
        raise LocalProtocolError("HKDF-Expand length out of range", code=ErrorCode.INVALID_ARGUMENT)
    if length <= HASH_LEN:  # the usual case: one block
        return _hmac(prk, info + b"\x01")[:length]
    blocks: list[bytes] = []
    block = b""
    for counter in range(1, -(-length // HASH_LEN) + 1):
        block = _hmac(prk, block + info + bytes((counter,)))
        blocks.append(block)
    return b"".join(blocks)[:length]


def hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869 §2): :func:`hkdf_extract` then :func:`hkdf_expand` in one call of
    pyca's HKDF (no HMAC object or frame of ours per step: a per-request key schedule's case).
    A length out of range gets :func:`hkdf_expand`'s error."""
    if not 0 <= length <= _MAX_EXPAND:
        return hkdf_expand(b"", info, length)  # (raises)
    return HKDF(_SHA256, length, salt or None, info).derive(ikm)
