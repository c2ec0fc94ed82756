"""Sans-IO Server-Sent Events helpers: a bounded line splitter and an event parser.

Both take bytes split at arbitrary points and keep memory bounded: a line (or an event) longer
than the configured limit raises :class:`~pqe2ee.errors.LimitExceeded` instead of growing the
buffer without end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from pqe2ee.errors import ErrorCode, LimitExceeded, StreamError

__all__ = ["LineSplitter", "SSEEvent", "SSEParser"]


class LineSplitter:
    """Splits a byte stream into lines, each returned *with* its terminating ``\\n``.

    ``feed`` returns the complete lines; ``flush`` returns the unterminated tail (possibly
    empty). Lines longer than ``max_line`` bytes raise LimitExceeded.
    """

    __slots__ = ("_buf", "_max")

    def __init__(self, max_line: int) -> None:
        self._buf = bytearray()
        self._max = max_line

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        if not buf and data.endswith(b"\n") and len(data) <= self._max and b"\r" not in data:
            # Whole lines, none over the bound, nothing pending (the usual chunk: an event, a
            # record; tested first, it needs no search for a "\n"): without a "\r", the lines
            # split at "\n" and keep it, the same as the general split below gives.
            return data.splitlines(keepends=True)
        if data.find(b"\n") < 0:  # (find: bytes `in` raises and clears a TypeError per call)
            buf += data  # at most one chunk past the bound before refusing
            if len(buf) > self._max:
                raise LimitExceeded(f"line longer than {self._max} bytes")
            return []
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        parts = data.split(b"\n")
        tail = parts.pop()
        if len(data) > self._max and (
            len(tail) > self._max or any(len(p) >= self._max for p in parts)
        ):
            raise LimitExceeded(f"line longer than {self._max} bytes")
        buf += tail
        return [p + b"\n" for p in parts]

    def peek(self) -> bytes:
        """The unterminated tail, left in place."""
        return bytes(self._buf)

    def flush(self) -> bytes:
        tail = bytes(self._buf)
        self._buf.clear()
        return tail

    @property
    def pending(self) -> int:
        return len(self._buf)


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched SSE event. ``raw`` is the exact bytes it came from, blank line included."""

    data: str
    event: str | None
    id: str | None
    raw: bytes


# SSEEvent(...) sets each field with object.__setattr__, the price of frozen=True. Setting the
# slots through their descriptors builds the same object in about half the time: the parser
# makes one per event, the stream decryptor one per record.
_new = object.__new__
_set_data, _set_event, _set_id, _set_raw = (
    SSEEvent.__dict__[name].__set__ for name in ("data", "event", "id", "raw")
)


def _sse_event(data: str, event: str | None, id: str | None, raw: bytes) -> SSEEvent:
    """``SSEEvent(data, event, id, raw)``, faster."""
    ev: SSEEvent = _new(SSEEvent)
    _set_data(ev, data)
    _set_event(ev, event)
    _set_id(ev, id)
    _set_raw(ev, raw)
    return ev


_DONE: Final = "[DONE]"


