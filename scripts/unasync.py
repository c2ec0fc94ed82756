#!/usr/bin/env python3
"""Generate the sync transports and the legacy-httpx flavour from the async httpx2 sources.

As httpcore does it: plain token substitutions, nothing clever. Sources (edit these):

* ``src/pqe2ee/transports/_async/_engine.py``  -> ``_sync/_engine.py`` (the shared orchestration)
* ``src/pqe2ee/transports/_async/_httpx2.py``  -> ``_sync/_httpx2.py``, ``_async/_httpx.py``,
  ``_sync/_httpx.py``
* ``src/pqe2ee/transports/_httpx2_common.py``  -> ``_httpx_common.py``
* ``src/pqe2ee/transports/httpx2.py``          -> ``httpx.py``
* ``src/pqe2ee/transports/_async/_attest.py``  -> ``_sync/_attest.py`` (attestation step)
* ``src/pqe2ee/transports/_async/_bounded.py`` -> ``_sync/_bounded.py`` (the total deadline)
* ``src/pqe2ee/transports/_async/_stream.py``  -> ``_sync/_stream.py`` (the port, the decrypted
  stream)

"sync" substitutions turn async code into blocking code: generic rules (``Async[A-Z]...`` ->
``...``, ``async def`` -> ``def``, ``await`` dropped, ``__aenter__`` -> ``__enter__``,
``aclose`` -> ``close``, ``aiter_*`` -> ``iter_*``) plus a short explicit list where the
generic rule would be wrong (``AsyncByteStream`` -> ``SyncByteStream``); "httpx"
substitutions turn every ``httpx2`` into ``httpx``. The output is then import-sorted, its
yield loops collapsed to ``yield from``, and formatted with ruff so that ``ruff format --check``
agrees with it. Formatting differs between ruff releases, so the output is only defined for
ruff :data:`RUFF_VERSION` (pinned in the dev extra): another version is refused rather than
reported as drift.

Usage::

    python scripts/unasync.py           # rewrite the generated files
    python scripts/unasync.py --check   # exit 1 (and list them) if any is stale
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "pqe2ee" / "transports"

#: Async -> sync, like httpcore's: the explicit names first (where the generic rule would be
#: wrong), then generic rules that need no list of names.
SYNC: list[tuple[str, str]] = [
    # explicit
    (r"\bAsyncByteStream\b", "SyncByteStream"),  # httpx's sync twin is not "ByteStream"
    (r"\bStopAsyncIteration\b", "StopIteration"),
    (r"\bhandle_async_request\b", "handle_request"),
    # Threads are not cancelled: a one-line ``with anyio.CancelScope(shield=True):`` block (a
    # cleanup shielded from cancellation) becomes its line alone.
    (r"\n( *)with anyio\.CancelScope\(shield=True\):\n\1    ", r"\n\1"),
    (r"\banext\(", "next("),
    # A read of a body in a ``with`` block of its deadline's guard (``per_read()``; async:
    # the timer that cuts it at the deadline) is the read alone: a blocking read is not
    # interrupted, its deadline is the check before it. The block must be one statement.
    (r"(?m)^( *)with guard:[^\n]*\n *", r"\1"),
    # generic
    (r"\b(_?)Async([A-Z]\w*)", r"\1\2"),  # AsyncEngine -> Engine, _AsyncPort -> _Port
    (r"\basync_(\w+)", r"\1"),  # async_sleep -> sleep
    (r"\basync (def|with|for)\b", r"\1"),
    (r"\bawait ", ""),
    (r"\b__a(enter|exit|iter|next)__\b", r"__\1__"),
    (r"\ba(close|read)\b", r"\1"),
    (r"\baiter_(\w+)", r"iter_\1"),  # aiter_bytes -> iter_bytes
    (r"\b_async\b", "_sync"),  # module paths
]
HTTPX: list[tuple[str, str]] = [(r"httpx2", "httpx")]

SOURCE = PKG / "_async" / "_httpx2.py"
ENGINE = PKG / "_async" / "_engine.py"
COMMON = PKG / "_httpx2_common.py"
PUBLIC = PKG / "httpx2.py"

#: (source, target, substitution sets)
TARGETS: list[tuple[Path, Path, tuple[list[tuple[str, str]], ...]]] = [
    (SOURCE, PKG / "_sync" / "_httpx2.py", (SYNC,)),
    (SOURCE, PKG / "_async" / "_httpx.py", (HTTPX,)),
    (SOURCE, PKG / "_sync" / "_httpx.py", (SYNC, HTTPX)),
    (COMMON, PKG / "_httpx_common.py", (HTTPX,)),
    (PUBLIC, PKG / "httpx.py", (HTTPX,)),
    (ENGINE, PKG / "_sync" / "_engine.py", (SYNC,)),
    (PKG / "_async" / "_attest.py", PKG / "_sync" / "_attest.py", (SYNC,)),
    (PKG / "_async" / "_bounded.py", PKG / "_sync" / "_bounded.py", (SYNC,)),
    (PKG / "_async" / "_stream.py", PKG / "_sync" / "_stream.py", (SYNC,)),
]


#: The ruff release whose formatting the generated files follow (``ruff==`` in the dev extra).
RUFF_VERSION = "0.17.6"


def _ruff_version(ruff: str) -> str:
    out = subprocess.run([ruff, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().removeprefix("ruff ").split()[0] if out.stdout.strip() else "?"


def _ruff() -> str:
    here = Path(sys.executable).parent / "ruff"
    found = str(here) if here.exists() else shutil.which("ruff")
    if not found:
        sys.exit(
            f"unasync: ruff is needed to format the generated files (pip install ruff=={RUFF_VERSION})"
        )
    version = _ruff_version(found)
    if version != RUFF_VERSION:
        sys.exit(
            f"unasync: the generated files are formatted by ruff {RUFF_VERSION}, found {version} "
            f"(pip install ruff=={RUFF_VERSION})"
        )
    return found


def _ruff_pipe(ruff: str, args: list[str], text: str, target: Path) -> str:
    config = str(ROOT / "pyproject.toml")
    proc = subprocess.run(
        [ruff, *args, "--config", config, "--stdin-filename", str(target), "-"],
        input=text,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode not in (0, 1) or not proc.stdout:
        sys.exit(f"unasync: ruff {args[0]} failed on {target.name}: {proc.stderr.strip()}")
    return proc.stdout


def _rel(path: Path) -> str:
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def substitute(text: str, rule_sets: tuple[list[tuple[str, str]], ...]) -> str:
    """``text`` with every rule of every set applied, in order."""
    for rules in rule_sets:
        for pattern, replacement in rules:
            text = re.sub(pattern, replacement, text)
    return text


def generate(
    source: Path, target: Path, rule_sets: tuple[list[tuple[str, str]], ...], ruff: str
) -> str:
    text = substitute(source.read_text(), rule_sets)
    text = f"# GENERATED by scripts/unasync.py from {_rel(source)} - do not edit.\n{text}"
    # Sort imports and __all__, drop the imports a substitution made unused (and mark the
    # unpacked names it did: a dropped read guard), and turn ``for x in it: yield x``
    # (an ``async for`` loop in the source, where ``yield from`` is not allowed) into
    # ``yield from it``.
    fixes = [
        *("check", "--fix-only", "--unsafe-fixes", "--quiet"),
        *("--select", "I,F401,RUF022,RUF059,UP028"),
    ]
    text = _ruff_pipe(ruff, fixes, text, target)
    return _ruff_pipe(ruff, ["format", "--quiet"], text, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    args = parser.parse_args(argv)
    ruff = _ruff()
    stale: list[str] = []
    for source, target, rules in TARGETS:
        expected = generate(source, target, rules, ruff)
        current = target.read_text() if target.exists() else None
        if current == expected:
            continue
        rel = _rel(target)
        if args.check:
            stale.append(rel)
        else:
            target.write_text(expected)
            print(f"unasync: wrote {rel}")
    if stale:
        print("unasync: stale generated files (run python scripts/unasync.py):", file=sys.stderr)
        for rel in stale:
            print(f"  {rel}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
