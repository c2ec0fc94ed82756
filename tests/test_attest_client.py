"""Attested E2EE end to end: a real client (the httpx2 transports, sync and async) against a
replay relay on loopback that serves a real capture's discovery and evidence, with the client's
clock set to the capture time. An instance that fails is never sent a prompt; when none passes,
a typed error is raised before any byte of the prompt leaves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from attest_replay import CHUTE, MODEL, Replay
from attest_support import ATTESTATION, EXTRA, capture, full_collateral
from pqe2ee.attest import Policy
from pqe2ee.attest.capture import Capture
from pqe2ee.attest.gate import (
    UNATTESTED_RECHECK,
    AttestMode,
    AttestOptions,
    confidential_chutes,
)
from pqe2ee.errors import AttestationError, ErrorCode
from pqe2ee.transports.httpx2 import AsyncE2EETransport, E2EETransport
from servers import run_app

NAME = "glm-5-tee-2026-06-29"
GOOD = "3ff90a0d-1f52-4800-b313-dbf3d7c26839"  # FMSPC 90c06f000000: collateral in the capture
OTHER = "e5dc50c8-b0bb-4f03-be0d-ee31dffd3533"  # FMSPC b0c06f000000: needs the extra TCB info
KEY = "cpk_test-attest-0123456789"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "secret prompt"}]}


def _options(cap: Capture, base: str, *, extra: bool, **kw: object) -> AttestOptions:
    args: dict[str, object] = {
        "collateral": full_collateral(cap) if extra else cap.collateral,
        "pcs_url": None,
        "wall_clock": lambda: cap.captured_at.timestamp(),
        "nonce_factory": lambda: cap.nonce_hex,
    }
    args.update(kw)
    return AttestOptions(**args)  # type: ignore[arg-type]


@pytest.fixture
def replay() -> Iterator[tuple[Replay, str]]:
    rp = Replay(
        ATTESTATION / "chutes" / NAME, extra=[EXTRA / "tcb-info-b0c06f000000-2026-06-29.meta.json"]
    )
    with run_app(rp.app()) as base:
        yield rp, base


def _from_pcs(cap: Capture, base: str, **kw: object) -> AttestOptions:
    """Nothing at hand: every piece of collateral comes from the PCS (the replay relay)."""
    return _options(
        cap,
        base,
        extra=False,
        collateral=type(cap.collateral)(),
        pcs_url=base,
        root_ca_crl_url=base + "/IntelSGXRootCA.der",
        **kw,
    )


def _post(base: str, attest: AttestOptions | str, n: int = 1) -> list[int]:
    transport = E2EETransport(
        api_key=KEY, api_base=base, models_base=base, attest=attest, max_attempts=1
    )
    with httpx2.Client(transport=transport, base_url=base, timeout=30) as client:
        return [client.post("/v1/chat/completions", json=BODY).status_code for _ in range(n)]


def test_verified_instances_get_the_prompt(replay: tuple[Replay, str]) -> None:
    rp, base = replay
    cap = capture(NAME)
    statuses = _post(base, _options(cap, base, extra=True), n=6)
    assert statuses == [500] * 6  # the replay relay refuses; the prompt went out 6 times
    assert {h["x-instance-id"] for h in rp.invokes} <= {GOOD, OTHER}
    assert len(rp.invokes) == 6
    assert rp.evidence_nonces == [cap.nonce_hex]  # one evidence round trip for the chute


def test_an_instance_already_judged_costs_no_base64_or_digest_per_request(
    replay: tuple[Replay, str],
) -> None:
    """The keys a verdict is kept under (base64, and the gate's SHA-256 of them) are made
    once per instance key, not once per request."""
    from pqe2ee.attest import gate
    from pqe2ee.transports._sync import _attest

    rp, base = replay
    cap = capture(NAME)
    _attest._key_strings.cache_clear()
    gate.key_id.cache_clear()
    assert _post(base, _options(cap, base, extra=True), n=6) == [500] * 6
    instances = len({h["x-instance-id"] for h in rp.invokes})
    made, digests = _attest._key_strings.cache_info(), gate.key_id.cache_info()
    assert made.misses == digests.misses == instances
    assert made.hits == 6 - instances
    assert digests.hits >= 6 - instances


def test_a_failing_instance_never_gets_the_prompt(replay: tuple[Replay, str]) -> None:
    rp, base = replay
    cap = capture(NAME)
    assert _post(base, _options(cap, base, extra=False), n=8) == [500] * 8
    assert {h["x-instance-id"] for h in rp.invokes} == {GOOD}  # OTHER: collateral missing


def test_replayed_evidence_for_a_fresh_nonce_stops_the_request(
    replay: tuple[Replay, str],
) -> None:
    rp, base = replay
    cap = capture(NAME)
    options = _options(cap, base, extra=True, nonce_factory=lambda: "ab" * 32)
    with pytest.raises(AttestationError) as err:
        _post(base, options)
    assert err.value.code is ErrorCode.ATTEST_FAILED
    assert len(err.value.verdicts) == 2
    assert all(ErrorCode.ATTEST_NONCE_BINDING in v.reasons for v in err.value.verdicts)  # type: ignore[attr-defined]
    assert rp.invokes == []  # not a byte of the prompt left
    assert rp.evidence_nonces == ["ab" * 32]


def test_a_swapped_key_is_never_used(replay: tuple[Replay, str]) -> None:
    rp, base = replay
    cap = capture(NAME)
    keys = dict(cap.instances)

    def swap(instances: list[dict[str, object]]) -> list[dict[str, object]]:
        for inst in instances:  # the relay hands out GOOD's key for OTHER (a key it holds)
            if inst["instance_id"] == OTHER:
                inst["e2e_pubkey"] = keys[GOOD]
        return instances

    rp.discovery_edit = swap
    assert _post(base, _options(cap, base, extra=True), n=6) == [500] * 6
    assert {h["x-instance-id"] for h in rp.invokes} == {GOOD}


def test_require_refuses_a_chute_without_evidence(replay: tuple[Replay, str]) -> None:
    rp, base = replay
    cap = capture(NAME)
    rp.serve_evidence = False
    with pytest.raises(AttestationError) as err:
        _post(base, _options(cap, base, extra=True, mode=AttestMode.REQUIRE))
    assert err.value.code is ErrorCode.ATTEST_EVIDENCE_MISSING
    assert rp.invokes == []


def test_auto_sends_unattested_with_one_warning(
    replay: tuple[Replay, str], caplog: pytest.LogCaptureFixture
) -> None:
    rp, base = replay
    rp.serve_evidence = False
    with caplog.at_level(logging.WARNING, logger="pqe2ee.attest"):
        assert _post(base, "auto", n=3) == [500] * 3
    assert len(rp.invokes) == 3
    warnings = [r for r in caplog.records if "NOT attested" in r.getMessage()]
    assert len(warnings) == 1
    # "no evidence" is remembered for a while: one evidence round trip, not one per request.
    assert len([p for m, p, _ in rp.seen if p.endswith("/evidence")]) == 1


def test_auto_asks_again_for_evidence_after_the_recheck_interval(
    replay: tuple[Replay, str],
) -> None:
    rp, base = replay
    rp.serve_evidence = False
    clock = [1_000_000.0]
    options = AttestOptions(mode=AttestMode.AUTO, wall_clock=lambda: clock[0])
    transport = E2EETransport(
        api_key=KEY, api_base=base, models_base=base, attest=options, max_attempts=1
    )
    with httpx2.Client(transport=transport, base_url=base, timeout=30) as client:
        for step in (0.0, UNATTESTED_RECHECK - 1, 2.0):
            clock[0] += step
            assert client.post("/v1/chat/completions", json=BODY).status_code == 500
    assert len([p for m, p, _ in rp.seen if p.endswith("/evidence")]) == 2


@pytest.mark.parametrize("listed", [True, False, None])
def test_the_listing_flag_decides_for_a_chute_without_evidence(
    replay: tuple[Replay, str], listed: bool | None
) -> None:
    # Listed as TEE but the evidence endpoint says 404: never a quiet unattested send. Listed
    # as not confidential (or not at all): sent unattested (auto).
    rp, base = replay
    rp.confidential, rp.serve_evidence = listed, False
    if not listed:
        assert _post(base, "auto") == [500] and len(rp.invokes) == 1
        return
    with pytest.raises(AttestationError) as err:
        _post(base, "auto")
    assert err.value.code is ErrorCode.ATTEST_DOWNGRADE
    assert "confidential compute" in err.value.message
    assert rp.invokes == []


def test_a_listing_that_later_drops_the_flag_still_needs_evidence(
    replay: tuple[Replay, str],
) -> None:
    # Listed once, then a later listing (a new client of the same options, so a fresh model
    # map) hides the flag: the chute stays expected to attest (sticky per options/gate).
    rp, base = replay
    cap = capture(NAME)
    rp.confidential, rp.serve_evidence = True, False
    options = _options(cap, base, extra=True)
    with pytest.raises(AttestationError):
        _post(base, options)
    rp.confidential = None
    with pytest.raises(AttestationError) as err:
        _post(base, options)
    assert err.value.code is ErrorCode.ATTEST_DOWNGRADE
    assert "confidential compute" in err.value.message
    assert rp.invokes == [] and len([p for _, p, _ in rp.seen if p == "/v1/models"]) == 2


def test_confidential_chutes_reads_the_listing_flag() -> None:
    doc = (
        b'{"data": [{"id": "a", "chute_id": "AA-1", "confidential_compute": true},'
        b' {"id": "b", "chute_id": "bb-2", "confidential_compute": false},'
        b' {"id": "c", "chute_id": "cc-3", "confidential_compute": "true"},'
        b' {"id": "d", "confidential_compute": true}, 7]}'
    )
    assert confidential_chutes(doc) == {"aa-1"}
    assert confidential_chutes(b"not json") == frozenset()
    assert confidential_chutes(b'{"data": {}}') == frozenset()


def test_off_asks_for_no_evidence(replay: tuple[Replay, str]) -> None:
    rp, base = replay
    assert _post(base, "off") == [500]
    assert rp.evidence_nonces == [] and len(rp.invokes) == 1


def test_a_verified_chute_that_hides_its_evidence_is_a_downgrade(
    replay: tuple[Replay, str],
) -> None:
    rp, base = replay
    cap = capture(NAME)
    options = _options(cap, base, extra=True, policy=Policy(max_age=0))  # re-verify every time
    transport = E2EETransport(
        api_key=KEY, api_base=base, models_base=base, attest=options, max_attempts=1
    )
    with httpx2.Client(transport=transport, base_url=base, timeout=30) as client:
        assert client.post("/v1/chat/completions", json=BODY).status_code == 500
        rp.serve_evidence = False
        before = len(rp.invokes)
        with pytest.raises(AttestationError) as err:
            client.post("/v1/chat/completions", json=BODY)
    assert err.value.code is ErrorCode.ATTEST_DOWNGRADE
    assert len(rp.invokes) == before


def test_collateral_fetched_from_a_pcs(replay: tuple[Replay, str]) -> None:
    # Nothing at hand: TCB info, QE identity and CRLs come from the PCS (here the replay relay,
    # serving Intel's captured answers byte for byte with their issuer-chain headers).
    rp, base = replay
    cap = capture(NAME)
    options = _from_pcs(cap, base)
    assert _post(base, options, n=4) == [500] * 4
    fetched = [p for m, p, _ in rp.seen if "certification" in p or p.endswith(".der")]
    assert "/tdx/certification/v4/tcb" in fetched and "/IntelSGXRootCA.der" in fetched
    assert {h["x-instance-id"] for h in rp.invokes} <= {GOOD, OTHER} and rp.invokes


@pytest.mark.anyio
async def test_async_transport_fails_closed(replay: tuple[Replay, str]) -> None:
    # anyio code (the async engine, its worker-thread verification): asyncio and trio.
    rp, base = replay
    cap = capture(NAME)
    options = _options(cap, base, extra=True, nonce_factory=lambda: "cd" * 32)
    transport = AsyncE2EETransport(api_key=KEY, api_base=base, models_base=base, attest=options)
    async with httpx2.AsyncClient(transport=transport, base_url=base, timeout=30) as client:
        with pytest.raises(AttestationError) as err:
            await client.post("/v1/chat/completions", json=BODY)
    assert err.value.code is ErrorCode.ATTEST_FAILED
    assert rp.invokes == []


@pytest.mark.anyio
async def test_async_transport_sends_only_to_verified_instances(replay: tuple[Replay, str]) -> None:
    rp, base = replay
    cap = capture(NAME)
    options = _options(cap, base, extra=False)  # OTHER's FMSPC has no collateral: rejected
    transport = AsyncE2EETransport(
        api_key=KEY, api_base=base, models_base=base, attest=options, max_attempts=1
    )
    async with httpx2.AsyncClient(transport=transport, base_url=base, timeout=30) as client:
        for _ in range(4):
            assert (await client.post("/v1/chat/completions", json=BODY)).status_code == 500
    assert {h["x-instance-id"] for h in rp.invokes} == {GOOD}


def test_attest_option_validation() -> None:
    with pytest.raises(Exception) as err:
        E2EETransport(api_key=KEY, attest="sometimes")
    assert "attest must be" in str(err.value)


def test_the_next_request_after_every_instance_failed_is_attest_failed_too(
    replay: tuple[Replay, str],
) -> None:
    rp, base = replay
    cap = capture(NAME)
    options = _options(cap, base, extra=True, nonce_factory=lambda: "ab" * 32)
    transport = E2EETransport(api_key=KEY, api_base=base, models_base=base, attest=options)
    with httpx2.Client(transport=transport, base_url=base, timeout=30) as client:
        for _ in range(3):
            with pytest.raises(AttestationError) as err:
                client.post("/v1/chat/completions", json=BODY)
            assert err.value.code is ErrorCode.ATTEST_FAILED  # not no_instances
    assert rp.invokes == []
    assert len(rp.evidence_nonces) == 1  # the rejections are cached per (chute, instance, key)


def test_aiohttp_fails_closed_too(replay: tuple[Replay, str]) -> None:
    # aiohttp is asyncio-only: this one runs on asyncio alone.
    from pqe2ee.transports.aiohttp import E2EEClientSession

    rp, base = replay
    cap = capture(NAME)
    options = _options(cap, base, extra=True, nonce_factory=lambda: "cd" * 32)

    async def go() -> None:
        session = E2EEClientSession(api_key=KEY, api_base=base, models_base=base, attest=options)
        try:
            await session.post("/v1/chat/completions", json=BODY)
        finally:
            await session.close()

    with pytest.raises(AttestationError) as err:
        asyncio.run(go())
    assert err.value.code is ErrorCode.ATTEST_FAILED
    assert rp.invokes == []


@pytest.mark.anyio
async def test_anyio_client_fails_closed_too(replay: tuple[Replay, str]) -> None:
    from pqe2ee.transports.anyio import E2EEClient

    rp, base = replay
    cap = capture(NAME)
    options = _options(cap, base, extra=True, nonce_factory=lambda: "cd" * 32)
    async with E2EEClient(api_key=KEY, api_base=base, models_base=base, attest=options) as c:
        with pytest.raises(AttestationError) as err:
            await c.chat(**BODY)
    assert err.value.code is ErrorCode.ATTEST_FAILED
    assert rp.invokes == []


def test_collateral_cache_on_disk_serves_the_next_run_offline(
    replay: tuple[Replay, str], tmp_path: Path
) -> None:
    rp, base = replay
    cap = capture(NAME)
    online = _from_pcs(cap, base, cache_dir=tmp_path)
    assert _post(base, online, n=2) == [500] * 2
    assert len(list(tmp_path.glob("*.meta.json"))) >= 5  # 2 FMSPCs' TCB info, QE id, CRLs
    fetched = len([p for _, p, _ in rp.seen if "certification" in p])
    offline = _options(
        cap,
        base,
        extra=False,
        collateral=type(cap.collateral)(),
        pcs_url=None,
        cache_dir=tmp_path,
    )
    assert _post(base, offline, n=4) == [500] * 4
    assert len([p for _, p, _ in rp.seen if "certification" in p]) == fetched  # none fetched
    assert {h["x-instance-id"] for h in rp.invokes[-4:]} == {GOOD, OTHER}


def test_attest_fetch_captures_a_layout_that_verifies(
    replay: tuple[Replay, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from pqe2ee.attest import verify as verify_module
    from pqe2ee.cli import cli

    rp, base = replay
    cap = capture(NAME)
    out = tmp_path / "capture"
    args = [
        "attest",
        "fetch",
        "--chute",
        CHUTE,
        "--out",
        str(out),
        "--api-base",
        base,
        "--api-key",
        KEY,
        "--attest-pcs-url",
        base,
        "--root-ca-crl-url",
        base + "/IntelSGXRootCA.der",
    ]
    # A fresh nonce (the default): the replayed evidence does not bind it - caught.
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "attest_nonce_binding" in result.output and "0 trusted" in result.output
    for name in (
        "manifest.json",
        "discovery.body",
        "evidence.body",
        "intel-tcb-info.body",
        "intel-qe-identity.meta.json",
        "intel-pck-crl.body",
        "intel-root-ca-crl.body",
    ):
        assert (out / name).is_file(), name
    # The capture's own nonce, verified at the capture time: what was fetched verifies.
    monkeypatch.setattr(verify_module, "new_nonce", lambda: cap.nonce_hex)
    out2 = tmp_path / "again"
    assert CliRunner().invoke(cli, [*args[:4], "--out", str(out2), *args[6:]]).exit_code == 0
    at = cap.captured_at.isoformat()
    result = CliRunner().invoke(cli, ["attest", "verify", "--capture", str(out2), "--at", at])
    assert result.exit_code == 0 and "2 trusted, 0 rejected" in result.output, result.output
    assert rp.invokes == []


def test_no_evidence_is_not_remembered_over_a_standing_rejection() -> None:
    # The shortcut for a chute without evidence skips the verdict lookup: it must never hide
    # a rejection that still holds (that instance stays refused), and new evidence or a new
    # verdict ends it at once.
    from pqe2ee.attest.policy import Verdict

    gate = AttestOptions(mode=AttestMode.AUTO).gate
    gate.unattested("c1", "answered 404", 1000.0)
    assert gate.known_unattested("c1", 1000.0 + UNATTESTED_RECHECK - 1)
    assert not gate.known_unattested("c1", 1000.0 + UNATTESTED_RECHECK)
    rejected = Verdict("i1", False, (ErrorCode.ATTEST_NONCE_BINDING,), (), verified_at=1000.0)
    gate.record("c1", "key", rejected, None)
    assert not gate.known_unattested("c1", 1001.0)  # a verdict ends the shortcut
    gate.unattested("c1", "answered 404", 1002.0)
    assert not gate.known_unattested("c1", 1003.0)  # the rejection still holds: look it up
    assert gate.verdict("c1", "i1", "key", 1003.0) is rejected
