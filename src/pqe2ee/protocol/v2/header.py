"""The v2 context header H: sent in clear in front of the request, bound into the HPKE key
schedule through ``info = "pqe2ee/v2 req" || 00 || SHA-256(H)`` (spec/v2.md §3).

Layout (integers big-endian; ``lp1`` = u8 length || bytes, ``lp2`` = u16 length || bytes)::

    off  size  field
      0     4  magic "PQE2"
      4     1  version 02
      5     2  hdr_len: total length of H
      7     1  flags: bit0 stream, bits1-2 response padding (0 none, 1 b=256, 2 b=128), rest 0
      8     6  kem_id 647A, kdf_id 0001, aead_id 0003
     14    32  pk_hash = SHA-256(instance X-Wing public key)
     46     8  ts_ms (client clock, ms since the epoch)
     54    16  request_id (random)
     70   var  chute_id lp1, instance_id lp1 (canonical lowercase UUIDs), relay_nonce lp1,
               path lp2 (ASCII, "/...", no "?" or "#"), model lp1 (UTF-8, non-empty)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from pqe2ee.errors import ErrorCode, LocalProtocolError, MalformedError
from pqe2ee.protocol.v2.hpke import AEAD_ID, KDF_ID, KEM_ID

__all__ = [
    "FIXED_LEN",
    "INFO_PREFIX",
    "MAGIC",
    "MAX_HEADER_LEN",
    "MAX_PATH_LEN",
    "RESPONSE_PADDINGS",
    "VERSION",
    "ContextHeader",
    "header_info",
    "parse_header",
    "strip_relay_path",
]

MAGIC: Final = b"PQE2"
VERSION: Final = 2
FIXED_LEN: Final = 70
MAX_PATH_LEN: Final = 2048
MAX_LP1: Final = 255
# The longest valid H (spec/v2.md §3): two 36-byte UUIDs, the longest nonce, path and model.
MAX_HEADER_LEN: Final = FIXED_LEN + 2 * (1 + 36) + (1 + MAX_LP1) + 2 + MAX_PATH_LEN + 1 + MAX_LP1
INFO_PREFIX: Final = b"pqe2ee/v2 req\x00"
SUITE_BYTES: Final = (
    KEM_ID.to_bytes(2, "big") + KDF_ID.to_bytes(2, "big") + AEAD_ID.to_bytes(2, "big")
)

FLAG_STREAM: Final = 0x01
_PAD_SHIFT: Final = 1
_PAD_MASK: Final = 0x06
_RESERVED_MASK: Final = 0xF8
#: response padding bucket size by flag value (bits 1-2); value 3 is reserved
RESPONSE_PADDINGS: Final[dict[int, int]] = {0: 0, 1: 256, 2: 128}
_PAD_CODE: Final = {v: k for k, v in RESPONSE_PADDINGS.items()}

_UUID_RE: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TOKEN_RE: Final = re.compile(r"[\x21-\x7e]{1,255}")
_PATH_RE: Final = re.compile(r"/[\x21-\x22\x24-\x3e\x40-\x7e]*")  # visible ASCII minus # and ?


def _problem(h: ContextHeader) -> str | None:
    """Why ``h`` is not a valid header, or None."""
    if h.response_padding not in _PAD_CODE:
        return "response_padding must be 0, 128 or 256"
    if len(h.pk_hash) != 32:
        return "pk_hash must be 32 bytes"
    if not 0 <= h.ts_ms < 1 << 64:
        return "ts_ms out of range"
    if len(h.request_id) != 16:
        return "request_id must be 16 bytes"
    if not _UUID_RE.fullmatch(h.chute_id):
        return "chute_id must be a canonical lowercase UUID"
    if not _UUID_RE.fullmatch(h.instance_id):
        return "instance_id must be a canonical lowercase UUID"
    if not _TOKEN_RE.fullmatch(h.relay_nonce):
        return "relay_nonce must be 1-255 visible ASCII characters"
    if len(h.path) > MAX_PATH_LEN or not _PATH_RE.fullmatch(h.path):
        return "path must be '/' then visible ASCII without '?' or '#', at most 2048 bytes"
    try:
        model = h.model.encode("utf-8")
    except UnicodeEncodeError:
        return "model must be valid Unicode"
    if not model:
        return "model must not be empty"
    if len(model) > MAX_LP1:
        return "model must be at most 255 bytes of UTF-8"
    return None


@dataclass(frozen=True, slots=True)
class ContextHeader:
    """The fields of H. Validated on construction (LocalProtocolError ``invalid_argument``)."""

    stream: bool
    pk_hash: bytes
    ts_ms: int
    request_id: bytes
    chute_id: str
    instance_id: str
    relay_nonce: str
    path: str
    model: str
    response_padding: int = 0  # 0 (none), 128 or 256

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem is not None:
            raise LocalProtocolError(f"context header: {problem}", code=ErrorCode.INVALID_ARGUMENT)

    @property
    def flags(self) -> int:
        return (FLAG_STREAM if self.stream else 0) | (
            _PAD_CODE[self.response_padding] << _PAD_SHIFT
        )

    def encode(self) -> bytes:
        var = b"".join(
            (
                _lp1(self.chute_id.encode("ascii")),
                _lp1(self.instance_id.encode("ascii")),
                _lp1(self.relay_nonce.encode("ascii")),
                len(self.path).to_bytes(2, "big") + self.path.encode("ascii"),
                _lp1(self.model.encode("utf-8")),
            )
        )
        total = FIXED_LEN + len(var)
        return b"".join(
            (
                MAGIC,
                bytes((VERSION,)),
                total.to_bytes(2, "big"),
                bytes((self.flags,)),
                SUITE_BYTES,
                self.pk_hash,
                self.ts_ms.to_bytes(8, "big"),
                self.request_id,
                var,
            )
        )


def _lp1(b: bytes) -> bytes:
    return bytes((len(b),)) + b


def _bad(message: str) -> MalformedError:
    return MalformedError(f"context header: {message}", code=ErrorCode.BAD_HEADER)


def parse_header(data: bytes) -> ContextHeader:
    """Parse exactly one H (no trailing bytes). Raises MalformedError ``bad_header``."""
    if len(data) < FIXED_LEN:
        raise _bad(f"{len(data)} bytes, shorter than {FIXED_LEN}")
    if data[:4] != MAGIC:
        raise _bad("bad magic")
    if data[4] != VERSION:
        raise _bad(f"unsupported version {data[4]}")
    hdr_len = int.from_bytes(data[5:7], "big")
    if hdr_len != len(data):
        raise _bad(f"hdr_len {hdr_len} does not match the {len(data)} bytes given")
    flags = data[7]
    if flags & _RESERVED_MASK or (flags & _PAD_MASK) >> _PAD_SHIFT not in RESPONSE_PADDINGS:
        raise _bad("reserved flag bits set")
    if data[8:14] != SUITE_BYTES:
        raise _bad("unsupported suite")
    pos = FIXED_LEN
    fields: list[bytes] = []
    for width in (1, 1, 1, 2, 1):
        if pos + width > len(data):
            raise _bad("truncated length prefix")
        n = int.from_bytes(data[pos : pos + width], "big")
        pos += width
        if pos + n > len(data):
            raise _bad("field runs past the end")
        fields.append(bytes(data[pos : pos + n]))
        pos += n
    if pos != len(data):
        raise _bad("trailing bytes")
    try:
        chute_id, instance_id, relay_nonce, path = (f.decode("ascii") for f in fields[:4])
        model = fields[4].decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("field is not valid ASCII / UTF-8") from None
    try:
        return ContextHeader(
            stream=bool(flags & FLAG_STREAM),
            pk_hash=bytes(data[14:46]),
            ts_ms=int.from_bytes(data[46:54], "big"),
            request_id=bytes(data[54:70]),
            chute_id=chute_id,
            instance_id=instance_id,
            relay_nonce=relay_nonce,
            path=path,
            model=model,
            response_padding=RESPONSE_PADDINGS[(flags & _PAD_MASK) >> _PAD_SHIFT],
        )
    except LocalProtocolError as exc:
        raise _bad(exc.message.removeprefix("context header: ")) from None


def header_info(header_bytes: bytes) -> bytes:
    """HPKE ``info`` for a request: ``"pqe2ee/v2 req" || 00 || SHA-256(H)`` (46 bytes)."""
    return INFO_PREFIX + hashlib.sha256(header_bytes).digest()


def strip_relay_path(delivered: str) -> str:
    """The path as the client sent it, from the relay's ``path.ljust(24, "?")`` form.

    Exact because a v2 path never contains ``?``.
    """
    return delivered.rstrip("?")
