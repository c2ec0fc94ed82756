"""A deliberately broken client for the conformance tests: pqe2ee's own adapter with its
errors swallowed — whatever goes wrong, it prints what it has (nothing) and exits 0, the way a
client that treats a cut stream as the end of the answer would."""

from __future__ import annotations

import contextlib
import io
import sys

from pqe2ee.conformance.adapter import main

if __name__ == "__main__":
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(sys.argv[1:])
    sys.stdout.write(out.getvalue() if code == 0 else "\n")
    sys.exit(0)
