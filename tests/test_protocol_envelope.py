"""v1 request/response envelopes (src/pqe2ee/protocol/v1/envelope.py, _codec.py, kdf.py).

The blobs are opened here a second time by hand (KEM + HKDF + ChaCha20-Poly1305 + gunzip, straight
from the primitives) so the tests check the wire layout, not only that seal and open agree.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from pqe2ee.backends import AEAD, KEM, available, get_aead, get_kem
from pqe2ee.backends.base import MLKEM768_CT_LEN, MLKEM768_PK_LEN, KEMPrivateKey
from pqe2ee.errors import (
    DecryptError,
    ErrorCode,
    LimitExceeded,
    LocalProtocolError,
    MalformedError,
    PQE2EEError,
)
from pqe2ee.protocol import (
    BLOB_OVERHEAD,
    INFO_REQUEST,
    INFO_RESPONSE,
    RESPONSE_PK_FIELD,
    derive_key,
    open_request,
    open_response,
    seal_request,
    seal_response,
    stream_flag,
)
from pqe2ee.protocol._codec import gunzip_bounded, gzip_compress
from pqe2ee.protocol.v1.envelope import STORE_BELOW

CANARY = "canary-7f3a9c-SECRET-PROMPT"

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def kem() -> KEM:
    return get_kem("pyca")


@pytest.fixture(scope="module")
def aead() -> AEAD:
    return get_aead("pyca")


@pytest.fixture(scope="module")
def instance_key(kem: KEM) -> KEMPrivateKey:
    return kem.generate()


def _seal(body: Any, instance_key: KEMPrivateKey, kem: KEM, aead: AEAD, **kw: Any) -> Any:
    return seal_request(
        body, instance_key.public_key, response_key=kem.generate(), kem=kem, aead=aead, **kw
    )


def _open_by_hand(blob: bytes, key: KEMPrivateKey, info: bytes) -> bytes:
    """kem_ct(1088) || nonce(12) || ct || tag(16) -> gunzipped plaintext, from the primitives."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    kem_ct, nonce, rest = blob[:1088], blob[1088:1100], blob[1100:]
    ss = key.decapsulate(kem_ct)
    sym = derive_key(ss, kem_ct, info)
    return gzip.decompress(ChaCha20Poly1305(sym).decrypt(nonce, rest, None))


