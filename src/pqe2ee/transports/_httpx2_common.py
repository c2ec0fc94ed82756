"""httpx2 pieces shared by the sync and the async transport: the stream error types, exception
mapping at the inner-transport boundary, and response builders.

``scripts/unasync.py`` generates the legacy-httpx twin of this module (``httpx2`` -> ``httpx``).
"""

from __future__ import annotations

from typing import Literal, NoReturn

import anyio
import httpx2

from pqe2ee.errors import (
    ConnectionLost,
    DeadlineExceeded,
    DecryptError,
    LimitExceeded,
    MalformedError,
    PQE2EEError,
    RelayError,
    RemoteError,
    RemoteProtocolError,
    StreamError,
)
from pqe2ee.transports._common import KEEPALIVE_EXPIRY, RawHeaders, end_to_end_headers
from pqe2ee.transports._stream_errors import StreamErrorBase


class E2EEStreamError(StreamErrorBase, httpx2.TransportError):
    """An encrypted stream failed after its response was handed over.

    Both a :class:`~pqe2ee.errors.PQE2EEError` (``code`` is the original error's code, e.g.
    ``decrypt_failed``, ``duplicate_record``, ``stream_truncated``, ``connection_lost``,
    ``remote_error``) and an ``httpx2.TransportError``, so HTTP clients and SDKs treat it as
    a broken transfer (openai raises ``APIConnectionError`` from it) and never as success.
    What is raised is the subclass below for the original pqe2ee class, so ``except
    pqe2ee.DecryptError`` works too; ``error`` is the original exception (also ``__cause__``
    unless a lower-level error is the cause).
    """

    _unpicklable = ("_request",)


class E2EEStreamProtocolError(E2EEStreamError, RemoteProtocolError):
    """httpx2's stream error for a :class:`~pqe2ee.errors.RemoteProtocolError`."""


class E2EEStreamDecryptError(E2EEStreamError, DecryptError):
    """httpx2's stream error for a :class:`~pqe2ee.errors.DecryptError` (tampered data)."""


class E2EEStreamMalformedError(E2EEStreamError, MalformedError):
    """httpx2's stream error for a :class:`~pqe2ee.errors.MalformedError`."""


class E2EEStreamIntegrityError(E2EEStreamError, StreamError):
    """httpx2's stream error for a :class:`~pqe2ee.errors.StreamError` (truncated, reordered,
    duplicated records; a lost connection)."""


class E2EEStreamConnectionLost(E2EEStreamIntegrityError, ConnectionLost):
    """httpx2's stream error for a :class:`~pqe2ee.errors.ConnectionLost` (the connection to the
    relay broke mid-stream; ``__cause__`` is the network error)."""


class E2EEStreamRelayError(E2EEStreamError, RelayError):
    """httpx2's stream error for a :class:`~pqe2ee.errors.RelayError` (an unauthenticated error
    the relay put into a v2 stream before its end)."""


class E2EEStreamLimitExceeded(E2EEStreamError, LimitExceeded):
    """httpx2's stream error for a :class:`~pqe2ee.errors.LimitExceeded`."""


class E2EEStreamDeadlineExceeded(E2EEStreamLimitExceeded, DeadlineExceeded, httpx2.ReadTimeout):
    """httpx2's stream error for a :class:`~pqe2ee.errors.DeadlineExceeded` (the stream outlived
    the client's total ``deadline``); also an ``httpx2.ReadTimeout``, so SDKs report a timeout
    (openai: ``APITimeoutError``)."""


class E2EEStreamRemoteError(E2EEStreamError, RemoteError):
    """httpx2's stream error for a :class:`~pqe2ee.errors.RemoteError` (the far side gave up)."""


def default_limits() -> httpx2.Limits:
    """The pool of the default inner transport: httpx2's defaults, but idle connections are
    dropped after :data:`~pqe2ee.transports._common.KEEPALIVE_EXPIRY` seconds."""
    return httpx2.Limits(
        max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_EXPIRY
    )


def as_stream_error(error: PQE2EEError, request: httpx2.Request | None) -> E2EEStreamError:
    """``error`` as this library's :class:`E2EEStreamError` (same code, message, attributes)."""
    exc = E2EEStreamError.wrap(error)
    exc._request = request
    return exc


def inner_error(exc: BaseException, phase: Literal["connect", "read"]) -> httpx2.HTTPError | None:
    """What an inner transport's ``exc`` becomes (raise it ``from exc``), or None to let it
    pass unchanged (httpx2 and pqe2ee errors, and anything unknown). ``TimeoutError`` becomes
    a connect/read timeout, ``OSError`` and anyio stream breakage a ``ConnectError`` /
    ``ReadError``."""
    if isinstance(exc, (httpx2.HTTPError, PQE2EEError)):
        return None
    if isinstance(exc, TimeoutError):
        timeout = httpx2.ConnectTimeout if phase == "connect" else httpx2.ReadTimeout
        return timeout(f"relay {phase} timed out")
    if isinstance(exc, (OSError, anyio.BrokenResourceError, anyio.EndOfStream)):
        network = httpx2.ConnectError if phase == "connect" else httpx2.ReadError
        return network(f"relay {phase} failed: {type(exc).__name__}")
    return None


def raise_mapped(exc: Exception, phase: Literal["connect", "read"]) -> NoReturn:
    """Raise ``exc`` as :func:`inner_error` maps it (chained), or unchanged: the body of an
    ``except Exception`` on a per-request path (no frame unless something is raised)."""
    mapped = inner_error(exc, phase)
    if mapped is None:
        raise exc
    raise mapped from exc


def json_response(
    status: int, body: bytes, request: httpx2.Request, content_type: str = "application/json"
) -> httpx2.Response:
    """A decrypted answer, bytes exactly as the engine produced them (JSON for v1; v2 gives
    the engine's authenticated content type): the bytes are the response's stream as they
    are, with the headers ``content=`` would have added (as bytes: httpx2 has nothing to
    convert), and no content encoding step.

    The response is left as ``content=`` leaves it - read (``content`` there), its stream
    consumed and closed - without running httpx2's read through its iterator and decoder
    layers (~12 us) to get there."""
    response = httpx2.Response(
        status,
        headers=[
            (b"content-type", content_type.encode("ascii")),
            (b"content-length", b"%d" % len(body)),
        ],
        stream=httpx2.ByteStream(body),
        request=request,
    )
    response._content = body
    response.is_stream_consumed = response.is_closed = True
    return response


def passthrough_response(
    status: int, raw_headers: RawHeaders, body: bytes, request: httpx2.Request
) -> httpx2.Response:
    """The relay's own (plaintext) answer, already read, handed to the caller as it was."""
    headers = end_to_end_headers(raw_headers)
    return httpx2.Response(status, headers=headers, content=body, request=request)
