"""One sans-IO decoder for the answer to an encrypted request, whatever its profile and shape.

A transport reads the relay's body and hands the bytes over; :class:`ResponseDecoder` hands back
what the caller gets (python-hyper style: bytes in, the events they complete out, as h2's
``receive_data``; nothing is read or written here)::

    decoder = ResponseDecoder(key, aead=aead, stream=sealed.stream)
    for chunk in body:
        for event in decoder.feed(chunk):
            ...
    for event in decoder.eof():             # the last one is the authenticated Done
        ...
    decoder.answer                          # or, instead of events: a whole answer

``key`` says the profile: a v1 response key (:class:`~pqe2ee.backends.base.KEMPrivateKey`) or
the :class:`~pqe2ee.protocol.v2.ResponseSecrets` of a v2 request. Two outputs:

* events (:data:`ResponseEvent`): :class:`~pqe2ee.protocol.InnerEvent` per SSE event of the
  engine's stream, then the authenticated :class:`~pqe2ee.protocol.Done` (streamed answers,
  either profile: the same bytes the engine wrote);
* :attr:`ResponseDecoder.answer`, an :class:`Opened` once EOF completed a whole answer: the
  decrypted body of a single response, or, for a v2 stream whose authenticated HEAD is not
  2xx, the engine's error body (read to the authenticated END).

v1: plaintext usage events go to ``on_usage`` as they arrive; a reported ``e2e_error`` raises
:class:`~pqe2ee.errors.RemoteError` (:func:`remote_error`). v2: every record is checked as it
arrives (:class:`~pqe2ee.protocol.v2.StreamDecryptorV2`); the inner ``data: [DONE]`` is held back
until the authenticated END (a caller never sees a complete stream that END did not vouch for;
END without an inner ``[DONE]`` still ends it, with an empty :class:`Done`); after a non-2xx
HEAD the DATA is the engine's error body, kept whole (at most ``max_body`` bytes); END's usage
(the relay's copy once END cross-checked it) goes to ``on_usage``; an upstream failure reported
by END raises ``upstream_error``. :attr:`ResponseDecoder.head` is the authenticated HEAD once
read (a transport waits for it before handing a v2 stream over).

Faults raise typed pqe2ee errors from :meth:`~ResponseDecoder.feed` / :meth:`~ResponseDecoder.eof`
and stick. A v2 fault keeps the events decoded before it in the same bytes, however they were
chunked: :meth:`~ResponseDecoder.events` returns them once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from pqe2ee.backends.base import AEAD, KEMPrivateKey
from pqe2ee.errors import ErrorCode, LimitExceeded, PQE2EEError, RemoteError, StreamError
from pqe2ee.protocol._events import NEED_DATA, Done, EndOfStream, InnerEvent
from pqe2ee.protocol.sse import SSEParser
from pqe2ee.protocol.v1.envelope import DEFAULT_MAX_PLAINTEXT, open_response
from pqe2ee.protocol.v1.stream import (
    DEFAULT_MAX_RECORD,
    RemoteErrorEvent,
    StreamDecryptor,
    Usage,
)
from pqe2ee.protocol.v2.records import Data, End, Head, ResponseV2, UpstreamError, open_response_v2
from pqe2ee.protocol.v2.request import ResponseSecrets
from pqe2ee.protocol.v2.stream import StreamDecryptorV2

__all__ = [
    "DEFAULT_MAX_BODY",
    "OnUsage",
    "Opened",
    "ResponseDecoder",
    "ResponseEvent",
    "error_body",
    "open_answer",
    "opened_v2",
    "remote_error",
    "upstream_error",
]

#: Default bound of a v2 engine error body read whole after a non-2xx HEAD.
DEFAULT_MAX_BODY: Final = DEFAULT_MAX_PLAINTEXT

OnUsage = Callable[[Any], object]


@dataclass(frozen=True, slots=True)
class Opened:
    """A decrypted whole answer: the engine's bytes exactly as produced, with the engine's
    status (200, or the status of an engine error sealed by the instance) and content type
    (v2 authenticates both; v1 answers are JSON). ``version`` is the wire profile used."""

    status: int
    body: bytes
    content_type: str = "application/json"
    version: int = 1


ResponseEvent = InnerEvent | Done


# -- errors and error bodies -----------------------------------------------------------------


def remote_error(error: Any) -> RemoteError:
    """A :class:`RemoteError` for an ``e2e_error`` / ``error`` event of an encrypted stream.

    The message names only the error's ``type``/``code`` (short strings); the whole object is
    kept in ``detail``. ``status`` is taken from an integer ``status``/``code`` field if any.
    """
    label = ""
    status: int | None = None
    if isinstance(error, dict):
        for field in ("type", "code"):
            value = error.get(field)
            if isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable():
                label = f" ({value})"
                break
        for field in ("status", "status_code", "code"):
            value = error.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
                status = value
                break
    return RemoteError(
        f"the far side reported an error mid-stream{label}",
        code=ErrorCode.REMOTE_ERROR,
        status=status,
        detail=error,
    )


def upstream_error(error: UpstreamError) -> RemoteError:
    """END reported an upstream failure (authenticated)."""
    label = error.type if 0 < len(error.type) <= 64 and error.type.isprintable() else "error"
    return RemoteError(
        f"the engine failed ({label})",
        code=ErrorCode.UPSTREAM_ERROR,
        status=error.status,
        detail={"type": error.type, "message": error.message},
    )


def error_body(error: UpstreamError) -> bytes:
    """END's upstream error as an OpenAI-shaped error body."""
    return msgspec.json.encode(
        {
            "error": {
                "message": error.message,
                "type": error.type,
                "code": ErrorCode.UPSTREAM_ERROR.value,
            }
        }
    )


