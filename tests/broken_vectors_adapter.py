"""Deliberately broken sealers/openers for the conformance tests: pqe2ee's own vectors adapter
with one fault, chosen by the first argument:

* ``lenient``   — accepts everything: a rejection becomes exit 0 with ``{}``;
* ``v1-only``   — answers 20 (unsupported) for every v2 op;
* ``bad-seal``  — flips one bit of every blob it seals.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

from pqe2ee.conformance.vectors_adapter import main

if __name__ == "__main__":
    fault = sys.argv[1]
    raw = sys.stdin.read()
    if fault == "v1-only" and json.loads(raw).get("op", "").startswith("v2."):
        sys.exit(20)
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
