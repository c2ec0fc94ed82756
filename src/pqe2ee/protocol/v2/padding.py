"""Length padding for v2 (spec/v2.md §6): Padmé, next power of two, fixed buckets.

All functions map a length ``L >= 0`` to a padded length ``>= L``; padding bytes are zero and
receivers check them.

* Padmé (Nikitin et al., "Reducing Metadata Leakage from Encrypted Files and Communication
  with PURBs", PoPETs 2019(4)): keeps the top ``floor(log2 E) + 1`` bits of ``L`` where
  ``E = floor(log2 L)``, rounding up. Overhead at most ~12 %, leaks O(log log L) bits.
* pow2: the next power of two (overhead up to 100 %).
* bucket(b): the next multiple of ``b``.
"""

from __future__ import annotations

from typing import Final, Literal

from pqe2ee.errors import ErrorCode, LocalProtocolError

__all__ = ["BODY_PADDINGS", "BodyPadding", "bucket", "pad_length", "padme", "pow2"]

BodyPadding = Literal["none", "padme", "pow2"]
BODY_PADDINGS: Final = ("none", "padme", "pow2")


def padme(length: int) -> int:
    """Padmé: ``padme(0) = 0``, ``padme(1) = 1``; otherwise rounds ``L`` up so that only its top
    ``floor(log2(floor(log2 L))) + 1`` bits may be non-zero."""
    if length < 0:
        raise LocalProtocolError("length must be >= 0", code=ErrorCode.INVALID_ARGUMENT)
    if length < 2:
        return length
    e = length.bit_length() - 1  # floor(log2 L)
    s = e.bit_length()  # floor(log2 E) + 1
    last_bits = e - s
    mask = (1 << last_bits) - 1
    return (length + mask) & ~mask


def pow2(length: int) -> int:
    """The smallest power of two ``>= L`` (``pow2(0) = 0``)."""
    if length < 0:
        raise LocalProtocolError("length must be >= 0", code=ErrorCode.INVALID_ARGUMENT)
    if length == 0:
        return 0
    return 1 << (length - 1).bit_length()


def bucket(length: int, size: int) -> int:
    """The smallest multiple of ``size`` that is ``>= L`` (``size`` 0 means no padding)."""
    if length < 0 or size < 0:
        raise LocalProtocolError("length and size must be >= 0", code=ErrorCode.INVALID_ARGUMENT)
    if size == 0:
        return length
    return -(-length // size) * size


def pad_length(length: int, policy: BodyPadding) -> int:
    """The padded length of a request plaintext under ``policy``."""
    if policy == "none":
        return length
    if policy == "padme":
        return padme(length)
    if policy == "pow2":
        return pow2(length)
    raise LocalProtocolError(f"unknown padding policy {policy!r}", code=ErrorCode.INVALID_ARGUMENT)
