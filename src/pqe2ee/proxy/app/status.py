"""The proxy's status page, ``GET /``: server-rendered HTML, no script, no build step.

What it shows: the upstream hosts, the wire-profile policy and the attestation mode; every
chute the proxy has negotiated with (profile v1 or v2, v2 pin) or attested, with its
attestation state from the proxy's one shared gate (trusted / rejected / unattested / not
yet); per attested instance the verdict, TCB status, measurements (MRTD, RTMR0-3 as short
hex), GPUs checked / ok, when verified and the reason codes; the API keys with a live
transport, as SHA-256 fingerprints; failures by stable error code, in the last hour and since
start. What it never shows: a prompt, a completion, a key, a model
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
from pqe2ee.attest.gate import AttestationGate, AttestMode, ChuteAttestation
from pqe2ee.attest.policy import Verdict
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


def _short(hex_value: str) -> str:
    return hex_value[:12] + "…" if len(hex_value) > 12 else hex_value


def _measurements(verdict: Verdict) -> str:
    m = verdict.measurements
    if m is None:
        return "-"
    shown = " ".join(f"{k.upper()} {_short(v)}" for k, v in m.as_dict().items())
    return shown + ("" if verdict.measurements_pinned else " (not pinned by the policy)")


def _instance_rows(state: ChuteAttestation) -> list[list[str]]:
    rows = []
    for verdict, until in state.verdicts:
        codes = [r.value for r in verdict.reasons] + list(verdict.notes)
        rows.append([
            state.chute, verdict.instance_id,
            "trusted" if verdict.trusted else "rejected",
            verdict.tcb_status or "-", _measurements(verdict),
            f"{verdict.gpus_ok} of {verdict.gpus_checked}",
            _utc(verdict.verified_at), _utc(until), ", ".join(codes) or "-",
        ])  # fmt: skip
    for instance in state.pending:
        rows.append([state.chute, instance, "not yet", "-", "-", "-", "-", "-", "-"])
    return rows


def _chute_rows(
    negotiator: Negotiator | None,
    attest: dict[str, ChuteAttestation],
    mode: AttestMode | None,
) -> list[list[str]]:
    seen = negotiator.seen() if negotiator is not None else {}
    pins = negotiator.pins() if negotiator is not None else {}
    rows = []
    for chute in sorted({*seen, *pins, *attest}):
        version, last = seen.get(chute, (None, None))
        profile = "-" if version is None else f"v{version}"
        pinned = _utc(pins[chute]) if chute in pins else "-"
        state = attest.get(chute)
        if mode is AttestMode.OFF:
            verdict = "off (--attest off)"
        elif state is None:
            verdict = "not yet"
        else:
            trusted = sum(v.trusted for v, _ in state.verdicts)
            verdict = state.state
            if state.verdicts:
                verdict += f" ({trusted} of {len(state.verdicts)} instances verified trusted)"
            if state.why:
                verdict += f": {state.why}"
            if state.pinned and state.state != "trusted":
                verdict += " (verified before: pinned to attestation)"
        rows.append([chute, profile, "-" if last is None else _utc(last), pinned, verdict])
    return rows


def render(
    config: ProxyConfig,
    negotiator: Negotiator | None,
    fingerprints: list[str],
    failures: FailureLog,
    gate: AttestationGate | None = None,
) -> str:
    policy = (
        "v2 required (--min-version 2): v1 is never sent"
        if config.min_version >= 2
        else "v2 preferred, v1 for chutes that never offered v2"
        if config.prefer_v2
        else "v1 only (--no-prefer-v2)"
    )
    attest: dict[str, ChuteAttestation] = {}
    mode = None
    if gate is not None:
        mode = gate.options.mode
        with gate.lock:
            attest = gate.summary()
    chutes = _chute_rows(negotiator, attest, mode)
    instances = [row for c in sorted(attest) for row in _instance_rows(attest[c])]
    attest_mode = {
        None: "none",
        AttestMode.AUTO: "auto: chutes serving evidence are verified before any prompt; "
        "others are sent to unattested (one warning each)",
        AttestMode.REQUIRE: "require: only verified instances are sent a prompt",
        AttestMode.OFF: "off: nothing is verified",
    }[mode]
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
             ["wire profile", policy],
             ["attestation (--attest)", attest_mode]],
            "",
        )),
        ("Chutes seen", _table(
            ["chute", "profile", "last negotiated", "v2 pinned until", "attestation"], chutes,
            "No chute seen yet (chutes appear after the first call).",
        )),
        ("Attestation per instance", _table(
            ["chute", "instance", "verdict", "TCB status", "measurements", "GPUs ok",
             "verified", "reused until", "reasons and notes"], instances,
            "No instance verified yet.",
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
    gate: AttestationGate | None = None,
) -> Callable[[Request], Awaitable[Response]]:
    """The ``GET /`` endpoint over the proxy's live state (``gate``: the attestation gate
    every per-key transport shares)."""

    async def endpoint(request: Request) -> Response:
        page = render(config, negotiator, fingerprints(), failures, gate)
        return HTMLResponse(
            page,
            headers={"content-security-policy": _CSP, "cache-control": "no-store",
                     "x-content-type-options": "nosniff"},
        )  # fmt: skip

    return endpoint
