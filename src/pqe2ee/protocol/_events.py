"""Events both wire profiles hand out, the ``NEED_DATA`` sentinel, and the decryptors' queue.

The stream decryptors (:class:`~pqe2ee.protocol.v1.stream.StreamDecryptor`,
:class:`~pqe2ee.protocol.v2.stream.StreamDecryptorV2`) follow h11: ``receive_data`` buffers,
``next_event()`` returns an event or :data:`NEED_DATA` (:class:`EventQueue`). The engine's own
stream comes out the same way under either profile - :class:`InnerEvent` per SSE event, then
the authenticated :class:`Done` - and :class:`~pqe2ee.protocol.response.ResponseDecoder` hands
those on. Profile-specific events live with their profile. :func:`outer_event` reads one line
of the relay's outer stream the same way for both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

import msgspec

from pqe2ee.errors import ErrorCode, PQE2EEError, StreamError
from pqe2ee.protocol._codec import json_decode
from pqe2ee.protocol.sse import SSEEvent, _set_data, _set_event, _set_id, _set_raw

__all__ = [
    "NEED_DATA",
    "Done",
    "EndOfStream",
    "EventQueue",
    "InnerEvent",
    "NeedData",
    "data_event",
    "inner_event",
    "outer_event",
]

E = TypeVar("E")


class NeedData:
    """The type of :data:`NEED_DATA` (one instance)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event()`` when no event is complete: feed more bytes (or EOF).
NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class InnerEvent:
    """A decrypted, authenticated SSE event of the engine's stream. ``raw`` is its exact bytes
    (``event.raw``, kept as a field: a stream read as bytes reads it once per event)."""

    event: SSEEvent
    raw: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw", self.event.raw)

    @property
    def data(self) -> str:
        return self.event.data


@dataclass(frozen=True, slots=True)
class Done:
    """The inner ``data: [DONE]`` event (authenticated). ``raw`` is its exact bytes."""

    raw: bytes


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """Clean end: EOF after the inner ``[DONE]`` (or after a reported remote error)."""

    complete: bool


# InnerEvent(ev) without the frozen dataclass's object.__setattr__ (see sse._sse_event): a
# decryptor makes one per record.
_new = object.__new__
_set_inner_event, _set_inner_raw = (InnerEvent.__dict__[name].__set__ for name in ("event", "raw"))


def inner_event(event: SSEEvent) -> InnerEvent:
    """``InnerEvent(event)``, faster."""
    ev: InnerEvent = _new(InnerEvent)
    _set_inner_event(ev, event)
    _set_inner_raw(ev, event.raw)
    return ev


def data_event(data: str, id: str | None, raw: bytes, event: str | None = None) -> InnerEvent:
    """``InnerEvent(SSEEvent(data, event, id, raw))`` in one call: the event of one ``data``
    line, built as the v1 decryptor's per-record path needs it (one frame per event)."""
    sse: SSEEvent = _new(SSEEvent)  # sse._sse_event, inlined
    _set_data(sse, data)
    _set_event(sse, event)
    _set_id(sse, id)
    _set_raw(sse, raw)
    ev: InnerEvent = _new(InnerEvent)
    _set_inner_event(ev, sse)
    _set_inner_raw(ev, raw)
    return ev


#: Outer SSE fields that carry nothing for either profile.
_IGNORED_OUTER_FIELDS: Final = frozenset((b"event", b"id", b"retry"))


def outer_event(line: bytes) -> tuple[str, Any] | None:
    """One line of the relay's outer stream (its line break may be included), the slow way:
    ``(key, value)`` of the one-member JSON object a ``data:`` line carries, or ``None`` for a
    line that carries nothing (blank, a comment, ``event:``/``id:``/``retry:``, an outer
    ``[DONE]``: part of neither profile, and not authenticated). Anything else is a
    :class:`~pqe2ee.errors.StreamError` (``malformed_event``). The decryptors take the
    compact form of their record lines on a fast path before calling this."""
    body = line.rstrip(b"\r\n")
    if not body or body.startswith(b":"):
        return None
    if not body.startswith(b"data:"):
        if body.partition(b":")[0] in _IGNORED_OUTER_FIELDS:
            return None
        raise StreamError("outer line is not an SSE data line", code=ErrorCode.MALFORMED_EVENT)
    payload = body[5:].strip()
    if payload == b"[DONE]":
        return None
    try:
        obj = json_decode(payload)  # nesting bounded; bad UTF-8 is a DecodeError too
    except msgspec.DecodeError:
        raise StreamError("outer event is not valid JSON", code=ErrorCode.MALFORMED_EVENT) from None
    if not isinstance(obj, dict) or len(obj) != 1:
        raise StreamError(
            "outer event must be an object with one key", code=ErrorCode.MALFORMED_EVENT
        )
    ((key, value),) = obj.items()
    return key, value


class EventQueue(Generic[E]):
    """What the stream decryptors share: decoded events wait in ``_events``; a fault is kept in
    ``_error`` (:meth:`_failed`, extended by each decryptor) and raised by every later call
    (errors are sticky); ``_eof`` says EOF was received."""

    _events: deque[E]
    _error: PQE2EEError | None
    _eof: bool

    def next_event(self) -> E | NeedData:
        """The next event, or :data:`NEED_DATA`."""
        if self._error is not None:
            raise self._error
        events = self._events
        return events.popleft() if events else NEED_DATA

    def events(self) -> list[E]:
        """Drain every pending event."""
        if self._error is not None:
            raise self._error
        out = list(self._events)
        self._events.clear()
        return out

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _mark_eof(self) -> bool:
        """On EOF: the sticky error, else False when EOF was already received."""
        self._check()
        if self._eof:
            return False
        self._eof = True
        return True

    def _guard(self, fn: Callable[[], None]) -> None:
        """Run ``fn``; a pqe2ee error fails the decryptor for good. Any other exception (a
        hostile input reaching a bug) fails it too, as a :class:`StreamError`: the stream can
        never go on to report itself complete after a fault."""
        try:
            fn()
        except PQE2EEError as exc:
            self._failed(exc)
            raise
        except Exception as exc:
            raise self._unexpected(exc) from exc

    def _unexpected(self, exc: Exception) -> StreamError:
        """Fail the decryptor on a non-pqe2ee exception; the typed error to raise instead."""
        err = StreamError(
            f"stream decoder failed ({type(exc).__name__})", code=ErrorCode.MALFORMED_EVENT
        )
        self._failed(err)
        return err

    def _failed(self, exc: PQE2EEError) -> None:
        self._error = exc
