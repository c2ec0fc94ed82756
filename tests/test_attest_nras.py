"""GPU mode ``nras``: the token checks on NVIDIA's real captured answer and JWKS (a real
negative: the capturing client sent the client nonce, not H), and a real client against the
replay relay plus a loopback stand-in NRAS whose JWKS holds a test-only key (the production
verifier checks its ES384 tokens). The client must send H = report_data[0:32] hex, never N."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import httpx2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from attest_nras import StandInNras, gpu_claims, jwk, nras_answer
from attest_replay import Replay
from attest_support import ATTESTATION, EXTRA, capture, full_collateral
from pqe2ee.attest import Policy
from pqe2ee.attest.gate import AttestOptions
from pqe2ee.attest.nras import check_nras, nras_request, parse_jwks, token_kids
from pqe2ee.attest.policy import GpuMode
from pqe2ee.attest.verify import nonce_binding, verify_evidence
from pqe2ee.errors import AttestationError
from pqe2ee.errors import ErrorCode as E
from pqe2ee.transports.httpx2 import AsyncE2EETransport, E2EETransport
from servers import run_app

NAME = "glm-5-tee-2026-06-29"
CAPTURE = ATTESTATION / "chutes" / NAME
KEY = "cpk_test-attest-0123456789"
BODY = {"model": "zai-org/GLM-5-TEE", "messages": [{"role": "user", "content": "secret"}]}
NRAS = Policy(gpu=GpuMode.NRAS)


def _real() -> tuple[bytes, dict[str, ec.EllipticCurvePublicKey], float, str]:
    cap = capture(NAME)
    answer = (CAPTURE / "nvidia-nras-answer.body").read_bytes()
    keys = parse_jwks((CAPTURE / "nvidia-nras-jwks.body").read_bytes())
    return answer, keys, cap.captured_at.timestamp(), cap.nonce_hex


# -- pure: NVIDIA's real answer ------------------------------------------------------------------


def test_real_answer_signatures_verify_and_the_wrong_nonce_is_caught() -> None:
    answer, keys, now, client_nonce = _real()
    # The capture sent N (the client nonce): NVIDIA's tokens verify, and say NONCE_NOT_MATCHING.
    checks = check_nras(answer, keys, bytes.fromhex(client_nonce), 8, now)
    assert [c.code for c in checks] == [E.ATTEST_GPU_NRAS] + [E.ATTEST_GPU_NONCE] * 8
    assert all("NONCE_NOT_MATCHING" in c.detail for c in checks[1:])
    # Checked against H of an instance instead, the overall token's eat_nonce is wrong already.
    cap = capture(NAME)
    _, pubkey = next(iter(cap.instances.items()))
    h = nonce_binding(client_nonce, pubkey)
    assert check_nras(answer, keys, h, 8, now)[0].code is E.ATTEST_GPU_NONCE
    assert token_kids(answer) <= keys.keys() and len(token_kids(answer)) == 1


def test_real_answer_tampered_or_out_of_window_is_a_token_error() -> None:
    answer, keys, now, nonce = _real()
    doc = json.loads(answer)
    head, body, sig = doc[0][1].split(".")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    doc[0][1] = f"{head}.{body}.{flipped}"
    h = bytes.fromhex(nonce)
    bad = check_nras(json.dumps(doc).encode(), keys, h, 8, now)
    assert [c.code for c in bad] == [E.ATTEST_GPU_NRAS_TOKEN]
    assert check_nras(answer, keys, h, 8, now + 3 * 3600)[0].code is E.ATTEST_GPU_NRAS_TOKEN
    assert check_nras(answer, keys, h, 8, now - 3600)[0].code is E.ATTEST_GPU_NRAS_TOKEN
    assert check_nras(answer, {}, h, 8, now)[0].code is E.ATTEST_GPU_NRAS_TOKEN  # unknown kid
    assert check_nras(answer, keys, h, 7, now)[-1].code is E.ATTEST_GPU_NRAS_TOKEN  # 8 for 7
    assert check_nras(b"{}", keys, h, 8, now)[0].code is E.ATTEST_GPU_NRAS_TOKEN


def test_tokens_are_bound_to_the_overall_digest_alg_and_claims() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    keys = parse_jwks(json.dumps({"keys": [jwk(key)]}).encode())
    h, now = bytes(range(32)), 1_800_000_000.0
    good = [gpu_claims(h.hex(), now, True) for _ in range(2)]
    answer = nras_answer(key, h.hex(), good, now)
    assert [c.ok for c in check_nras(json.dumps(answer).encode(), keys, h, 2, now)] == [True] * 3
    # A GPU token swapped for another valid one: the overall digest no longer names it.
    other = nras_answer(key, h.hex(), good, now)
    answer[1]["GPU-1"] = other[1]["GPU-0"]
    found = check_nras(json.dumps(answer).encode(), keys, h, 2, now)
    assert found[2].code is E.ATTEST_GPU_NRAS_TOKEN and "digest" in found[2].detail
    # alg "none" (or any alg but ES384) is refused before any key is looked at.
    none = nras_answer(key, h.hex(), good, now)
    head = base64.urlsafe_b64encode(b'{"alg":"none","kid":"test-only-nras-key"}').rstrip(b"=")
    none[0][1] = head.decode() + "." + none[0][1].split(".", 1)[1]
    found = check_nras(json.dumps(none).encode(), keys, h, 2, now)
    assert found[0].code is E.ATTEST_GPU_NRAS_TOKEN and "ES384" in found[0].detail
    # A GPU claim NRAS did not vouch for (debug firmware): attest_gpu_nras.
    debug = [dict(good[0], dbgstat="enabled"), good[1]]
    found = check_nras(json.dumps(nras_answer(key, h.hex(), debug, now)).encode(), keys, h, 2, now)
    assert found[1].code is E.ATTEST_GPU_NRAS and "dbgstat" in found[1].detail


def test_jwks_and_request_shapes() -> None:
    for doc in (b"nope", b"{}", b'{"keys": {}}', b'{"keys": [{"kty": "RSA", "kid": "r"}]}'):
        with pytest.raises(AttestationError) as err:
            parse_jwks(doc)
        assert err.value.code is E.ATTEST_UNAVAILABLE
    cap = capture(NAME)
    entry = next(iter(cap.evidence.entries.values()))
    gpus = entry["gpu_evidence"]
    assert isinstance(gpus, list)
    body = json.loads(nras_request(gpus, b"\x01" * 32))
    assert body["nonce"] == "01" * 32 and body["arch"] == "HOPPER"
    assert [g["evidence"] for g in body["evidence_list"]] == [g["evidence"] for g in gpus]
    with pytest.raises(AttestationError) as err:
        nras_request([{"certificate": 1}], b"\x01" * 32)
    assert err.value.code is E.ATTEST_EVIDENCE_MALFORMED


def test_offline_verify_in_nras_mode_says_no_answer_at_hand() -> None:
    cap = capture(NAME)
    verdicts = verify_evidence(
        cap.instances, cap.evidence, cap.nonce_hex, full_collateral(cap), NRAS,
        cap.captured_at.timestamp(),
    )  # fmt: skip
    assert verdicts and all(v.reasons == (E.ATTEST_GPU_UNSUPPORTED,) for v in verdicts)


# -- a real client, the replay relay and the stand-in NRAS ---------------------------------------


@pytest.fixture
def stack() -> Iterator[tuple[Replay, str, StandInNras, str]]:
    cap = capture(NAME)
    rp = Replay(CAPTURE, extra=[EXTRA / "tcb-info-b0c06f000000-2026-06-29.meta.json"])
    nras = StandInNras(clock=cap.captured_at.timestamp(), capture=CAPTURE)
    with run_app(rp.app()) as base, run_app(nras.app()) as nras_base:
        yield rp, base, nras, nras_base


def _options(nras_base: str, **kw: object) -> AttestOptions:
    cap = capture(NAME)
    args: dict[str, object] = {
        "policy": NRAS,
        "collateral": full_collateral(cap),
        "pcs_url": None,
        "wall_clock": lambda: cap.captured_at.timestamp(),
        "nonce_factory": lambda: cap.nonce_hex,
        "nras_url": nras_base + "/v3/attest/gpu",
        "nras_jwks_url": nras_base + "/.well-known/jwks.json",
    }
    args.update(kw)
    return AttestOptions(**args)  # type: ignore[arg-type]


def _post(base: str, options: AttestOptions, n: int = 1) -> list[int]:
    transport = E2EETransport(
        api_key=KEY, api_base=base, models_base=base, attest=options, max_attempts=1
    )
    with httpx2.Client(transport=transport, base_url=base, timeout=30) as client:
        return [client.post("/v1/chat/completions", json=BODY).status_code for _ in range(n)]


def test_nras_vouches_and_the_client_sends_h_not_n(
    stack: tuple[Replay, str, StandInNras, str],
) -> None:
    rp, base, nras, nras_base = stack
    cap = capture(NAME)
    assert _post(base, _options(nras_base), n=4) == [500] * 4  # 500: the replay's invoke
    assert rp.invokes and {h["x-instance-id"] for h in rp.invokes} <= set(cap.instances)
    expected = {nonce_binding(cap.nonce_hex, k).hex() for k in cap.instances.values()}
    assert set(nras.nonces) == {nonce_binding(cap.nonce_hex, cap.instances[i]).hex()
                                for i in {h["x-instance-id"] for h in rp.invokes}}  # fmt: skip
    assert set(nras.nonces) <= expected and cap.nonce_hex not in nras.nonces
    assert len(nras.nonces) <= len(cap.instances)  # verdicts cached per (chute, instance, key)
    assert nras.jwks_fetches == 1  # the JWKS is cached


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("other-key", E.ATTEST_GPU_NRAS_TOKEN),
        ("measurements", E.ATTEST_GPU_NRAS),
        ("down", E.ATTEST_UNAVAILABLE),
        ("capture", E.ATTEST_GPU_NONCE),  # NVIDIA's real tokens, for another nonce
    ],
)
def test_nras_failures_stop_the_request_before_the_prompt(
    stack: tuple[Replay, str, StandInNras, str], mode: str, reason: E
) -> None:
    rp, base, nras, nras_base = stack
    nras.mode = mode
    with pytest.raises(AttestationError) as err:
        _post(base, _options(nras_base))
    assert err.value.code is E.ATTEST_FAILED
    assert err.value.verdicts and all(reason in v.reasons for v in err.value.verdicts)
    assert rp.invokes == []


def test_unreachable_nras_fails_closed(stack: tuple[Replay, str, StandInNras, str]) -> None:
    rp, base, _, _ = stack
    with pytest.raises(AttestationError) as err:
        _post(base, _options("http://127.0.0.1:9"))
    assert err.value.code is E.ATTEST_FAILED
    assert all(E.ATTEST_UNAVAILABLE in v.reasons for v in err.value.verdicts)
    assert rp.invokes == []


def test_a_rotated_nras_key_refetches_the_jwks_once(
    stack: tuple[Replay, str, StandInNras, str],
) -> None:
    rp, base, nras, nras_base = stack
    clock = [capture(NAME).captured_at.timestamp()]
    options = _options(
        nras_base, policy=Policy(gpu=GpuMode.NRAS, max_age=0), wall_clock=lambda: clock[0]
    )
    assert _post(base, options) == [500]
    assert nras.jwks_fetches == 1
    nras.key, nras.kid = ec.generate_private_key(ec.SECP384R1()), "rotated-kid"
    clock[0] += 120  # past the refetch floor: a token naming an unknown kid refetches once
    assert _post(base, options) == [500]
    assert nras.jwks_fetches == 2
    assert len(rp.invokes) == 2


@pytest.mark.anyio
async def test_nras_on_the_async_transport(stack: tuple[Replay, str, StandInNras, str]) -> None:
    # The async engine's NRAS round trip and JWKS fetch, on asyncio and trio.
    rp, base, nras, nras_base = stack
    transport = AsyncE2EETransport(
        api_key=KEY, api_base=base, models_base=base, attest=_options(nras_base), max_attempts=1
    )
    async with httpx2.AsyncClient(transport=transport, base_url=base, timeout=30) as client:
        assert (await client.post("/v1/chat/completions", json=BODY)).status_code == 500
        nras.mode = "other-key"  # later instances are never verified by a foreign signer
        for _ in range(3):
            try:
                await client.post("/v1/chat/completions", json=BODY)
            except AttestationError as exc:
                assert exc.code is E.ATTEST_FAILED
    first = rp.invokes[0]["x-instance-id"]
    assert {h["x-instance-id"] for h in rp.invokes} == {first}
    assert nras.jwks_fetches == 1


def test_proxy_flags_reach_the_attestation_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import pqe2ee.cli._preflight as preflight
    import pqe2ee.proxy.app as proxy_app
    from pqe2ee.cli import cli

    seen: list[AttestOptions] = []
    monkeypatch.setattr(proxy_app, "serve", lambda config, **kw: seen.append(config.attest))
    monkeypatch.setattr(preflight, "check_port", lambda *a: None)
    args = ["proxy", "--api-key", KEY, "--attest-gpu", "nras", "--attest-nras-url",
            "http://127.0.0.1:1/v3/attest/gpu", "--attest-nras-jwks-url", "http://127.0.0.1:1/j"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    (options,) = seen
    assert options.policy.gpu is GpuMode.NRAS
    assert options.nras_url == "http://127.0.0.1:1/v3/attest/gpu"
    assert options.nras_jwks_url == "http://127.0.0.1:1/j"
    monkeypatch.setenv("PQE2EE_PROXY_ATTEST_GPU", "bogus")
    refused = CliRunner().invoke(cli, ["proxy", "--api-key", KEY])
    assert refused.exit_code != 0 and "--attest-gpu" in refused.output
