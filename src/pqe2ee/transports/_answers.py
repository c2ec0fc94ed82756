"""Relay and discovery failures as the HTTP answers SDKs understand.

The openai and anthropic SDKs turn an HTTP status into their own error classes
(``AuthenticationError`` 401, ``PermissionDeniedError`` 403, ``NotFoundError`` 404,
``RateLimitError`` 429, ``InternalServerError`` 5xx), but let any other exception escape as it
is. So the HTTP transports answer a :class:`~pqe2ee.errors.RelayError` raised before any byte
of the model's answer (discovery, a refused or exhausted invocation) with :func:`error_answer`:
the status that says what happened and a JSON body both SDKs read, carrying the pqe2ee code
(``error.code``, and the ``x-pqe2ee-error`` header); the error itself rides in the response's
``extensions["pqe2ee_error"]``. Only operational failures are answered (unknown model, discovery refused or rate limited, no
or busy instances, a refused path, retries exhausted); everything else (the relay's
catch-all ``relay_error``, v2 refusals such as ``replay`` / ``context_mismatch``, local
refusals, broken crypto, downgrade refusals, network errors) still raises.
"""

from __future__ import annotations

from typing import Final

import msgspec

from pqe2ee.errors import ErrorCode, PQE2EEError, RelayError

__all__ = ["ERROR_EXTENSION", "ERROR_HEADER", "error_answer"]

#: The response extension holding the :class:`~pqe2ee.errors.RelayError` an answer stands for.
ERROR_EXTENSION: Final = "pqe2ee_error"
#: The header naming the pqe2ee error code of an answer made by :func:`error_answer`.
ERROR_HEADER: Final = "x-pqe2ee-error"

_STATUS: Final[dict[ErrorCode, int]] = {
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.PATH_FORBIDDEN: 403,
    ErrorCode.DISCOVERY_RATE_LIMITED: 429,
    ErrorCode.INSTANCE_BUSY: 429,
    ErrorCode.NO_INSTANCES: 503,
    ErrorCode.INSTANCE_GONE: 503,
    ErrorCode.NONCE_REJECTED: 503,
    ErrorCode.KEY_EXCHANGE_REQUIRED: 502,
}
#: The operational failures answered as HTTP errors. The relay's catch-all ``relay_error`` and
#: the v2 instance refusals (``replay``, ``context_mismatch``, ...) still raise: under v2 a
#: non-200 answer is the relay's unauthenticated word, never to be shown as the engine's.
_ANSWERED: Final = frozenset(
    {
        *_STATUS,
        ErrorCode.DISCOVERY_FAILED,
        ErrorCode.RETRIES_EXHAUSTED,
    }
)
#: Relay statuses passed on as they are (the rest become 502: the relay failed us).
_KEPT: Final = frozenset({400, 401, 403, 404, 409, 413, 422, 426, 429, 503})
_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def _status(exc: RelayError) -> int:
    fixed = _STATUS.get(exc.code)
    if fixed is not None:
        return fixed
    status = exc.status
    if exc.code is ErrorCode.RETRIES_EXHAUSTED:  # every instance busy: rate limited
        return 429 if status == 429 else 503
    return status if status in _KEPT else 502  # discovery_failed


def error_answer(exc: PQE2EEError) -> tuple[int, list[tuple[str, str]], bytes] | None:
    """``(status, headers, JSON body)`` answering ``exc``, or None if it must be raised."""
    if not isinstance(exc, RelayError) or exc.code not in _ANSWERED:
        return None
    status = _status(exc)
    kind = _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {
        "type": "error",  # the anthropic shape; openai reads "error" alone
        "error": {
            "message": str(exc),
            "type": kind,
            "code": exc.code.value,
            "param": None,
        },
    }
    headers = [("content-type", "application/json"), (ERROR_HEADER, exc.code.value)]
    return status, headers, msgspec.json.encode(body)