def opened_v2(response: ResponseV2) -> Opened:
    """An opened v2 single response as the caller's answer: the authenticated status, body and
    content type. A non-2xx answer keeps the engine's error body (END's error as the body when
    there is none); a 2xx answer whose END reports an upstream failure becomes that error with
    its status (502 when it gave none), never a partial body presented as an answer."""
    error = response.error
    if error is None or not 200 <= response.status < 300:
        if not response.body and error is not None:
            return Opened(response.status, error_body(error), "application/json", 2)
        ctype = response.content_type or "application/json"
        return Opened(response.status, response.body, ctype, 2)
    status = error.status if error.status is not None and 400 <= error.status <= 599 else 502
    return Opened(status, error_body(error), "application/json", 2)


def open_answer(
    key: KEMPrivateKey | ResponseSecrets, data: bytes, *, aead: AEAD, status: int = 200
) -> Opened:
    """A whole single answer at once: what :class:`ResponseDecoder` (``stream=False``) gives
    for ``data`` followed by EOF. ``status`` is the HTTP status of a v1 answer."""
    if isinstance(key, ResponseSecrets):
        return opened_v2(open_response_v2(data, key, aead=aead))
    return Opened(status, open_response(data, key, aead=aead))


# -- the decoder -----------------------------------------------------------------------------


