"""The answers spec/v2.md and SPEC.md give to the questions a port would otherwise have to guess
(issue 13, item 5), each checked against the code that implements it."""

from __future__ import annotations

import base64
import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pqe2ee.backends import get_aead
from pqe2ee.backends.xwing import get_xwing
from pqe2ee.errors import PQE2EEError
from pqe2ee.protocol._codec import b64decode, gunzip_bounded, json_decode_object, stream_flag
from pqe2ee.protocol.clocks import UnixTime
from pqe2ee.protocol.v2 import (
    ContextHeader,
    E2EPolicy,
    MemoryReplayCache,
    Negotiator,
    ResponseSealer,
    ResponseSecrets,
    StreamDecryptorV2,
    header_info,
    open_response_v2,
    parse_request_blob,
    parse_v2_offer,
    seal_base,
    seal_request_v2,
)
from pqe2ee.protocol.v2.header import MAX_HEADER_LEN
from pqe2ee.protocol.v2.replay import Admission
from pqe2ee.protocol.v2.request import InstanceV2, build_plaintext
from test_relay_redis import redis_server

XW = get_xwing()
AEAD = get_aead()
V2 = json.loads((Path(__file__).resolve().parent.parent / "spec/vectors/v2.json").read_text())
CHUTE = "5f0b7ad3-1c2e-4d5a-9b8c-7e6f5a4b3c2d"
INSTANCE = "0e9d8c7b-6a59-4837-a625-140f3e2d1c0b"


def code_of(fn: Any) -> str:
    with pytest.raises(PQE2EEError) as info:
        fn()
    return info.value.code.value


def test_longest_valid_header_is_2706_bytes() -> None:
    h = ContextHeader(
        stream=True,
        pk_hash=bytes(32),
        ts_ms=0,
        request_id=bytes(16),
        chute_id=CHUTE,
        instance_id=INSTANCE,
        relay_nonce="n" * 255,
        path="/" + "p" * 2047,
        model="m" * 255,
    ).encode()
    assert len(h) == MAX_HEADER_LEN == 2706
    too_long = h[:5] + (2707).to_bytes(2, "big") + h[7:] + b"x" + bytes(1200)
    assert code_of(lambda: parse_request_blob(too_long)) == "bad_header"


@pytest.mark.parametrize(
    ("value", "flag"),
    [(None, False), (False, False), (0, False), (0.0, False), (-0.0, False), ("", False),
     ([], False), ({}, False), ("false", True), ([0], True), ({"a": 0}, True), (1e-300, True)],
)  # fmt: skip
def test_stream_flag_is_the_spec_table(value: Any, flag: bool) -> None:
    assert stream_flag({"stream": value}) is flag
    assert stream_flag({}) is False


def _seal(body: bytes) -> Any:
    key = XW.generate()
    return seal_request_v2(
        body, key.public_key, chute_id=CHUTE, instance_id=INSTANCE, relay_nonce="n1",
        path="/v1/chat/completions", now_ms=0, xwing=XW, aead=AEAD,
    )  # fmt: skip


def test_model_is_the_decoded_string() -> None:
    assert _seal(rb'{"model":"a\/b\u00e9"}').model == "a/bé"
    assert _seal(b'{"model":"a","model":"b"}').model == "b"  # duplicates: last wins
    for body in (rb'{"model":"a\ud800"}', b'{"model":""}', b'{"model":5}', b"{}"):
        assert code_of(lambda b=body: _seal(b)) == "invalid_body"
    assert json_decode_object(b'{"stream":false,"stream":true}', what="x")["stream"] is True


def test_base64_ignores_nonzero_unused_bits_but_nothing_else() -> None:
    assert b64decode("QR==", what="x") == b64decode("QQ==", what="x") == b"A"
    for bad in ("QQ", "QQ=", "Q Q==", "QQ==QQ==", "QQ==\n"):
        assert code_of(lambda v=bad: b64decode(v, what="x")) == "malformed_payload"


