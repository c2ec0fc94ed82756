"""A relay of ours that misbehaves on purpose: an ASGI wrapper around the real relay app.

Used two ways: as the *deliberately broken server* the server cases must catch, and as the
*hostile server* a client under test must survive (``conformance client``). Each
:class:`Mode` changes one thing; everything else passes through to the real relay. Answers
of ``/e2e/invoke`` are buffered whole and re-sent as the mode says (a conformance stream is a
few KiB), so byte-level framing (split and coalesced events) is the mode's choice.

The wrapper records what it saw (invokes with their nonce and instance, discoveries), so a
verdict can use what the server saw as well as what the client printed.
"""

from __future__ import annotations

import base64
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from pqe2ee.protocol.v2.header import MAGIC as V2_MAGIC

__all__ = ["HostileRelay", "Mode", "Seen", "SeenInvoke"]

ASGI = Callable[..., Any]


class Mode(enum.Enum):
    FAITHFUL = "faithful"
    # server faults (the server cases must detect each)
    TAMPER_BLOB = "tamper_blob"  # one bit of a 200 blob flipped
    TRUNCATE = "truncate"  # a stream ends cleanly after the second event
    ACCEPT_SPENT_NONCE = "accept_spent_nonce"  # a nonce refusal becomes 200
    IGNORE_STREAM_FLAG = "ignore_stream_flag"  # a stream_mismatch refusal becomes 200
    OPEN_PATHS = "open_paths"  # X-E2E-Path forced to /v1/chat/completions
    PLAIN_ERRORS = "plain_errors"  # relay errors as text/plain
    TAMPER_IS_500 = "tamper_is_500"  # 400 for a broken request becomes 500
    DUPLICATE_NONCES = "duplicate_nonces"  # discovery lists a nonce twice
    BAD_OFFER = "bad_offer"  # e2e_v2 key corrupted
    HIDE_V2 = "hide_v2"  # e2e_v2 removed from discovery (downgrade)
    # stream hostility a client must handle
    SPLIT = "split"  # the answer arrives in 5-byte pieces (still valid)
    COALESCE = "coalesce"  # the whole answer in one piece (still valid)
    INTERLEAVE_USAGE = "interleave_usage"  # v1: a usage event before every record (valid)
    DUPLICATE_RECORD = "duplicate_record"
    REORDER_RECORDS = "reorder_records"
    TAMPER_RECORD = "tamper_record"
    # relay answers a client must retry past (first invoke only) or report
    SPENT_NONCE = "spent_nonce"  # first invoke: 403 nonce
    GONE_410 = "gone_410"
    BUSY_429 = "busy_429"
    KEY_502 = "key_502"
    DISCOVERY_429 = "discovery_429"  # every discovery rate-limited
    EXPIRED_NONCES = "expired_nonces"  # discovery says nonce_expires_in 0 (expires_at kept)
    # clocks (SPEC §10.2): the relay's clock is the runner's machine clock, as the client's is
    EXPIRES_AT_PAST = "expires_at_past"  # nonce_expires_at an hour ago (skew): must be ignored
    EXPIRES_AT_SOON = "expires_at_soon"  # nonce_expires_at in 2 s (< margin), expires_in 60
    # records that split or merge inner lines (made at the instance: conformance/rechunk.py)
    INNER_SPLIT = "inner_split"
    INNER_MERGED = "inner_merged"
    # v2 downgrade of a pinned chute (spec/v2.md §8.2): one row with one nonce, so a second
    # call rediscovers; every discovery after the first invoke hides e2e_v2
    PIN_DOWNGRADE = "pin_downgrade"


_DISCOVERY_MODES = (
    Mode.DUPLICATE_NONCES,
    Mode.BAD_OFFER,
    Mode.HIDE_V2,
    Mode.EXPIRED_NONCES,
    Mode.EXPIRES_AT_PAST,
    Mode.EXPIRES_AT_SOON,
    Mode.PIN_DOWNGRADE,
)
_ANSWERS: dict[Mode, tuple[int, str]] = {
    Mode.SPENT_NONCE: (403, "Invalid, expired, or already-used nonce"),
    Mode.GONE_410: (410, "Instance is no longer active"),
    Mode.BUSY_429: (429, "Instance is at maximum capacity, try again later"),
    Mode.KEY_502: (502, "Instance requires key exchange, try a different instance"),
}
_USAGE_EVENT = b'data: {"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'


