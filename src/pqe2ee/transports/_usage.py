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
        out: list[InnerEvent | Done] = []
        for event in batch:
            kept = self._event(event) if isinstance(event, InnerEvent) else event
            if kept is not None:
                out.append(kept)
        return out

    def _event(self, event: InnerEvent) -> InnerEvent | None:
        inner = event.event
        data = inner.data
        if '"usage"' not in data:
            return event
        try:
            chunk: Any = _DECODER.decode(data)
        except msgspec.DecodeError:
            return event
        if not isinstance(chunk, dict) or chunk.get("usage") is None:
            return event
        if chunk.get("choices") == []:  # the totals chunk
            return event if self.include_usage else None
        del chunk["usage"]
        body = _ENCODER.encode(chunk)
        raw = b"data: " + body + b"\n\n"
        if inner.event is not None:
            raw = b"event: " + inner.event.encode() + b"\n" + raw
        return data_event(body.decode(), None, raw, inner.event)
