"""Fault injection in front of the real ``pqe2ee relay``, for the transport tests.

:class:`FaultyRelay` is an ASGI wrapper around the real relay app. ``inject(fault, times=N)``
arms a fault for the next N ``POST /e2e/invoke`` calls (faults queue up in order); everything
else passes through untouched. What each fault does:

=================  ===============================================================================
``NONCE_403``      the invoke goes to the real relay with a nonce that was never issued, so the
                   relay itself answers 403 "Invalid, expired, or already-used nonce"
``PATH_403``       the invoke goes through with ``X-E2E-Path: /v1/embeddings``; the real instance
                   refuses the path and the real relay answers 403 "Instance returned status 403"
``GONE_410``       answered here: 410 "Instance is no longer active" (the relay's text)
``BUSY_429``       answered here: 429 "Instance is at maximum capacity, try again later"
``KEY_502``        answered here: 502 "Instance requires key exchange, try a different instance"
``TRUNCATE``       the outer stream ends cleanly after ``at`` events (init included)
``RESET``          after ``at`` events the body iterator raises, so uvicorn aborts the connection
``DUPLICATE``      outer ``e2e`` record number ``at`` (0-based, records only) is sent twice
``TAMPER``         one bit inside the ciphertext of record ``at`` is flipped (base64 re-encoded)
``BAD_BASE64``     record ``at`` carries invalid base64
``TAMPER_BLOB``    a non-stream 200 blob gets one bit flipped inside its ciphertext
``REMOTE_ERROR``   after ``at`` events an ``e2e_error`` event is sent and the stream ends (as an
                   instance does when its engine breaks off)
``TRICKLE``        the answer's headers go at once, its body one byte every ``trickle_interval``
                   seconds (a relay that keeps a stream open without ever finishing it)
=================  ===============================================================================

Records that split and coalesce lines cannot be made here (the relay cannot re-seal): the
instance makes them. :class:`RechunkingEncoder` replaces the instance's one-record-per-line
:class:`~pqe2ee.protocol.StreamEncoder` with records of cycling sizes (1 byte to 1 KiB), as a
custom Chutes cord that yields arbitrary chunks would; install it with
``monkeypatch.setattr(pqe2ee.server.instance, "StreamEncoder", RechunkingEncoder)``.

The wrapper also counts what it sees (``invokes``, ``discoveries``, ``model_listings``), the
discoveries answered (``discoveries_done``) and the most discoveries of one chute that were
ever in flight at once (``max_parallel_discoveries``). ``hold_discoveries``: an event that
holds every discovery (counted, not yet answered) until it is set, for 10 s at most.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from pqe2ee.conformance.rechunk import RechunkingEncoder
from pqe2ee.protocol import StreamSealer
from servers import serve_chain

__all__ = [
    "Fault",
    "FaultyRelay",
    "FaultyStack",
    "InjectedReset",
    "RechunkingEncoder",
    "serve_faulty_stack",
]


class Fault(enum.Enum):
    NONCE_403 = "nonce_403"
    PATH_403 = "path_403"
    GONE_410 = "gone_410"
    BUSY_429 = "busy_429"
    KEY_502 = "key_502"
    TRUNCATE = "truncate"
    RESET = "reset"
    DUPLICATE = "duplicate"
    TAMPER = "tamper"
    BAD_BASE64 = "bad_base64"
    TAMPER_BLOB = "tamper_blob"
    REMOTE_ERROR = "remote_error"
    TRICKLE = "trickle"


_ANSWERED_HERE = {
    Fault.GONE_410: (410, "Instance is no longer active"),
    Fault.BUSY_429: (429, "Instance is at maximum capacity, try again later"),
    Fault.KEY_502: (502, "Instance requires key exchange, try a different instance"),
}
_RECORD_PREFIX = b'data: {"e2e":"'
_REMOTE_ERROR_EVENT = StreamSealer.error_event(
    {"code": "upstream_error", "message": "the engine's stream broke"}
)


class InjectedReset(Exception):
    """Raised inside the response body on purpose: uvicorn aborts the connection."""


@dataclass
class _Plan:
    fault: Fault
    times: int
    at: int


@dataclass
class FaultyRelay:
    """ASGI wrapper that injects :class:`Fault` s into the next invokes of the wrapped relay."""

    app: Any
    invokes: int = 0
    discoveries: int = 0
    model_listings: int = 0
    injected: list[Fault] = field(default_factory=list)
    instance_ids: list[str] = field(default_factory=list)  # X-Instance-Id of every invoke
    max_parallel_discoveries: int = 0
    discoveries_done: int = 0
    hold_discoveries: threading.Event | None = None
    trickle_interval: float = 2.0
    _plans: deque[_Plan] = field(default_factory=deque)
    _in_flight: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(self, fault: Fault, *, times: int = 1, at: int = 2) -> None:
        with self._lock:
            self._plans.append(_Plan(fault, times, at))

    def reset(self) -> None:
        """Forget armed faults and zero the counters."""
        with self._lock:
            self._plans.clear()
            self.injected.clear()
            self.instance_ids.clear()
            self.invokes = self.discoveries = self.model_listings = 0
            self.max_parallel_discoveries = self.discoveries_done = 0
            self.hold_discoveries = None

    @property
    def armed(self) -> int:
        with self._lock:
            return sum(p.times for p in self._plans)

    def _take(self, scope: Any) -> _Plan | None:
        with self._lock:
            self.invokes += 1
            headers = dict(scope["headers"])
            self.instance_ids.append(headers.get(b"x-instance-id", b"").decode("latin-1"))
            if not self._plans:
                return None
            plan = self._plans[0]
            plan.times -= 1
            if plan.times <= 0:
                self._plans.popleft()
            self.injected.append(plan.fault)
            return plan

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path.startswith("/e2e/instances/"):
            await self._discovery(path, scope, receive, send)
            return
        if path == "/v1/models":
            with self._lock:
                self.model_listings += 1
        if path != "/e2e/invoke":
            await self.app(scope, receive, send)
            return
        plan = self._take(scope)
        if plan is None:
            await self.app(scope, receive, send)
        elif plan.fault in _ANSWERED_HERE:
            status, detail = _ANSWERED_HERE[plan.fault]
            await _drain(receive)
            await _answer(send, status, detail)
        elif plan.fault is Fault.NONCE_403:
            scope = _with_header(scope, b"x-e2e-nonce", b"never-issued-nonce-0000000000000")
            await self.app(scope, receive, send)
        elif plan.fault is Fault.PATH_403:
            scope = _with_header(scope, b"x-e2e-path", b"/v1/embeddings")
            await self.app(scope, receive, send)
        elif plan.fault is Fault.TAMPER_BLOB:
            await self.app(scope, receive, _BlobTamperer(send))
        elif plan.fault is Fault.TRICKLE:
            await self.app(scope, receive, _Trickler(send, self.trickle_interval))
        else:
            reframer = _Reframer(send, plan.fault, plan.at)
            try:
                await self.app(scope, receive, reframer)
            except BaseException as exc:
                if reframer.reset_sent and _contains(exc, InjectedReset):
                    raise InjectedReset("connection reset injected by tests/faults.py") from None
                raise

    async def _discovery(self, path: str, scope: Any, receive: Any, send: Any) -> None:
        chute = path.rsplit("/", 1)[-1]
        with self._lock:
            self.discoveries += 1
            n = self._in_flight[chute] = self._in_flight.get(chute, 0) + 1
            self.max_parallel_discoveries = max(self.max_parallel_discoveries, n)
        try:
            hold = self.hold_discoveries
            for _ in range(2000):
                if hold is None or hold.is_set():
                    break
                await asyncio.sleep(0.005)
            await self.app(scope, receive, send)
        finally:
            with self._lock:
                self._in_flight[chute] -= 1
                self.discoveries_done += 1


def _contains(exc: BaseException, kind: type[BaseException]) -> bool:
    if isinstance(exc, kind):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_contains(e, kind) for e in exc.exceptions)
    return exc.__cause__ is not None and _contains(exc.__cause__, kind)


def _with_header(scope: Any, name: bytes, value: bytes) -> Any:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != name]
    headers.append((name, value))
    return {**scope, "headers": headers}


async def _drain(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _answer(send: Any, status: int, detail: str) -> None:
    body = msgspec.json.encode({"detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _flip(raw: bytes, offset: int) -> bytes:
    i = min(offset, len(raw) - 1)
    return raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1 :]


class _BlobTamperer:
    """Buffers a 200 ``application/octet-stream`` body and flips one ciphertext bit."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self._active = False
        self._buf = bytearray()

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            self._active = message["status"] == 200 and headers.get(
                b"content-type", b""
            ).startswith(b"application/octet-stream")
            await self._send(message)
            return
        if not self._active or message["type"] != "http.response.body":
            await self._send(message)
            return
        self._buf += message.get("body", b"")
        if message.get("more_body", False):
            return
        body = _flip(bytes(self._buf), 1088 + 12 + 5)  # inside the ciphertext, past kem ct+nonce
        await self._send({"type": "http.response.body", "body": body, "more_body": False})


