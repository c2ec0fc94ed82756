"""v2 streams over the unchanged relay: SSE framing of records (compact JSON, as the runtime's
orjson writes it; the relay re-emits every line byte for byte)::

    data: {"e2e_v2_init":"<b64 resp_init>"}\\n\\n        once, first
    data: {"e2e_v2":"<b64 record>"}\\n\\n                 HEAD, DATA..., USAGE..., END
    data: {"usage":{...}}\\n\\n                           one plaintext copy, just before END

:class:`StreamEncoderV2` is the instance side; :class:`StreamDecryptorV2` the client side
(h11-style: ``receive_data`` / ``receive_eof`` buffer, ``next_event`` returns an event or
:data:`~pqe2ee.protocol.NEED_DATA`; errors are sticky). DATA payloads come out as the
upstream byte stream, whatever the record boundaries. Callers that need all-or-nothing buffer
until :class:`~pqe2ee.protocol.v2.records.End`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from pqe2ee.backends.base import AEAD
from pqe2ee.errors import (
    ErrorCode,
    LocalProtocolError,
    PQE2EEError,
    RelayError,
    StreamError,
)
from pqe2ee.protocol._codec import b64decode, b64encode, extract_usage
from pqe2ee.protocol._events import EndOfStream, EventQueue, outer_event
from pqe2ee.protocol.sse import LineSplitter
from pqe2ee.protocol.v2.records import (
    MAX_PAYLOAD,
    RECORD_OVERHEAD,
    RESP_INIT_LEN,
    Data,
    End,
    Head,
    RecordDecryptor,
    ResponseSealer,
    State,
    UpstreamError,
    UsageUpdate,
)
from pqe2ee.protocol.v2.request import ResponseSecrets
from pqe2ee.protocol.v2.usage import check_usage_copy, usage_matches

__all__ = [
    "INIT_PREFIX",
    "RECORD_PREFIX",
    "StreamDecryptorV2",
    "StreamEncoderV2",
    "StreamEventV2",
    "UsageMismatch",
    "init_event",
    "record_event",
    "usage_copy_event",
]

INIT_PREFIX: Final = b'data: {"e2e_v2_init":"'
RECORD_PREFIX: Final = b'data: {"e2e_v2":"'
EVENT_SUFFIX: Final = b'"}\n\n'
_USAGE_SCAN_LIMIT: Final = 1 << 20


def init_event(resp_init: bytes) -> bytes:
    return INIT_PREFIX + b64encode(resp_init) + EVENT_SUFFIX


def record_event(record: bytes) -> bytes:
    return RECORD_PREFIX + b64encode(record) + EVENT_SUFFIX


def usage_copy_event(usage: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode({"usage": usage}) + b"\n\n"


# -- instance side --------------------------------------------------------------------------------


class _UsageTracker:
    """Finds the last ``data: {..."usage":{...}}`` line in the upstream SSE (bounded)."""

    __slots__ = ("_buf", "_skip", "last")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = False
        self.last: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> None:
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                if not self._skip:
                    self._buf += chunk[start:]
                    if len(self._buf) > _USAGE_SCAN_LIMIT:
                        self._buf.clear()
                        self._skip = True
                return
            if not self._skip:
                self._buf += chunk[start : nl + 1]
                usage = extract_usage(bytes(self._buf))
                if isinstance(usage, dict):
                    self.last = usage
            self._buf.clear()
            self._skip = False
            start = nl + 1


class StreamEncoderV2:
    """Turns an upstream response into the outer v2 stream (instance side).

    ``start(status, content_type)`` gives the init and HEAD events; ``feed(chunk)`` one DATA
    event per non-empty chunk (split at 16 MiB); ``usage(obj)`` an authenticated USAGE event;
    ``finish(usage=, error=)`` the plaintext usage copy (unless ``plaintext_usage=False``) and
    END. With ``track_usage`` the last ``usage`` seen in the upstream SSE is the default for
    ``finish``. Call ``finish`` on every path (``try/finally``), with ``error`` on failure.
    """

    __slots__ = ("_plaintext_usage", "_sealer", "_tracker")

    def __init__(
        self, sealer: ResponseSealer, *, track_usage: bool = True, plaintext_usage: bool = True
    ) -> None:
        if not sealer.stream:
            raise LocalProtocolError(
                "this sealer is for a single response", code=ErrorCode.INVALID_ARGUMENT
            )
        self._sealer = sealer
        self._tracker = _UsageTracker() if track_usage else None
        self._plaintext_usage = plaintext_usage

    @property
    def done(self) -> bool:
        return self._sealer.done

    def start(self, status: int = 200, content_type: str | None = "text/event-stream") -> bytes:
        return init_event(self._sealer.resp_init) + record_event(
            self._sealer.head(status, content_type)
        )

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._tracker is not None:
            self._tracker.feed(chunk)
        return b"".join(
            record_event(self._sealer.data(chunk[i : i + MAX_PAYLOAD]))
            for i in range(0, len(chunk), MAX_PAYLOAD)
        )

    def usage(self, usage: dict[str, Any]) -> bytes:
        return record_event(self._sealer.usage(usage))

    def finish(
        self, *, usage: dict[str, Any] | None = None, error: UpstreamError | None = None
    ) -> bytes:
        if usage is None and self._tracker is not None:
            usage = self._tracker.last
        copy = usage_copy_event(usage) if self._plaintext_usage and usage is not None else b""
        return copy + record_event(self._sealer.end(usage=usage, error=error))


# -- client side ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageMismatch:
    """A plaintext usage copy after END disagreed with it (``usage_check="report"`` only)."""

    copy: dict[str, Any]
    authenticated: dict[str, Any] | None


StreamEventV2 = Head | Data | UsageUpdate | End | UsageMismatch | EndOfStream


class StreamDecryptorV2(EventQueue[StreamEventV2]):
    """Client-side v2 stream state machine over SSE bytes.

    The record layer is :class:`~pqe2ee.protocol.v2.records.RecordDecryptor` (its transition
    table decides every record's fate). This layer adds the outer framing: init and record
    events, the plaintext usage copy (kept from the application; cross-checked with END:
    ``usage_mismatch``, or reported in ``End.usage_copy_matches`` with ``usage_check="report"``),
    unauthenticated relay errors before END (RelayError ``relay_error``), and bounds (one
    outer line holds at most one record of ``max_payload`` bytes plus padding).
    """

    def __init__(
        self,
        secrets: ResponseSecrets,
        *,
        aead: AEAD,
        usage_check: Literal["raise", "report"] = "raise",
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        if not secrets.stream:
            raise LocalProtocolError(
                "these secrets are for a single response", code=ErrorCode.INVALID_ARGUMENT
            )
        self._dec = RecordDecryptor(secrets, aead=aead, max_payload=max_payload)
        max_record = min(max_payload, MAX_PAYLOAD) + RECORD_OVERHEAD + 256
        self._outer = LineSplitter(max_line=max(max_record, RESP_INIT_LEN) * 4 // 3 + 64)
        self._usage_check = usage_check
        self._copy: dict[str, Any] | None = None
        self._events: collections.deque[StreamEventV2] = collections.deque()
        self._eof = False
        self._error: PQE2EEError | None = None

    @property
    def state(self) -> str:
        return "error" if self._error is not None else self._dec.state.value

    @property
    def complete(self) -> bool:
        """True once the authenticated END has been opened (and cross-checked)."""
        return self._error is None and self._dec.complete

    def receive_data(self, data: bytes) -> None:
        self._check()
        if self._eof:
            raise StreamError("data after EOF", code=ErrorCode.MALFORMED_EVENT)
        if data:
            self._guard(lambda: self._lines(self._outer.feed(bytes(data))))

    def receive_eof(self) -> None:
        if not self._mark_eof():
            return

        def finish() -> None:
            tail = self._outer.flush()
            if tail.strip():
                # The relay ends every line with "\n": an unterminated tail was cut short. It is
                # read if it still parses (a lost final newline); otherwise it is truncation.
                try:
                    self._lines([tail + b"\n"])
                except StreamError as exc:
                    if exc.code is not ErrorCode.MALFORMED_EVENT:
                        raise
                    raise StreamError(
                        "stream cut inside an event", code=ErrorCode.STREAM_TRUNCATED
                    ) from None
            self._dec.receive_eof()
            self._events.append(EndOfStream(complete=True))

        self._guard(finish)

    # -- internals ------------------------------------------------------------------------------

    def _failed(self, exc: PQE2EEError) -> None:
        super()._failed(exc)
        self._events.clear()
        self._dec.fail(exc)

    def _lines(self, lines: list[bytes]) -> None:
        for line in lines:
            if line.startswith(RECORD_PREFIX) and line.endswith(b'"}\n') and line.find(b"\\") < 0:
                self._record(line[len(RECORD_PREFIX) : -3])
                continue
            event = outer_event(line)
            if event is not None:
                self._outer_event(*event)

    def _outer_event(self, key: str, value: Any) -> None:
        if key == "e2e_v2":
            if not isinstance(value, str):
                raise StreamError("e2e_v2 must be a string", code=ErrorCode.MALFORMED_EVENT)
            self._record(value.encode("ascii", "replace"))
        elif key == "e2e_v2_init":
            if not isinstance(value, str):
                raise StreamError("e2e_v2_init must be a string", code=ErrorCode.MALFORMED_EVENT)
            self._dec.receive_init(self._b64(value.encode("ascii", "replace"), "e2e_v2_init"))
        elif key == "usage":
            if not isinstance(value, dict):
                raise StreamError("usage copy must be an object", code=ErrorCode.MALFORMED_EVENT)
            self._usage_copy(value)
        elif key in ("e2e_error", "error"):
            if not self._dec.complete:
                raise RelayError(
                    "the relay reported an error (unauthenticated)",
                    code=ErrorCode.RELAY_ERROR,
                    detail=value,
                )
        else:
            raise StreamError("unknown outer event", code=ErrorCode.MALFORMED_EVENT)

    @staticmethod
    def _b64(b64: bytes, what: str) -> bytes:
        return b64decode(b64, what=what, code=ErrorCode.MALFORMED_EVENT)  # a StreamError

    def _record(self, b64: bytes) -> None:
        if self._dec.state is not State.AWAIT_HEAD and self._dec.state is not State.BODY:
            self._dec.receive_record(b"")  # raises record_before_init / data_after_end
        ev = self._dec.receive_record(self._b64(b64, "e2e_v2 record"))
        if isinstance(ev, End):
            matches = None if self._copy is None else usage_matches(self._copy, ev.usage)
            if matches is False and self._usage_check == "raise":
                check_usage_copy(self._copy, ev.usage)
            ev = End(ev.usage, ev.error, ev.records, ev.data_bytes, self._copy, matches)
        self._events.append(ev)

    def _usage_copy(self, copy: dict[str, Any]) -> None:
        self._copy = copy
        end = self._dec.end
        if end is None:
            return
        if not usage_matches(copy, end.usage):
            if self._usage_check == "raise":
                check_usage_copy(copy, end.usage)
            self._events.append(UsageMismatch(copy, end.usage))
