"""Key derivation and key material for the protocol layer: HKDF-SHA256 and the system CSPRNG.

``pqe2ee.protocol`` imports no crypto library and reads no randomness itself: the keyed hash
under both profiles' key schedules (RFC 5869 HKDF-SHA256, over the standard library's one-call
``hmac.digest``: OpenSSL's HMAC, no HMAC object per block) and
the default source of random bytes live here, behind the backend boundary.
``pqe2ee.protocol.kdf`` builds the v1 key schedule (on :func:`hkdf`, extract and expand in one
call) and HPKE's labeled extract / expand on these functions.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Final

from pqe2ee.errors import ErrorCode, LocalProtocolError

__all__ = ["HASH_LEN", "RandomBytes", "hkdf", "hkdf_expand", "hkdf_extract", "random_bytes"]

#: Output length of SHA-256 (HKDF's ``HashLen``).
HASH_LEN: Final = 32
_MAX_EXPAND: Final = 255 * HASH_LEN
_ZERO_SALT: Final = bytes(HASH_LEN)

RandomBytes = Callable[[int], bytes]

#: The default randomness of every sealing function in ``pqe2ee.protocol`` (the OS CSPRNG).
random_bytes: Final[RandomBytes] = os.urandom


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-256 (RFC 5869 §2.2); an empty salt means 32 zero bytes."""
    return hmac.digest(salt or _ZERO_SALT, ikm, "sha256")


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand with SHA-256 (RFC 5869 §2.3); ``length`` <= 255 * 32."""
    if not 0 <= length <= _MAX_EXPAND:
        raise LocalProtocolError("HKDF-Expand length out of range", code=ErrorCode.INVALID_ARGUMENT)
    if length <= HASH_LEN:  # the usual case: one block
        return hmac.digest(prk, info + b"\x01", "sha256")[:length]
    blocks: list[bytes] = []
    block = b""
    for counter in range(1, -(-length // HASH_LEN) + 1):
        block = hmac.digest(prk, block + info + bytes((counter,)), "sha256")
        blocks.append(block)
    return b"".join(blocks)[:length]


def hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869 §2): :func:`hkdf_extract` then :func:`hkdf_expand`, in one call
    for a key of at most 32 bytes (one HMAC each: a per-request key schedule's case)."""
    prk = hmac.digest(salt or _ZERO_SALT, ikm, "sha256")
    if 0 <= length <= HASH_LEN:
        return hmac.digest(prk, info + b"\x01", "sha256")[:length]
    return hkdf_expand(prk, info, length)