def test_gzip_members_concatenate_and_trailing_bytes_are_refused() -> None:
    two = gzip.compress(b"ab") + gzip.compress(b"cd")
    assert gunzip_bounded(two, limit=100, what="x") == b"abcd"
    assert code_of(lambda: gunzip_bounded(two + b"\0", limit=100, what="x")) == "malformed_payload"


def _instance(key: Any) -> InstanceV2:
    return InstanceV2(
        chute_id=CHUTE, instance_id=INSTANCE, keys=[key], aead=AEAD,
        replay_cache=MemoryReplayCache(),
    )  # fmt: skip


def test_low_order_response_key_is_refused_after_the_request_id_is_spent() -> None:
    key = XW.generate()
    good = seal_request_v2(
        b'{"model":"m"}', key.public_key, chute_id=CHUTE, instance_id=INSTANCE,
        relay_nonce="n1", path="/v1/chat/completions", now_ms=0, xwing=XW, aead=AEAD,
    )  # fmt: skip
    pk_c = XW.generate().public_key[:-32] + bytes(32)  # X25519 half: the all-zero point
    p = build_plaintext(b'{"model":"m"}', pk_c, compress=False, pad="none")
    enc, ct, _ = seal_base(
        key.public_key, header_info(good.header_bytes), b"", p, xwing=XW, aead=AEAD
    )
    blob = good.header_bytes + enc + ct
    inst = _instance(key)

    def open_() -> Any:
        return inst.open(blob, path="/v1/chat/completions", stream=False, now_ms=0)

    opened = open_()  # checks 1-12 pass: the modulus check does not look at the X25519 half
    assert code_of(lambda: ResponseSealer.for_request(opened, xwing=XW, aead=AEAD)) == (
        "malformed_payload"
    )
    assert code_of(open_) == "replay"  # the request_id is spent


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis-spec")) as url:
        yield url


def _boundary(cache: Any) -> None:
    assert cache.admit(b"r1", 1000, 1000) is Admission.FRESH  # now = ts + W: accepted
    assert cache.admit(b"r1", 1000, 1000) is Admission.REPLAY  # and refused again
    assert cache.admit(b"r2", 1000, 1001) is Admission.TOO_OLD


def test_replay_boundary_is_inclusive_in_memory() -> None:
    _boundary(MemoryReplayCache())


@pytest.mark.redis
def test_replay_boundary_is_inclusive_in_redis(redis_url: str) -> None:
    from pqe2ee.server.replaycache import RedisReplayCache

    now = int(time.time() * 1000)
    cache = RedisReplayCache(redis_url, prefix=f"spec-{now}:")
    cache.check(fresh_keys=True)  # a new prefix: no generation to distrust (issue 16)
    assert cache.admit(b"r1", now, now) is Admission.FRESH
    assert cache.admit(b"r1", now, now) is Admission.REPLAY
    assert cache.admit(b"r2", now - 1, now) is Admission.TOO_OLD


def _single(usage_records: list[dict[str, Any]], end_usage: Any) -> Any:
    secrets = ResponseSecrets(bytes(32), XW.generate(), False)
    sealer = ResponseSealer(bytes(32), secrets.key.public_key, stream=False, xwing=XW, aead=AEAD)
    out = [sealer.resp_init, sealer.head(200)]
    out += [sealer.usage(u) for u in usage_records] + [sealer.end(usage=end_usage)]
    framed = out[0] + b"".join(len(r).to_bytes(4, "big") + r for r in out[1:])
    return open_response_v2(framed, secrets, aead=AEAD)


def test_end_usage_null_keeps_the_last_usage_record() -> None:
    assert _single([{"total_tokens": 1}, {"total_tokens": 2}], None).usage == {"total_tokens": 2}
    assert _single([{"total_tokens": 1}], {"total_tokens": 3}).usage == {"total_tokens": 3}
    assert _single([], None).usage is None


