"""The proxy's side of the shared ASGI plumbing (:mod:`pqe2ee.server._asgi`): its refusals.

The bounded readers, the disconnect watch, the streamed response and the JSON answer are the
shared ones; what is the proxy's own is how a refusal is *answered*, as a
:class:`~pqe2ee.proxy.app.failures.Failure` rendered in the caller's dialect by the routes:

* :func:`read_body` — a request body, bounded: 413 ``oversize`` as soon as it is known to
  exceed the limit (from ``Content-Length`` before reading, or from the bytes as they arrive;
  never truncated), 400 for a ``Content-Length`` that is not a non-negative integer.
* :func:`read_upstream` — an upstream reply read whole under the same rule, 502 ``oversize``
  (the upstream, not the caller, is at fault); the reply is always closed.
* :func:`decode_json` — JSON in, with the refusal to raise when it is not JSON;
  :func:`parse_object` — a request body as a JSON object (400 ``invalid_json`` otherwise).
"""

from __future__ import annotations

from typing import Any, Final

import anyio
import httpx2
import msgspec
from starlette.requests import Request

from pqe2ee.errors import ErrorCode
from pqe2ee.protocol._codec import json_decode
from pqe2ee.proxy.app.failures import Failure
from pqe2ee.server import _asgi
from pqe2ee.server._asgi import BodyTooLarge, InvalidContentLength, read_bounded

__all__ = [
    "ENCODER",
    "JSON_TYPE",
    "decode_json",
    "parse_object",
    "read_body",
    "read_upstream",
]

JSON_TYPE: Final = "application/json"
ENCODER: Final = msgspec.json.Encoder()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (:func:`pqe2ee.server._asgi.read_body`).
    Raises :class:`Failure`: 413 ``oversize``, or 400 for a bad ``Content-Length``.
    ``ClientDisconnect`` passes through (the caller is gone; there is no one to answer)."""
    try:
        return await _asgi.read_body(request, limit)
    except BodyTooLarge:
        raise Failure(
            413,
            "invalid_request_error",
            f"request body larger than {limit} bytes",
            code=ErrorCode.OVERSIZE.value,
        ) from None
    except InvalidContentLength:
        raise Failure(400, "invalid_request_error", "bad Content-Length header") from None


def decode_json(raw: bytes, refusal: Failure) -> Any:
    """``raw`` decoded as JSON; ``refusal`` is raised if it is not JSON."""
    try:
        return json_decode(raw)
    except msgspec.DecodeError:
        raise refusal from None


def parse_object(raw: bytes) -> dict[str, Any]:
    """``raw`` decoded as a JSON object; a 400 ``invalid_json`` :class:`Failure` otherwise."""
    obj = decode_json(
        raw,
        Failure(
            400, "invalid_request_error", "request body is not valid JSON", code="invalid_json"
        ),
    )
    if not isinstance(obj, dict):
        raise Failure(
            400, "invalid_request_error", "request body must be a JSON object", code="invalid_json"
        )
    return obj


async def read_upstream(resp: httpx2.Response, limit: int) -> bytes:
    """The whole body of an upstream reply, at most ``limit`` bytes; a larger one is refused
    (502 ``oversize`` :class:`Failure`), never truncated. ``resp`` is closed either way
    (shielded from cancellation)."""
    try:
        return await read_bounded(resp.aiter_bytes(), limit)
    except BodyTooLarge:
        raise Failure(
            502,
            "server_error",
            f"{ErrorCode.OVERSIZE.value}: upstream reply larger than {limit} bytes",
            code=ErrorCode.OVERSIZE.value,
        ) from None
    finally:
        with anyio.CancelScope(shield=True):
            await resp.aclose()
