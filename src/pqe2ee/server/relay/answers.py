"""The relay's own answers: ``{"detail": ...}`` JSON with the statuses and texts of the real
relay (design notes ``chutes-v1-notes.md``, section 5)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from pqe2ee.server._asgi import json_response

__all__ = [
    "detail",
    "gone",
    "http_error",
    "internal_error",
    "store_down",
    "too_large",
    "unauthorized",
]


def detail(status: int, text: Any, headers: Mapping[str, str] | None = None) -> Response:
    return json_response({"detail": text}, status, headers)


def unauthorized() -> Response:
    return detail(401, "Invalid or missing API key", {"WWW-Authenticate": "Bearer"})


def gone() -> Response:
    return detail(410, "Instance is no longer active")


def too_large(limit: int) -> Response:
    return detail(413, f"Request body too large (limit {limit} bytes)")


def store_down() -> Response:
    return detail(503, "Nonce store unavailable, try again later")


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return detail(exc.status_code, exc.detail, exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    return detail(500, "Internal error during E2E invocation")
