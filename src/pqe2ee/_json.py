"""The one JSON decoder every pqe2ee party uses on input: msgspec with a nesting bound.

msgspec cannot be told a depth and raises ``RecursionError`` (outside any error contract) past
about 1,000 levels; :func:`json_decode` refuses more than :data:`MAX_JSON_DEPTH` levels first,
with a cheap pre-scan. A module of its own (no I/O, no package side effects) so the pure proxy
translators and the sans-IO protocol can both use it.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Final

import msgspec

__all__ = ["MAX_JSON_DEPTH", "json_decode", "json_too_deep"]

_json_decoder: Final = msgspec.json.Decoder()

#: The deepest JSON nesting any party decodes (arrays and objects). Deeper input is refused as
#: not-JSON at every entry point, before msgspec (whose own limit raises RecursionError) sees it.
MAX_JSON_DEPTH: Final = 128
# A JSON string (escapes included), and every byte that is not a bracket.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
# +1 for an opening bracket, -1 for a closing one (after the brackets are kept alone).
_STEP: Final = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_too_deep(data: bytes | str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``data`` nests arrays/objects deeper than ``limit`` (strings ignored).

    Cheap: a count of the opening brackets settles almost every document; only one with more
    than ``limit`` of them is scanned (strings dropped by a regex, the rest in C iterators).
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0) > limit


def json_decode(
    data: bytes | str, *, type: Any = Any, decoder: msgspec.json.Decoder[Any] | None = None
) -> Any:
    """``msgspec.json.decode`` with the nesting bound: every JSON input in pqe2ee goes through
    here. Too deep, bad UTF-8 (which msgspec raises as UnicodeDecodeError) and msgspec's own
    RecursionError all raise :class:`msgspec.DecodeError`, so each caller's existing handler
    maps them to its typed error. ``type`` or ``decoder`` as for msgspec (``validation`` still
    raises :class:`msgspec.ValidationError`)."""
    if json_too_deep(data):
        raise msgspec.DecodeError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        if decoder is not None:
            return decoder.decode(data)
        if type is Any:
            return _json_decoder.decode(data)
        return msgspec.json.decode(data, type=type)
    except UnicodeDecodeError:
        raise msgspec.DecodeError("JSON holds invalid UTF-8") from None
    except RecursionError:
        raise msgspec.DecodeError("JSON nested too deeply") from None