class ResponseDecoder:
    """Bytes of one E2EE answer in; :data:`ResponseEvent` s and the whole :attr:`answer` out
    (see the module docstring).

    ``stream``: the request asked for a stream (the sealed request's flag). ``status``: the
    HTTP status of a single answer being opened (v1: 200, or the status of a sealed engine
    error; v2 single answers carry their own). ``max_body`` bounds a single answer's bytes and a
    v2 engine error body.
    """

    __slots__ = ("_error", "_impl", "_kept", "answer", "version")

    def __init__(
        self,
        key: KEMPrivateKey | ResponseSecrets,
        *,
        aead: AEAD,
        stream: bool,
        status: int = 200,
        on_usage: OnUsage | None = None,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        self._impl: _Single | _V1Stream | _V2Stream
        if not stream:
            self._impl = _Single(key, aead, status, max_body)
        elif isinstance(key, ResponseSecrets):
            self._impl = _V2Stream(key, aead, on_usage, max_body)
        else:
            self._impl = _V1Stream(key, aead, on_usage)
        self.version = 2 if isinstance(key, ResponseSecrets) else 1
        self._kept: list[ResponseEvent] = []
        self._error: PQE2EEError | None = None
        #: The whole answer, once :meth:`eof` completed one (single answers; v2 error answers).
        self.answer: Opened | None = None

    @property
    def head(self) -> Head | None:
        """v2 streams: the authenticated HEAD once it was read (else ``None``)."""
        impl = self._impl
        return impl.head if isinstance(impl, _V2Stream) else None

    def feed(self, data: bytes) -> list[ResponseEvent]:
        """Bytes of the body, split anywhere; returns the events they complete."""
        if self._error is not None:
            raise self._error
        out: list[ResponseEvent] = []
        try:
            self._impl.feed(data, out)
        except PQE2EEError as exc:
            self._error, self._kept = exc, out
            raise
        return out

    def eof(self) -> list[ResponseEvent]:
        """The body ended: the last events (or sets :attr:`answer`); raises when that cuts
        the answer short."""
        if self._error is not None:
            raise self._error
        out: list[ResponseEvent] = []
        try:
            self.answer = self._impl.eof(out)
        except PQE2EEError as exc:
            self._error, self._kept = exc, out
            raise
        return out

    def events(self) -> list[ResponseEvent]:
        """After a fault: the events decoded before it by the call that failed (once)."""
        out, self._kept = self._kept, []
        return out

    def wipe(self) -> None:
        """Wipe the response key (idempotent; done when the answer is closed)."""
        self._impl.wipe()


class _Single:
    """A whole answer, opened at EOF."""

    __slots__ = ("_aead", "_chunks", "_key", "_limit", "_size", "_status")

    def __init__(
        self, key: KEMPrivateKey | ResponseSecrets, aead: AEAD, status: int, limit: int
    ) -> None:
        self._key = key
        self._aead = aead
        self._status = status
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes, out: list[ResponseEvent]) -> None:
        self._size += len(data)
        if self._size > self._limit:
            raise LimitExceeded(f"relay answer is larger than {self._limit} bytes")
        self._chunks.append(data)

    def eof(self, out: list[ResponseEvent]) -> Opened:
        data = b"".join(self._chunks)
        self._chunks = []
        return open_answer(self._key, data, aead=self._aead, status=self._status)

    def wipe(self) -> None:
        key = self._key
        (key.key if isinstance(key, ResponseSecrets) else key).wipe()


_PASSED: Final = (InnerEvent, Done)


class _V1Stream:
    """Outer v1 stream bytes -> inner events (the v1 state machine does the work)."""

    __slots__ = ("_dec", "_key", "_on_usage")

    def __init__(self, key: KEMPrivateKey, aead: AEAD, on_usage: OnUsage | None) -> None:
        self._key = key
        self._dec = StreamDecryptor(key, aead=aead, decode_usage=on_usage is not None)
        self._on_usage = on_usage

    def feed(self, data: bytes | None, out: list[ResponseEvent]) -> None:
        """``data`` (``None``: EOF) to the decryptor, and the events it completed to ``out``."""
        dec = self._dec
        if data is None:
            dec.receive_eof()
        else:
            dec.receive_data(data)
        # Hot path (one call per network chunk): the decryptor's queue drained in place (its
        # receive_* raised any fault already; events() would copy it), the common types first.
        queue = dec._events
        for event in queue:
            if isinstance(event, _PASSED):
                out.append(event)
            elif isinstance(event, Usage):
                if self._on_usage is not None:
                    self._on_usage(event.usage)
            elif isinstance(event, RemoteErrorEvent):
                queue.clear()
                raise remote_error(event.error)
        queue.clear()

    def eof(self, out: list[ResponseEvent]) -> None:
        self.feed(None, out)

    def wipe(self) -> None:
        self._key.wipe()


