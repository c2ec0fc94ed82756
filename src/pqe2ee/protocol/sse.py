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
        if b"\n" not in data:
            self._buf += data
            if len(self._buf) > self._max:
                raise LimitExceeded(f"line longer than {self._max} bytes")
            return []
        if self._buf:
            data = bytes(self._buf) + data
        parts = data.split(b"\n")
        tail = parts.pop()
        lines = [p + b"\n" for p in parts]
        if any(len(line) > self._max for line in lines) or len(tail) > self._max:
            raise LimitExceeded(f"line longer than {self._max} bytes")
        self._buf = bytearray(tail)
        return lines

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
        out: list[SSEEvent] = []
        for line in self._lines.feed(data):
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
        return out

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
        if self._lines.pending:
            return False
        return self._data == [data]

    def _line(self, line: bytes) -> SSEEvent | None:
        self._raw.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes > self._max_event:
            raise LimitExceeded(f"SSE event longer than {self._max_event} bytes")
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
        ev = SSEEvent(
            data="\n".join(self._data), event=self._event, id=self._id, raw=b"".join(self._raw)
        )
        self._raw.clear()
        self._pending_bytes = 0
        self._data = []
        self._event = None
        return ev


def is_done(event: SSEEvent) -> bool:
    return event.data == _DONE