class SSEParser:
    """Incremental SSE parser (WHATWG HTML "event stream" rules; ``\\n``/``\\r\\n`` line ends).

    Events with no ``data`` field are not dispatched (as the standard says), but their bytes are
    kept in the next event's ``raw`` so nothing is lost when forwarding.
    """

    __slots__ = ("_data", "_event", "_id", "_lines", "_max_event", "_pending_bytes", "_raw")

    def __init__(self, max_event: int) -> None:
        self._lines = LineSplitter(max_event)
        self._max_event = max_event
        self._raw: list[bytes] = []
        self._pending_bytes = 0
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None

    def feed(self, data: bytes) -> list[SSEEvent]:
        # Fast paths for what a record usually is, with the same results as the general path
        # below: one whole line (vLLM's per-line records "data: ...\n" and "\n") or, nothing
        # being pending, whole single-line events "data: ...\n\n" (a record per event, or the
        # events of one decrypted read that the proxy translates).
        n = len(data)
        if n and n <= self._max_event and not self._lines._buf:  # nothing pending
            nl = data.find(b"\n")
            if nl == n - 1:
                ev = self._line(data)
                return [] if ev is None else [ev]
            if not self._raw and data.endswith(b"\n\n") and data.startswith(b"data: "):
                if nl == n - 2 and data[n - 3] != 0x0D:  # one event (a record): inline
                    try:
                        text = data[6:-2].decode("utf-8")
                    except UnicodeDecodeError:
                        raise StreamError(
                            "stream text is not valid UTF-8", code=ErrorCode.INVALID_UTF8
                        ) from None
                    return [_sse_event(text, None, self._id, data)]
                events = self._data_events(data)
                if events is not None:
                    return events
        out: list[SSEEvent] = []
        for line in self._lines.feed(data):
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
        return out

    def _data_events(self, data: bytes) -> list[SSEEvent] | None:
        """``data`` as whole events of one ``data: `` line each (what :meth:`_line` and
        :meth:`_dispatch` make of them), or None - nothing consumed - when it is anything else:
        another field, a line ending in "\r", a blank line too many."""
        out: list[SSEEvent] = []
        ident = self._id
        for block in data[:-2].split(b"\n\n"):
            if not block.startswith(b"data: ") or b"\n" in block or block.endswith(b"\r"):
                return None
            try:
                text = block[6:].decode("utf-8")
            except UnicodeDecodeError:
                raise StreamError(
                    "stream text is not valid UTF-8", code=ErrorCode.INVALID_UTF8
                ) from None
            out.append(_sse_event(text, None, ident, block + b"\n\n"))
        return out

    @property
    def last_event_id(self) -> str | None:
        """The id that events get (the last ``id`` field seen)."""
        return self._id

    @property
    def has_partial(self) -> bool:
        """True when bytes of an undispatched event are buffered."""
        return bool(self._raw) or self._lines.pending > 0

    def buffered(self) -> bytes:
        """Every byte fed but not yet returned in an event (dataless lines and the line tail)."""
        return b"".join(self._raw) + self._lines.peek()

    def partial_is(self, data: str) -> bool:
        """True when the buffered, undispatched event carries exactly ``data`` (and nothing else
        is pending) - used to accept a stream cut right after ``data: [DONE]\\n``."""
        if self._lines.pending or self._data != [data]:
            return False
        # ... and that data line is the last line: nothing (not even an ignored field) after it
        return self._raw[-1].startswith(b"data:")

    def _line(self, line: bytes) -> SSEEvent | None:
        self._raw.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes > self._max_event:
            raise LimitExceeded(f"SSE event longer than {self._max_event} bytes")
        # Fast paths for the two lines every event stream is made of (same result as below).
        if line == b"\n":
            return self._dispatch()
        if line.startswith(b"data: ") and not line.endswith(b"\r\n"):
            try:
                self._data.append(line[6:-1].decode("utf-8"))
            except UnicodeDecodeError:
                raise StreamError(
                    "stream text is not valid UTF-8", code=ErrorCode.INVALID_UTF8
                ) from None
            return None
        body = line[:-1]
        if body.endswith(b"\r"):
            body = body[:-1]
        if not body:
            return self._dispatch()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise StreamError(
                "stream text is not valid UTF-8", code=ErrorCode.INVALID_UTF8
            ) from None
        if text.startswith(":"):
            return None
        name, sep, value = text.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value
        # "retry" and unknown fields are ignored, as the standard says.
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            # Nothing to dispatch; keep the raw bytes for the next event, reset the type.
            self._event = None
            return None
        data = self._data
        ev = _sse_event(
            data[0] if len(data) == 1 else "\n".join(data),
            self._event,
            self._id,
            b"".join(self._raw),
        )
        self._raw.clear()
        self._pending_bytes = 0
        self._data = []
        self._event = None
        return ev


def is_done(event: SSEEvent) -> bool:
    return event.data == _DONE