def _seal_raw(payload: bytes, public_key: bytes, info: bytes, kem: KEM) -> bytes:
    """A blob carrying ``payload`` as the AEAD plaintext (already 'gzipped' or not at all)."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    kem_ct, ss = kem.encapsulate(public_key)
    nonce = os.urandom(12)
    return (
        kem_ct
        + nonce
        + ChaCha20Poly1305(derive_key(ss, kem_ct, info)).encrypt(nonce, payload, None)
    )


# -- request: seal / open -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", available())
def test_request_round_trip_every_kem_backend(backend: str, aead: AEAD) -> None:
    kem = get_kem(backend)
    inst = kem.generate()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    sealed = seal_request(body, inst.public_key, response_key=kem.generate(), kem=kem, aead=aead)
    opened = open_request(sealed.blob, inst, aead=aead)
    assert opened.body == body
    assert opened.response_public_key == sealed.response_key.public_key
    reply = b'{"id":"x","choices":[]}'
    blob = seal_response(reply, opened.response_public_key, kem=kem, aead=aead)
    assert open_response(blob, sealed.response_key, aead=aead) == reply


def test_bytes_body_kept_byte_for_byte_with_field_appended(
    kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    # Odd spacing, key order, escapes and number forms that a re-serialisation would change.
    raw = b'{"model" :  "m","temperature":1.50, "x":"\\u00e9\\/", "messages":[ ]}'
    sealed = _seal(raw, instance_key, kem, aead)
    pk_b64 = base64.b64encode(sealed.response_key.public_key)
    plaintext = _open_by_hand(sealed.blob, instance_key, INFO_REQUEST)
    assert plaintext == raw[:-1] + b',"e2e_response_pk":"' + pk_b64 + b'"}'
    assert len(sealed.blob) == BLOB_OVERHEAD + len(_decrypt_request_gz(sealed.blob, instance_key))
    assert sealed.model == "m"
    assert sealed.stream is False
    opened = open_request(sealed.blob, instance_key, aead=aead)
    assert opened.body == json.loads(raw)
    assert json.loads(opened.json) == json.loads(raw)
    assert RESPONSE_PK_FIELD not in opened.body


def _decrypt_request_gz(blob: bytes, key: KEMPrivateKey) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    kem_ct = blob[:MLKEM768_CT_LEN]
    sym = derive_key(key.decapsulate(kem_ct), kem_ct, INFO_REQUEST)
    return ChaCha20Poly1305(sym).decrypt(blob[1088:1100], blob[1100:], None)


def test_mapping_body(kem: KEM, aead: AEAD, instance_key: KEMPrivateKey) -> None:
    body = {"model": "org/model", "messages": [{"role": "user", "content": CANARY}], "n": 2}
    sealed = _seal(body, instance_key, kem, aead)
    doc = json.loads(_open_by_hand(sealed.blob, instance_key, INFO_REQUEST))
    assert list(doc) == ["model", "messages", "n", RESPONSE_PK_FIELD]  # field goes last
    assert base64.b64decode(doc.pop(RESPONSE_PK_FIELD)) == sealed.response_key.public_key
    assert doc == body
    assert body == {"model": "org/model", "messages": [{"role": "user", "content": CANARY}], "n": 2}
    assert sealed.model == "org/model"


@pytest.mark.parametrize("raw", [b"{}", b"{ }", b" \n{\t}\r\n ", b"\n{}\n"])
def test_empty_object_body(raw: bytes, kem: KEM, aead: AEAD, instance_key: KEMPrivateKey) -> None:
    sealed = _seal(raw, instance_key, kem, aead)
    plaintext = _open_by_hand(sealed.blob, instance_key, INFO_REQUEST)
    doc = json.loads(plaintext)
    assert list(doc) == [RESPONSE_PK_FIELD]
    assert sealed.model is None
    assert open_request(sealed.blob, instance_key, aead=aead).body == {}


def test_whitespace_around_json_is_trimmed(
    kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    raw = b'  \n{"model":"m", "a":[1, 2] \n }\r\n\t'
    sealed = _seal(raw, instance_key, kem, aead)
    plaintext = _open_by_hand(sealed.blob, instance_key, INFO_REQUEST)
    pk_b64 = base64.b64encode(sealed.response_key.public_key)
    assert plaintext == b'{"model":"m", "a":[1, 2],"e2e_response_pk":"' + pk_b64 + b'"}'
    assert open_request(sealed.blob, instance_key, aead=aead).body == {"model": "m", "a": [1, 2]}


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","e2e_response_pk":"AAAA"}',
        b'{"e2e_response_p\\u006b":null}',  # the same key, written with an escape
        {"model": "m", "e2e_response_pk": "x"},
    ],
)
def test_reserved_field_already_present(
    body: Any, kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    with pytest.raises(LocalProtocolError) as info:
        _seal(body, instance_key, kem, aead)
    assert info.value.code is ErrorCode.INVALID_BODY


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'"model"',
        b"1",
        b"null",
        b"",
        b"   ",
        b"{",
        b'{"model":"m"',
        b'{"model":"m"} {}',
        b'{"model":"m",}',
        b"{'model':'m'}",
        b'{"a":"\xc3"}',  # invalid UTF-8 inside a string
        b"\xff\xfe{}",
        ["model"],
        "a string",
        42,
        None,
        {"model": object()},
        {"model": 1j},
    ],
)
def test_body_not_a_json_object(
    body: Any, kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    with pytest.raises(LocalProtocolError) as info:
        _seal(body, instance_key, kem, aead)
    assert info.value.code is ErrorCode.INVALID_BODY


@pytest.mark.parametrize("length", [0, 32, MLKEM768_PK_LEN - 1, MLKEM768_PK_LEN + 1, 2400])
def test_wrong_public_key_length(length: int, kem: KEM, aead: AEAD) -> None:
    with pytest.raises(LocalProtocolError) as info:
        seal_request(
            b'{"model":"m"}', b"\x00" * length, response_key=kem.generate(), kem=kem, aead=aead
        )
    assert info.value.code is ErrorCode.INVALID_KEY


def test_public_key_failing_modulus_check(kem: KEM, aead: AEAD) -> None:
    with pytest.raises(LocalProtocolError) as info:
        seal_request(
            b'{"model":"m"}',
            b"\xff" * MLKEM768_PK_LEN,
            response_key=kem.generate(),
            kem=kem,
            aead=aead,
        )
    assert info.value.code is ErrorCode.INVALID_KEY


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (None, False),
        (1, True),
        (0, False),
        (0.0, False),
        ("false", True),  # truthiness, exactly as the reference's bool(payload.get("stream"))
        ("", False),
        ([], False),
        ([0], True),
        ({}, False),
        ({"a": 1}, True),
    ],
)
def test_stream_flag_is_truthiness(
    value: Any, expected: bool, kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    body = {"model": "m", "stream": value}
    assert stream_flag(body) is expected
    assert stream_flag(body) is bool(body.get("stream"))
    sealed = _seal(json.dumps(body).encode(), instance_key, kem, aead)
    assert sealed.stream is expected
    assert open_request(sealed.blob, instance_key, aead=aead).stream is expected


def test_stream_flag_absent(kem: KEM, aead: AEAD, instance_key: KEMPrivateKey) -> None:
    assert stream_flag({}) is False
    assert _seal({"model": "m"}, instance_key, kem, aead).stream is False


@pytest.mark.parametrize("model", [None, 5, ["m"], {"a": 1}])
def test_non_string_model_is_reported_as_none(
    model: Any, kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    assert _seal({"model": model}, instance_key, kem, aead).model is None


def test_deterministic_random_bytes_and_compresslevel(
    kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    body = b'{"model":"m","messages":[' + b'{"role":"user","content":"aaaa"},' * 200 + b"{}]}"
    fixed = b"\x01" * 12
    low = _seal(body, instance_key, kem, aead, random_bytes=lambda n: fixed[:n], compresslevel=1)
    high = _seal(body, instance_key, kem, aead, compresslevel=9)
    assert low.blob[MLKEM768_CT_LEN : MLKEM768_CT_LEN + 12] == fixed
    assert open_request(low.blob, instance_key, aead=aead).body == json.loads(body)
    assert open_request(high.blob, instance_key, aead=aead).body == json.loads(body)


def _is_stored(gz: bytes) -> bool:
    """True when the gzip member's first deflate block is a stored one (BTYPE 00)."""
    assert gz[:4] == b"\x1f\x8b\x08\x00"  # no optional header fields
    return (gz[10] >> 1) & 0b11 == 0


