"""The proxy in front of the replay relay: attestation failures surface in each dialect as a
typed error (code ``attest_failed``), and nothing is sent; a verified chute gets the call."""

from __future__ import annotations

from collections.abc import Iterator

import httpx2
import pytest

from attest_replay import MODEL, Replay
from attest_support import ATTESTATION, EXTRA, capture, full_collateral
from pqe2ee.attest.gate import AttestOptions
from pqe2ee.proxy.app import ProxyConfig, create_app
from servers import run_app

NAME = "glm-5-tee-2026-06-29"
KEY = "cpk_test-attest-proxy-0123456789"


def _proxy(relay: str, nonce: str) -> Iterator[str]:
    cap = capture(NAME)
    attest = AttestOptions(
        collateral=full_collateral(cap),
        pcs_url=None,
        wall_clock=lambda: cap.captured_at.timestamp(),
        nonce_factory=lambda: nonce,
    )
    config = ProxyConfig(
        api_base=relay,
        models_base=relay,
        api_key=KEY,
        attest=attest,
        transport_options={"max_attempts": 1},
    )
    with run_app(create_app(config)) as base:
        yield base


@pytest.fixture
def replay() -> Iterator[tuple[Replay, str]]:
    rp = Replay(ATTESTATION / "chutes" / NAME, extra=[EXTRA])
    with run_app(rp.app()) as base:
        yield rp, base


DIALECTS = [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/responses", {"model": MODEL, "input": "hi"}),
    (
        "/v1/messages",
        {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
    ),
]


@pytest.mark.parametrize("stream", [False, True])
def test_each_dialect_surfaces_attest_failed(replay: tuple[Replay, str], stream: bool) -> None:
    rp, relay = replay
    for base in _proxy(relay, "ee" * 32):  # replayed evidence, fresh nonce: nothing binds
        for path, body in DIALECTS:
            r = httpx2.post(base + path, json={**body, "stream": stream}, timeout=30)
            assert r.status_code == 502, (path, r.text)
            err = r.json()["error"]
            assert "attest_failed" in err["message"], (path, err)
            if path == "/v1/messages":
                assert r.json()["type"] == "error"
            else:
                assert err["code"] == "attest_failed"
    assert rp.invokes == []


def test_a_verified_chute_gets_the_call(replay: tuple[Replay, str]) -> None:
    rp, relay = replay
    cap = capture(NAME)
    for base in _proxy(relay, cap.nonce_hex):
        path, body = DIALECTS[0]
        r = httpx2.post(base + path, json=body, timeout=30)
        assert r.status_code == 500  # the replay relay's refusal, after the prompt was sent
    assert len(rp.invokes) == 1
