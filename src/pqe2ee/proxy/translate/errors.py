"""Errors raised while translating between API dialects, and their rendering in each dialect.

:class:`TranslationError` carries an HTTP status, an error ``type`` and a short message. The
``type`` is written in the OpenAI vocabulary (``invalid_request_error``, ``server_error``, ...);
when rendered for Anthropic clients it is kept if it is also an Anthropic error type and otherwise
replaced by the type Anthropic uses for the HTTP status (:func:`anthropic_error_type`).

Shapes:

* OpenAI (Chat Completions and Responses): ``{"error": {"message", "type", "param", "code"}}``
* Anthropic: ``{"type": "error", "error": {"type", "message"}}``

Messages follow the package rule: they name what was wrong (a field path, a type name, a count)
and never echo prompt text.
"""

from __future__ import annotations

import re
from typing import Any, Final, TypeVar

import msgspec

from pqe2ee.errors import ErrorCode, LocalProtocolError, MalformedError, PQE2EEError

__all__ = [
    "ANTHROPIC_ERROR_TYPES",
    "TranslationError",
    "TranslationRequestError",
    "TranslationUpstreamError",
    "anthropic_error_body",
    "anthropic_error_type",
    "convert",
    "invalid_request",
    "openai_error_body",
    "upstream_error",
]

T = TypeVar("T")

#: Error types the Anthropic API (and the anthropic SDK's ``ErrorType``) knows.
ANTHROPIC_ERROR_TYPES: Final[frozenset[str]] = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "rate_limit_error",
        "timeout_error",
        "api_error",
        "overloaded_error",
    }
)


class TranslationError(PQE2EEError):
    """A request or reply could not be translated.

    ``status`` is the HTTP status to answer with (4xx: the client's request is at fault; 5xx: the
    upstream reply was malformed). ``type`` is the error type (OpenAI vocabulary), ``param`` the
    offending request field when known, ``error_code`` a machine-readable OpenAI ``code`` such as
    ``"unsupported_tool"``. Constructing it gives one of its two concrete classes, which place it
    in the error tree: :class:`TranslationRequestError` (a :class:`LocalProtocolError`, code
    ``invalid_body``) for a 4xx, :class:`TranslationUpstreamError` (a :class:`MalformedError`,
    code ``malformed_payload``) for a 5xx.
    """

    def __new__(cls, status: int = 400, *args: Any, **kwargs: Any) -> TranslationError:
        if cls is TranslationError:
            cls = TranslationRequestError if status < 500 else TranslationUpstreamError
        return super().__new__(cls)

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        *,
        param: str | None = None,
        error_code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.error_code = error_code

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return openai_error_body(self.type, self.message, param=self.param, code=self.error_code)

    def to_anthropic(self) -> dict[str, Any]:
        """The Anthropic error body: ``{"type": "error", "error": {"type", "message"}}``."""
        return anthropic_error_body(self.status, self.type, self.message)


class TranslationRequestError(TranslationError, LocalProtocolError):
    """The client's request cannot be translated (a 4xx)."""

    default_code = ErrorCode.INVALID_BODY


class TranslationUpstreamError(TranslationError, MalformedError):
    """The upstream Chat Completions reply cannot be translated (a 5xx)."""

    default_code = ErrorCode.MALFORMED_PAYLOAD


def invalid_request(
    message: str, *, param: str | None = None, code: str | None = None
) -> TranslationError:
    """A 400 ``invalid_request_error``."""
    return TranslationError(400, "invalid_request_error", message, param=param, error_code=code)


def upstream_error(message: str) -> TranslationError:
    """A 502 ``server_error``: the upstream Chat Completions reply broke the protocol."""
    return TranslationError(502, "server_error", message, error_code="bad_upstream_reply")


def anthropic_error_type(status: int) -> str:
    """The Anthropic error type for an HTTP status.

    400 (and other 4xx not listed) → ``invalid_request_error``, 401 → ``authentication_error``,
    402 → ``billing_error``, 403 → ``permission_error``, 404 → ``not_found_error``,
    408/504 → ``timeout_error``, 429 → ``rate_limit_error``, 503/529 → ``overloaded_error``,
    any other status → ``api_error``. (Anthropic documents 413 as ``request_too_large``, which the
    SDK's error union does not accept; it is mapped to ``invalid_request_error``.)
    """
    fixed = {
        400: "invalid_request_error",
        401: "authentication_error",
        402: "billing_error",
        403: "permission_error",
        404: "not_found_error",
        408: "timeout_error",
        429: "rate_limit_error",
        503: "overloaded_error",
        504: "timeout_error",
        529: "overloaded_error",
    }
    if status in fixed:
        return fixed[status]
    if 400 <= status < 500:
        return "invalid_request_error"
    return "api_error"


def openai_error_body(
    type: str, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def anthropic_error_body(status: int, type: str, message: str) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}``.

    ``type`` is kept when it is an Anthropic error type, otherwise derived from ``status``.
    """
    kind = type if type in ANTHROPIC_ERROR_TYPES else anthropic_error_type(status)
    return {"type": "error", "error": {"type": kind, "message": message}}


_AT_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def convert(obj: object, typ: type[T], *, where: str = "") -> T:
    """``msgspec.convert(obj, typ)``, turning a validation failure into a 400.

    ``where`` is the path of ``obj`` inside the request (``"messages[2]"``) and prefixes the path
    msgspec reports, so the message reads ``"messages[2].content: Expected `str`, got `int`"``.
    """
    try:
        return msgspec.convert(obj, typ)
    except msgspec.ValidationError as exc:
        text = str(exc)
        path = where
        match = _AT_PATH.search(text)
        if match is not None:
            path = f"{where}{match.group('path')}"
            text = text[: match.start()]
        path = path.lstrip(".")
        raise invalid_request(f"{path}: {text}" if path else text, param=path or None) from None
