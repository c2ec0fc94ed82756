"""The verifying half of ``pqe2ee.attest`` is sans-IO: parsing, binding, policy, verdicts and
the client's decisions are functions of bytes, time and policy. Its modules are read as ASTs
and may not import networking, HTTP, subprocess or event-loop libraries, nor call ``open``
(the pinned NVIDIA root is package data, read through ``importlib.resources``). Fetching is
the transports' job; files are ``capture.py``'s and configfs-tsm is ``tsm.py``'s."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from imports_of import imports_of

ATTEST = Path(__file__).resolve().parent.parent / "src" / "pqe2ee" / "attest"
PURE = [
    "collateral.py",
    "gate.py",
    "gpu.py",
    "nras.py",
    "policy.py",
    "tdx.py",
    "verify.py",
    "__init__.py",
]
IO_MODULES = ["capture.py", "tsm.py"]
BANNED = frozenset(
    {
        "socket",
        "ssl",
        "select",
        "selectors",
        "asyncio",
        "anyio",
        "trio",
        "subprocess",
        "http",
        "httpx",
        "httpx2",
        "httpcore",
        "aiohttp",
        "h11",
        "requests",
        "starlette",
        "uvicorn",
        "redis",
        "shutil",
        "tempfile",
    }
)


def _violations(source: str) -> list[str]:
    tree = ast.parse(source)
    found = [i.module for i in imports_of(tree) if i.top in BANNED or i.module == "urllib.request"]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "open":
                found.append("open()")
        elif isinstance(node, ast.Attribute) and node.attr in (
            "read_bytes",
            "read_text",
            "write_bytes",
            "write_text",
        ):
            found.append(f".{node.attr}")
    return found


@pytest.mark.parametrize("name", PURE)
def test_pure_module(name: str) -> None:
    source = (ATTEST / name).read_text("utf-8")
    allowed = {".read_bytes"} if name == "gpu.py" else set()  # importlib.resources package data
    assert [v for v in _violations(source) if v not in allowed] == []


def test_every_module_is_classified() -> None:
    assert sorted(p.name for p in ATTEST.glob("*.py")) == sorted(PURE + IO_MODULES)


@pytest.mark.parametrize(
    "sample",
    [
        "import httpx2",
        "from asyncio import sleep",
        "open('x')",
        "p.read_text()",
        "from urllib.request import urlopen",
        "import anyio.to_thread",
    ],
)
def test_the_check_bites(sample: str) -> None:
    assert _violations(sample)
