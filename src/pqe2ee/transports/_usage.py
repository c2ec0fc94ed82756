"""Stream usage as the caller asked for it, whatever the runtime sent.

The Chutes runtime rewrites every streamed request's ``stream_options`` to
``{"include_usage": true, "continuous_usage_stats": true}`` (``pqe2ee instance`` does the same
by default: ``--continuous-usage``), so every inner chunk carries the usage so far and a final
``choices: []`` chunk the totals. A caller gets what the OpenAI API would give it:

* it asked for ``include_usage`` and ``continuous_usage_stats``: everything, unchanged;
* ``include_usage`` only: no ``usage`` on the chunks with choices; the final ``choices: []``
  usage chunk kept;
* neither: no ``usage`` anywhere; the ``choices: []`` usage chunk dropped.

A chunk is rewritten (``usage`` removed, the rest re-encoded) only when it carries a usage the
caller did not ask for; every other event passes byte for byte. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from pqe2ee.protocol._events import Done, InnerEvent, data_event

__all__ = ["UsageFilter"]

_DECODER = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()
#: A streamed chunk: only a JSON object is one (anything else fails, and passes unchanged).
_CHUNK = msgspec.json.Decoder(dict[str, Any])


def _flag(options: object, name: str) -> bool:
    return isinstance(options, dict) and options.get(name) is True


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Removes the usage a caller did not ask for from a chat/completions stream."""

    include_usage: bool

    @classmethod
    def for_request(cls, body: bytes, decoded: dict[str, Any] | None = None) -> UsageFilter | None:
        """The filter a streamed request's body calls for; None when nothing is to be removed
        (not a stream, or the caller asked for continuous usage itself). ``decoded``: the body
        already decoded by the caller (then it is not parsed again)."""
        req: Any = decoded
        if req is None:
            try:
                req = _DECODER.decode(body)
            except msgspec.DecodeError:
                return None
        if not isinstance(req, dict) or req.get("stream") is not True:
            return None
        options = req.get("stream_options")
        include = _flag(options, "include_usage")
        if include and _flag(options, "continuous_usage_stats"):
            return None
        return cls(include_usage=include)

    def apply(self, batch: Sequence[InnerEvent | Done]) -> list[InnerEvent | Done]:
        """The events the caller gets."""
        out: list[InnerEvent | Done] = []
        for event in batch:
            if isinstance(event, InnerEvent) and '"usage"' in event.event.data:
                inner = event.event
                body = self._body(inner.data)
                if body is False:
                    continue
                if body is not True:
                    raw = _frame(body, inner.event)
                    event = data_event(body.decode(), None, raw, inner.event)
            out.append(event)
        return out

    def joined(self, batch: Sequence[InnerEvent | Done]) -> bytes:
        """The bytes of :meth:`apply`'s events, made without the events (what an HTTP
        library's caller reads)."""
        parts: list[bytes] = []
        for event in batch:
            if type(event) is InnerEvent and '"usage"' in (inner := event.event).data:
                body = self._body(inner.data)
                if body is False:
                    continue
                if body is not True:
                    parts.append(_frame(body, inner.event))
                    continue
            parts.append(event.raw)
        return b"".join(parts)

    def _body(self, data: str) -> bytes | bool:
        """An event's verdict: ``True`` it passes as it is, ``False`` it is dropped, or its
        chunk re-encoded without the usage (``usage: null``, not a JSON object, or not JSON
        at all: passes)."""
        try:
            chunk = _CHUNK.decode(data)
        except msgspec.DecodeError:  # its ValidationError too: not an object
            return True
        if chunk.pop("usage", None) is None:
            return True
        if chunk.get("choices") == []:  # the totals chunk
            return self.include_usage
        return _ENCODER.encode(chunk)


def _frame(body: bytes, name: str | None) -> bytes:
    """The SSE bytes of an event whose data is ``body`` (one line: JSON has no line break)."""
    if name is None:
        return b"data: " + body + b"\n\n"
    return b"event: " + name.encode() + b"\ndata: " + body + b"\n\n"
