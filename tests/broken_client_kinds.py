"""Deliberately broken clients for the conformance tests, one flaw each, all built on pqe2ee's
own adapter: ``python tests/broken_client_kinds.py KIND <adapter arguments>``.

* ``record-is-event``: treats every record as whole SSE lines (the unterminated tail of a
  record is dropped) and every decrypted chunk as one event (its first ``data:`` line only) -
  garbles records that split or merge inner lines.
* ``ignore-expires-at``: never honours ``nonce_expires_at`` (uses ``nonce_expires_in`` alone).
* ``trust-expires-at``: honours a ``nonce_expires_at`` that is already past (clock skew) as
  "expired now" instead of ignoring it.
* ``forget-pins``: a new client for every call of ``--calls N`` (no pins kept).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pqe2ee.conformance import adapter
from pqe2ee.protocol import client as sans_io
from pqe2ee.protocol import discovery, response, sse
from pqe2ee.protocol.v1 import stream as v1_stream


class _WholeLinesParser(sse.SSEParser):
    def feed(self, data: bytes) -> list[sse.SSEEvent]:
        return super().feed(data[: data.rfind(b"\n") + 1])


def _record_is_event(client: Any, args: Any) -> str:
    if not args.stream:
        return _real_call(client, args)
    body = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}]}
    parts: list[str] = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        for chunk in r.iter_bytes():
            first = chunk.split(b"\n", 1)[0]
            if not first.startswith(b"data: {"):
                continue
            try:
                doc = json.loads(first[6:])
            except ValueError:
                continue
            for choice in doc.get("choices", []):
                parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def _ignore_at(doc: bytes, now: Any, wall: Any = None) -> Any:
    return _real_parse(doc, now, None)  # no wall clock: nonce_expires_at never applies


def _trust_at(doc: bytes, now: Any, wall: Any = None) -> Any:
    result = _real_parse(doc, now, wall)
    at = json.loads(doc).get("nonce_expires_at")
    if wall is not None and isinstance(at, (int, float)) and at <= wall:
        return discovery.DiscoveryResult(result.instances, now, result.skipped)
    return result


_real_call = adapter._call
_real_parse = discovery.parse_discovery

if __name__ == "__main__":
    kind, argv = sys.argv[1], sys.argv[2:]
    if argv == ["--capabilities"]:
        sys.exit(adapter.main(argv))
    if kind == "record-is-event":
        adapter._call = _record_is_event
        v1_stream.SSEParser = _WholeLinesParser  # type: ignore[misc]
        response.SSEParser = _WholeLinesParser  # type: ignore[misc]
    elif kind == "ignore-expires-at":
        sans_io.parse_discovery = _ignore_at  # type: ignore[assignment]
    elif kind == "trust-expires-at":
        sans_io.parse_discovery = _trust_at  # type: ignore[assignment]
    elif kind == "forget-pins" and "--calls" in argv:
        i = argv.index("--calls")
        n, rest = int(argv[i + 1]), argv[:i] + argv[i + 2 :]
        for _ in range(n):
            code = adapter.main(rest)
            if code:
                sys.exit(code)
        sys.exit(0)
    sys.exit(adapter.main(argv))
