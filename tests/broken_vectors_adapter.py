"""Deliberately broken sealers/openers for the conformance tests: pqe2ee's own vectors adapter
with one fault, chosen by the first argument:

* ``lenient``   — accepts everything: a rejection becomes exit 0 with ``{}``;
* ``v1-only``   — answers 20 (unsupported) for every v2 op;
* ``bad-seal``  — flips one bit of every blob it seals;
* ``strict-base64`` — rejects a v2 stream whose record base64 has non-zero unused bits;
* ``unpadded-base64`` — accepts record base64 with its ``=`` padding missing (pads it first);
* ``garbage``   — answers every op with text that is not JSON (exit 0).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import sys

from pqe2ee.conformance.vectors_adapter import main

_RECORD = re.compile(r'"e2e_v2":"([^"]*)"')


def _records(req: dict[str, object]) -> list[str]:
    return _RECORD.findall(str(req.get("wire", ""))) if req.get("op") == "v2.open_stream" else []


def _canonical(b64: str) -> bool:
    try:
        return base64.b64encode(base64.b64decode(b64)).decode() == b64
    except ValueError:
        return True  # not this fault's business


def _padded(req: dict[str, object]) -> str:
    def pad(m: re.Match[str]) -> str:
        return f'"e2e_v2":"{m.group(1) + "=" * (-len(m.group(1)) % 4)}"'

    return json.dumps({**req, "wire": _RECORD.sub(pad, str(req.get("wire", "")))})


if __name__ == "__main__":
    fault = sys.argv[1]
    raw = sys.stdin.read()
    req = json.loads(raw)
    if fault == "v1-only" and req.get("op", "").startswith("v2."):
        sys.exit(20)
    if fault == "garbage":
        sys.stdout.write("ok, sealed it\n")
        sys.exit(0)
    if fault == "strict-base64" and not all(_canonical(r) for r in _records(req)):
        sys.stdout.write('{"error": "malformed_event"}')
        sys.exit(10)
    if fault == "unpadded-base64":
        raw = _padded(req)
    sys.stdin = io.StringIO(raw)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main()
    text = out.getvalue()
    if fault == "lenient" and code == 10:
        text, code = "{}", 0
    if fault == "bad-seal" and code == 0 and '"blob"' in text:
        doc = json.loads(text)
        blob = bytearray.fromhex(doc["blob"])
        blob[1100] ^= 1
        text = json.dumps({"blob": blob.hex()})
    sys.stdout.write(text)
    sys.exit(code)