@dataclass(frozen=True)
class SeenInvoke:
    instance_id: str
    nonce: str
    stream_header: str | None
    path_header: str | None
    v2: bool  # the blob starts with the v2 magic


@dataclass
class Seen:
    invokes: list[SeenInvoke] = field(default_factory=list)
    discoveries: int = 0
    statuses: list[int] = field(default_factory=list)  # what the client was answered


@dataclass
class HostileRelay:
    app: ASGI
    mode: Mode = Mode.FAITHFUL
    seen: Seen = field(default_factory=Seen)
    hide_v2: bool = False  # on top of any mode: serve a v1-only relay (no e2e_v2 offers)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set_mode(self, mode: Mode, *, hide_v2: bool = False) -> None:
        with self._lock:
            self.mode = mode
            self.hide_v2 = hide_v2
            self.seen = Seen()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        mode = self.mode
        if path.startswith("/e2e/instances/"):
            self.seen.discoveries += 1
            if mode is Mode.DISCOVERY_429:
                await _drain(receive)
                await _send_all(send, 429, b'{"detail":"Rate limit exceeded"}', "application/json")
                return
            status, headers, body = await _capture(self.app, scope, receive)
            if self.hide_v2 or (mode is Mode.PIN_DOWNGRADE and self.seen.invokes):
                body = _rewrite_discovery(body, Mode.HIDE_V2)
            await _send_all(send, status, _rewrite_discovery(body, mode), _ctype(headers))
            return
        if path != "/e2e/invoke":
            await self.app(scope, receive, send)
            return
        receive, head = await _peek(receive)
        with self._lock:
            first = not self.seen.invokes
            self.seen.invokes.append(_seen_invoke(scope, head))
        if mode in _ANSWERS and first:
            status, text = _ANSWERS[mode]
            await _drain(receive)
            self.seen.statuses.append(status)
            await _send_all(send, status, msgspec.json.encode({"detail": text}), "application/json")
            return
        if mode is Mode.OPEN_PATHS:
            scope = {
                **scope,
                "headers": [(k, v) for k, v in scope["headers"] if k != b"x-e2e-path"]
                + [(b"x-e2e-path", b"/v1/chat/completions")],
            }
        status, headers, body = await _capture(self.app, scope, receive)
        ctype = _ctype(headers)
        status, ctype, pieces = _rewrite_answer(mode, status, ctype, body)
        self.seen.statuses.append(status)
        await _send_pieces(send, status, ctype, pieces)


def _seen_invoke(scope: Any, head: bytes) -> SeenInvoke:
    def header(name: bytes) -> str | None:
        for k, v in scope["headers"]:
            if k.lower() == name:
                return str(v.decode("latin-1"))
        return None

    return SeenInvoke(
        header(b"x-instance-id") or "",
        header(b"x-e2e-nonce") or "",
        header(b"x-e2e-stream"),
        header(b"x-e2e-path"),
        head.startswith(V2_MAGIC),
    )


async def _peek(receive: Any) -> tuple[Any, bytes]:
    """Read the first body message; return a receive that replays it, and its bytes."""
    first = await receive()
    replayed = False

    async def replay() -> Any:
        nonlocal replayed
        if not replayed:
            replayed = True
            return first
        return await receive()

    return replay, bytes(first.get("body", b"")) if first["type"] == "http.request" else b""


def _ctype(headers: list[tuple[bytes, bytes]]) -> str:
    for k, v in headers:
        if k.lower() == b"content-type":
            return v.decode("latin-1")
    return "application/octet-stream"


def _flip(raw: bytes, offset: int) -> bytes:
    i = min(offset, len(raw) - 1)
    return raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1 :]


