"""Failures as answers: what the proxy says, in the caller's dialect, when a call cannot go on.

Everything that goes wrong below a route is raised as one :class:`Failure` (status, OpenAI
``type``, message, ``code``) and rendered once, as an OpenAI or an Anthropic error body. The
functions here map the other things that can go wrong onto it: typed pqe2ee errors and httpx2
errors from the transport (:func:`fail_of`), and an upstream's non-200 answer
(:func:`fail_of_upstream_body`). No web framework here: rendering a body as a response is the
routes' business.
"""

from __future__ import annotations

import enum
from dataclasses import KW_ONLY, dataclass
from typing import Any, Final

import httpx2
import msgspec

from pqe2ee.errors import (
    BackendError,
    ErrorCode,
    LocalProtocolError,
    PQE2EEError,
    RelayError,
    RemoteError,
)
from pqe2ee.protocol._codec import json_decode
from pqe2ee.proxy.translate.chat import parse_chat_reply
from pqe2ee.proxy.translate.errors import (
    TranslationError,
    anthropic_error_body,
    anthropic_error_type,
    openai_error_body,
)

__all__ = [
    "Dialect",
    "Failure",
    "dialect_of",
    "fail_of",
    "fail_of_upstream_body",
    "kind_of",
]


class Dialect(enum.Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


def dialect_of(path: str) -> Dialect:
    """The dialect errors on ``path`` are answered in."""
    return Dialect.ANTHROPIC if path.startswith("/v1/messages") else Dialect.OPENAI


@dataclass(eq=False)
class Failure(Exception):
    """An error answer: HTTP status, OpenAI-vocabulary ``type``, message and machine ``code``
    (the OpenAI ``code`` field; ``param`` likewise). Raised anywhere below a route, rendered
    once, in the caller's dialect, by the routes' guard."""

    status: int
    type: str
    message: str
    _: KW_ONLY
    code: str | None = None
    param: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self, dialect: Dialect) -> dict[str, Any]:
        """The error body in ``dialect``'s shape."""
        if dialect is Dialect.ANTHROPIC:
            kind = self.type
            if kind == "invalid_request_error" and self.status != 400:
                kind = anthropic_error_type(self.status)  # e.g. 404 -> not_found_error
            return anthropic_error_body(self.status, kind, self.message)
        return openai_error_body(self.type, self.message, param=self.param, code=self.code)

    @classmethod
    def of_translation(cls, exc: TranslationError) -> Failure:
        return cls(exc.status, exc.type, exc.message, code=exc.error_code, param=exc.param)


_TYPE_FOR_STATUS: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    504: "timeout_error",
}


def kind_of(status: int) -> str:
    """Error ``type`` (OpenAI vocabulary) for a status. Anthropic rendering maps the generic
    ones onto its own types by status (503 -> ``overloaded_error``, ...)."""
    fixed = _TYPE_FOR_STATUS.get(status)
    if fixed is not None:
        return fixed
    return "server_error" if status >= 500 else "invalid_request_error"


#: pqe2ee error codes that mean "try again later": no instance could take the call.
_UNAVAILABLE: Final = frozenset(
    {
        ErrorCode.NO_INSTANCES,
        ErrorCode.INSTANCE_BUSY,
        ErrorCode.INSTANCE_GONE,
        ErrorCode.KEY_EXCHANGE_REQUIRED,
        ErrorCode.DISCOVERY_RATE_LIMITED,
        ErrorCode.RETRIES_EXHAUSTED,
    }
)


#: Relay refusals where the relay's own 401/402/403 is the caller's answer (a bad key).
_AUTH: Final = frozenset({ErrorCode.DISCOVERY_FAILED, ErrorCode.RELAY_ERROR})


def _fail_of_pqe2ee(exc: PQE2EEError) -> Failure:
    """Status and type for a typed pqe2ee error; the stable code goes in ``code`` and message."""
    if exc.code is ErrorCode.MODEL_NOT_FOUND:
        status, kind = 404, "invalid_request_error"  # as OpenAI answers an unknown model
    elif isinstance(exc, RemoteError) and exc.status is not None and 400 <= exc.status <= 599:
        status = exc.status
        kind = kind_of(status)
    elif isinstance(exc, RelayError) and exc.status in (401, 402, 403) and exc.code in _AUTH:
        status = exc.status  # the relay refused the key (discovery or model listing)
        kind = kind_of(status)
    elif exc.code is ErrorCode.DEADLINE_EXCEEDED:
        status, kind = 504, "timeout_error"  # the call outlived --deadline
    elif exc.code in _UNAVAILABLE:
        status, kind = 503, "server_error"
    elif isinstance(exc, LocalProtocolError):
        status, kind = 400, "invalid_request_error"
    elif isinstance(exc, BackendError):
        status, kind = 500, "server_error"
    else:
        status, kind = 502, "server_error"
    return Failure(status, kind, f"{exc.code.value}: {exc.message}", code=exc.code.value)


def fail_of(exc: Exception) -> Failure:
    """An upstream failure (typed pqe2ee error or an httpx2 error) as an error answer."""
    if isinstance(exc, PQE2EEError):
        return _fail_of_pqe2ee(exc)
    if isinstance(exc, httpx2.TimeoutException):
        return Failure(504, "timeout_error", "upstream timed out", code="upstream_timeout")
    return Failure(
        502,
        "server_error",
        f"{ErrorCode.CONNECTION_LOST.value}: upstream unreachable ({type(exc).__name__})",
        code=ErrorCode.CONNECTION_LOST.value,
    )


def fail_of_upstream_body(status: int, body: bytes) -> Failure:
    """A non-200 upstream answer (engine or relay error) as an error in our vocabulary: the
    status is kept, the message is the one the upstream gave when it gave one."""
    kind = kind_of(status)
    message = f"upstream answered {status}"
    try:
        obj = json_decode(body)
    except msgspec.DecodeError:
        obj = None
    if isinstance(obj, dict):
        detail = obj.get("detail")
        if isinstance(detail, str) and detail:
            message = detail
        else:
            try:
                parse_chat_reply(obj)
            except TranslationError as exc:
                if exc.error_code == "upstream_error":  # the body reported an error in-band
                    message = exc.message
    return Failure(status, kind, message, code="upstream_error")
