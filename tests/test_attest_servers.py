"""Our own servers serve TEE evidence: ``pqe2ee instance`` ``GET /evidence?nonce=`` (quotes from
a provider: configfs-tsm in a TDX guest, here the test-only signer) and ``pqe2ee relay``
``GET /chutes/{chute}/evidence`` (fan-out, Chutes shape). The client verifies them with the
production verifier (dcap-qvl) given the signer's test root, end to end over loopback: a debug
TD is never sent a prompt, a v2 key is bound (spec/v2.md §8.3) so v2 requests are attested too.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest

from attest_signer import TestQuoteSigner
from attest_stack import serve_tee_stack, signer_options
from pqe2ee.attest import GpuMode, Policy, nonce_binding, parse_evidence, verify_instance
from pqe2ee.attest.gate import AttestOptions
from pqe2ee.errors import AttestationError, ErrorCode
from pqe2ee.server import relay
from pqe2ee.transports.httpx2 import E2EETransport
from relay_support import InvokeCounter
from servers import run_app

KEY = "cpk_attest-servers-0123456789"
BODY = {"model": "dev-echo", "messages": [{"role": "user", "content": "attested hello"}]}


@dataclass
class Stack:
    signer: TestQuoteSigner
    relay: str
    good: InvokeCounter
    debug: InvokeCounter
    good_url: str
    good_id: str

    def options(self, **kw: Any) -> AttestOptions:
        return signer_options(self.signer, **kw)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with serve_tee_stack(
        (False, True),
        api_keys=(KEY,),
        wrap=InvokeCounter,
        rate_limit=10_000,
        nonces_per_instance=50,
    ) as st:
        good, debug = st.apps
        yield Stack(st.signer, st.relay, good, debug, st.urls[0], st.ids[0])


def _verify(stack: Stack, instance_id: str, k1: str, entry: Any, nonce: str, **kw: Any) -> Any:
    kw.setdefault("intel_root_der", stack.signer.root_der)
    return verify_instance(
        instance_id,
        k1,
        entry,
        nonce,
        stack.signer.collateral,
        Policy(gpu=GpuMode.OFF),
        stack.signer.now,
        **kw,
    )


def _chute(stack: Stack) -> str:
    models = httpx2.get(stack.relay + "/v1/models", timeout=10).json()["data"]
    return str(models[0]["chute_id"])


def test_instance_evidence_binds_nonce_and_both_keys(stack: Stack) -> None:
    nonce = secrets.token_hex(32)
    r = httpx2.get(stack.good_url + "/evidence", params={"nonce": nonce}, timeout=10)
    assert r.status_code == 200
    entry = r.json()
    info = httpx2.get(stack.good_url + "/e2e/info", timeout=10).json()
    assert entry["instance_id"] == info["instance_id"] and entry["gpu_evidence"] == []
    args = (stack, info["instance_id"], info["e2e_pubkey"], entry, nonce)
    verdict = _verify(*args, e2e_v2_pk=info["e2e_v2"]["pk"])
    assert verdict.trusted and verdict.v2_bound, verdict.checks
    # the v1-only form does not match an instance that serves v2 (a stripped offer fails)
    v1_only = _verify(*args)
    assert v1_only.reasons == (ErrorCode.ATTEST_NONCE_BINDING,)
    # and Intel's real root does not accept the test signer's chain
    real_root = _verify(*args, e2e_v2_pk=info["e2e_v2"]["pk"], intel_root_der=None)
    assert real_root.reasons == (ErrorCode.ATTEST_QUOTE_INVALID,)
    quote = base64.b64decode(entry["quote"])
    assert nonce_binding(nonce, info["e2e_pubkey"], info["e2e_v2"]["pk"]) in quote


@pytest.mark.parametrize("nonce", ["", "ab", "AB" * 32, "zz" * 32, "00" * 33])
def test_instance_evidence_refuses_a_bad_nonce(stack: Stack, nonce: str) -> None:
    r = httpx2.get(stack.good_url + "/evidence", params={"nonce": nonce}, timeout=10)
    assert r.status_code == 400


def test_relay_fans_out_in_the_chutes_shape(stack: Stack) -> None:
    nonce = secrets.token_hex(32)
    url = f"{stack.relay}/chutes/{_chute(stack)}/evidence"
    assert httpx2.get(url, params={"nonce": nonce}, timeout=10).status_code == 401
    r = httpx2.get(
        url, params={"nonce": nonce}, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert r.status_code == 200
    bundle = parse_evidence(r.content)
    assert len(bundle.entries) == 2 and bundle.failed == frozenset()
    rows = httpx2.get(
        f"{stack.relay}/e2e/instances/{_chute(stack)}",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    ).json()["instances"]
    reasons = {}
    for row in rows:
        verdict = _verify(
            stack,
            row["instance_id"],
            row["e2e_pubkey"],
            bundle.entries[row["instance_id"]],
            nonce,
            e2e_v2_pk=row["e2e_v2"]["pk"],
        )
        reasons[row["instance_id"]] = verdict.reasons
    assert reasons.pop(stack.good_id) == ()
    # the debug TD: our own check names it, and dcap-qvl refuses debug quotes as well
    assert set(next(iter(reasons.values()))) == {
        ErrorCode.ATTEST_DEBUG,
        ErrorCode.ATTEST_QUOTE_INVALID,
    }
    bad = httpx2.get(
        url, params={"nonce": "x"}, headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    )
    assert bad.status_code == 400


@pytest.mark.parametrize("min_version", [1, 2])
def test_client_sends_only_to_the_verified_instance(stack: Stack, min_version: int) -> None:
    before_good, before_debug = stack.good.invokes, stack.debug.invokes
    transport = E2EETransport(
        api_key=KEY,
        api_base=stack.relay,
        models_base=stack.relay,
        attest=stack.options(),
        min_version=min_version,
    )
    with httpx2.Client(transport=transport, base_url=stack.relay, timeout=30) as client:
        for _ in range(6):
            r = client.post("/v1/chat/completions", json=BODY)
            assert r.status_code == 200, r.text
            assert "attested hello" in r.text  # the dev engine's echo, decrypted
    assert stack.debug.invokes == before_debug  # the debug TD never got a prompt
    assert stack.good.invokes == before_good + 6


def test_without_a_root_that_accepts_the_quotes_nothing_is_sent(stack: Stack) -> None:
    # Intel's root (production) does not accept the test chain: every instance is rejected.
    before = stack.good.invokes + stack.debug.invokes
    transport = E2EETransport(
        api_key=KEY,
        api_base=stack.relay,
        models_base=stack.relay,
        attest=stack.options(test_intel_root_der=None),
    )
    with httpx2.Client(transport=transport, base_url=stack.relay, timeout=30) as client:
        with pytest.raises(AttestationError) as err:
            client.post("/v1/chat/completions", json=BODY)
    assert err.value.code is ErrorCode.ATTEST_FAILED
    assert stack.good.invokes + stack.debug.invokes == before


def test_relay_rate_limits_evidence(stack: Stack) -> None:
    config = relay.RelayConfig(
        instances=(stack.good_url,),
        api_keys=(KEY,),
        startup_wait=5.0,
        rate_limit=2,
        rate_window=60.0,
    )
    with run_app(relay.create_app(config)) as small:
        url = f"{small}/chutes/{_chute(stack)}/evidence"
        auth = {"Authorization": f"Bearer {KEY}"}
        codes = [
            httpx2.get(
                url, params={"nonce": secrets.token_hex(32)}, headers=auth, timeout=30
            ).status_code
            for _ in range(3)
        ]
    assert codes == [200, 200, 429]
