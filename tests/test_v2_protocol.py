"""Wire profile v2 core (src/pqe2ee/protocol/v2/): unit tests and hypothesis properties.

Everything is bytes in, events out: a client core and an instance core are wired together in
memory; the relay is played by the test, which drops, swaps, duplicates, splices, cuts and flips
bytes. The central property: any edit of a response gives a typed PQE2EEError as the records
arrive, or exactly the original response - never wrong or partial output presented as complete.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import load_vectors
from pqe2ee.backends import get_aead
from pqe2ee.backends.kdf import hkdf
from pqe2ee.backends.xwing import XWingPrivateKey, get_xwing
from pqe2ee.errors import (
    DecryptError,
    ErrorCode,
    LimitExceeded,
    LocalProtocolError,
    MalformedError,
    PQE2EEError,
    RelayError,
    RemoteError,
    RemoteProtocolError,
    StreamError,
)
from pqe2ee.protocol import NEED_DATA, EndOfStream
from pqe2ee.protocol.discovery import InstanceInfo
from pqe2ee.protocol.v2 import (
    Admission,
    ContextHeader,
    Data,
    E2EPolicy,
    End,
    Head,
    InstanceV2,
    MemoryReplayCache,
    Negotiator,
    RecordDecryptor,
    ResponseSealer,
    ResponseSecrets,
    SealedRequestV2,
    StreamDecryptorV2,
    StreamEncoderV2,
    UpstreamError,
    UsageMismatch,
    UsageReceipt,
    UsageUpdate,
    bucket,
    evidence_report_data,
    instance_error_response,
    open_response_v2,
    padme,
    parse_header,
    parse_instance_hint,
    parse_v2_offer,
    pk_hash,
    pow2,
    seal_request_v2,
    seal_response_v2,
    strip_relay_path,
)
from pqe2ee.protocol.v2 import records as rec_mod
from pqe2ee.protocol.v2.hpke import (
    hkdf_expand,
    hkdf_extract,
    labeled_expand,
    setup_base_r,
    setup_base_s,
)
from pqe2ee.protocol.v2.padding import pad_length
from pqe2ee.protocol.v2.records import State
from pqe2ee.protocol.v2.request import P_FIXED_LEN, build_plaintext, parse_plaintext

XW = get_xwing("pyca")
AEAD = get_aead("pyca")
CHUTE = "5f0b7ad3-1c2e-4d5a-9b8c-7e6f5a4b3c2d"
INST = "0e9d8c7b-6a59-4837-a625-140f3e2d1c0b"
NONCE = "nonce-0123456789"
PATH = "/v1/chat/completions"
T0 = 1_767_225_600_000


@cache
def instance_key() -> XWingPrivateKey:
    return XW.from_seed(hashlib.sha256(b"test-instance").digest())


def new_instance(**kw: Any) -> InstanceV2:
    args: dict[str, Any] = dict(
        chute_id=CHUTE,
        instance_id=INST,
        keys=[instance_key()],
        aead=AEAD,
        replay_cache=MemoryReplayCache(),
    )
    args.update(kw)
    return InstanceV2(**args)


def body(stream: bool = False, model: str = "m", content: str = "hello") -> bytes:
    obj: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        obj["stream"] = True
    return json.dumps(obj).encode()


def seal(
    b: bytes | dict[str, Any], *, now: int = T0, pk: bytes | None = None, **kw: Any
) -> SealedRequestV2:
    return seal_request_v2(
        b,
        pk or instance_key().public_key,
        chute_id=CHUTE,
        instance_id=INST,
        relay_nonce=NONCE,
        path=kw.pop("path", PATH),
        now_ms=now,
        xwing=XW,
        aead=AEAD,
        **kw,
    )


def test_a_kept_key_hash_seals_the_same_bytes() -> None:
    """``key_hash`` (an offer's ``pk_hash``, kept per offer) is what goes into H instead of
    hashing the key per request: with the right hash H is byte for byte the one sealed
    without it (and the instance opens the request); whatever hash is given is sealed."""
    key = instance_key()
    fixed = {"random_bytes": lambda n: bytes(range(n))}
    plain = seal(body(), pk=key.public_key, **fixed)
    kept = seal(
        body(), pk=key.public_key, key_hash=hashlib.sha256(key.public_key).digest(), **fixed
    )
    assert kept.header_bytes == plain.header_bytes
    opened = new_instance().open(kept.blob, path=PATH, stream=False, now_ms=T0)
    assert opened.body == body()
    other = seal(body(), pk=key.public_key, key_hash=bytes(32), **fixed)
    assert other.header.pk_hash == bytes(32) != plain.header.pk_hash


def code(fn: Callable[[], Any]) -> ErrorCode:
    with pytest.raises(PQE2EEError) as info:
        fn()
    return info.value.code


# ================================================================================================
# HKDF / HPKE


def test_hkdf_rfc5869() -> None:
    doc = load_vectors("rfc/rfc5869_hkdf_sha256.json")
    for t in doc["tests"]:
        prk = hkdf_extract(bytes.fromhex(t["salt"]), bytes.fromhex(t["ikm"]))
        assert prk.hex() == t["prk"]
        assert hkdf_expand(prk, bytes.fromhex(t["info"]), t["L"]).hex() == t["okm"]
        args = bytes.fromhex(t["salt"]), bytes.fromhex(t["ikm"]), bytes.fromhex(t["info"])
        assert hkdf(*args, t["L"]).hex() == t["okm"]  # extract and expand in one call
        for length in range(34):  # its one-block shortcut, against the two steps
            assert hkdf(*args, length) == hkdf_expand(prk, args[2], length)
    with pytest.raises(LocalProtocolError):
        hkdf_expand(prk, b"", 255 * 32 + 1)
    for length in (-1, 255 * 32 + 1):
        with pytest.raises(LocalProtocolError):
            hkdf(b"", b"ikm", b"", length)
    with pytest.raises(LocalProtocolError):
        labeled_expand(prk, b"x", b"", 0x10000)


def test_hpke_sequence_and_failed_open() -> None:
    enc, s = setup_base_s(instance_key().public_key, b"info", xwing=XW, aead=AEAD)
    r = setup_base_r(enc, instance_key(), b"info", aead=AEAD)
    assert s.compute_nonce(0) == s.base_nonce
    assert int.from_bytes(s.compute_nonce(5), "big") == int.from_bytes(s.base_nonce, "big") ^ 5
    c0, c1 = s.seal(b"a", b"zero"), s.seal(b"b", b"one")
    assert s.seq == 2
    with pytest.raises(DecryptError):
        r.open(b"a", c1)  # wrong order: seq 0 expected
    assert r.seq == 0  # a failed open does not advance
    assert r.open(b"a", c0) == b"zero" and r.open(b"b", c1) == b"one"
    with pytest.raises(DecryptError):
        setup_base_r(enc, instance_key(), b"other info", aead=AEAD).open(b"a", c0)


# ================================================================================================
# header

uuids = st.uuids().map(str)
tokens = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255)
paths = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="?#"), max_size=300
).map(lambda s: "/" + s)
models = (
    st.text(min_size=1, max_size=60)
    .filter(lambda s: 0 < len(s.encode("utf-8", "surrogatepass")) <= 255)
    .filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s))
)
headers = st.builds(
    ContextHeader,
    stream=st.booleans(),
    pk_hash=st.binary(min_size=32, max_size=32),
    ts_ms=st.integers(0, 2**64 - 1),
    request_id=st.binary(min_size=16, max_size=16),
    chute_id=uuids,
    instance_id=uuids,
    relay_nonce=tokens,
    path=paths,
    model=models,
    response_padding=st.sampled_from([0, 128, 256]),
)


@given(headers)
def test_header_roundtrip(h: ContextHeader) -> None:
    hb = h.encode()
    assert int.from_bytes(hb[5:7], "big") == len(hb)
    assert parse_header(hb) == h


@given(headers, st.data())
def test_header_prefix_and_suffix_rejected(h: ContextHeader, data: st.DataObject) -> None:
    hb = h.encode()
    cut = data.draw(st.integers(0, len(hb) - 1))
    assert code(lambda: parse_header(hb[:cut])) is ErrorCode.BAD_HEADER
    extra = data.draw(st.binary(min_size=1, max_size=8))
    assert code(lambda: parse_header(hb + extra)) is ErrorCode.BAD_HEADER


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("chute_id", CHUTE.upper()),
        ("instance_id", "node-1"),
        ("relay_nonce", ""),
        ("relay_nonce", "a b"),
        ("path", "v1/chat"),
        ("path", "/v1/chat?x=1"),
        ("path", "/v1/ch\u00e4t"),
        ("path", "/" + "a" * 2048),
        ("model", ""),
        ("model", "m" * 256),
        ("model", "\ud800"),
        ("response_padding", 64),
        ("pk_hash", bytes(31)),
        ("request_id", bytes(15)),
        ("ts_ms", -1),
    ],
)
def test_header_fields_validated(field: str, value: Any) -> None:
    fields: dict[str, Any] = dict(
        stream=False,
        pk_hash=bytes(32),
        ts_ms=T0,
        request_id=bytes(16),
        chute_id=CHUTE,
        instance_id=INST,
        relay_nonce=NONCE,
        path=PATH,
        model="m",
    )
    ContextHeader(**fields)
    fields[field] = value
    assert code(lambda: ContextHeader(**fields)) is ErrorCode.INVALID_ARGUMENT


def test_strip_relay_path() -> None:
    assert strip_relay_path("/v1/x".ljust(24, "?")) == "/v1/x"
    assert strip_relay_path(PATH.ljust(24, "?")) == PATH
    assert strip_relay_path("/" + "a" * 30) == "/" + "a" * 30


# ================================================================================================
# padding


@given(st.integers(0, 10**9))
def test_padme_properties(n: int) -> None:
    p = padme(n)
    assert p >= n
    if n >= 2:
        e = n.bit_length() - 1
        low = e - e.bit_length()
        assert p % (1 << low) == 0  # only the top bits may be set
        assert p - n < (1 << low)  # the smallest such value
        assert p <= n * 1.12 + 1 or n < 16
    assert pow2(n) >= n and (n == 0 or pow2(n) & (pow2(n) - 1) == 0)
    assert bucket(n, 256) % 256 == 0 and 0 <= bucket(n, 256) - n < 256


def test_pad_length_rejects_unknown_policy() -> None:
    assert code(lambda: pad_length(5, "bogus")) is ErrorCode.INVALID_ARGUMENT  # type: ignore[arg-type]


# ================================================================================================
# requests


@pytest.mark.parametrize("pad", ["none", "padme", "pow2"])
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("stream", [True, False])
def test_request_roundtrip(pad: str, compress: bool, stream: bool) -> None:
    b = body(stream, content="x" * 700)
    sealed = seal(b, pad=pad, compress=compress)
    inst = new_instance()
    opened = inst.open(sealed.blob, path=PATH.ljust(24, "?"), stream=stream, now_ms=T0 + 1)
    assert opened.body == b and opened.stream is stream and opened.compressed is compress
    assert opened.exporter == sealed.secrets.exporter
    assert opened.response_public_key == sealed.secrets.key.public_key
    assert opened.transcript_hash == sealed.transcript_hash
    payload = gzip.compress(b, mtime=0) if compress else b
    unpadded = P_FIXED_LEN + len(payload)
    ct_len = len(sealed.blob) - len(sealed.header_bytes) - 1120 - 16
    if not compress:
        assert ct_len == pad_length(unpadded, pad)  # type: ignore[arg-type]
    assert ct_len >= unpadded - (0 if not compress else 20)


def test_request_body_kept_byte_for_byte_and_not_rewritten() -> None:
    raw = b'{ "model" : "m",  "messages":[], "z": 1.50 }'
    opened = new_instance().open(seal(raw).blob, path=PATH, stream=False, now_ms=T0)
    assert opened.body == raw
    assert b"e2e_response_pk" not in opened.body


def test_request_mapping_body_and_headers() -> None:
    sealed = seal({"model": "m", "stream": 1, "messages": []}, path=PATH + "?api-version=2")
    assert sealed.stream is True and sealed.header.path == PATH
    assert sealed.invoke_headers("k") == [
        ("Authorization", "Bearer k"),
        ("X-Chute-Id", CHUTE),
        ("X-Instance-Id", INST),
        ("X-E2E-Nonce", NONCE),
        ("X-E2E-Stream", "true"),
        ("X-E2E-Path", PATH),
        ("Content-Type", "application/octet-stream"),
    ]
    upper = seal_request_v2(
        body(),
        instance_key().public_key,
        chute_id=CHUTE.upper(),
        instance_id=INST.upper(),
        relay_nonce=NONCE,
        path=PATH,
        now_ms=T0,
        xwing=XW,
        aead=AEAD,
    )
    assert upper.header.chute_id == CHUTE and upper.header.instance_id == INST


@pytest.mark.parametrize(
    ("b", "kw", "expected"),
    [
        (b"[1]", {}, ErrorCode.INVALID_BODY),
        (b"{", {}, ErrorCode.INVALID_BODY),
        (b'{"messages":[]}', {}, ErrorCode.INVALID_BODY),
        (b'{"model":""}', {}, ErrorCode.INVALID_BODY),
        (b'{"model":5}', {}, ErrorCode.INVALID_BODY),
        (b'{"model":"m"}', {"path": "/v1/\u00e9"}, ErrorCode.INVALID_ARGUMENT),
        (b'{"model":"m"}', {"pk": bytes(1216)}, ErrorCode.INVALID_KEY),
        (b'{"model":"m"}', {"pk": bytes(1184)}, ErrorCode.INVALID_KEY),
        (b'{"model":"m"}', {"response_padding": 100}, ErrorCode.INVALID_ARGUMENT),
    ],
)
def test_request_local_errors(b: bytes, kw: dict[str, Any], expected: ErrorCode) -> None:
    with pytest.raises(LocalProtocolError) as info:
        seal(b, **kw)
    assert info.value.code is expected


def test_instance_checks_order_and_codes() -> None:
    sealed = seal(body())
    blob = sealed.blob
    # each cheap check is reached before decapsulation: a garbage ciphertext still yields them
    garbage = blob[: len(sealed.header_bytes)] + os.urandom(len(blob) - len(sealed.header_bytes))
    inst = new_instance()
    assert (
        code(lambda: inst.open(garbage, path="/other", stream=False, now_ms=T0))
        is ErrorCode.CONTEXT_MISMATCH
    )
    assert (
        code(lambda: inst.open(garbage, path=PATH, stream=True, now_ms=T0))
        is ErrorCode.CONTEXT_MISMATCH
    )
    assert (
        code(lambda: inst.open(garbage, path=PATH, stream=False, now_ms=T0 + 120_001))
        is ErrorCode.STALE
    )
    assert (
        code(lambda: inst.open(garbage, path=PATH, stream=False, now_ms=T0))
        is ErrorCode.DECRYPT_FAILED
    )
    other = new_instance(instance_id="1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d")
    assert (
        code(lambda: other.open(blob, path=PATH, stream=False, now_ms=T0))
        is ErrorCode.CONTEXT_MISMATCH
    )
    # window is inclusive
    assert new_instance().open(blob, path=PATH, stream=False, now_ms=T0 - 120_000).body == body()
    assert (
        new_instance(window_ms=5).open(blob, path=PATH, stream=False, now_ms=T0 + 5).body == body()
    )
    assert (
        code(lambda: new_instance(window_ms=5).open(blob, path=PATH, stream=False, now_ms=T0 + 6))
        is ErrorCode.STALE
    )
    # relay nonce, when forwarded
    assert (
        code(lambda: new_instance().open(blob, path=PATH, stream=False, now_ms=T0, relay_nonce="x"))
        is ErrorCode.CONTEXT_MISMATCH
    )
    assert (
        new_instance().open(blob, path=PATH, stream=False, now_ms=T0, relay_nonce=NONCE).body
        == body()
    )


def test_replay_refused_only_after_successful_open() -> None:
    sealed = seal(body())
    inst = new_instance()
    tampered = sealed.blob[:-1] + bytes((sealed.blob[-1] ^ 1,))
    for _ in range(3):  # forged copies do not poison the cache
        assert (
            code(lambda: inst.open(tampered, path=PATH, stream=False, now_ms=T0))
            is ErrorCode.DECRYPT_FAILED
        )
    inst.open(sealed.blob, path=PATH, stream=False, now_ms=T0)
    assert (
        code(lambda: inst.open(sealed.blob, path=PATH, stream=False, now_ms=T0 + 100_000))
        is ErrorCode.REPLAY
    )
    assert len(inst.replay_cache) == 1  # type: ignore[arg-type]


def test_key_rotation() -> None:
    old = instance_key()
    sealed_old = seal(body())
    inst = new_instance(keys=[XW.from_seed(os.urandom(32))])
    assert (
        code(lambda: inst.open(sealed_old.blob, path=PATH, stream=False, now_ms=T0))
        is ErrorCode.UNKNOWN_KEY
    )
    k1 = XW.from_seed(hashlib.sha256(b"k1").digest())
    k2 = XW.from_seed(hashlib.sha256(b"k2").digest())
    k3 = XW.from_seed(hashlib.sha256(b"k3").digest())
    inst = new_instance(keys=[k2, k1])
    assert inst.public_key == k2.public_key
    s1 = seal(body(), pk=k1.public_key)
    inst.open(s1.blob, path=PATH, stream=False, now_ms=T0)  # previous key still opens
    inst.rotate(k3)
    assert inst.public_key == k3.public_key
    s1b = seal(body(), pk=k1.public_key)
    assert (
        code(lambda: inst.open(s1b.blob, path=PATH, stream=False, now_ms=T0))
        is ErrorCode.UNKNOWN_KEY
    )
    assert k1.seed() is None  # dropped keys are wiped
    s2 = seal(body(), pk=k2.public_key)
    assert inst.open(s2.blob, path=PATH, stream=False, now_ms=T0).body == body()
    assert old.seed() is not None
    with pytest.raises(LocalProtocolError):
        new_instance(keys=[])


def test_plaintext_parsing() -> None:
    pk = instance_key().public_key
    p = build_plaintext(b"abc", pk, compress=False, pad="none")
    assert p == b"\x00" + pk + b"\x00\x00\x00\x03abc"
    assert parse_plaintext(p) == (b"abc", pk, False)
    assert parse_plaintext(p + bytes(9)) == (b"abc", pk, False)
    assert code(lambda: parse_plaintext(p + b"\x01")) is ErrorCode.BAD_PADDING
    assert code(lambda: parse_plaintext(b"\x02" + p[1:])) is ErrorCode.MALFORMED_PAYLOAD
    assert code(lambda: parse_plaintext(p[:-1])) is ErrorCode.MALFORMED_PAYLOAD
    assert code(lambda: parse_plaintext(p[:100])) is ErrorCode.MALFORMED_PAYLOAD
    bomb = build_plaintext(b"\x00" * 5_000_000, pk, compress=True, pad="none")
    assert len(bomb) < 30_000
    with pytest.raises(LimitExceeded):
        parse_plaintext(bomb, max_body=1_000_000)
    with pytest.raises(LimitExceeded):
        parse_plaintext(build_plaintext(b"x" * 100, pk, compress=False, pad="none"), max_body=99)


def test_invalid_response_key_in_request() -> None:
    # a (hostile) client sends an unusable resp_pk: refused as malformed, before any response
    from pqe2ee.protocol.v2.header import header_info
    from pqe2ee.protocol.v2.hpke import seal_base

    sealed = seal(body())
    hb = sealed.header_bytes
    bad_ml = b"\xff\xff" + sealed.secrets.key.public_key[2:]
    p = build_plaintext(body(), bad_ml, compress=False, pad="none")
    enc, ct, _ = seal_base(instance_key().public_key, header_info(hb), b"", p, xwing=XW, aead=AEAD)
    assert (
        code(lambda: new_instance().open(hb + enc + ct, path=PATH, stream=False, now_ms=T0))
        is ErrorCode.MALFORMED_PAYLOAD
    )
    low_order = sealed.secrets.key.public_key[:1184] + bytes(32)
    p = build_plaintext(body(), low_order, compress=False, pad="none")
    enc, ct, _ = seal_base(instance_key().public_key, header_info(hb), b"", p, xwing=XW, aead=AEAD)
    opened = new_instance().open(hb + enc + ct, path=PATH, stream=False, now_ms=T0)
    with pytest.raises(MalformedError) as info:
        ResponseSealer.for_request(opened, xwing=XW, aead=AEAD)
    assert info.value.code is ErrorCode.MALFORMED_PAYLOAD


def test_error_hints() -> None:
    for c, status in [
        (ErrorCode.REPLAY, 409),
        (ErrorCode.STALE, 400),
        (ErrorCode.UNKNOWN_KEY, 400),
        (ErrorCode.OVERSIZE, 413),
    ]:
        st_, b = instance_error_response(RemoteProtocolError("x", code=c))
        assert st_ == status and b == b'{"detail":"e2e_v2:%s"}' % c.value.encode()
        assert parse_instance_hint(b) is c
        wrapped = json.dumps({"detail": b.decode()}).encode()  # how the relay relays a 400
        assert parse_instance_hint(wrapped) is c
    assert instance_error_response(RemoteProtocolError("x", code=ErrorCode.RELAY_ERROR))[1] == (
        b'{"detail":"e2e_v2:decrypt_failed"}'
    )
    assert parse_instance_hint(b'{"detail":"e2e_v2:usage_mismatch"}') is None
    assert parse_instance_hint(b'{"detail":"Invalid nonce"}') is None


# ================================================================================================
# replay cache


def test_replay_cache_basics() -> None:
    c = MemoryReplayCache(max_entries=3)
    assert c.admit(b"a", 100, 0) is Admission.FRESH
    assert c.admit(b"a", 100, 50) is Admission.REPLAY
    assert c.admit(b"a", 100, 100) is Admission.REPLAY  # still live at its expiry
    assert c.admit(b"a", 200, 101) is Admission.FRESH  # expired, and a new expiry
    assert c.admit(b"late", 50, 101) is Admission.TOO_OLD
    for rid in (b"b", b"c"):
        assert c.admit(rid, 300, 101) is Admission.FRESH
    assert len(c) == 3 and c.floor_ms == -1
    assert c.admit(b"d", 400, 101) is Admission.FRESH  # evicts "a" (expires first)
    assert c.floor_ms == 200 and len(c) == 3
    assert c.admit(b"a", 200, 102) is Admission.TOO_OLD  # the evicted id cannot come back
    assert c.admit(b"e", 150, 102) is Admission.TOO_OLD
    with pytest.raises(LocalProtocolError):
        MemoryReplayCache(0)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(0, 40),
    st.lists(st.tuples(st.integers(0, 7), st.integers(-20, 20), st.integers(0, 5)), max_size=80),
)
def test_replay_cache_never_readmits_a_live_id(
    cap: int, window: int, ops: list[tuple[int, int, int]]
) -> None:
    """Whatever the capacity, an id admitted FRESH is never FRESH again before its expiry.

    As on an instance, an id always comes with the same expiry (ts + W from its authenticated
    H); ``skew`` is the client's clock offset when it first made that id.
    """
    cache_ = MemoryReplayCache(cap)
    now = 0
    expiry: dict[bytes, int] = {}
    live: dict[bytes, int] = {}
    for rid_n, skew, step in ops:
        now += step
        rid = bytes((rid_n,))
        expires = expiry.setdefault(rid, now + skew + window)
        verdict = cache_.admit(rid, expires, now)
        assert len(cache_) <= cap
        if rid in live and live[rid] >= now:
            assert verdict is not Admission.FRESH
        if verdict is Admission.FRESH:
            assert expires >= now
            live[rid] = expires


def test_instance_uses_floor_as_stale() -> None:
    inst = new_instance(replay_cache=MemoryReplayCache(1))
    a, b = seal(body(), now=T0), seal(body(), now=T0 + 10)
    inst.open(a.blob, path=PATH, stream=False, now_ms=T0 + 20)
    inst.open(b.blob, path=PATH, stream=False, now_ms=T0 + 20)  # evicts a, floor = T0 + W
    assert (
        code(lambda: inst.open(a.blob, path=PATH, stream=False, now_ms=T0 + 30)) is ErrorCode.STALE
    )


# ================================================================================================
# records: tables, sealer, decryptor


def test_transition_table_exhaustive() -> None:
    """Every (state, input) pair: a transition, a listed violation, or malformed_event."""
    for state, inp in itertools.product(list(State), list(rec_mod.Input)):
        dec = RecordDecryptor(ResponseSecrets(bytes(32), XW.generate(), False), aead=AEAD)
        dec._state = state
        nxt = rec_mod.TRANSITIONS.get((state, inp))
        if nxt is not None:
            dec._on(inp)
            assert dec._state is nxt
            continue
        with pytest.raises(StreamError) as info:
            dec._on(inp)
        expected = rec_mod.VIOLATIONS.get((state, inp), (ErrorCode.MALFORMED_EVENT, ""))[0]
        assert info.value.code is expected
    # the grammar HEAD (DATA|USAGE)* END is all there is
    assert {k for k, v in rec_mod.TRANSITIONS.items() if v is not k[0]} == {
        (State.AWAIT_INIT, rec_mod.Input.INIT),
        (State.AWAIT_HEAD, rec_mod.Input.HEAD),
        (State.BODY, rec_mod.Input.END),
        (State.DONE, rec_mod.Input.EOF),
    }


@dataclass
class Exchange:
    sealed: SealedRequestV2
    sealer: ResponseSealer
    seed: bytes

    def secrets(self) -> ResponseSecrets:
        """Fresh secrets (the decryptor wipes the response key it is given)."""
        return ResponseSecrets(
            self.sealed.secrets.exporter, XW.from_seed(self.seed), self.sealed.stream
        )


def exchange(stream: bool, *, padding: int = 0, content: str = "hello") -> Exchange:
    seed = os.urandom(32)
    sealed = seal(
        body(stream, content=content), response_key=XW.from_seed(seed), response_padding=padding
    )
    opened = new_instance().open(sealed.blob, path=PATH, stream=stream, now_ms=T0)
    return Exchange(sealed, ResponseSealer.for_request(opened, xwing=XW, aead=AEAD), seed)


def test_sealer_grammar_and_limits() -> None:
    ex = exchange(False)
    s = ex.sealer
    assert code(lambda: s.data(b"x")) is ErrorCode.INVALID_ARGUMENT
    assert code(lambda: s.end()) is ErrorCode.INVALID_ARGUMENT
    assert code(lambda: s.head(99)) is ErrorCode.INVALID_ARGUMENT
    assert code(lambda: s.head(200, content_encoding="br")) is ErrorCode.INVALID_ARGUMENT
    s.head(200)
    assert code(lambda: s.head(200)) is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(LimitExceeded):
        s.data(bytes(rec_mod.MAX_PAYLOAD + 1))
    s.data(b"ok")
    s.end()
    assert s.done and s.records == 3
    assert code(lambda: s.data(b"x")) is ErrorCode.INVALID_ARGUMENT
    st_ = exchange(True).sealer
    assert code(lambda: st_.head(200, content_encoding="gzip")) is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(LocalProtocolError):
        seal_response_v2(st_, status=200, body=b"")
    with pytest.raises(LocalProtocolError):
        StreamEncoderV2(exchange(False).sealer)


@pytest.mark.parametrize("padding", [0, 128, 256])
def test_record_sizes_and_padding(padding: int) -> None:
    ex = exchange(True, padding=padding)
    head = ex.sealer.head(200)
    sizes = [(n, len(ex.sealer.data(b"x" * n))) for n in (0, 1, 100, 122, 123, 250, 251, 1000)]
    sizes.append(
        (len(b'{"status":200,"content_type":null,"content_encoding":"identity"}'), len(head))
    )
    for n, size in sizes:
        inner = size - 5 - 16
        if padding:
            assert inner % padding == 0 and 0 <= inner - (n + 5) < padding
        else:
            assert size == n + rec_mod.RECORD_OVERHEAD


def test_single_response_padme_and_chunking() -> None:
    ex = exchange(False, padding=128)
    payload = os.urandom(5000)
    out = seal_response_v2(
        ex.sealer,
        status=201,
        body=payload,
        compress=False,
        max_record=1024,
        content_type="application/octet-stream",
    )
    recs = []
    pos = rec_mod.RESP_INIT_LEN
    while pos < len(out):
        n = int.from_bytes(out[pos : pos + 4], "big")
        recs.append(n)
        pos += 4 + n
    assert len(recs) == 2 + 5  # HEAD, 5 DATA of <= 1024, END
    assert recs[1] - 21 == padme(1024 + 5)
    r = open_response_v2(out, ex.secrets(), aead=AEAD)
    assert (r.status, r.body, r.content_type, r.usage, r.error) == (
        201,
        payload,
        "application/octet-stream",
        None,
        None,
    )
    r.raise_for_error()


def test_single_response_errors_and_usage() -> None:
    ex = exchange(False)
    err = UpstreamError("ServerError", "engine died", 500)
    out = seal_response_v2(
        ex.sealer, status=500, body=b'{"error":"x"}', usage={"total_tokens": 3}, error=err
    )
    r = open_response_v2(out, ex.secrets(), aead=AEAD)
    assert r.status == 500 and r.body == b'{"error":"x"}' and r.usage == {"total_tokens": 3}
    with pytest.raises(RemoteError) as info:
        r.raise_for_error()
    assert info.value.code is ErrorCode.UPSTREAM_ERROR and info.value.status == 500


def test_single_response_limits() -> None:
    ex = exchange(False)
    out = seal_response_v2(ex.sealer, status=200, body=b"z" * 100_000, compress=True)
    assert len(out) < 2000
    with pytest.raises(LimitExceeded):
        open_response_v2(out, ex.secrets(), aead=AEAD, max_body=50_000)
    with pytest.raises(LimitExceeded):
        open_response_v2(out + bytes(1_100_000), ex.secrets(), aead=AEAD, max_body=10)


def test_decryptor_wipes_response_key_and_is_sticky() -> None:
    ex = exchange(False)
    out = seal_response_v2(ex.sealer, status=200, body=b"{}")
    key = XW.from_seed(ex.seed)
    sec = ResponseSecrets(ex.sealed.secrets.exporter, key, False)
    dec = RecordDecryptor(sec, aead=AEAD)
    dec.receive_init(out[: rec_mod.RESP_INIT_LEN])
    assert key.seed() is None  # forward secrecy: erased as soon as the response keys exist
    first_len = int.from_bytes(out[rec_mod.RESP_INIT_LEN : rec_mod.RESP_INIT_LEN + 4], "big")
    head = out[rec_mod.RESP_INIT_LEN + 4 : rec_mod.RESP_INIT_LEN + 4 + first_len]
    assert isinstance(dec.receive_record(head), Head)
    bad = head[:-1] + bytes((head[-1] ^ 1,))
    with pytest.raises(StreamError) as info:
        dec.receive_record(head)
    assert info.value.code is ErrorCode.DUPLICATE_RECORD
    with pytest.raises(StreamError):
        dec.receive_record(bad)  # sticky: the first error again
    assert code(dec.receive_eof) is ErrorCode.DUPLICATE_RECORD
    assert dec.state is State.ERROR


def test_record_guards() -> None:
    ex = exchange(False)
    init = ex.sealer.resp_init
    head = ex.sealer.head(200)
    dec = RecordDecryptor(ex.secrets(), aead=AEAD)
    dec.receive_init(init)
    assert code(lambda: dec.receive_record(head[:25])) is ErrorCode.MALFORMED_EVENT
    dec = RecordDecryptor(ex.secrets(), aead=AEAD)
    dec.receive_init(init)
    assert code(lambda: dec.receive_record(b"\x02" + head[1:])) is ErrorCode.MALFORMED_EVENT
    dec = RecordDecryptor(ex.secrets(), aead=AEAD)
    assert code(lambda: dec.receive_init(init[:-1])) is ErrorCode.MALFORMED_EVENT
    # oversize plen refused before anything is buffered
    dec = RecordDecryptor(ex.secrets(), aead=AEAD, max_payload=100)
    dec.receive_init(init)
    dec.receive_record(head)
    with pytest.raises(LimitExceeded):
        dec.receive_record(ex.sealer.data(b"x" * 101))


# ================================================================================================
# streams


def engine_chunks(n: int = 6, *, usage: bool = True) -> tuple[list[bytes], dict[str, int]]:
    u = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
    out = [b'data: {"choices":[{"delta":{"content":"t%d \\u00e9"}}]}\n\n' % i for i in range(n)]
    if usage:
        out.append(b'data: {"choices":[],"usage":' + msgspec.json.encode(u) + b"}\n\n")
    out.append(b"data: [DONE]\n\n")
    return out, u


def make_stream(ex: Exchange, chunks: list[bytes], **finish: Any) -> bytes:
    enc = StreamEncoderV2(ex.sealer)
    return enc.start() + b"".join(enc.feed(c) for c in chunks) + enc.finish(**finish)


def decrypt(
    ex: Exchange, wire: bytes, *, step: int = 0, **kw: Any
) -> tuple[StreamDecryptorV2, list[Any]]:
    dec = StreamDecryptorV2(ex.secrets(), aead=AEAD, **kw)
    evs: list[Any] = []
    if step:
        for i in range(0, len(wire), step):
            dec.receive_data(wire[i : i + step])
            while (ev := dec.next_event()) is not NEED_DATA:
                evs.append(ev)
    else:
        dec.receive_data(wire)
        evs += dec.events()
    dec.receive_eof()
    evs += dec.events()
    return dec, evs


@pytest.mark.parametrize("step", [0, 1, 7, 1000])
def test_stream_roundtrip(step: int) -> None:
    ex = exchange(True)
    chunks, u = engine_chunks()
    wire = make_stream(ex, chunks)
    assert wire.count(b'data: {"usage":') == 1  # exactly one plaintext copy ...
    assert wire.index(b'data: {"usage":') < wire.rindex(b'data: {"e2e_v2":')  # ... before END
    dec, evs = decrypt(ex, wire, step=step)
    assert dec.complete
    assert (
        isinstance(evs[0], Head)
        and evs[0].status == 200
        and evs[0].content_type == "text/event-stream"
    )
    assert b"".join(e.data for e in evs if isinstance(e, Data)) == b"".join(chunks)
    end = evs[-2]
    assert (
        isinstance(end, End) and end.usage == u and end.usage_copy == u and end.usage_copy_matches
    )
    assert evs[-1] == EndOfStream(complete=True)
    assert not any(isinstance(e, dict) for e in evs)


def test_stream_without_usage_and_with_error() -> None:
    ex = exchange(True)
    chunks, _ = engine_chunks(usage=False)
    wire = make_stream(ex, chunks[:2], error=UpstreamError("EngineDied", "gone", 502))
    assert b'{"usage"' not in wire
    _dec, evs = decrypt(ex, wire)
    end = evs[-2]
    assert isinstance(end, End) and end.error == UpstreamError("EngineDied", "gone", 502)
    assert end.usage is None and end.usage_copy is None and end.usage_copy_matches is None


def test_stream_authenticated_usage_records() -> None:
    ex = exchange(True)
    enc = StreamEncoderV2(ex.sealer, track_usage=False, plaintext_usage=False)
    wire = enc.start() + enc.feed(b"a") + enc.usage({"total_tokens": 1}) + enc.feed(b"b")
    wire += enc.usage({"total_tokens": 2}) + enc.finish()
    assert b'{"usage"' not in wire
    _, evs = decrypt(ex, wire)
    assert [e.usage for e in evs if isinstance(e, UsageUpdate)] == [
        {"total_tokens": 1},
        {"total_tokens": 2},
    ]
    end = evs[-2]
    assert isinstance(end, End) and end.usage == {"total_tokens": 2}  # last wins


def test_usage_report_mode() -> None:
    ex = exchange(True)
    chunks, u = engine_chunks()
    wire = make_stream(ex, chunks).replace(b'"completion_tokens":6', b'"completion_tokens":60', 1)
    _, evs = decrypt(ex, wire, usage_check="report")
    end = evs[-2]
    assert isinstance(end, End) and end.usage == u and end.usage_copy_matches is False
    late = (
        make_stream(exchange_again := exchange(True), chunks)
        + b'data: {"usage":{"total_tokens":1}}\n\n'
    )
    _, evs = decrypt(exchange_again, late, usage_check="report")
    assert isinstance(evs[-2], UsageMismatch) and evs[-2].copy == {"total_tokens": 1}


def test_outer_framing_tolerance() -> None:
    ex = exchange(True)
    chunks, _ = engine_chunks(2)
    wire = make_stream(ex, chunks)
    lines = wire.split(b"\n\n")
    # comments, event/id/retry lines, an outer [DONE], escaped solidus, CRLF
    first_rec = lines[1]
    escaped = first_rec.replace(b"/", b"\\/")
    noisy = b"\n\n".join(
        [
            b": keep-alive",
            lines[0],
            b"event: x\nid: 1\nretry: 5",
            escaped.replace(b"\n", b"\r\n"),
            *lines[2:],
        ]
    )
    noisy += b"data: [DONE]\n\n"
    dec, _evs = decrypt(ex, noisy)
    assert dec.complete
    # a lost final newline is not truncation
    dec, _ = decrypt(exchange_b := exchange(True), make_stream(exchange_b, chunks)[:-2])
    assert dec.complete
    # a relay error after END is ignored, before END it is raised (unauthenticated)
    dec, _ = decrypt(ex2 := exchange(True), make_stream(ex2, chunks) + b'data: {"error":"x"}\n\n')
    assert dec.complete
    ex3 = exchange(True)
    w3 = make_stream(ex3, chunks)
    cut = w3.rindex(b"data: {")
    with pytest.raises(RelayError) as info:
        decrypt(ex3, w3[:cut] + b'data: {"e2e_error":{"m":1}}\n\n')
    assert info.value.code is ErrorCode.RELAY_ERROR and info.value.detail == {"m": 1}


def test_stream_line_bound() -> None:
    ex = exchange(True)
    dec = StreamDecryptorV2(ex.secrets(), aead=AEAD, max_payload=100)
    with pytest.raises(LimitExceeded):
        dec.receive_data(b"data: " + b"A" * 2000)


def test_stream_kind_is_bound() -> None:
    """A single response replayed as a stream (or vice versa) is refused."""
    ex = exchange(False)
    single = seal_response_v2(ex.sealer, status=200, body=b"{}")
    sec = ResponseSecrets(ex.sealed.secrets.exporter, XW.from_seed(ex.seed), True)
    dec = StreamDecryptorV2(sec, aead=AEAD)
    with pytest.raises(StreamError) as info:
        dec.receive_data(
            b'data: {"e2e_v2_init":"' + __import__("base64").b64encode(single[:1126]) + b'"}\n\n'
        )
    assert info.value.code is ErrorCode.MALFORMED_EVENT
    patched = single[:5] + b"\x02" + single[6:]
    with pytest.raises(PQE2EEError) as info2:
        open_response_v2(patched, ex.secrets(), aead=AEAD)
    assert info2.value.code is ErrorCode.MALFORMED_EVENT


# ================================================================================================
# hypothesis: any edit of a response -> typed error, or exactly the original


@dataclass
class Scenario:
    ex: Exchange
    events: list[bytes]  # the valid stream's SSE events
    data: bytes
    usage: dict[str, int]
    foreign_same: list[bytes]  # events of another response to the same request
    foreign_other: list[bytes]  # events of a response to another request
    single: bytes  # a single response (same request kind: non-stream exchange below)
    single_ex: Exchange
    single_body: bytes


@cache
def scenario(padding: int) -> Scenario:
    chunks, u = engine_chunks(5)
    ex = exchange(True, padding=padding)
    wire = make_stream(ex, chunks)
    # another response to the same request: a second sealer on the same opened request
    again = new_instance().open(ex.sealed.blob, path=PATH, stream=True, now_ms=T0)
    same = ResponseSealer.for_request(again, xwing=XW, aead=AEAD)
    enc = StreamEncoderV2(same)
    wire_same = enc.start() + b"".join(enc.feed(c) for c in chunks) + enc.finish()
    other = exchange(True, padding=padding)
    wire_other = make_stream(other, chunks)
    sex = exchange(False, padding=padding)
    sbody = b'{"choices":[{"message":{"content":"' + b"w" * 300 + b'"}}]}'
    single = seal_response_v2(
        sex.sealer, status=200, body=sbody, usage=u, compress=False, max_record=64
    )

    def split(w: bytes) -> list[bytes]:
        return [e + b"\n\n" for e in w.split(b"\n\n") if e]

    return Scenario(
        ex,
        split(wire),
        b"".join(chunks),
        u,
        split(wire_same),
        split(wire_other),
        single,
        sex,
        sbody,
    )


STREAM_CODES = {
    ErrorCode.STREAM_TRUNCATED,
    ErrorCode.RECORD_OUT_OF_ORDER,
    ErrorCode.DUPLICATE_RECORD,
    ErrorCode.RECORD_AUTH_FAILED,
    ErrorCode.DATA_AFTER_END,
    ErrorCode.RECORD_BEFORE_INIT,
    ErrorCode.DUPLICATE_INIT,
    ErrorCode.MALFORMED_EVENT,
    ErrorCode.USAGE_MISMATCH,
    ErrorCode.RECORD_GRAMMAR,
    ErrorCode.BAD_PADDING,
    ErrorCode.UNKNOWN_RECORD_TYPE,
    ErrorCode.MALFORMED_PAYLOAD,
    ErrorCode.DECRYPT_FAILED,
    ErrorCode.INVALID_UTF8,
    ErrorCode.RELAY_ERROR,
}


def run_stream(sc: Scenario, wire: bytes, step: int) -> tuple[bool, bytes, Any, list[Any]]:
    """(completed, data handed out, error code or None, events)."""
    dec = StreamDecryptorV2(sc.ex.secrets(), aead=AEAD)
    evs: list[Any] = []
    try:
        for i in range(0, len(wire), step):
            dec.receive_data(wire[i : i + step])
            evs += dec.events()
        dec.receive_eof()
        evs += dec.events()
    except PQE2EEError as exc:
        assert exc.code in STREAM_CODES, exc
        assert not dec.complete
        assert not any(isinstance(e, EndOfStream) for e in evs)
        return False, b"".join(e.data for e in evs if isinstance(e, Data)), exc.code, evs
    return dec.complete, b"".join(e.data for e in evs if isinstance(e, Data)), None, evs


def check_outcome(sc: Scenario, completed: bool, data: bytes, err: Any, evs: list[Any]) -> None:
    if err is None:
        # no error: the whole, exact, authenticated response
        assert completed
        assert data == sc.data
        ends = [e for e in evs if isinstance(e, End)]
        assert len(ends) == 1 and ends[0].usage == sc.usage
        assert isinstance(evs[-1], EndOfStream)
    else:
        # an error: whatever was handed out is a prefix of the real data (never foreign bytes)
        assert sc.data.startswith(data)


mutations = st.sampled_from(["drop", "swap", "dup", "splice_same", "splice_other", "move", "none"])


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([0, 256]), mutations, st.data(), st.integers(1, 4000))
def test_any_event_edit_is_caught(padding: int, how: str, data: st.DataObject, step: int) -> None:
    sc = scenario(padding)
    evs = list(sc.events)
    n = len(evs)
    i = data.draw(st.integers(0, n - 1))
    j = data.draw(st.integers(0, n - 1))
    if how == "drop":
        del evs[i]
    elif how == "swap":
        assume(evs[i] != evs[j])
        evs[i], evs[j] = evs[j], evs[i]
    elif how == "dup":
        evs.insert(j, evs[i])
    elif how == "move":
        ev = evs.pop(i)
        evs.insert(j, ev)
        assume(evs != sc.events)
    elif how in ("splice_same", "splice_other"):
        foreign = sc.foreign_same if how == "splice_same" else sc.foreign_other
        k = data.draw(st.integers(0, len(foreign) - 1))
        assume(foreign[k] != evs[i])
        evs[i] = foreign[k]
    completed, out, err, events = run_stream(sc, b"".join(evs), step)
    check_outcome(sc, completed, out, err, events)

    # Only the unauthenticated plaintext usage copy may move or vanish unnoticed (and even then
    # the cross-check catches a copy that ends up after END with other numbers): any change to
    # the sequence of init + records is an error.
    def authenticated(seq: list[bytes]) -> list[bytes]:
        return [e for e in seq if not e.startswith(b'data: {"usage"')]

    if authenticated(evs) != authenticated(sc.events):
        assert err is not None, how


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([0, 256]), st.data())
def test_any_cut_or_bit_flip_is_caught(padding: int, data: st.DataObject) -> None:
    sc = scenario(padding)
    wire = b"".join(sc.events)
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(wire) - 1))
        completed, out, err, evs = run_stream(sc, wire[:cut], 997)
        check_outcome(sc, completed, out, err, evs)
        # a cut before the last byte of the END line can never complete
        if cut < len(wire) - 2:
            assert err is not None
    else:
        pos = data.draw(st.integers(0, len(wire) - 1))
        bit = data.draw(st.integers(0, 7))
        flipped = wire[:pos] + bytes((wire[pos] ^ (1 << bit),)) + wire[pos + 1 :]
        completed, out, err, evs = run_stream(sc, flipped, 997)
        check_outcome(sc, completed, out, err, evs)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([0, 128]), st.data())
def test_single_response_edits(padding: int, data: st.DataObject) -> None:
    sc = scenario(padding)
    body_ = sc.single
    how = data.draw(st.sampled_from(["cut", "flip", "append", "drop_record", "dup_record"]))
    recs: list[bytes] = []
    pos = rec_mod.RESP_INIT_LEN
    while pos < len(body_):
        n = int.from_bytes(body_[pos : pos + 4], "big")
        recs.append(body_[pos : pos + 4 + n])
        pos += 4 + n
    init = body_[: rec_mod.RESP_INIT_LEN]
    if how == "cut":
        edited = body_[: data.draw(st.integers(0, len(body_) - 1))]
    elif how == "flip":
        p = data.draw(st.integers(0, len(body_) - 1))
        edited = (
            body_[:p] + bytes((body_[p] ^ (1 << data.draw(st.integers(0, 7))),)) + body_[p + 1 :]
        )
    elif how == "append":
        edited = body_ + data.draw(st.binary(min_size=1, max_size=40))
    elif how == "drop_record":
        k = data.draw(st.integers(0, len(recs) - 1))
        edited = init + b"".join(recs[:k] + recs[k + 1 :])
    else:
        k = data.draw(st.integers(0, len(recs) - 1))
        edited = init + b"".join([*recs[: k + 1], recs[k], *recs[k + 1 :]])
    try:
        r = open_response_v2(edited, sc.single_ex.secrets(), aead=AEAD)
    except PQE2EEError as exc:
        assert exc.code in STREAM_CODES | {ErrorCode.OVERSIZE}
        return
    # the only accepted edit is none at all (a flip can land in... nothing: every byte counts)
    assert edited == body_
    assert r.body == sc.single_body


# ================================================================================================
# negotiation, usage, evidence


def offer(**over: Any) -> dict[str, Any]:
    import base64

    f: dict[str, Any] = {
        "v": 2,
        "kem_id": 25722,
        "kdf_id": 1,
        "aead_id": 3,
        "pk": base64.b64encode(instance_key().public_key).decode(),
        "not_after": 2000,
    }
    f.update(over)
    return {"e2e_v2": f}


@pytest.mark.parametrize(
    "over",
    [
        {"v": 1},
        {"v": True},
        {"kem_id": 0x41},
        {"kdf_id": True},
        {"aead_id": 1},
        {"pk": 5},
        {"pk": "@@@@"},
        {"pk": ""},
        {"not_after": "2000"},
        {"not_after": None},
        {"not_after": 1699},
    ],
)
def test_offer_invalid(over: dict[str, Any]) -> None:
    assert code(lambda: parse_v2_offer(offer(**over), 2000.0)) is ErrorCode.MALFORMED_DISCOVERY


def test_offer_valid_and_skew() -> None:
    assert parse_v2_offer({}, 0.0) is None
    o = parse_v2_offer(offer(), 2000.0)
    assert o is not None and o.pk_hash == pk_hash(instance_key().public_key) and o.not_after == 2000
    assert parse_v2_offer(offer(not_after=1701), 2000.0) is not None  # within 300 s skew
    assert (
        code(lambda: parse_v2_offer(offer(not_after=1701), 2000.0, clock_skew_s=0))
        is ErrorCode.MALFORMED_DISCOVERY
    )
    assert code(lambda: parse_v2_offer({"e2e_v2": []}, 0.0)) is ErrorCode.MALFORMED_DISCOVERY
    bad_key = __import__("base64").b64encode(b"\xff\xff" + instance_key().public_key[2:]).decode()
    assert code(lambda: parse_v2_offer(offer(pk=bad_key), 2000.0)) is ErrorCode.MALFORMED_DISCOVERY


def test_offer_keys_are_checked_once_but_expiry_every_time() -> None:
    from pqe2ee.protocol.v2 import negotiation

    checked = negotiation._checked_key.cache_info
    first = parse_v2_offer(offer(), 2000.0)
    hits = checked().hits
    again = parse_v2_offer(offer(), 2000.0)
    assert checked().hits == hits + 1 and again == first  # the key's check was kept
    expired = offer(not_after=1000)
    assert code(lambda: parse_v2_offer(expired, 2000.0)) is ErrorCode.MALFORMED_DISCOVERY
    bad_key = __import__("base64").b64encode(b"\xff\xff" + instance_key().public_key[2:]).decode()
    for _ in range(2):  # a refused key is refused again, never kept
        assert code(lambda: parse_v2_offer(offer(pk=bad_key), 2000.0)) is (
            ErrorCode.MALFORMED_DISCOVERY
        )
    misses = checked().misses
    code(lambda: parse_v2_offer(offer(pk=bad_key), 2000.0))
    assert checked().misses == misses + 1


def inst_info(iid: str, v2: bool, key: bytes = bytes(1184)) -> InstanceInfo:
    return InstanceInfo(iid, key, ("n",), offer() if v2 else {})


def test_negotiator_pins_bounded_and_expiring() -> None:
    neg = Negotiator(E2EPolicy(pin_ttl_s=100, max_pins=2))
    for i, chute in enumerate(("a", "b", "c")):
        key = bytes([i]) * 1184  # each chute its own instance key (keys are pinned too)
        assert neg.decide(chute, [inst_info("i", True, key)], 1000.0).version == 2
    assert set(neg.pins()) == {"b", "c"}  # "a" was pinned least recently
    assert neg.decide("a", [inst_info("i", False, bytes([0]) * 1184)], 1001.0).downgraded
    assert (
        code(lambda: neg.decide("b", [inst_info("i", False, bytes([1]) * 1184)], 1001.0))
        is ErrorCode.DOWNGRADE_SUSPECTED
    )
    assert neg.decide("b", [inst_info("i", False)], 1100.0).version == 1  # pin expired
    neg.unpin("c")
    assert neg.decide("c", [inst_info("i", False)], 1001.0).version == 1
    no_pin = Negotiator(E2EPolicy(pin_ttl_s=0))
    no_pin.decide("a", [inst_info("i", True)], 1000.0)
    assert not no_pin.pinned("a", 1000.0)
    with pytest.raises(LocalProtocolError):
        E2EPolicy(min_version=3)
    with pytest.raises(LocalProtocolError):
        E2EPolicy(min_version=2, prefer_v2=False)


def test_negotiator_remembers_the_chutes_seen() -> None:
    """``seen()`` (the proxy's status page): the last decision's version and time per chute,
    bounded like the pins; a refused decision is not a chute spoken to. (Distinct instances:
    an instance key seen offering v2 pins every chute it serves.)"""
    neg = Negotiator(E2EPolicy(max_pins=2))
    assert neg.decide("a", [inst_info("i", True)], 1000.0).version == 2
    assert neg.decide("b", [inst_info("j", False, b"\x01" * 1184)], 1001.0).version == 1
    assert neg.seen() == {"a": (2, 1000.0), "b": (1, 1001.0)}
    assert code(lambda: neg.decide("a", [inst_info("i", False)], 1002.0)) is (
        ErrorCode.DOWNGRADE_SUSPECTED
    )
    assert neg.seen()["a"] == (2, 1000.0)
    neg.decide("c", [inst_info("k", False, b"\x02" * 1184)], 1003.0)
    assert list(neg.seen()) == ["b", "c"]  # "a" was seen least recently
    v1_only = Negotiator(E2EPolicy(prefer_v2=False))
    v1_only.decide("a", [inst_info("i", True)], 1000.0)
    assert v1_only.seen() == {"a": (1, 1000.0)}


def test_negotiated_request_end_to_end() -> None:
    """Discovery offer -> decision -> sealed request -> instance: the key in H is the offer's."""
    neg = Negotiator(E2EPolicy(min_version=2))
    d = neg.decide(CHUTE, [inst_info(INST, True), inst_info("x", False)], 1000.0)
    (cand,) = d.candidates
    assert cand.offer is not None
    sealed = seal(body(), pk=cand.offer.public_key)
    assert sealed.header.pk_hash == cand.offer.pk_hash
    assert new_instance().open(sealed.blob, path=PATH, stream=False, now_ms=T0).body == body()


def test_receipt_and_evidence() -> None:
    sealed = seal(body())
    r = UsageReceipt.make(sealed.request_id, sealed.transcript_hash, {"total_tokens": 3})
    assert r.as_dict() == {
        "request_id": sealed.request_id.hex(),
        "transcript_hash": hashlib.sha256(sealed.header_bytes + sealed.enc).hexdigest(),
        "usage": {"total_tokens": 3},
    }
    e = evidence_report_data(b"nonce", b"v1", b"v2")
    assert (
        e
        == hashlib.sha256(
            b"pqe2ee/v2 evidence"
            + b"nonce"
            + hashlib.sha256(b"v1").digest()
            + hashlib.sha256(b"v2").digest()
        ).digest()
    )
    assert e != evidence_report_data(b"nonce", b"v2", b"v1")


def test_pin_survives_a_renamed_chute() -> None:
    """Issue 16 item 10: the pin holds on what the relay cannot rename - the model name the
    user asked for and the v1 keys of instances seen offering v2 - not only the chute id."""
    neg = Negotiator(E2EPolicy(pin_ttl_s=100))
    k1, k2 = bytes([1]) * 1184, bytes([2]) * 1184
    assert neg.decide("chute-a", [inst_info("i", True, k1)], 1000.0, models=["m"]).version == 2
    # the same model, now under another chute id, with other instances and no v2
    err = code(lambda: neg.decide("chute-b", [inst_info("j", False, k2)], 1001.0, models=["m"]))
    assert err is ErrorCode.DOWNGRADE_SUSPECTED
    # the same instance (its v1 key), under another chute id and model name, without v2
    err = code(lambda: neg.decide("chute-c", [inst_info("i", False, k1)], 1001.0, models=["x"]))
    assert err is ErrorCode.DOWNGRADE_SUSPECTED
    # something never seen with v2 is spoken to in v1 (downgraded, logged)
    assert neg.decide("chute-d", [inst_info("k", False, k2)], 1001.0, models=["y"]).downgraded
