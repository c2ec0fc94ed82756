"""The proxy's status page (``GET /``) in a real headless browser (Debian's Chromium): after a
few calls it shows the upstream hosts, the chute pinned to v2 with its (unverified)
attestation state, the keys in use as fingerprints, and failures by code - and never a
prompt, a completion or a key."""

from __future__ import annotations

import hashlib
import html
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

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
    assert f"{chute} v2 (pinned)" in text
    assert "not verified (no attestation verifier here)" in text
    assert "API keys in use: 2" in text
    for key in (KEY_A, wrong):
        assert hashlib.sha256(key.encode()).hexdigest()[:16] in text
        assert key not in text
    assert re.search(rf"\b{re.escape(code)} 1 1\b", text), text
    assert PROMPT not in text and "Echo:" not in text


def test_status_page_headers_forbid_scripts(proxy: dict[str, Any]) -> None:
    resp = httpx2.get(proxy["url"] + "/", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in resp.headers["content-security-policy"]
    assert "<script" not in resp.text
