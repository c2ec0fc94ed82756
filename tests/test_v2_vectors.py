"""spec/vectors/v2.json checked with pqe2ee.protocol.v2: every positive vector opened from the
decrypting side by every X-Wing backend, re-derived byte for byte where encapsulation can be
derandomised (pycryptodome), and every negative vector failing with its listed error code."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from pqe2ee.backends import get_aead
from pqe2ee.backends.pyca import PycaKEM
from pqe2ee.backends.xwing import XWing, available_xwing, get_xwing
from pqe2ee.errors import DecryptError, ErrorCode, PQE2EEError
from pqe2ee.protocol import EndOfStream
from pqe2ee.protocol import open_request as open_request_v1
from pqe2ee.protocol.discovery import parse_discovery
from pqe2ee.protocol.v2 import (
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
    StreamDecryptorV2,
    StreamEncoderV2,
    UpstreamError,
    UsageUpdate,
    bucket,
    derive_response_keys,
    header_info,
    open_base,
    open_response_v2,
    padme,
    parse_header,
    parse_request_blob,
    pow2,
    record_nonce,
    seal_request_v2,
    seal_response_v2,
    setup_base_r,
    setup_base_s,
    usage_matches,
)
from pqe2ee.protocol.v2.header import MAX_HEADER_LEN
from pqe2ee.protocol.v2.request import EXPORT_CONTEXT

ROOT = Path(__file__).resolve().parent.parent
V = json.loads((ROOT / "spec" / "vectors" / "v2.json").read_text(encoding="utf-8"))
AEAD = get_aead("pyca")
BACKENDS = available_xwing()


def h(s: str) -> bytes:
    return bytes.fromhex(s)


@pytest.fixture(params=BACKENDS)
def xw(request: pytest.FixtureRequest) -> XWing:
    return get_xwing(request.param)


@pytest.fixture(scope="module")
def derand() -> XWing:
    return get_xwing("pycryptodome")


def ids(section: str) -> list[str]:
    return [c["name"] for c in V[section]]


def code_of(fn: Any) -> str:
    with pytest.raises(PQE2EEError) as info:
        fn()
    return info.value.code.value


# -- the file -----------------------------------------------------------------------------------


def test_both_backends_available() -> None:
    assert BACKENDS == ["pyca", "pycryptodome"]


def test_coverage_of_the_design_vector_list() -> None:
    assert len(V["xwing"]) == 3
    assert len(V["hpke"]["encryptions"]) == 10 and len(V["hpke"]["exports"]) == 5
    neg_codes = {c["code"] for c in V["stream_negative"]}
    assert {
        "stream_truncated",
        "record_out_of_order",
        "duplicate_record",
        "record_auth_failed",
        "data_after_end",
        "bad_padding",
        "unknown_record_type",
        "record_grammar",
        "usage_mismatch",
        "record_before_init",
        "duplicate_init",
        "malformed_event",
    } <= neg_codes
    inst_codes = {c["code"] for c in V["instance_negative"]}
    assert {
        "decrypt_failed",
        "context_mismatch",
        "unknown_key",
        "stale",
        "replay",
        "bad_header",
        "bad_padding",
        None,
    } <= inst_codes
    assert {r["pad"] for r in V["request"]} == {"none", "padme", "pow2"}
    assert {r["compress"] for r in V["request"]} == {True, False}
    assert {r["response_padding"] for r in V["request"]} == {0, 128, 256}
    assert len(V["header_negative"]) >= 20


# -- X-Wing and HPKE ----------------------------------------------------------------------------


@pytest.mark.parametrize("i", range(3))
def test_xwing_keygen_and_decaps(xw: XWing, i: int) -> None:
    v = V["xwing"][i]
    key = xw.from_seed(h(v["seed"]))
    assert key.public_key == h(v["pk"])
    assert key.decapsulate(h(v["ct"])) == h(v["ss"])


@pytest.mark.parametrize("i", range(3))
def test_xwing_encaps_derand(derand: XWing, i: int) -> None:
    v = V["xwing"][i]
    assert derand.encapsulate_derand(h(v["pk"]), h(v["eseed"])) == (h(v["ct"]), h(v["ss"]))


def test_pyca_cannot_derandomise() -> None:
    v = V["xwing"][0]
    assert code_of(lambda: get_xwing("pyca").encapsulate_derand(h(v["pk"]), h(v["eseed"]))) == (
        "unsupported_operation"
    )


@pytest.mark.parametrize("case", V["kem_negative"], ids=ids("kem_negative"))
def test_kem_negative(xw: XWing, case: dict[str, Any]) -> None:
    if case["op"] == "decaps":
        key = xw.from_seed(h(case["seed"]))
        assert code_of(lambda: key.decapsulate(h(case["ct"]))) == case["code"]
    else:
        assert code_of(lambda: xw.encapsulate(h(case["pk"]))) == case["code"]


def test_hpke_sender(derand: XWing) -> None:
    v = V["hpke"]
    enc, ctx = setup_base_s(h(v["pkRm"]), h(v["info"]), xwing=derand, aead=AEAD, eseed=h(v["ikmE"]))
    assert enc == h(v["enc"])
    assert (ctx.key, ctx.base_nonce, ctx.exporter_secret) == (
        h(v["key"]),
        h(v["base_nonce"]),
        h(v["exporter_secret"]),
    )
    for e in v["encryptions"]:
        assert ctx.compute_nonce(ctx.seq) == h(e["nonce"])
        assert ctx.seal(h(e["aad"]), h(e["pt"])) == h(e["ct"])
    for x in v["exports"]:
        assert ctx.export(h(x["exporter_context"]), x["L"]) == h(x["exported_value"])


def test_hpke_recipient(xw: XWing) -> None:
    v = V["hpke"]
    ctx = setup_base_r(h(v["enc"]), xw.from_seed(h(v["skRm"])), h(v["info"]), aead=AEAD)
    assert ctx.key == h(v["key"])
    for e in v["encryptions"]:
        assert ctx.open(h(e["aad"]), h(e["ct"])) == h(e["pt"])
    for x in v["exports"]:
        assert ctx.export(h(x["exporter_context"]), x["L"]) == h(x["exported_value"])


# -- header -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", V["header"], ids=ids("header"))
def test_header(case: dict[str, Any]) -> None:
    f = case["fields"]
    hdr = ContextHeader(
        stream=f["stream"],
        pk_hash=h(f["pk_hash"]),
        ts_ms=f["ts_ms"],
        request_id=h(f["request_id"]),
        chute_id=f["chute_id"],
        instance_id=f["instance_id"],
        relay_nonce=f["relay_nonce"],
        path=f["path"],
        model=f["model"],
        response_padding=f["response_padding"],
    )
    assert hdr.encode() == h(case["h"])
    assert hdr.flags == case["flags"]
    assert parse_header(h(case["h"])) == hdr
    assert hashlib.sha256(h(case["h"])).hexdigest() == case["sha256"]
    assert header_info(h(case["h"])) == h(case["info"])
    assert len(h(case["info"])) == 46


@pytest.mark.parametrize("case", V["header_negative"], ids=ids("header_negative"))
def test_header_negative(case: dict[str, Any]) -> None:
    assert code_of(lambda: parse_header(h(case["h"]))) == case["code"]


@pytest.mark.parametrize("case", V["header_edge"], ids=ids("header_edge"))
def test_header_edge(case: dict[str, Any]) -> None:
    # the longest valid H sits exactly on the §3 bound (hdr_len 2706) and parses
    hb = h(case["h"])
    assert len(hb) == int.from_bytes(hb[5:7], "big") == MAX_HEADER_LEN == 2706
    assert parse_header(hb).encode() == hb


# -- requests -----------------------------------------------------------------------------------


def instance(xw: XWing, req: dict[str, Any]) -> InstanceV2:
    return InstanceV2(
        chute_id=req["chute_id"],
        instance_id=req["instance_id"],
        keys=[xw.from_seed(h(req["instance_seed"]))],
        aead=AEAD,
        replay_cache=MemoryReplayCache(),
    )


@pytest.mark.parametrize("req", V["request"], ids=ids("request"))
def test_request_opens(xw: XWing, req: dict[str, Any]) -> None:
    parsed = parse_request_blob(h(req["blob"]))
    assert parsed.header_bytes == h(req["h"]) and parsed.enc == h(req["enc"])
    assert header_info(parsed.header_bytes) == h(req["info"])
    key = xw.from_seed(h(req["instance_seed"]))
    assert hashlib.sha256(key.public_key).hexdigest() == req["instance_pk_sha256"]
    p, ctx = open_base(parsed.enc, key, h(req["info"]), b"", parsed.ciphertext, aead=AEAD)
    assert p == h(req["p"])
    assert ctx.export(EXPORT_CONTEXT, 32) == h(req["exporter"])
    opened = instance(xw, req).open(
        h(req["blob"]), path=req["delivered_path"], stream=req["stream"], now_ms=req["ts_ms"]
    )
    assert opened.body == req["body"].encode()
    assert opened.exporter == h(req["exporter"])
    assert opened.response_public_key == xw.from_seed(h(req["response_seed"])).public_key
    assert opened.compressed is req["compress"]
    assert opened.transcript_hash == h(req["transcript_hash"])


@pytest.mark.parametrize("req", V["request"], ids=ids("request"))
def test_request_rederived(derand: XWing, req: dict[str, Any]) -> None:
    sealed = seal_request_v2(
        req["body"].encode(),
        derand.from_seed(h(req["instance_seed"])).public_key,
        chute_id=req["chute_id"],
        instance_id=req["instance_id"],
        relay_nonce=req["relay_nonce"],
        path=req["path"],
        now_ms=req["ts_ms"],
        xwing=derand,
        aead=AEAD,
        random_bytes=lambda n: h(req["request_id"])[:n],
        compress=req["compress"],
        pad=req["pad"],
        response_padding=req["response_padding"],
        response_key=derand.from_seed(h(req["response_seed"])),
        eseed=h(req["eseed"]),
    )
    assert sealed.blob == h(req["blob"])
    assert sealed.secrets.exporter == h(req["exporter"])


@pytest.mark.parametrize("case", V["instance_negative"], ids=ids("instance_negative"))
def test_instance_negative(xw: XWing, case: dict[str, Any]) -> None:
    req = V["request"][case["request"]]
    inst = instance(xw, req)
    view = case["view"]

    def open_() -> Any:
        return inst.open(
            h(case["blob"]),
            path=view["path"],
            stream=view["stream"],
            now_ms=view["now_ms"],
            relay_nonce=view.get("relay_nonce"),
        )

    if view["chute_id"] != req["chute_id"] or view["instance_id"] != req["instance_id"]:
        inst = InstanceV2(
            chute_id=view["chute_id"],
            instance_id=view["instance_id"],
            keys=[xw.from_seed(h(req["instance_seed"]))],
            aead=AEAD,
            replay_cache=MemoryReplayCache(),
        )
    if case.get("open_twice"):
        open_()
    if case["code"] is None:
        assert open_().body == req["body"].encode()
    else:
        assert code_of(open_) == case["code"]


def test_v2_blob_to_v1_runtime() -> None:
    case = V["v1_runtime"]
    blob = h(V["request"][case["request"]]["blob"])
    key = PycaKEM().from_seed(h(case["v1_seed"]))
    with pytest.raises(DecryptError) as info:
        open_request_v1(blob, key, aead=AEAD)
    assert info.value.code.value == case["code"]


# -- responses ----------------------------------------------------------------------------------


def secrets(xw: XWing, req: dict[str, Any]) -> ResponseSecrets:
    return ResponseSecrets(h(req["exporter"]), xw.from_seed(h(req["response_seed"])), req["stream"])


def event_json(ev: Any) -> dict[str, Any]:
    if isinstance(ev, Head):
        return {
            "type": "head",
            "status": ev.status,
            "content_type": ev.content_type,
            "content_encoding": ev.content_encoding,
        }
    if isinstance(ev, Data):
        return {"type": "data", "data": ev.data.decode("utf-8")}
    if isinstance(ev, UsageUpdate):
        return {"type": "usage", "usage": ev.usage}
    assert isinstance(ev, End)
    err = (
        None
        if ev.error is None
        else {"type": ev.error.type, "message": ev.error.message, "status": ev.error.status}
    )
    return {
        "type": "end",
        "usage": ev.usage,
        "error": err,
        "records": ev.records,
        "data_bytes": ev.data_bytes,
    }


@pytest.mark.parametrize("resp", V["response"], ids=ids("response"))
def test_response_schedule(xw: XWing, resp: dict[str, Any]) -> None:
    req = V["request"][resp["request"]]
    s = resp["schedule"]
    ss_r = xw.from_seed(h(req["response_seed"])).decapsulate(h(s["enc_r"]))
    assert ss_r == h(s["ss_r"])
    init = h(s["resp_init"])
    assert (
        init[:5] == b"PQE2\x02"
        and init[5] == (2 if req["stream"] else 1)
        and init[6:] == h(s["enc_r"])
    )
    keys = derive_response_keys(h(req["exporter"]), ss_r, init)
    assert (keys.prk, keys.key, keys.nonce_prefix) == (h(s["prk_r"]), h(s["k_r"]), h(s["np_r"]))
    nonces = s["nonces"]
    assert record_nonce(keys.nonce_prefix, 0, False) == h(nonces["seq0"])
    assert record_nonce(keys.nonce_prefix, 1, False) == h(nonces["seq1"])
    (final_name,) = (k for k in nonces if k.startswith("final_seq"))
    assert record_nonce(keys.nonce_prefix, int(final_name[9:]), True) == h(nonces[final_name])


@pytest.mark.parametrize(
    "resp",
    [r for r in V["response"] if r["kind"] == "single"],
    ids=[r["name"] for r in V["response"] if r["kind"] == "single"],
)
def test_single_response(xw: XWing, resp: dict[str, Any]) -> None:
    req = V["request"][resp["request"]]
    out = open_response_v2(h(resp["body"]), secrets(xw, req), aead=AEAD)
    exp = resp["expect"]
    assert out.status == exp["status"] and out.content_type == exp["content_type"]
    assert out.body == exp["body"].encode() and out.usage == exp["usage"]
    assert (
        None
        if out.error is None
        else {"type": out.error.type, "message": out.error.message, "status": out.error.status}
    ) == exp["error"]
    # the listed records, one by one
    dec = RecordDecryptor(secrets(xw, req), aead=AEAD)
    dec.receive_init(h(resp["schedule"]["resp_init"]))
    for rec in resp["records"]:
        dec.receive_record(h(rec))
    dec.receive_eof()
    assert dec.complete


@pytest.mark.parametrize(
    "resp",
    [r for r in V["response"] if r["kind"] == "stream"],
    ids=[r["name"] for r in V["response"] if r["kind"] == "stream"],
)
def test_stream_response(xw: XWing, resp: dict[str, Any]) -> None:
    req = V["request"][resp["request"]]
    dec = StreamDecryptorV2(secrets(xw, req), aead=AEAD)
    wire = resp["wire"].encode()
    for i in range(0, len(wire), 777):  # split anywhere
        dec.receive_data(wire[i : i + 777])
    dec.receive_eof()
    evs = dec.events()
    assert isinstance(evs[-1], EndOfStream) and evs[-1].complete
    assert [event_json(e) for e in evs[:-1]] == resp["events"]
    assert b"".join(e.data for e in evs if isinstance(e, Data)) == resp["data"].encode()


@pytest.mark.parametrize("resp", V["response"], ids=ids("response"))
def test_response_rederived(derand: XWing, resp: dict[str, Any]) -> None:
    req = V["request"][resp["request"]]
    opened = InstanceV2(
        chute_id=req["chute_id"],
        instance_id=req["instance_id"],
        keys=[derand.from_seed(h(req["instance_seed"]))],
        aead=AEAD,
        replay_cache=MemoryReplayCache(),
    ).open(h(req["blob"]), path=req["delivered_path"], stream=req["stream"], now_ms=req["ts_ms"])
    sealer = ResponseSealer.for_request(
        opened, xwing=derand, aead=AEAD, eseed=h(resp["schedule"]["eseed"])
    )
    assert sealer.resp_init == h(resp["schedule"]["resp_init"])
    if resp["kind"] == "single":
        exp = resp["expect"]
        err = exp["error"]
        body = seal_response_v2(
            sealer,
            status=exp["status"],
            body=exp["body"].encode(),
            usage=exp["usage"],
            error=None
            if err is None
            else UpstreamError(err["type"], err["message"], err["status"]),
            compress=req["compress"] if resp["name"] == "single-padded" else True,
        )
        assert body == h(resp["body"])
    else:
        enc = StreamEncoderV2(sealer)
        out = [enc.start()]
        evs = resp["events"]
        usage_recs = [e for e in evs if e["type"] == "usage"]
        out += [enc.feed(e["data"].encode()) for e in evs if e["type"] == "data"]
        out += [enc.usage(e["usage"]) for e in usage_recs]
        end = evs[-1]
        err = end["error"]
        out.append(
            enc.finish(
                error=None
                if err is None
                else UpstreamError(err["type"], err["message"], err["status"])
            )
        )
        assert b"".join(out) == resp["wire"].encode()


@pytest.mark.parametrize("case", V["stream_edge"], ids=ids("stream_edge"))
def test_stream_edge(xw: XWing, case: dict[str, Any]) -> None:
    # non-zero unused base64 bits are ignored (§1): same DATA as the canonical stream
    dec = StreamDecryptorV2(secrets(xw, V["request"][case["request"]]), aead=AEAD)
    dec.receive_data(case["wire"].encode())
    dec.receive_eof()
    evs = dec.events()
    assert isinstance(evs[-1], EndOfStream) and evs[-1].complete
    assert b"".join(e.data for e in evs if isinstance(e, Data)) == case["data"].encode()
    canonical = next(r["wire"] for r in V["response"] if r["name"] == "stream-ok")
    assert case["wire"] != canonical and case["request"] == 1


@pytest.mark.parametrize("case", V["stream_negative"], ids=ids("stream_negative"))
def test_stream_negative(xw: XWing, case: dict[str, Any]) -> None:
    req = V["request"][case["request"]]
    dec = StreamDecryptorV2(secrets(xw, req), aead=AEAD)
    seen: list[Any] = []

    def run() -> None:
        dec.receive_data(case["wire"].encode())
        seen.extend(dec.events())
        dec.receive_eof()
        seen.extend(dec.events())

    assert code_of(run) == case["code"]
    assert not dec.complete
    assert not any(isinstance(e, EndOfStream) for e in seen)
    # sticky: the same error again
    assert code_of(lambda: dec.receive_data(b"\n")) == case["code"]


@pytest.mark.parametrize("case", V["single_negative"], ids=ids("single_negative"))
def test_single_negative(xw: XWing, case: dict[str, Any]) -> None:
    req = V["request"][case["request"]]
    assert (
        code_of(lambda: open_response_v2(h(case["body"]), secrets(xw, req), aead=AEAD))
        == case["code"]
    )


# -- padding, negotiation, usage ----------------------------------------------------------------


def test_padding_tables() -> None:
    t = V["padding"]
    assert {int(k): v for k, v in t["padme"].items()} == {int(k): padme(int(k)) for k in t["padme"]}
    assert {int(k): v for k, v in t["pow2"].items()} == {int(k): pow2(int(k)) for k in t["pow2"]}
    for b in (128, 256):
        table = t[f"bucket{b}"]
        assert all(bucket(int(k), b) == v for k, v in table.items())
    # the published Padmé examples / bounds
    assert t["padme"]["1000"] == 1024 and t["padme"]["9"] == 10 and t["padme"]["1000000"] == 1015808
    assert all(v <= int(k) * 1.12 + 1 for k, v in t["padme"].items())


@pytest.mark.parametrize("case", V["negotiation"], ids=ids("negotiation"))
def test_negotiation(case: dict[str, Any]) -> None:
    neg = Negotiator(E2EPolicy(**case["policy"]))
    for step in case["steps"]:
        invokes = 0
        result = parse_discovery(step["discovery"].encode(), step["now"])
        expect = step["expect"]
        try:
            decision = neg.decide("chute", result.instances, step["now"])
        except PQE2EEError as exc:
            assert exc.code.value == expect["code"]
            assert invokes == expect["invokes"]
            continue
        invokes += 1  # a transport would POST /e2e/invoke now
        assert "code" not in expect, expect
        assert decision.version == expect["version"]
        assert [c.instance.instance_id for c in decision.candidates] == expect["instances"]
        assert decision.downgraded is expect["downgraded"]
        assert all((c.offer is not None) == (decision.version == 2) for c in decision.candidates)


@pytest.mark.parametrize("case", V["usage"], ids=ids("usage"))
def test_usage(case: dict[str, Any]) -> None:
    assert usage_matches(case["copy"], case["authenticated"]) is case["matches"]
    assert (ErrorCode.USAGE_MISMATCH.value if not case["matches"] else None) == case.get("code")
