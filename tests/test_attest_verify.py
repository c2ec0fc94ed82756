"""pqe2ee.attest on the real Chutes captures (../shared/attestation), verified at capture time
with the production verifier (dcap-qvl + Intel's root, the pinned NVIDIA root), and each way the
evidence can be wrong: outside the collateral window, a flipped quote byte, a wrong nonce, a
swapped key, swapped GPU evidence, a debug quote, a measurement off the allowlist."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
from collections.abc import Mapping

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attest_support import CAPTURES, EXPECTED_FMSPC, capture, full_collateral
from pqe2ee.attest import (
    EvidenceBundle,
    GpuMode,
    MeasurementSet,
    Policy,
    Verdict,
    nonce_binding,
    parse_evidence,
    verify_evidence,
)
from pqe2ee.attest.capture import Capture
from pqe2ee.attest.collateral import SelectedCollateral, raw_members
from pqe2ee.attest.gpu import nvidia_root, parse_spdm
from pqe2ee.attest.tdx import _verify, load_qvl, parse_quote
from pqe2ee.errors import AttestationError, ErrorCode

E = ErrorCode
NAMES = [p.name for p in CAPTURES]


def _run(
    cap: Capture,
    *,
    policy: Policy | None = None,
    at: float | None = None,
    instances: Mapping[str, str] | None = None,
    evidence: EvidenceBundle | None = None,
    nonce: str | None = None,
    extra: bool = True,
    **roots: object,
) -> dict[str, Verdict]:
    verdicts = verify_evidence(
        instances if instances is not None else cap.instances,
        evidence or cap.evidence,
        nonce or cap.nonce_hex,
        full_collateral(cap) if extra else cap.collateral,
        policy or Policy(),
        at if at is not None else cap.captured_at.timestamp(),
        **roots,  # type: ignore[arg-type]
    )
    return {v.instance_id: v for v in verdicts}


def _with_entry(cap: Capture, instance_id: str, **changes: object) -> EvidenceBundle:
    entries = dict(cap.evidence.entries)
    entries[instance_id] = {**entries[instance_id], **changes}
    return EvidenceBundle(entries, cap.evidence.failed)


def _first(cap: Capture) -> str:
    return next(iter(cap.instances))


def _flip_quote(cap: Capture, instance_id: str, offset: int, mask: int = 1) -> EvidenceBundle:
    quote = bytearray(base64.b64decode(str(cap.evidence.entries[instance_id]["quote"])))
    quote[offset] ^= mask
    return _with_entry(cap, instance_id, quote=base64.b64encode(bytes(quote)).decode())


# ------------------------------------------------------------------------ the fixtures, as captured


@pytest.mark.parametrize("name", NAMES)
def test_every_instance_trusted_at_capture_time(name: str) -> None:
    cap = capture(name)
    verdicts = _run(cap)
    assert list(verdicts) == list(cap.instances)  # one verdict per discovered instance, in order
    for verdict in verdicts.values():
        assert verdict.trusted, (verdict.instance_id, verdict.reasons, verdict.checks)
        assert verdict.reasons == ()
        assert verdict.tcb_status == "UpToDate"
        assert (verdict.gpus_checked, verdict.gpus_ok) == (8, 8)
        assert not verdict.measurements_pinned
        assert "measurements_not_pinned" in verdict.notes
        assert verdict.measurements is not None and len(verdict.measurements.mrtd) == 96


def test_fmspc_without_tcb_info_is_collateral_missing() -> None:
    cap = capture("glm-5-tee-2026-05-20")
    verdicts = _run(cap, extra=False)
    for instance_id, fmspc in EXPECTED_FMSPC[cap_name(cap)].items():
        assert verdicts[instance_id].fmspc == fmspc
        if fmspc == "90c06f000000":  # the capture fetched TCB info for this FMSPC only
            assert verdicts[instance_id].trusted
        else:
            assert verdicts[instance_id].reasons == (E.ATTEST_COLLATERAL_MISSING,)


def cap_name(cap: Capture) -> str:
    return "glm-5-tee-" + cap.captured_at.date().isoformat()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("days", [-40, 45])
def test_rejected_outside_the_collateral_window(name: str, days: int) -> None:
    cap = capture(name)
    at = cap.captured_at.timestamp() + days * 86400
    for verdict in _run(cap, at=at).values():
        assert not verdict.trusted
        assert E.ATTEST_COLLATERAL_MISSING in verdict.reasons


def test_an_expired_pck_crl_is_not_used() -> None:
    # TCB info and QE identity valid at the 06-29 capture, but only the PCK CRL of 05-20 (next
    # update 06-19): no usable collateral, so nothing is trusted; dcap-qvl refuses it as well.
    early = capture("glm-5-tee-2026-05-20")
    cap = capture("glm-5-tee-2026-06-29")
    crl = x509.load_der_x509_crl(early.collateral.pck_crls[0][1])
    assert crl.next_update_utc is not None and crl.next_update_utc < cap.captured_at
    coll = dataclasses.replace(full_collateral(cap), pck_crls=early.collateral.pck_crls)
    now = cap.captured_at.timestamp()
    verdicts = verify_evidence(cap.instances, cap.evidence, cap.nonce_hex, coll, Policy(), now)
    assert [v.reasons for v in verdicts] == [(E.ATTEST_COLLATERAL_MISSING,)] * 2
    fresh = full_collateral(cap)
    selected = fresh.select("90c06f000000", "platform", now)
    assert selected is not None
    stale = SelectedCollateral(
        selected.tcb_info,
        selected.qe_identity,
        early.collateral.pck_crls[0][1],
        selected.pck_crl_issuer_chain,
        selected.root_ca_crl,
    )
    quote = base64.b64decode(str(cap.evidence.entries[_first(cap)]["quote"]))
    with pytest.raises(ValueError, match=r"(?i)crl"):
        _verify(load_qvl(), quote, stale, int(now), None)


# ------------------------------------------------------------------------------ negative cases


@pytest.mark.parametrize("offset", [0x30 + 16, 0x30 + 136, 0x30 + 520, 1000])
def test_flipped_quote_byte(offset: int) -> None:
    # header / mr_td / report_data / signature area: the signature or the chain breaks
    cap = capture("glm-5-tee-2026-06-29")
    victim = _first(cap)
    verdict = _run(cap, evidence=_flip_quote(cap, victim, offset))[victim]
    assert not verdict.trusted
    assert set(verdict.reasons) & {E.ATTEST_QUOTE_INVALID, E.ATTEST_EVIDENCE_MALFORMED}


def test_wrong_nonce() -> None:
    cap = capture("glm-5-tee-2026-06-29")
    other = "00" * 32
    for verdict in _run(cap, nonce=other).values():
        assert verdict.reasons == (E.ATTEST_NONCE_BINDING, E.ATTEST_GPU_NONCE)
        assert verdict.tcb_status == "UpToDate"  # the quote itself is genuine


def test_swapped_e2e_pubkey() -> None:
    # a relay hands out another instance's (or its own) key: the quote does not bind it
    cap = capture("glm-5-tee-2026-06-29")
    a, b = list(cap.instances)
    swapped = {a: cap.instances[b], b: cap.instances[a]}
    verdicts = _run(cap, instances=swapped)
    for verdict in verdicts.values():
        assert E.ATTEST_NONCE_BINDING in verdict.reasons
    one_char = dict(cap.instances)
    key = one_char[a]
    one_char[a] = key[:-2] + ("A" if key[-2] != "A" else "B") + key[-1]
    assert E.ATTEST_NONCE_BINDING in _run(cap, instances=one_char)[a].reasons


def test_swapped_gpu_evidence() -> None:
    cap = capture("glm-5-tee-2026-06-29")
    a, b = list(cap.instances)
    evidence = _with_entry(cap, a, gpu_evidence=cap.evidence.entries[b]["gpu_evidence"])
    verdict = _run(cap, evidence=evidence)[a]
    assert verdict.reasons == (E.ATTEST_GPU_NONCE,)  # genuine GPUs, answering another nonce
    assert verdict.gpus_ok == 0


def test_swapped_certificate() -> None:
    cap = capture("glm-5-tee-2026-06-29")
    a, b = list(cap.instances)
    evidence = _with_entry(cap, a, certificate=cap.evidence.entries[b]["certificate"])
    assert _run(cap, evidence=evidence)[a].reasons == (E.ATTEST_CERT_BINDING,)
    lax = Policy(require_cert_binding=False)
    assert _run(cap, evidence=evidence, policy=lax)[a].trusted


def test_debug_quote_is_caught_by_our_own_check() -> None:
    # Setting TD attributes bit 0 breaks Intel's signature too, but the debug check is ours
    # and does not depend on dcap-qvl: the verdict names it.
    cap = capture("glm-5-tee-2026-06-29")
    victim = _first(cap)
    td_attributes = (
        48 + 120
    )  # header 48 bytes; tee_tcb_svn 16, mrseam 48, mrsignerseam 48, seam attrs 8
    evidence = _flip_quote(cap, victim, td_attributes)
    raw = base64.b64decode(str(evidence.entries[victim]["quote"]))
    assert parse_quote(raw).debug
    verdict = _run(cap, evidence=evidence)[victim]
    assert E.ATTEST_DEBUG in verdict.reasons
    assert E.ATTEST_QUOTE_INVALID in verdict.reasons


def test_measurement_allowlist() -> None:
    cap = capture("glm-5-tee-2026-06-29")
    verdicts = _run(cap)
    a, b = list(cap.instances)
    ma = verdicts[a].measurements
    assert ma is not None
    only_a = Policy(measurements=(MeasurementSet(**ma.as_dict()),))
    pinned = _run(cap, policy=only_a)
    assert pinned[a].trusted and pinned[a].measurements_pinned
    mb = verdicts[b].measurements
    assert mb is not None
    if mb == ma:
        pytest.skip("both hosts run the same image")
    assert pinned[b].reasons == (E.ATTEST_MEASUREMENT,)
    mrtd_only = Policy(measurements=(MeasurementSet(mrtd=ma.mrtd.upper()),))
    assert _run(cap, policy=mrtd_only)[a].trusted
    wrong = Policy(measurements=(MeasurementSet(rtmr3="00" * 48),))
    assert all(v.reasons == (E.ATTEST_MEASUREMENT,) for v in _run(cap, policy=wrong).values())


def test_tcb_status_not_allowed() -> None:
    cap = capture("glm-5-tee-2026-06-29")
    policy = Policy(allowed_tcb_statuses=frozenset({"SWHardeningNeeded"}))
    assert all(v.reasons == (E.ATTEST_TCB_STATUS,) for v in _run(cap, policy=policy).values())


def test_missing_and_failed_evidence() -> None:
    cap = capture("glm-5-tee-2026-06-29")
    a, b = list(cap.instances)
    entries = {k: v for k, v in cap.evidence.entries.items() if k != a}
    verdicts = _run(cap, evidence=EvidenceBundle(entries, frozenset({b})))
    assert verdicts[a].reasons == (E.ATTEST_EVIDENCE_MISSING,)
    assert verdicts[b].reasons == (E.ATTEST_EVIDENCE_MISSING,)  # listed as failed: not used


# ---------------------------------------------------------------------------------------- GPUs


def _gpu(cap: Capture, instance_id: str, index: int = 0) -> dict[str, str]:
    gpus = cap.evidence.entries[instance_id]["gpu_evidence"]
    assert isinstance(gpus, list)
    return dict(gpus[index])


def _replace_gpu(cap: Capture, instance_id: str, gpu: dict[str, str]) -> EvidenceBundle:
    gpus = list(cap.evidence.entries[instance_id]["gpu_evidence"])  # type: ignore[call-overload]
    gpus[0] = gpu
    return _with_entry(cap, instance_id, gpu_evidence=gpus)


def test_gpu_requester_nonce_is_h_not_the_client_nonce() -> None:
    cap = capture("glm-5-tee-2026-05-20")
    for instance_id, pubkey in cap.instances.items():
        h = nonce_binding(cap.nonce_hex, pubkey)
        spdm = parse_spdm(base64.b64decode(_gpu(cap, instance_id)["evidence"]))
        assert spdm.requester_nonce == h != bytes.fromhex(cap.nonce_hex)
        assert len(spdm.signature) == 96 and spdm.blocks


def test_gpu_signature_flipped() -> None:
    cap = capture("glm-5-tee-2026-06-29")
    victim = _first(cap)
    gpu = _gpu(cap, victim)
    ev = bytearray(base64.b64decode(gpu["evidence"]))
    ev[-5] ^= 0x40
    gpu["evidence"] = base64.b64encode(bytes(ev)).decode()
    verdict = _run(cap, evidence=_replace_gpu(cap, victim, gpu))[victim]
    assert verdict.reasons == (E.ATTEST_GPU_SIGNATURE,)
    assert (verdict.gpus_checked, verdict.gpus_ok) == (8, 7)


def test_gpu_measurement_byte_flipped() -> None:
    cap = capture("glm-5-tee-2026-06-29")
    victim = _first(cap)
    gpu = _gpu(cap, victim)
    ev = bytearray(base64.b64decode(gpu["evidence"]))
    ev[37 + 8 + 10] ^= 1  # inside the first measurement block
    gpu["evidence"] = base64.b64encode(bytes(ev)).decode()
    assert _run(cap, evidence=_replace_gpu(cap, victim, gpu))[victim].reasons == (
        E.ATTEST_GPU_SIGNATURE,
    )


def test_gpu_truncated_is_malformed() -> None:
    cap = capture("glm-5-tee-2026-06-29")
    victim = _first(cap)
    gpu = _gpu(cap, victim)
    gpu["evidence"] = base64.b64encode(base64.b64decode(gpu["evidence"])[:-1]).decode()
    assert _run(cap, evidence=_replace_gpu(cap, victim, gpu))[victim].reasons == (
        E.ATTEST_EVIDENCE_MALFORMED,
    )


def _self_signed_p384(name: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )


def test_gpu_chain_must_reach_the_pinned_root() -> None:
    cap = capture("glm-5-tee-2026-06-29")
    other_root = _self_signed_p384("NVIDIA Device Identity CA")  # same name, other key
    verdicts = _run(cap, gpu_root=other_root)
    assert all(v.reasons == (E.ATTEST_GPU_CHAIN,) for v in verdicts.values())
    # the chain's own last certificate is never trusted in place of the pinned one
    victim = _first(cap)
    gpu = _gpu(cap, victim)
    pem = base64.b64decode(gpu["certificate"]).decode()
    certs = x509.load_pem_x509_certificates(pem.encode())
    assert certs[-1].subject == nvidia_root().subject
    assert len(certs) == 5
    from cryptography.hazmat.primitives.serialization import Encoding

    truncated = b"".join(c.public_bytes(Encoding.PEM) for c in certs[:2])
    gpu["certificate"] = base64.b64encode(truncated).decode()
    assert _run(cap, evidence=_replace_gpu(cap, victim, gpu))[victim].reasons == (
        E.ATTEST_GPU_CHAIN,
    )


def test_gpu_modes() -> None:
    cap = capture("glm-5-tee-2026-06-29")
    off = _run(cap, policy=Policy(gpu=GpuMode.OFF))
    assert all(
        v.trusted and v.gpus_checked == 0 and "gpus_not_checked" in v.notes for v in off.values()
    )
    nras = _run(cap, policy=Policy(gpu=GpuMode.NRAS))
    assert all(v.reasons == (E.ATTEST_GPU_UNSUPPORTED,) for v in nras.values())
    victim = _first(cap)
    none = _run(cap, evidence=_with_entry(cap, victim, gpu_evidence=[]))
    assert none[victim].reasons == (E.ATTEST_GPU_MISSING,)


# --------------------------------------------------------------------------- parsing and policy


def test_raw_members_keep_intel_bytes_exactly() -> None:
    body = (CAPTURES[0] / "intel-tcb-info.body").read_bytes()
    members = raw_members(body)
    raw, value = members["tcbInfo"]
    assert raw.encode() in body and json.loads(raw) == value
    assert raw_members(b' { "a" : [1, {"b": "}"}] , "c":"x" } ') == {
        "a": ('[1, {"b": "}"}]', [1, {"b": "}"}]),
        "c": ('"x"', "x"),
    }
    for bad in (b"[]", b'{"a":1', b'{"a" 1}', b"\xff", b'{"a":1 "b":2}'):
        with pytest.raises(AttestationError) as err:
            raw_members(bad)
        assert err.value.code is E.ATTEST_COLLATERAL_MISSING


@pytest.mark.parametrize(
    "body",
    [
        b"nope",
        b"[]",
        b'{"evidence": {}}',
        b'{"evidence": [{"quote": "x"}]}',
        b'{"evidence": [], "failed_instance_ids": "x"}',
        b'{"evidence": [{"instance_id": "a"}, {"instance_id": "a"}]}',
    ],
)
def test_malformed_evidence_documents(body: bytes) -> None:
    with pytest.raises(AttestationError) as err:
        parse_evidence(body)
    assert err.value.code is E.ATTEST_EVIDENCE_MALFORMED


def test_malformed_quote_in_an_entry() -> None:
    cap = capture("glm-5-tee-2026-06-29")
    victim = _first(cap)
    for quote in ("not base64!", base64.b64encode(b"\x04\x00" * 20).decode(), 7):
        verdict = _run(cap, evidence=_with_entry(cap, victim, quote=quote))[victim]
        assert verdict.reasons == (E.ATTEST_EVIDENCE_MALFORMED,)


def test_policy_from_dict() -> None:
    policy = Policy.from_dict(
        {
            "allowed_tcb_statuses": ["UpToDate", "SWHardeningNeeded"],
            "gpu": "off",
            "measurements": [{"mrtd": "ab"}],
            "max_age": 60,
            "require_cert_binding": False,
        }
    )
    assert policy.gpu is GpuMode.OFF and policy.max_age == 60.0
    assert policy.measurements == (MeasurementSet(mrtd="ab"),)
    assert Policy.from_dict({}) == Policy()
    for bad in (
        {"x": 1},
        {"gpu": "maybe"},
        {"max_age": -1},
        {"allow_debug": "no"},
        {"measurements": [{"mrtd": 1}]},
        {"measurements": [{"mrxx": "00"}]},
        {"allowed_tcb_statuses": "UpToDate"},
    ):
        with pytest.raises(AttestationError) as err:
            Policy.from_dict(bad)
        assert err.value.code is E.ATTEST_UNAVAILABLE


def test_verdict_json_shape() -> None:
    cap = capture("glm-5-tee-2026-06-29")
    doc = next(iter(_run(cap).values())).to_json()
    assert {"instance_id", "verdict", "reasons", "tcb_status", "measurements", "gpus"} <= set(doc)
    assert doc["verdict"] == "trusted" and doc["gpus"] == {"checked": 8, "ok": 8}
    assert set(doc["measurements"]) == {"mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"}
    json.dumps(doc)


def test_hostile_nesting_is_a_typed_error_not_a_recursion_error() -> None:
    """Evidence, model listings, NRAS answers and Intel collateral come from the network: JSON
    nested past the project's bound is refused with each place's typed answer (before the
    shared depth-bounded decoder, stdlib json raised RecursionError here)."""
    from pqe2ee.attest.collateral import raw_members
    from pqe2ee.attest.gate import confidential_chutes
    from pqe2ee.attest.nras import parse_jwks, token_kids
    from pqe2ee.attest.verify import parse_evidence
    from pqe2ee.errors import AttestationError, ErrorCode

    deep = b'{"evidence": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(AttestationError) as info:
        parse_evidence(deep)
    assert info.value.code is ErrorCode.ATTEST_EVIDENCE_MALFORMED
    assert confidential_chutes(deep) == frozenset()
    assert token_kids(deep) == frozenset()
    with pytest.raises(AttestationError) as info:
        parse_jwks(deep)
    assert info.value.code is ErrorCode.ATTEST_UNAVAILABLE
    with pytest.raises(AttestationError) as info:
        raw_members(b'{"tcbInfo": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert info.value.code is ErrorCode.ATTEST_COLLATERAL_MISSING
