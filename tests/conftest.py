"""Shared test fixtures and helpers.

* :func:`vectors_dir` / :func:`load_vectors`: the shared test vectors (Wycheproof, ACVP, RFC
  test cases): ``$PQE2EE_VECTORS`` if set, else ``../shared/vectors`` beside the checkout. The
  one place that knows where they are (import them: ``from conftest import load_vectors``; they
  are plain functions because parametrised tests need the vectors at collection time).
* ``anyio_backend``: asyncio AND trio. The code under test is anyio-based (the transports, the
  protocol clients, the shared ASGI plumbing); a file or test whose code is asyncio-only
  (aiohttp, the starlette/uvicorn servers themselves) pins ``"asyncio"`` and says why.
* Hypothesis runs without its per-example deadline: a wall-clock limit fails on a loaded
  2-core box, not on a bug (speed is measured in benchmarks/, never in tests).
* ``faulty_stack`` / ``stack``: dev-engine -> two v1 instances -> real relay ->
  :class:`faults.FaultyRelay`, once per module, with the armed faults cleared around each test
  (the transport tests' stack). Files that need another chain override ``stack`` with a small
  wrapper over :func:`servers.serve_chain` (or relay_support.serve_stack).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from faults import FaultyStack, serve_faulty_stack
from transport_support import KEY  # the API key the transport tests' relay accepts

ROOT = Path(__file__).resolve().parent.parent

settings.register_profile("pqe2ee", deadline=None)
settings.load_profile("pqe2ee")


@cache
def vectors_dir() -> Path:
    """The shared vectors folder (``$PQE2EE_VECTORS``, else ``../shared/vectors``); a clear
    error when it is missing (``make test`` expects ../shared beside the checkout)."""
    override = os.environ.get("PQE2EE_VECTORS")
    path = Path(override) if override else ROOT.parent / "shared" / "vectors"
    if not (path / "wycheproof").is_dir():
        raise RuntimeError(
            f"test vectors not found at {path} (set PQE2EE_VECTORS to the shared/vectors folder)"
        )
    return path


def load_vectors(relative: str) -> Any:
    """A JSON file of the shared vectors, by its path inside the folder."""
    with (vectors_dir() / relative).open(encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def faulty_stack() -> Iterator[FaultyStack]:
    with serve_faulty_stack(2, api_keys=(KEY,), rate_limit=100_000) as st:
        yield st


@pytest.fixture
def stack(faulty_stack: FaultyStack) -> Iterator[FaultyStack]:
    faulty_stack.faults.reset()
    yield faulty_stack
    faulty_stack.faults.reset()
