"""The proxy's status page, ``GET /``: server-rendered HTML, no script, no build step.

What it shows: the upstream hosts and the wire-profile policy; the chutes pinned to profile v2
(until when) and their attestation state - which this version does not verify, and says so;
the API keys with a live transport, as SHA-256 fingerprints; failures by stable error code,
in the last hour and since start. What it never shows: a prompt, a completion, a key, a model
name from a request. Every value is HTML-escaped; the page forbids scripts and outside
resources (Content-Security-Policy).
"""

from __future__ import annotations

import collections
import datetime
import html
import time
from collections.abc import Awaitable, Callable, Iterable

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

import pqe2ee
from pqe2ee.protocol.v2.negotiation import Negotiator
from pqe2ee.proxy.app.config import ProxyConfig

__all__ = ["FailureLog", "status_page"]

RECENT_S = 3600.0
_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


class FailureLog:
    """Failures by stable error code: all since start, and the last ``RECENT_S`` seconds
    (the newest 10 000 kept)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.total: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[tuple[float, str]] = collections.deque(maxlen=10_000)
        self._clock = clock

    def add(self, code: str) -> None:
        self.total[code] += 1
        self._recent.append((self._clock(), code))

    def recent(self) -> collections.Counter[str]:
        cutoff = self._clock() - RECENT_S
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        return collections.Counter(code for _, code in self._recent)


def _utc(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _table(head: Iterable[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f"<p class=empty>{html.escape(empty)}</p>"
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render(
    config: ProxyConfig,
    negotiator: Negotiator | None,
    fingerprints: list[str],
    failures: FailureLog,
) -> str:
    policy = (
        "v2 required (--min-version 2): v1 is never sent"
        if config.min_version >= 2
        else "v2 preferred, v1 for chutes that never offered v2"
        if config.prefer_v2
        else "v1 only (--no-prefer-v2)"
    )
    pins = negotiator.pins() if negotiator is not None else {}
    chutes = [
        [chute, "v2 (pinned)", _utc(until), "not verified (no attestation verifier here)"]
        for chute, until in sorted(pins.items())
    ]
    recent = failures.recent()
    errors = [
        [code, str(recent.get(code, 0)), str(total)]
        for code, total in sorted(failures.total.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    keys = [[fp] for fp in fingerprints]
    sections = [
        ("Upstream", _table(
            ["what", "value"],
            [["relay (encrypted calls)", config.api_base],
             ["model list (plaintext)", config.models_base],
             ["wire profile", policy]],
            "",
        )),
        ("Chutes seen with profile v2", _table(
            ["chute", "profile", "pinned until", "attestation"], chutes,
            "No chute pinned to v2 yet (pins appear after the first call to a chute offering v2).",
        )),
        (f"API keys in use: {len(keys)}", _table(
            ["SHA-256 fingerprint (first 16 hex digits)"], keys, "No key has a live transport.",
        )),
        ("Failures by code", _table(
            ["code", "last hour", "since start"], errors, "No failures since start.",
        )),
    ]  # fmt: skip
    body = "".join(
        f"<section><h2>{html.escape(t)}</h2>{content}</section>" for t, content in sections
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<title>pqe2ee proxy status</title><style>"
        "body{font:14px system-ui,sans-serif;margin:2em;max-width:60em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;"
        "text-align:left}th{background:#f4f4f4}.empty{color:#666}</style></head><body>"
        f"<h1>pqe2ee proxy {html.escape(pqe2ee.__version__)}</h1>"
        f"<p>Rendered {html.escape(_utc(time.time()))}. Also: <a href=/health>/health</a>, "
        "<a href=/ready>/ready</a>, <a href=/metrics>/metrics</a>.</p>"
        f"{body}</body></html>"
    )


def status_page(
    config: ProxyConfig,
    negotiator: Negotiator | None,
    fingerprints: Callable[[], list[str]],
    failures: FailureLog,
) -> Callable[[Request], Awaitable[Response]]:
    """The ``GET /`` endpoint over the proxy's live state."""

    async def endpoint(request: Request) -> Response:
        page = render(config, negotiator, fingerprints(), failures)
        return HTMLResponse(
            page,
            headers={"content-security-policy": _CSP, "cache-control": "no-store",
                     "x-content-type-options": "nosniff"},
        )  # fmt: skip

    return endpoint