def _rewrite_discovery(body: bytes, mode: Mode) -> bytes:
    if mode not in _DISCOVERY_MODES:
        return body
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body
    if isinstance(doc, dict):
        if mode is Mode.EXPIRED_NONCES:
            doc["nonce_expires_in"] = 0
        elif mode is Mode.EXPIRES_AT_PAST:
            doc["nonce_expires_in"], doc["nonce_expires_at"] = 60, int(time.time()) - 3600
        elif mode is Mode.EXPIRES_AT_SOON:
            doc["nonce_expires_in"], doc["nonce_expires_at"] = 60, int(time.time()) + 2
        elif mode is Mode.PIN_DOWNGRADE and isinstance(doc.get("instances"), list):
            rows = [r for r in doc["instances"] if isinstance(r, dict) and r.get("nonces")]
            doc["instances"] = [{**rows[0], "nonces": rows[0]["nonces"][:1]}] if rows else []
    for row in doc.get("instances", []) if isinstance(doc, dict) else []:
        if not isinstance(row, dict):
            continue
        if mode is Mode.DUPLICATE_NONCES and row.get("nonces"):
            row["nonces"] = [*row["nonces"], row["nonces"][0]]
        elif mode is Mode.HIDE_V2:
            row.pop("e2e_v2", None)
        elif mode is Mode.BAD_OFFER and isinstance(row.get("e2e_v2"), dict):
            offer = row["e2e_v2"]
            offer["pk"] = base64.b64encode(b"\x00" * 10).decode()
    return msgspec.json.encode(doc)


def _events(body: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in body.split(b"\n\n") if e]


_RECORD_PREFIXES = (b'data: {"e2e":"', b'data: {"e2e_v2":"')


def _is_record(ev: bytes) -> bool:
    return ev.startswith(_RECORD_PREFIXES)


def _rewrite_answer(
    mode: Mode, status: int, ctype: str, body: bytes
) -> tuple[int, str, list[bytes]]:
    """The status, content type and body pieces to send for one invoke answer."""
    lower = body.lower()
    if status == 403 and b"nonce" in lower and mode is Mode.ACCEPT_SPENT_NONCE:
        return 200, "application/octet-stream", [b""]
    if status == 400 and b"stream_mismatch" in body and mode is Mode.IGNORE_STREAM_FLAG:
        return 200, "application/octet-stream", [b""]
    if status == 400 and mode is Mode.TAMPER_IS_500:
        return 500, ctype, [body]
    if status != 200:
        if mode is Mode.PLAIN_ERRORS:
            return status, "text/plain", [b"error " + str(status).encode()]
        return status, ctype, [body]
    if mode is Mode.TAMPER_BLOB and ctype.startswith("application/octet-stream"):
        return status, ctype, [_flip(body, 1088 + 12 + 5)]
    if not ctype.startswith("text/event-stream"):
        return status, ctype, [body]
    events = _events(body)
    records = [i for i, ev in enumerate(events) if _is_record(ev)]
    if mode is Mode.TRUNCATE:
        events = events[:2]
    elif mode is Mode.DUPLICATE_RECORD and len(records) > 1:
        events.insert(records[1], events[records[1]])
    elif mode is Mode.REORDER_RECORDS and len(records) > 2:
        a, b = records[1], records[2]
        events[a], events[b] = events[b], events[a]
    elif mode is Mode.TAMPER_RECORD and len(records) > 1:
        ev = events[records[1]]
        head, _, rest = ev.partition(b':"')
        b64 = rest[: -len(b'"}\n\n')]
        raw = _flip(base64.b64decode(b64), 12 + 1)  # past v1's record nonce; v2's first bytes
        events[records[1]] = head + b':"' + base64.b64encode(raw) + b'"}\n\n'
    elif mode is Mode.INTERLEAVE_USAGE:
        # v1 only: SPEC §8.1 lets the relay add usage events anywhere; v2 allows one copy
        v1 = _RECORD_PREFIXES[0]
        events = [x for ev in events for x in ((_USAGE_EVENT, ev) if ev.startswith(v1) else (ev,))]
    data = b"".join(events)
    if mode is Mode.SPLIT:
        return status, ctype, [data[i : i + 5] for i in range(0, len(data), 5)]
    if mode is Mode.COALESCE:
        return status, ctype, [data]
    return status, ctype, events or [b""]


async def _capture(app: ASGI, scope: Any, receive: Any) -> tuple[int, list[Any], bytes]:
    status = 500
    headers: list[Any] = []
    body = bytearray()

    async def send(message: Any) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    return status, headers, bytes(body)


async def _drain(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _send_all(send: Any, status: int, body: bytes, ctype: str) -> None:
    await _send_pieces(send, status, ctype, [body])


async def _send_pieces(send: Any, status: int, ctype: str, pieces: list[bytes]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", ctype.encode("latin-1"))],
        }
    )
    for i, piece in enumerate(pieces):
        more = i < len(pieces) - 1
        await send({"type": "http.response.body", "body": piece, "more_body": more})