class _V2Stream:
    """Outer v2 stream bytes -> inner events (or, after a non-2xx HEAD, the error body)."""

    __slots__ = (
        "_dec",
        "_done",
        "_inner",
        "_limit",
        "_on_usage",
        "_raw",
        "_raw_size",
        "_secrets",
        "end",
        "head",
    )

    def __init__(
        self, secrets: ResponseSecrets, aead: AEAD, on_usage: OnUsage | None, limit: int
    ) -> None:
        self._secrets = secrets
        self._dec = StreamDecryptorV2(secrets, aead=aead)
        self._on_usage = on_usage
        self._limit = limit
        self._inner = SSEParser(max_event=DEFAULT_MAX_RECORD)
        self._done: Done | None = None
        self._raw: list[bytes] | None = None  # the engine's error body after a non-2xx HEAD
        self._raw_size = 0
        self.head: Head | None = None
        self.end: End | None = None

    def feed(self, data: bytes, out: list[ResponseEvent]) -> None:
        if data.count(b"\n") <= 2:  # the usual chunk: one event, or part of one
            self._dec.receive_data(data)
            self._drain(out)
            return
        # Line by line: a fault keeps the events before it, however the bytes are chunked.
        start, size = 0, len(data)
        while start < size:
            end = data.find(b"\n", start)
            end = size if end < 0 else end + 1
            self._dec.receive_data(data[start:end])
            self._drain(out)
            start = end

    def eof(self, out: list[ResponseEvent]) -> Opened | None:
        self._dec.receive_eof()
        self._drain(out)
        if self._raw is None or self.head is None:
            return None
        body = b"".join(self._raw)
        ctype = self.head.content_type or "application/json"
        if not body and self.end is not None and self.end.error is not None:
            # The instance had no answer to pass on (e.g. the engine timed out).
            body, ctype = error_body(self.end.error), "application/json"
        return Opened(self.head.status, body, ctype, 2)

    def _drain(self, out: list[ResponseEvent]) -> None:
        while True:
            event = self._dec.next_event()
            if isinstance(event, Data):
                if self._raw is None:
                    self._sse(event.data, out)
                else:
                    self._raw_size += len(event.data)
                    if self._raw_size > self._limit:
                        raise LimitExceeded(f"engine error body is larger than {self._limit} bytes")
                    self._raw.append(event.data)
            elif isinstance(event, Head):
                self.head = event
                if not 200 <= event.status < 300:
                    self._raw = []
            elif isinstance(event, End):
                self._end(event, out)
            elif event is NEED_DATA or isinstance(event, EndOfStream):
                return
            # UsageUpdate: cumulative, END carries the last one. UsageMismatch: report mode only.

    def _sse(self, data: bytes, out: list[ResponseEvent]) -> None:
        for event in self._inner.feed(data):
            if self._done is not None:
                raise StreamError("event after the inner [DONE]", code=ErrorCode.DATA_AFTER_DONE)
            if event.data == "[DONE]":
                self._done = Done(raw=event.raw)
            else:
                out.append(InnerEvent(event))
        if self._done is not None and self._inner.buffered().strip():
            raise StreamError("data after the inner [DONE]", code=ErrorCode.DATA_AFTER_DONE)

    def _end(self, end: End, out: list[ResponseEvent]) -> None:
        self.end = end
        if self._raw is not None:
            return  # a non-2xx answer: END's error, if any, restates HEAD's status
        if end.error is not None:
            raise upstream_error(end.error)
        if self._done is None and self._inner.partial_is("[DONE]"):
            self._done = Done(raw=self._inner.buffered() + b"\n")
        elif self._done is None and self._inner.buffered().strip():
            raise StreamError(
                "the engine's stream ended inside an event", code=ErrorCode.STREAM_TRUNCATED
            )
        out.append(self._done or Done(raw=b""))
        usage = end.usage_copy if end.usage_copy is not None else end.usage
        if usage is not None and self._on_usage is not None:
            self._on_usage(usage)

    def wipe(self) -> None:
        self._secrets.key.wipe()