def test_default_compression_stores_small_and_deflates_large(
    kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    small = json.dumps(chat(500)).encode()
    large = json.dumps(chat(20_000)).encode()
    for body, stored in ((small, True), (large, False)):
        sealed = _seal(body, instance_key, kem, aead)
        gz = _decrypt_request_gz(sealed.blob, instance_key)
        assert _is_stored(gz) is stored
        assert json.loads(gzip.decompress(gz))["messages"] == json.loads(body)["messages"]
        if not stored:
            assert len(gz) < len(body) // 2
    # just under and at the bound (the plaintext includes the ~1.6 KiB base64 response key)
    base = len(
        _open_by_hand(
            _seal(b'{"pad":""}', instance_key, kem, aead).blob, instance_key, INFO_REQUEST
        )
    )
    for size, stored in ((STORE_BELOW - 1, True), (STORE_BELOW, False)):
        body = b'{"pad":"' + b"x" * (size - base) + b'"}'
        sealed = _seal(body, instance_key, kem, aead)
        assert len(_open_by_hand(sealed.blob, instance_key, INFO_REQUEST)) == size
        assert _is_stored(_decrypt_request_gz(sealed.blob, instance_key)) is stored
    # an explicit level always wins
    gz = _decrypt_request_gz(
        _seal(small, instance_key, kem, aead, compresslevel=6).blob, instance_key
    )
    assert not _is_stored(gz)
    gz = _decrypt_request_gz(
        _seal(large, instance_key, kem, aead, compresslevel=0).blob, instance_key
    )
    assert _is_stored(gz)


def test_default_compression_of_responses(kem: KEM, aead: AEAD) -> None:
    rk = kem.generate()
    for body, stored in ((b'{"id":"x"}', True), (json.dumps(chat(20_000)).encode(), False)):
        blob = seal_response(body, rk.public_key, kem=kem, aead=aead)
        kem_ct = blob[:MLKEM768_CT_LEN]
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        key = derive_key(rk.decapsulate(kem_ct), kem_ct, INFO_RESPONSE)
        gz = ChaCha20Poly1305(key).decrypt(blob[1088:1100], blob[1100:], None)
        assert _is_stored(gz) is stored
        assert open_response(blob, rk, aead=aead) == body


@pytest.mark.parametrize("size", [0, 1, 100, 2600, 4095, 4096, 16383, 16384, 16385, 70_000])
def test_gzip_level_0_is_what_zlib_writes(size: int) -> None:
    data = os.urandom(size)
    ours = gzip_compress(data, 0)
    theirs = zlib.compress(data, 0, wbits=31)
    assert ours[:9] + ours[10:] == theirs[:9] + theirs[10:]  # byte 9 is the OS (3 = Unix)
    assert gzip.decompress(ours) == data
    assert gunzip_bounded(ours, limit=size, what="x") == data


def chat(size: int) -> dict[str, Any]:
    words = " ".join(f"word{i % 97}" for i in range(size // 7))
    return {"model": "m", "messages": [{"role": "user", "content": words[:size]}]}


# -- request: open errors -------------------------------------------------------------------------


def test_open_request_wrong_key(kem: KEM, aead: AEAD, instance_key: KEMPrivateKey) -> None:
    sealed = _seal({"model": "m"}, instance_key, kem, aead)
    with pytest.raises(DecryptError) as info:
        open_request(sealed.blob, kem.generate(), aead=aead)
    assert info.value.code is ErrorCode.DECRYPT_FAILED


@pytest.mark.parametrize("where", [0, 500, MLKEM768_CT_LEN, MLKEM768_CT_LEN + 5, -1, -17])
def test_open_request_tampered(
    where: int, kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    blob = bytearray(_seal({"model": "m"}, instance_key, kem, aead).blob)
    blob[where] ^= 0x01
    with pytest.raises(DecryptError):
        open_request(bytes(blob), instance_key, aead=aead)


@pytest.mark.parametrize("length", [0, 1, MLKEM768_CT_LEN, BLOB_OVERHEAD - 1])
def test_open_short_blob(length: int, kem: KEM, aead: AEAD, instance_key: KEMPrivateKey) -> None:
    blob = _seal({"model": "m"}, instance_key, kem, aead).blob[:length]
    for opener in (open_request, open_response):
        with pytest.raises(MalformedError) as info:
            opener(blob, instance_key, aead=aead)
        assert info.value.code is ErrorCode.MALFORMED_BLOB


def test_open_blob_of_exactly_the_overhead_is_not_gzip(
    kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    blob = _seal_raw(b"", instance_key.public_key, INFO_REQUEST, kem)
    assert len(blob) == BLOB_OVERHEAD
    with pytest.raises(MalformedError) as info:
        open_request(blob, instance_key, aead=aead)
    assert info.value.code is ErrorCode.MALFORMED_PAYLOAD


def _request_with_plaintext(plaintext: bytes, key: KEMPrivateKey, kem: KEM) -> bytes:
    return _seal_raw(gzip.compress(plaintext), key.public_key, INFO_REQUEST, kem)


_PK_B64 = base64.b64encode(b"\x00" * MLKEM768_PK_LEN).decode()


@pytest.mark.parametrize(
    "doc",
    [
        {"model": "m"},
        {"model": "m", RESPONSE_PK_FIELD: None},
        {"model": "m", RESPONSE_PK_FIELD: 5},
        {"model": "m", RESPONSE_PK_FIELD: ["x"]},
        {"model": "m", RESPONSE_PK_FIELD: "not base64!"},
        {"model": "m", RESPONSE_PK_FIELD: _PK_B64[:-4]},  # one byte-triple short
        {"model": "m", RESPONSE_PK_FIELD: base64.b64encode(b"\x00" * 1185).decode()},
        {"model": "m", RESPONSE_PK_FIELD: _PK_B64.rstrip("=")},  # missing padding
    ],
)
def test_open_request_missing_or_invalid_response_pk(
    doc: dict[str, Any], kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    blob = _request_with_plaintext(json.dumps(doc).encode(), instance_key, kem)
    with pytest.raises(MalformedError) as info:
        open_request(blob, instance_key, aead=aead)
    assert info.value.code is ErrorCode.MALFORMED_PAYLOAD


@pytest.mark.parametrize("plaintext", [b"[]", b"not json", b'{"a":', b'{"a":"\xc3"}', b""])
def test_open_request_plaintext_not_an_object(
    plaintext: bytes, kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    blob = _request_with_plaintext(plaintext, instance_key, kem)
    with pytest.raises(MalformedError) as info:
        open_request(blob, instance_key, aead=aead)
    assert info.value.code is ErrorCode.MALFORMED_PAYLOAD


def test_open_request_accepts_a_valid_pk_built_by_hand(
    kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    doc = {"model": "m", "stream": 1, RESPONSE_PK_FIELD: _PK_B64}
    blob = _request_with_plaintext(json.dumps(doc).encode(), instance_key, kem)
    opened = open_request(blob, instance_key, aead=aead)
    assert opened.response_public_key == b"\x00" * MLKEM768_PK_LEN
    assert opened.body == {"model": "m", "stream": 1}
    assert opened.stream is True
    assert opened.json == b'{"model":"m","stream":1}'


def test_open_request_limit(kem: KEM, aead: AEAD, instance_key: KEMPrivateKey) -> None:
    sealed = _seal({"model": "m", "pad": "x" * 5000}, instance_key, kem, aead)
    with pytest.raises(LimitExceeded) as info:
        open_request(sealed.blob, instance_key, aead=aead, max_plaintext=4096)
    assert info.value.code is ErrorCode.OVERSIZE
    assert (
        open_request(sealed.blob, instance_key, aead=aead, max_plaintext=8192).body["model"] == "m"
    )


# -- response -------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"{}", b'{"id":"c","choices":[{"x":1}]}', os.urandom(5000)])
def test_response_round_trip(body: bytes, kem: KEM, aead: AEAD) -> None:
    rk = kem.generate()
    blob = seal_response(body, rk.public_key, kem=kem, aead=aead)
    assert _open_by_hand(blob, rk, INFO_RESPONSE) == body
    assert open_response(blob, rk, aead=aead) == body


def test_response_is_not_a_request(kem: KEM, aead: AEAD) -> None:
    # Same layout, different HKDF label: a response blob must not open as a request and vice versa.
    rk = kem.generate()
    resp = seal_response(b'{"model":"m"}', rk.public_key, kem=kem, aead=aead)
    with pytest.raises(DecryptError):
        open_request(resp, rk, aead=aead)
    req = seal_request(
        {"model": "m"}, rk.public_key, response_key=kem.generate(), kem=kem, aead=aead
    )
    with pytest.raises(DecryptError):
        open_response(req.blob, rk, aead=aead)


def test_open_response_wrong_key(kem: KEM, aead: AEAD) -> None:
    blob = seal_response(b"{}", kem.generate().public_key, kem=kem, aead=aead)
    with pytest.raises(DecryptError) as info:
        open_response(blob, kem.generate(), aead=aead)
    assert info.value.code is ErrorCode.DECRYPT_FAILED


def test_open_response_wrong_public_key_length(kem: KEM, aead: AEAD) -> None:
    with pytest.raises(LocalProtocolError) as info:
        seal_response(b"{}", b"\x00" * 100, kem=kem, aead=aead)
    assert info.value.code is ErrorCode.INVALID_KEY


def _zeros_gzip(total: int) -> bytes:
    """gzip of ``total`` zero bytes, built without ever holding them."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(MiB)
    parts = [c.compress(block) for _ in range(total // MiB)]
    parts.append(c.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    gz = _zeros_gzip(200 * MiB)
    assert len(gz) < 1 * MiB
    return gz


def test_gzip_bomb_response_is_refused_without_inflating(bomb: bytes, kem: KEM, aead: AEAD) -> None:
    rk = kem.generate()
    blob = _seal_raw(bomb, rk.public_key, INFO_RESPONSE, kem)
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceeded) as info:
            open_response(blob, rk, aead=aead, max_plaintext=64 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code is ErrorCode.OVERSIZE
    # The blob itself is ~200 KiB and is copied once or twice; 200 MiB must never be allocated.
    assert peak < 4 * MiB, peak


def test_gzip_bomb_request_is_refused_without_inflating(
    bomb: bytes, kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    blob = _seal_raw(bomb, instance_key.public_key, INFO_REQUEST, kem)
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceeded):
            open_request(blob, instance_key, aead=aead, max_plaintext=MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * MiB, peak


def test_concatenated_gzip_members_count_towards_the_limit(kem: KEM, aead: AEAD) -> None:
    rk = kem.generate()
    one = gzip.compress(b"a" * 3000)
    blob = _seal_raw(one * 3, rk.public_key, INFO_RESPONSE, kem)
    assert open_response(blob, rk, aead=aead) == b"a" * 9000
    assert open_response(blob, rk, aead=aead, max_plaintext=9000) == b"a" * 9000
    with pytest.raises(LimitExceeded):
        open_response(blob, rk, aead=aead, max_plaintext=8999)


@pytest.mark.parametrize(
    "payload",
    [
        gzip.compress(b"{}") + b"garbage",
        gzip.compress(b"{}") + b"\x00",
        gzip.compress(b"{}") + b"\x1f\x8b",  # looks like a second member, is not one
        gzip.compress(b"{}") + b"\x1f\x8bjunkjunkjunk",
        gzip.compress(b"{}")[:-1],  # truncated trailer
        gzip.compress(b"{}")[:10],
        b"{}",  # not gzip at all
        zlib.compress(b"{}"),  # zlib container, not gzip
        b"",
    ],
)
def test_malformed_gzip(payload: bytes, kem: KEM, aead: AEAD) -> None:
    rk = kem.generate()
    blob = _seal_raw(payload, rk.public_key, INFO_RESPONSE, kem)
    with pytest.raises(MalformedError) as info:
        open_response(blob, rk, aead=aead)
    assert info.value.code is ErrorCode.MALFORMED_PAYLOAD


def test_oversized_response_blob_refused_before_decrypting(kem: KEM, aead: AEAD) -> None:
    class NoDecaps(KEMPrivateKey):
        public_key = b""

        def decapsulate(self, ciphertext: bytes) -> bytes:
            raise AssertionError("must not get this far")

    with pytest.raises(LimitExceeded):
        open_response(
            b"\x00" * (2 * MiB + BLOB_OVERHEAD), NoDecaps(), aead=aead, max_plaintext=1024
        )


# -- no plaintext in error messages ---------------------------------------------------------------


def _failures(kem: KEM, aead: AEAD, inst: KEMPrivateKey) -> list[Callable[[], object]]:
    c = CANARY.encode()
    rk = kem.generate()

    def req_plain(pt: bytes) -> Callable[[], object]:
        return lambda: open_request(_request_with_plaintext(pt, inst, kem), inst, aead=aead)

    def resp_raw(payload: bytes, **kw: Any) -> Callable[[], object]:
        return lambda: open_response(
            _seal_raw(payload, rk.public_key, INFO_RESPONSE, kem), rk, aead=aead, **kw
        )

    sealed = seal_request(
        {"model": CANARY}, inst.public_key, response_key=kem.generate(), kem=kem, aead=aead
    )
    return [
        lambda: _seal(b'{"model":"' + c + b'"', inst, kem, aead),
        lambda: _seal(b'["' + c + b'"]', inst, kem, aead),
        lambda: _seal(b'{"' + c + b'":1,"e2e_response_pk":"' + c + b'"}', inst, kem, aead),
        lambda: _seal({CANARY: CANARY, "e2e_response_pk": CANARY}, inst, kem, aead),
        lambda: _seal({"model": CANARY, "x": object()}, inst, kem, aead),
        lambda: _seal(b'{"model":"' + c + b'\xc3"}', inst, kem, aead),
        lambda: seal_request({"model": CANARY}, c * 10, response_key=rk, kem=kem, aead=aead),
        lambda: open_request(sealed.blob, kem.generate(), aead=aead),
        lambda: open_request(sealed.blob, inst, aead=aead, max_plaintext=10),
        lambda: open_request(c, inst, aead=aead),
        req_plain(b'{"model":"' + c + b'"}'),
        req_plain(b'{"model":"' + c + b'","e2e_response_pk":"' + c + b'"}'),
        req_plain(b'{"model":"' + c + b'","e2e_response_pk":"' + base64.b64encode(c) + b'"}'),
        req_plain(b'["' + c + b'"]'),
        req_plain(b'{"' + c),
        resp_raw(gzip.compress(c) + c),
        resp_raw(gzip.compress(c * 100), max_plaintext=100),
        resp_raw(c),
    ]


def test_error_messages_never_contain_plaintext(
    kem: KEM, aead: AEAD, instance_key: KEMPrivateKey
) -> None:
    failures = _failures(kem, aead, instance_key)
    for fail in failures:
        with pytest.raises(PQE2EEError) as info:
            fail()
        exc = info.value
        for text in (str(exc), repr(exc), exc.message, *map(str, exc.args)):
            assert CANARY not in text, text
            assert CANARY[:12] not in text, text
