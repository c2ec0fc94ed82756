"""The proxy's status page (``GET /``) in a real headless browser (Debian's Chromium): after a
few calls it shows the upstream hosts, each chute seen with its profile (v1 or v2, v2 pin) and
attestation state, the keys in use as fingerprints, and failures by code - and never a
prompt, a completion or a key. The attested case runs our own instances whose quotes the
test-only signer makes, verified by the production verifier (dcap-qvl) under the signer's
root: a trusted instance with its TCB status and measurements, and a debug TD or a foreign
root rejected with reason codes."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import html
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from attest_signer import TestQuoteSigner
from attest_stack import serve_tee_stack, signer_options
from pqe2ee.attest.tdx import parse_quote
from pqe2ee.proxy.app import ProxyConfig, create_app
from relay_support import KEY_A, serve_stack
from servers import run_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROMPT = "a prompt that must never show"


def browser_text(url: str) -> str:
    """The page as Chromium renders it (its DOM after parsing), tags stripped."""
    if CHROMIUM is None:
        pytest.skip("chromium not found (`make test` installs it: apt-get install chromium)")
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert "<h1>pqe2ee proxy" in dom, dom[:500]
    return html.unescape(" ".join(re.sub(r"<[^>]+>", " ", dom).split()))


@pytest.fixture(scope="module")
def proxy() -> Iterator[dict[str, Any]]:
    with serve_stack(1, api_keys=(KEY_A,), rate_limit=1000) as st:
        config = ProxyConfig(api_base=st.relay, models_base=st.relay, api_key=KEY_A)
        with run_app(create_app(config)) as url:
            yield {"url": url, "relay": st.relay}


def test_status_page_in_chromium_after_a_few_calls(proxy: dict[str, Any]) -> None:
    url = proxy["url"]
    empty = browser_text(url + "/")
    assert "API keys in use: 0" in empty and "No failures since start." in empty
    body = {"model": "dev-echo", "messages": [{"role": "user", "content": PROMPT}]}
    ok = httpx2.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert ok.status_code == 200
    models = httpx2.get(proxy["relay"] + "/v1/models", timeout=10).json()["data"]
    chute = next(m["chute_id"] for m in models if m["id"] == "dev-echo")
    wrong = "sk-wrong-key-for-the-status-page"
    refused = httpx2.post(
        url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {wrong}"},
        timeout=30,
    )
    assert refused.status_code >= 400
    code = refused.json()["error"]["code"]

    text = browser_text(url + "/")
    assert f"relay (encrypted calls) {proxy['relay']}" in text
    assert f"model list (plaintext) {proxy['relay']}" in text
    # seen with profile v2, pinned; its instance serves no evidence (the relay answers 404)
    utc = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
    row = rf"{chute} v2 {utc} {utc} unattested: answered 404 for its evidence"
    assert re.search(row, text), text
    assert "No instance verified yet." in text
    assert "API keys in use: 2" in text
    for key in (KEY_A, wrong):
        assert hashlib.sha256(key.encode()).hexdigest()[:16] in text
        assert key not in text
    assert re.search(rf"\b{re.escape(code)} 1 1\b", text), text
    assert PROMPT not in text and "Echo:" not in text


def test_status_page_with_attestation_off(proxy: dict[str, Any]) -> None:
    config = ProxyConfig(
        api_base=proxy["relay"], models_base=proxy["relay"], api_key=KEY_A, attest="off"
    )
    body = {"model": "dev-echo", "messages": [{"role": "user", "content": PROMPT}]}
    with run_app(create_app(config)) as url:
        assert httpx2.post(url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        text = browser_text(url + "/")
    assert "attestation (--attest) off: nothing is verified" in text
    assert re.search(r" v2 \S+ \S+ UTC \S+ \S+ UTC off \(--attest off\)", text), text
    assert "No instance verified yet." in text and PROMPT not in text


def test_status_page_headers_forbid_scripts(proxy: dict[str, Any]) -> None:
    resp = httpx2.get(proxy["url"] + "/", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in resp.headers["content-security-policy"]
    assert "<script" not in resp.text


@dataclasses.dataclass
class Attested:
    signer: TestQuoteSigner
    relay: str
    good_url: str
    good_id: str
    debug_id: str


@pytest.fixture(scope="module")
def attested() -> Iterator[Attested]:
    """dev-engine -> two instances (one genuine TD, one debug TD; quotes by the test signer)
    -> relay, all on loopback."""
    with serve_tee_stack(
        (False, True), api_keys=(KEY_A,), rate_limit=10_000, nonces_per_instance=50
    ) as st:
        yield Attested(st.signer, st.relay, st.urls[0], st.ids[0], st.ids[1])


def _attested_proxy(at: Attested, **kw: Any) -> ProxyConfig:
    return ProxyConfig(
        api_base=at.relay, models_base=at.relay, api_key=KEY_A, prefer_v2=False,
        attest=signer_options(at.signer, **kw),
    )  # fmt: skip


def test_status_page_shows_a_verified_chute(attested: Attested) -> None:
    at = attested
    chute = httpx2.get(at.relay + "/v1/models", timeout=10).json()["data"][0]["chute_id"]
    nonce = secrets.token_hex(32)
    entry = httpx2.get(at.good_url + "/evidence", params={"nonce": nonce}, timeout=10).json()
    mrtd = parse_quote(base64.b64decode(entry["quote"])).measurements.mrtd
    body = {"model": "dev-echo", "messages": [{"role": "user", "content": PROMPT}]}
    with run_app(create_app(_attested_proxy(at))) as url:
        empty = browser_text(url + "/")
        assert "No chute seen yet" in empty and "require: only verified instances" in empty
        for _ in range(3):
            r = httpx2.post(url + "/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text
            assert PROMPT in r.text  # the dev engine's echo, decrypted
        text = browser_text(url + "/")
    utc = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
    # the chute, spoken to in profile v1 (--no-prefer-v2), not pinned to v2, trusted
    assert re.search(
        rf"{chute} v1 {utc} - trusted \(1 of [12] instances verified trusted\)", text
    ), text
    # the genuine TD: trusted, its TCB status, MRTD and RTMRs as short hex, no GPUs, when
    at_utc = re.escape(time_utc(at.signer.now))
    good = (
        rf"{chute} {at.good_id} trusted UpToDate MRTD {mrtd[:12]}… RTMR0 [0-9a-f]{{12}}… "
        rf"RTMR1 [0-9a-f]{{12}}… RTMR2 [0-9a-f]{{12}}… RTMR3 [0-9a-f]{{12}}… "
        rf"\(not pinned by the policy\) 0 of 0 {at_utc} {utc} "
        r"gpus_not_checked, measurements_not_pinned"
    )
    assert re.search(good, text), text
    # the debug TD: rejected with its reasons, or named in the evidence but not verified yet
    # (which of the two depends on which instance the first call leased)
    debug = re.search(rf"{chute} {at.debug_id} (rejected|not yet) ", text)
    assert debug is not None, text
    if debug.group(1) == "rejected":
        assert "attest_debug" in text
    assert mrtd not in text  # only the short form
    assert PROMPT not in text and KEY_A not in text


def test_status_page_shows_a_rejected_chute(attested: Attested) -> None:
    """Under Intel's real root the test signer's quotes do not verify: every instance is
    rejected, nothing is sent, and the page names the reason code per instance."""
    at = attested
    body = {"model": "dev-echo", "messages": [{"role": "user", "content": PROMPT}]}
    with run_app(create_app(_attested_proxy(at, test_intel_root_der=None))) as url:
        r = httpx2.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 502 and r.json()["error"]["code"] == "attest_failed"
        text = browser_text(url + "/")
    assert re.search(r"v1 \S+ \S+ UTC - rejected \(0 of 2 instances verified trusted\)", text)
    for inst in (at.good_id, at.debug_id):
        row = rf"{inst} rejected - MRTD [0-9a-f]{{12}}… .*? 0 of 0 .*?attest_quote_invalid"
        assert re.search(row, text), text
    assert re.search(r"attest_failed 1 1\b", text), text
    assert PROMPT not in text and KEY_A not in text


def time_utc(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