def _stream_vector() -> tuple[ResponseSecrets, str, str]:
    resp = next(r for r in V2["response"] if r["name"] == "stream-ok")
    req = V2["request"][resp["request"]]
    key = XW.from_seed(bytes.fromhex(req["response_seed"]))
    return ResponseSecrets(bytes.fromhex(req["exporter"]), key, True), resp["wire"], resp["data"]


def _data(wire: bytes) -> bytes:
    secrets, _, _ = _stream_vector()
    dec = StreamDecryptorV2(secrets, aead=AEAD)
    dec.receive_data(wire)
    dec.receive_eof()
    assert dec.complete
    return b"".join(getattr(e, "data", b"") for e in dec.events() if type(e).__name__ == "Data")


def test_v2_outer_lines_crlf_and_data_without_space() -> None:
    _, wire, data = _stream_vector()
    variant = wire.replace("\n", "\r\n").replace("data: ", "data:")
    assert _data(variant.encode()) == _data(wire.encode()) == data.encode()


def test_v2_outer_data_lines_are_not_joined() -> None:
    secrets, wire, _ = _stream_vector()
    first, rest = wire.split("\n\n", 1)
    split = first[: len(first) // 2] + "\ndata: " + first[len(first) // 2 :] + "\n\n" + rest
    dec = StreamDecryptorV2(secrets, aead=AEAD)
    assert code_of(lambda: dec.receive_data(split.encode())) == "malformed_event"


def test_v2_state_check_comes_before_base64() -> None:
    secrets, _, _ = _stream_vector()
    dec = StreamDecryptorV2(secrets, aead=AEAD)
    assert code_of(lambda: dec.receive_data(b'data: {"e2e_v2":"!!"}\n\n')) == "record_before_init"


def test_v1_state_check_comes_before_base64() -> None:
    from pqe2ee.backends import get_kem
    from pqe2ee.protocol import StreamDecryptor

    dec = StreamDecryptor(get_kem().generate(), aead=AEAD)
    assert code_of(lambda: dec.receive_data(b'data: {"e2e":"!!"}\n\n')) == "record_before_init"


def _offer(**changes: Any) -> dict[str, Any]:
    pk = XW.generate().public_key
    field = {"v": 2, "kem_id": 25722, "kdf_id": 1, "aead_id": 3,
             "pk": base64.b64encode(pk).decode(), "not_after": 2_000_000_000}  # fmt: skip
    field.update(changes)
    return {"e2e_v2": field}


def test_offer_types_and_boundaries() -> None:
    assert parse_v2_offer(_offer(), 1e9) is not None
    for bad in (
        {"v": 2.0},
        {"v": True},
        {"v": "2"},
        {"not_after": 2e9},
        {"not_after": "2000000000"},
    ):
        assert code_of(lambda b=bad: parse_v2_offer(_offer(**b), 1e9)) == "malformed_discovery"
    assert parse_v2_offer(_offer(not_after=1000), 1299.0) is not None
    assert code_of(lambda: parse_v2_offer(_offer(not_after=1000), 1300.0)) == "malformed_discovery"
    low = XW.generate().public_key[:-32] + bytes(32)
    assert parse_v2_offer(_offer(pk=base64.b64encode(low).decode()), 1e9) is not None
    assert code_of(lambda: XW.encapsulate(low)) == "invalid_key"


def test_policy_contradiction_and_pin_boundary() -> None:
    assert code_of(lambda: E2EPolicy(min_version=2, prefer_v2=False)) == "invalid_argument"
    neg = Negotiator(E2EPolicy(pin_ttl_s=10.0))
    neg.pin(CHUTE, UnixTime(100.0))
    assert neg.pinned(CHUTE, UnixTime(109.999))
    assert not neg.pinned(CHUTE, UnixTime(110.0))
