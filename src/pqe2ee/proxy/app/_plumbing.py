"""The proxy's HTTP plumbing, in one place: bounded reads, JSON in and out, disconnect watching.

Small functions with one behaviour each, meant to be swapped for the shared server helpers
(``pqe2ee.server._asgi``) once both exist side by side:

* :func:`read_body` — a request body, bounded: refused (413 ``oversize``) as soon as it is
  known to exceed the limit, from ``Content-Length`` before reading or from the bytes as they
  arrive; never truncated, and never more than the limit held. A malformed
  ``Content-Length`` is a 400.
* :func:`read_upstream` — an upstream reply read whole, bounded the same way (502
  ``oversize``: the upstream, not the caller, is at fault); the reply is always closed.
  Both use one bounded collector, :func:`_collect`.
* :func:`decode_json` — JSON in, with the refusal to raise when it is not JSON;
  :func:`parse_object` — a request body as a JSON object (400 ``invalid_json`` otherwise).
* :func:`json_response` — a compact JSON answer.
* :func:`wait_for_disconnect` — returns when the client hangs up (``http.disconnect``).

Refusals are raised as :class:`~pqe2ee.proxy.app.failures.Failure` and rendered in the
caller's dialect by the routes.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable
from typing import Any, Final

import anyio
import httpx2
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from pqe2ee.errors import ErrorCode
from pqe2ee.proxy.app.failures import Failure

__all__ = [
    "ENCODER",
    "JSON_TYPE",
    "decode_json",
    "json_response",
    "parse_object",
    "read_body",
    "read_upstream",
    "wait_for_disconnect",
]

JSON_TYPE: Final = "application/json"
ENCODER: Final = msgspec.json.Encoder()


def json_response(obj: Any, status: int = 200) -> Response:
    """``obj`` as compact JSON (``application/json``) with ``status``."""
    return Response(ENCODER.encode(obj), status_code=status, media_type=JSON_TYPE)


def _body_too_large(limit: int) -> Failure:
    return Failure(
        413,
        "invalid_request_error",
        f"request body larger than {limit} bytes",
        code=ErrorCode.OVERSIZE.value,
    )


def _reply_too_large(limit: int) -> Failure:
    return Failure(
        502,
        "server_error",
        f"{ErrorCode.OVERSIZE.value}: upstream reply larger than {limit} bytes",
        code=ErrorCode.OVERSIZE.value,
    )


async def _collect(
    chunks: AsyncIterable[bytes], limit: int, too_large: Callable[[int], Failure]
) -> bytes:
    """All of ``chunks``, refused with ``too_large(limit)`` at the first chunk that would take
    the total past ``limit`` (nothing past the limit is held; nothing is cut)."""
    buf = bytearray()
    async for chunk in chunks:
        if len(buf) + len(chunk) > limit:
            raise too_large(limit)
        buf += chunk
    return bytes(buf)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes; a larger one is refused, never truncated.

    A declared ``Content-Length`` over the limit is refused before anything is read; a body
    without one (or longer than declared) is refused as soon as it crosses the limit. Raises
    :class:`Failure`: 413 ``oversize``, or 400 for a ``Content-Length`` that is not a number.
    ``ClientDisconnect`` passes through (the caller is gone; there is no one to answer).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise Failure(400, "invalid_request_error", "bad Content-Length header") from None
        if size > limit:
            raise _body_too_large(limit)
    return await _collect(request.stream(), limit, _body_too_large)


def decode_json(raw: bytes, refusal: Failure) -> Any:
    """``raw`` decoded as JSON; ``refusal`` is raised if it is not JSON."""
    try:
        return msgspec.json.decode(raw)
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
        return await _collect(resp.aiter_bytes(), limit, _reply_too_large)
    finally:
        with anyio.CancelScope(shield=True):
            await resp.aclose()


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client hangs up: the ASGI ``http.disconnect`` message (request body
    messages still arriving are dropped). Run it beside a streamed answer and cancel that
    answer when it returns."""
    while (await receive())["type"] != "http.disconnect":
        pass
