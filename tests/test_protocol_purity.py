"""``pqe2ee.protocol`` is sans-IO, lock-free, clock- and randomness-free, and backend-neutral:
every module under src/pqe2ee/protocol/** is read as an AST and may not import I/O, concurrency,
clocks, randomness, HTTP or crypto libraries (crypto is reached through ``pqe2ee.backends``),
nor call clock / randomness / I/O functions. Negative samples show the check bites."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from imports_of import imports_of

PROTOCOL = Path(__file__).resolve().parent.parent / "src" / "pqe2ee" / "protocol"

#: Top-level modules protocol/ may not import.
BANNED_MODULES = frozenset(
    {
        # I/O and concurrency
        "socket",
        "ssl",
        "select",
        "selectors",
        "asyncio",
        "anyio",
        "trio",
        "sniffio",
        "threading",
        "_thread",
        "multiprocessing",
        "concurrent",
        "subprocess",
        "signal",
        "os",
        "sys",
        "io",
        "pathlib",
        "shutil",
        "tempfile",
        "logging",
        # clocks and randomness
        "time",
        "datetime",
        "random",
        "secrets",
        "uuid",
        # HTTP and servers
        "http",
        "urllib",
        "httpx",
        "httpx2",
        "httpcore",
        "aiohttp",
        "h11",
        "h2",
        "requests",
        "starlette",
        "uvicorn",
        "redis",
        # crypto libraries (behind pqe2ee.backends)
        "cryptography",
        "Crypto",
        "Cryptodome",
        "oqs",
        "pqcrypto",
        "nacl",
        "hmac",
    }
)

#: pqe2ee packages protocol/ may import (the rest - transports, server, proxy, cli - sit above).
ALLOWED_PQE2EE = ("pqe2ee.protocol", "pqe2ee.errors", "pqe2ee.backends", "pqe2ee._json")
#: Calls that read a clock or randomness, whatever they were imported as (``x.time()``,
#: ``monotonic()``, ``backend.urandom(12)``, ...).
CLOCK_AND_RANDOM_CALLS = frozenset(
    {
        "time",
        "time_ns",
        "monotonic",
        "monotonic_ns",
        "perf_counter",
        "now",
        "utcnow",
        "today",
        "urandom",
        "getrandom",
        "token_bytes",
        "token_hex",
        "randbits",
        "sleep",
    }
)
#: Builtins that do I/O or import at run time (``ctx.open(...)`` of HPKE is a method: allowed).
IO_BUILTINS = frozenset(
    {"open", "print", "input", "__import__", "exec", "eval", "breakpoint", "import_module"}
)


def violations(source: str, name: str) -> list[str]:
    """What in ``source`` breaks the rules (empty: pure)."""
    found: list[str] = []
    tree = ast.parse(source, name)
    for imp in imports_of(tree):
        if imp.level:
            found.append(f"{name}:{imp.lineno} relative import")
        if imp.top in BANNED_MODULES or (
            imp.top == "pqe2ee" and not imp.module.startswith(ALLOWED_PQE2EE)
        ):
            found.append(f"{name}:{imp.lineno} imports {imp.module}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                banned = func.id in CLOCK_AND_RANDOM_CALLS or func.id in IO_BUILTINS
                called = func.id
            elif isinstance(func, ast.Attribute):
                banned = func.attr in CLOCK_AND_RANDOM_CALLS or func.attr == "import_module"
                called = func.attr
            else:
                banned, called = False, ""
            if banned:
                found.append(f"{name}:{node.lineno} calls {called}()")
    return found


def protocol_modules() -> list[Path]:
    return sorted(PROTOCOL.rglob("*.py"))


def test_the_walk_covers_all_of_protocol() -> None:
    names = {p.relative_to(PROTOCOL).as_posix() for p in protocol_modules()}
    for expected in ("__init__.py", "client.py", "response.py", "v1/stream.py", "v2/hpke.py"):
        assert expected in names
    assert len(names) >= 20


@pytest.mark.parametrize(
    "path", protocol_modules(), ids=lambda p: p.relative_to(PROTOCOL).as_posix()
)
def test_protocol_module_is_pure(path: Path) -> None:
    assert violations(path.read_text(), path.relative_to(PROTOCOL).as_posix()) == []


def test_the_shared_json_decoder_is_pure() -> None:
    """pqe2ee/_json.py (protocol/ imports it) obeys the same rules."""
    path = PROTOCOL.parent / "_json.py"
    assert violations(path.read_text(), "_json.py") == []


@pytest.mark.parametrize(
    "sample",
    [
        "import socket",
        "import threading\nlock = threading.Lock()",
        "from time import monotonic",
        "import time.something",
        "import os",
        "from os import urandom",
        "import secrets",
        "import random",
        "import asyncio",
        "import anyio.abc",
        "import httpx2",
        "from aiohttp import web",
        "from cryptography.hazmat.primitives.kdf.hkdf import HKDF",
        "from Crypto.Cipher import ChaCha20_Poly1305",
        "import oqs",
        "from pqcrypto.kem import ml_kem_768",
        "from starlette.requests import Request",
        "import hmac",
        "from pqe2ee.transports._common import Settings",
        "from pqe2ee.server import instance",
        "from . import sse",
        "clock = get_clock()\nstamp = clock.time()",
        "nonce = backend.urandom(12)",
        "when = datetime_module.now()",
        "data = open('key').read()",
        "stamp = monotonic()",
        "mod = importlib.import_module('socket')",
    ],
)
def test_the_check_bites(sample: str) -> None:
    assert violations(sample, "sample.py"), sample


def test_pure_code_passes() -> None:
    sample = (
        "import hashlib\nimport msgspec\nfrom pqe2ee.errors import ErrorCode\n"
        "from pqe2ee.backends.kdf import hkdf_extract\nfrom pqe2ee.protocol.sse import SSEParser\n"
        "digest = hashlib.sha256(b'x').digest()\nplain = ctx.open(aad, ciphertext)\n"
    )
    assert violations(sample, "sample.py") == []
