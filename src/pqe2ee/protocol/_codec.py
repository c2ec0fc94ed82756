"""Byte-level helpers shared by both wire profiles: strict base64, bounded gzip, JSON objects,
and the two facts every party reads from plaintext JSON (a body's ``stream`` flag, an SSE
line's ``usage``)."""

from __future__ import annotations

import binascii
import functools
import struct
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec

from pqe2ee._json import MAX_JSON_DEPTH, json_decode, json_too_deep
from pqe2ee.errors import ErrorCode, LimitExceeded, MalformedError, error_class

__all__ = [
    "MAX_JSON_DEPTH",
    "b64decode",
    "b64encode",
    "extract_usage",
    "gunzip_bounded",
    "gzip_compress",
    "json_decode",
    "json_decode_object",
    "json_too_deep",
    "stream_flag",
]


GZIP_WBITS = 31  # zlib: 16 + 15 -> gzip container only
# What zlib writes for level 0: magic, CM=8, FLG=0, MTIME=0, XFL=4, OS=3 (RFC 1952).
_GZIP_STORED_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\x03"
_STORED_DIRECT_MAX = 16384  # checked byte for byte against zlib's level 0 up to here


#: ``b64encode(data)``: standard base64 with padding, as bytes (RFC 4648 section 4). binascii's
#: own function, called directly (``base64.b64encode`` is a Python wrapper of it: two frames
#: per request for the response key).
b64encode: Final[Callable[[bytes], bytes]] = functools.partial(binascii.b2a_base64, newline=False)


# msgspec decodes a JSON string into bytes as standard base64: alphabet A-Z a-z 0-9 + /, "="
# padding, a length that is a multiple of 4. What it accepts, strict binascii accepts too, with
# the same bytes (tests/test_codec_base64.py holds both to that); it refuses more (a string
# with an escape, a control character, a stray quote), and those go to binascii.
_BASE64_IN_JSON = msgspec.json.Decoder(bytes)
#: msgspec's half of :func:`a2b_base64_quoted`, for a caller that already knows its input holds
#: no backslash: the bytes, or a ``ValueError`` (then ask :func:`a2b_base64_quoted` for the
#: verdict).
a2b_base64_compact: Final = _BASE64_IN_JSON.decode


def a2b_base64_strict(data: bytes) -> bytes:
    """``binascii.a2b_base64(data, strict_mode=True)`` (its result, its ``binascii.Error``),
    about 4x faster for the usual input: a stream record or a key is decoded by msgspec, and
    binascii's verdict is asked only for what msgspec refuses."""
    return a2b_base64_quoted(b'"' + data + b'"')


def a2b_base64_quoted(quoted: bytes) -> bytes:
    """:func:`a2b_base64_strict` of ``quoted[1:-1]``, for base64 still between the quotes of
    the JSON it came in (``quoted`` starts and ends with ``"``): a stream record is decoded
    where it lies in its line, not copied out and quoted again."""
    # Inside quotes a backslash would start a JSON escape. (find, not `in`: for bytes, `in` first
    # tries the needle as an integer, raising and clearing a TypeError on every call.)
    if quoted.find(b"\\") < 0:
        try:
            return _BASE64_IN_JSON.decode(quoted)
        except msgspec.MsgspecError:
            pass
    return binascii.a2b_base64(quoted[1:-1], strict_mode=True)


def b64decode(
    data: str | bytes, *, what: str, code: ErrorCode = ErrorCode.MALFORMED_PAYLOAD
) -> bytes:
    """Strict standard base64 (padding required, no stray characters)."""
    try:
        if isinstance(data, bytes):
            return a2b_base64_strict(data)
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        raise error_class(code)(f"{what} is not valid base64", code=code) from None


def gzip_compress(data: bytes, level: int) -> bytes:
    """A single gzip member with mtime 0 (deterministic for a given zlib). Level 0 stores."""
    n = len(data)
    if level == 0 and n <= _STORED_DIRECT_MAX:
        # One final stored block, written directly: the same bytes zlib writes for level 0,
        # without setting up a deflate stream (which costs more than the copy).
        return b"".join(
            (
                _GZIP_STORED_HEADER,
                struct.pack("<BHH", 1, n, n ^ 0xFFFF),
                data,
                struct.pack("<II", zlib.crc32(data), n),
            )
        )
    return zlib.compress(data, level, wbits=GZIP_WBITS)


def gunzip_bounded(data: bytes, *, limit: int, what: str) -> bytes:
    """Decompress one or more concatenated gzip members, refusing more than ``limit`` bytes out.

    Never allocates more than ``limit + 1`` bytes of output, so a gzip bomb is refused cheaply.
    """
    out: list[bytes] = []
    total = 0
    rest = data
    while True:
        d = zlib.decompressobj(wbits=GZIP_WBITS)
        try:
            chunk = d.decompress(rest, limit - total + 1)
        except zlib.error:
            raise MalformedError(
                f"{what} is not valid gzip", code=ErrorCode.MALFORMED_PAYLOAD
            ) from None
        total += len(chunk)
        if total > limit:
            raise LimitExceeded(f"{what} decompresses to more than {limit} bytes")
        out.append(chunk)
        if not d.eof:
            raise MalformedError(
                f"{what} gzip stream is truncated", code=ErrorCode.MALFORMED_PAYLOAD
            )
        rest = d.unused_data
        if not rest:
            break
        if not rest.startswith(b"\x1f\x8b"):
            raise MalformedError(
                f"{what} has trailing bytes after gzip", code=ErrorCode.MALFORMED_PAYLOAD
            )
    return b"".join(out)


def json_decode_object(
    data: bytes, *, what: str, code: ErrorCode = ErrorCode.MALFORMED_PAYLOAD
) -> dict[str, Any]:
    """Decode JSON that must be an object."""
    try:
        obj = json_decode(data)
    except msgspec.DecodeError:
        raise error_class(code)(f"{what} is not valid JSON", code=code) from None
    if not isinstance(obj, dict):
        raise error_class(code)(f"{what} must be a JSON object", code=code)
    return obj


def stream_flag(body: Mapping[str, Any]) -> bool:
    """The stream flag as every party derives it: truthiness of the body's ``stream``."""
    return bool(body.get("stream"))


def extract_usage(line: bytes) -> Any | None:
    """The ``usage`` object of an engine SSE line ``data: {..., "usage": {...}}``, else None.

    Mirrors the real runtime: only lines starting with ``data: `` that mention ``"usage"``.
    """
    # rfind: an engine chunk's usage is its last key (found at once when there is one)
    if not line.startswith(b"data: ") or line.rfind(b'"usage"') < 0:
        return None
    body = line[6:]
    try:
        if not body.isascii():
            body.decode()  # msgspec checks UTF-8 only in the strings it keeps
        # Builds only ``usage`` (the rest is checked, not built): ~3.5x faster than a full
        # decode; json_decode bounds the nesting first.
        return json_decode(body, decoder=_usage_decoder).usage
    except (msgspec.DecodeError, UnicodeDecodeError):  # ValidationError (a DecodeError) too
        return None


class _UsageOnly(msgspec.Struct):
    usage: Any = None


_usage_decoder = msgspec.json.Decoder(_UsageOnly)