class _Trickler:
    """Sends the response start at once and the body one byte per ``interval`` seconds."""

    def __init__(self, send: Any, interval: float) -> None:
        self._send = send
        self._interval = interval

    async def __call__(self, message: Any) -> None:
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        import anyio

        body, more = message.get("body", b""), message.get("more_body", False)
        for i in range(len(body)):
            last = i == len(body) - 1
            await self._send(
                {
                    "type": "http.response.body",
                    "body": body[i : i + 1],
                    "more_body": more or not last,
                }
            )
            await anyio.sleep(self._interval)
        if not body:
            await self._send(message)


class _Reframer:
    """Re-frames an outer SSE stream event by event and applies one stream fault."""

    def __init__(self, send: Any, fault: Fault, at: int) -> None:
        self._send = send
        self._fault = fault
        self._at = at
        self._active = False
        self._buf = b""
        self._events = 0
        self._records = 0
        self._finished = False
        self.reset_sent = False

    async def __call__(self, message: Any) -> None:
        if self._finished:
            return  # swallow what the relay still sends after an injected end
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            self._active = message["status"] == 200 and headers.get(
                b"content-type", b""
            ).startswith(b"text/event-stream")
            await self._send(message)
            return
        if not self._active or message["type"] != "http.response.body":
            await self._send(message)
            return
        self._buf += message.get("body", b"")
        more = message.get("more_body", False)
        *events, self._buf = self._buf.split(b"\n\n")
        out: list[bytes] = []
        for ev in events:
            out.append(self._event(ev + b"\n\n"))
            if self._finished:
                break
        if self._finished:
            if self._fault is Fault.RESET:
                if out:
                    await self._send(
                        {"type": "http.response.body", "body": b"".join(out), "more_body": True}
                    )
                self.reset_sent = True
                raise InjectedReset("connection reset injected by tests/faults.py")
            await self._send(
                {"type": "http.response.body", "body": b"".join(out), "more_body": False}
            )
            return
        if not more:
            out.append(self._buf)
            self._buf = b""
        await self._send({"type": "http.response.body", "body": b"".join(out), "more_body": more})

    def _event(self, ev: bytes) -> bytes:
        """The bytes to send for one outer event (``_finished`` set: the stream ends after)."""
        if self._fault in (Fault.TRUNCATE, Fault.RESET) and self._events >= self._at:
            self._finished = True
            return b""
        if self._fault is Fault.REMOTE_ERROR and self._events >= self._at:
            self._finished = True
            return _REMOTE_ERROR_EVENT
        self._events += 1
        if not ev.startswith(_RECORD_PREFIX):
            return ev
        index = self._records
        self._records += 1
        if index != self._at:
            return ev
        if self._fault is Fault.DUPLICATE:
            return ev + ev
        b64 = ev[len(_RECORD_PREFIX) : -len(b'"}\n\n')]
        if self._fault is Fault.TAMPER:
            raw = _flip(base64.b64decode(b64), 12 + 1)  # past the 12-byte record nonce
            return _RECORD_PREFIX + base64.b64encode(raw) + b'"}\n\n'
        if self._fault is Fault.BAD_BASE64:
            return _RECORD_PREFIX + b"!!" + b64[2:] + b'"}\n\n'
        return ev


@dataclass
class FaultyStack:
    engine: str
    engine_app: Any
    instances: list[str]
    relay: str
    faults: FaultyRelay

    def engine_stats(self) -> dict[str, int]:
        import httpx2

        return dict(httpx2.get(self.engine + "/dev/stats", timeout=10).json())


@contextlib.contextmanager
def serve_faulty_stack(
    n_instances: int = 2,
    *,
    api_keys: Sequence[str],
    instance_kw: dict[str, Any] | None = None,
    **relay_kw: Any,
) -> Iterator[FaultyStack]:
    """dev-engine -> ``n_instances`` real instances -> real relay -> :class:`FaultyRelay`.

    The instances serve v1 only (``v2=False`` unless ``instance_kw`` says otherwise): every
    fault here edits v1 records, and clients prefer v2 where it is offered. The v2 faults are
    in tests/test_v2_client.py.
    """
    with serve_chain(
        n_instances,
        api_keys=api_keys,
        instance_kw={"v2": False, **(instance_kw or {})},
        wrap_relay=FaultyRelay,
        **relay_kw,
    ) as chain:
        yield FaultyStack(
            chain.engine, chain.engine_app, chain.instances, chain.relay, chain.relay_app
        )
