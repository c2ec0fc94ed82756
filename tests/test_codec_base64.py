"""``a2b_base64_strict`` (msgspec first, binascii's verdict for what msgspec refuses) gives
exactly what ``binascii.a2b_base64(data, strict_mode=True)`` gives: the same bytes, or the same
refusal. Stream records and keys are decoded through it, so a difference would change what a
client accepts on the wire."""

from __future__ import annotations

import base64
import binascii
import itertools
import random

import pytest

from pqe2ee.errors import ErrorCode, PQE2EEError
from pqe2ee.protocol._codec import a2b_base64_strict, b64decode, b64encode

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _outcome(fn: object, data: bytes) -> bytes | str:
    try:
        return fn(data)  # type: ignore[operator,no-any-return]
    except binascii.Error:
        return "refused"


def _strict(data: bytes) -> bytes:
    return binascii.a2b_base64(data, strict_mode=True)


EDGES = [
    b"",
    b"QUJD",
    b"QUI=",
    b"QUJ=",  # non-canonical trailing bits: accepted, as the vectors say
    b"QU==",
    b"QV==",
    b"QUI",  # no padding
    b"Q===",
    b"====",
    b"QU=I",
    b"QUI=QUI=",  # data after padding
    b"QUJD\n",
    b" QUJD",
    b"QU JD",
    b"-_-_",  # urlsafe alphabet
    b'QU"D',
    b'QUJD"',
    b'"QUJD',
    b"QU\\u0049=",  # a JSON escape spelling "QUI=": refused, as binascii refuses it
    b"QUJ\\/",
    b"\\",
    b"QUJ\x00",
    b"QUJ\x7f",
    b"QUJ\xc3\xa9",
    b"QUJ\xff",
    b"QUJDRA==",
    b"QUJDRA=",
    b"QUJDRA",
]


@pytest.mark.parametrize("data", EDGES)
def test_edges_match_binascii(data: bytes) -> None:
    assert _outcome(a2b_base64_strict, data) == _outcome(_strict, data)


def test_exhaustive_short_inputs_match_binascii() -> None:
    symbols = b'AQw+/=\\" \x80'
    for n in range(6):
        for combo in itertools.product(symbols, repeat=n):
            data = bytes(combo)
            assert _outcome(a2b_base64_strict, data) == _outcome(_strict, data), data


def test_random_inputs_match_binascii() -> None:
    rng = random.Random(20261205)
    noise = b'= \t\r\n-_."\\u{}\x00\x1f\x7f\x80\xff'
    accepted = 0
    for _ in range(20_000):
        n = rng.randrange(0, 24)
        if rng.random() < 0.5:
            data = bytes(rng.choice(_ALPHABET) for _ in range(n)) + b"=" * rng.randrange(3)
        else:
            data = bytes(rng.choice(_ALPHABET + noise) for _ in range(n))
        expected = _outcome(_strict, data)
        accepted += expected != "refused"
        assert _outcome(a2b_base64_strict, data) == expected, data
    assert accepted > 3_000  # both branches were exercised


def test_records_of_every_length_round_trip() -> None:
    rng = random.Random(7)
    for n in range(0, 600, 7):
        raw = rng.randbytes(n)
        assert a2b_base64_strict(binascii.b2a_base64(raw, newline=False)) == raw


def test_b64decode_keeps_its_typed_error() -> None:
    assert b64decode(b"QUJD", what="x") == b"ABC"
    assert b64decode("QUJD", what="x") == b"ABC"
    for bad in (b"QUI", b"QU\\u0049=", "QUI", "QUJ\u00e9"):
        with pytest.raises(PQE2EEError) as info:
            b64decode(bad, what="thing", code=ErrorCode.MALFORMED_EVENT)
        assert info.value.code is ErrorCode.MALFORMED_EVENT


def test_b64encode_is_standard_base64_with_padding() -> None:
    """b64encode (binascii's, called directly) gives base64.b64encode's bytes for every length
    and for every bytes-like input, and round-trips through b64decode."""
    rng = random.Random(5)
    for n in range(0, 70):
        data = rng.randbytes(n)
        for form in (data, bytearray(data), memoryview(data)):
            assert b64encode(form) == base64.b64encode(data)
        assert b64decode(b64encode(data).decode("ascii"), what="x") == data
