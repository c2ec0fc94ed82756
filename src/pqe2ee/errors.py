"""One exception hierarchy for pqe2ee, with stable machine-readable codes.

Tree::

    PQE2EEError
    ├── LocalProtocolError      the caller asked for something the protocol cannot do
    ├── RemoteProtocolError     the peer (instance, relay or engine) sent bytes that break the rules
    │   ├── DecryptError        an AEAD tag or KEM ciphertext did not verify
    │   ├── MalformedError      a blob, event or document has the wrong shape
    │   └── StreamError         a stream broke an integrity rule (truncation, duplicate, ...)
    ├── LimitExceeded           input went past a configured bound
    ├── BackendError            a crypto backend is missing or refused an operation
    ├── RemoteError             the far side reported an error (e2e_error, sealed upstream error)
    └── RelayError              the relay answered with an error status (nonce, path, gone, busy, ...)

Messages are short and never contain plaintext, key material or prompts: they name what was wrong
and, where useful, sizes or counts.
"""

from __future__ import annotations

import enum

__all__ = [
    "BackendError",
    "DecryptError",
    "ErrorCode",
    "LimitExceeded",
    "LocalProtocolError",
    "MalformedError",
    "PQE2EEError",
    "RelayError",
    "RemoteError",
    "RemoteProtocolError",
    "StreamError",
]


class ErrorCode(enum.StrEnum):
    """Stable error codes. Listed in SPEC.md; never renamed, only added to."""

    # local misuse
    INVALID_BODY = "invalid_body"
    INVALID_KEY = "invalid_key"
    INVALID_ARGUMENT = "invalid_argument"
    # crypto / envelope
    DECRYPT_FAILED = "decrypt_failed"
    MALFORMED_BLOB = "malformed_blob"
    MALFORMED_PAYLOAD = "malformed_payload"
    MALFORMED_DISCOVERY = "malformed_discovery"
    # streams
    MALFORMED_EVENT = "malformed_event"
    RECORD_BEFORE_INIT = "record_before_init"
    DUPLICATE_INIT = "duplicate_init"
    DUPLICATE_RECORD = "duplicate_record"
    DATA_AFTER_DONE = "data_after_done"
    STREAM_TRUNCATED = "stream_truncated"
    INVALID_UTF8 = "invalid_utf8"
    # limits
    OVERSIZE = "oversize"
    # backends
    BACKEND_UNAVAILABLE = "backend_unavailable"
    UNSUPPORTED_OPERATION = "unsupported_operation"
    # far side
    REMOTE_ERROR = "remote_error"
    UPSTREAM_ERROR = "upstream_error"
    # relay answers and client-side routing
    NONCE_REJECTED = "nonce_rejected"
    PATH_FORBIDDEN = "path_forbidden"
    INSTANCE_GONE = "instance_gone"
    INSTANCE_BUSY = "instance_busy"
    KEY_EXCHANGE_REQUIRED = "key_exchange_required"
    NO_INSTANCES = "no_instances"
    MODEL_NOT_FOUND = "model_not_found"
    DISCOVERY_FAILED = "discovery_failed"
    DISCOVERY_RATE_LIMITED = "discovery_rate_limited"
    RETRIES_EXHAUSTED = "retries_exhausted"
    RELAY_ERROR = "relay_error"
    PLAINTEXT_REFUSED = "plaintext_refused"
    CONNECTION_LOST = "connection_lost"
    # wire profile v2 (spec/v2.md §9). The instance-side ones double as the plaintext
    # `400 {"detail":"e2e_v2:<code>"}` hints, so their values are wire strings too.
    BAD_HEADER = "bad_header"
    UNKNOWN_KEY = "unknown_key"
    CONTEXT_MISMATCH = "context_mismatch"
    STALE = "stale"
    REPLAY = "replay"
    RECORD_OUT_OF_ORDER = "record_out_of_order"
    RECORD_AUTH_FAILED = "record_auth_failed"
    RECORD_GRAMMAR = "record_grammar"
    UNKNOWN_RECORD_TYPE = "unknown_record_type"
    BAD_PADDING = "bad_padding"
    DATA_AFTER_END = "data_after_end"
    USAGE_MISMATCH = "usage_mismatch"
    DOWNGRADE_REFUSED = "downgrade_refused"
    DOWNGRADE_SUSPECTED = "downgrade_suspected"
    # codes the instance puts in its plaintext JSON refusals (`{"detail": ..., "code": ...}`)
    STREAM_MISMATCH = "stream_mismatch"
    INSTANCE_MISMATCH = "instance_mismatch"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    V1_DISABLED = "v1_disabled"
    REPLAY_CACHE_UNAVAILABLE = "replay_cache_unavailable"


class PQE2EEError(Exception):
    """Base of every pqe2ee error. ``code`` is stable; ``str(err)`` is ``"<code>: <message>"``."""

    default_code: ErrorCode = ErrorCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        self.code: ErrorCode = code if code is not None else self.default_code
        self.message = message
        super().__init__(f"{self.code.value}: {message}")


class LocalProtocolError(PQE2EEError):
    """The local caller broke a rule (bad body, bad key, bad argument)."""

    default_code = ErrorCode.INVALID_ARGUMENT


class RemoteProtocolError(PQE2EEError):
    """The remote side sent something that breaks the protocol."""

    default_code = ErrorCode.MALFORMED_PAYLOAD


class DecryptError(RemoteProtocolError):
    """Authentication failed: the data was tampered with, truncated, or sealed to another key."""

    default_code = ErrorCode.DECRYPT_FAILED


class MalformedError(RemoteProtocolError):
    """A blob, event or JSON document does not have the shape the protocol requires."""

    default_code = ErrorCode.MALFORMED_PAYLOAD


class StreamError(RemoteProtocolError):
    """A stream broke an integrity rule: truncated, duplicated, out of order, or malformed."""

    default_code = ErrorCode.MALFORMED_EVENT


class LimitExceeded(PQE2EEError):
    """Input exceeded a configured size or count bound."""

    default_code = ErrorCode.OVERSIZE


class BackendError(PQE2EEError):
    """A crypto backend is unavailable here, or cannot perform the requested operation."""

    default_code = ErrorCode.BACKEND_UNAVAILABLE


class RemoteError(PQE2EEError):
    """The far side reported an error inside the encrypted channel (or as ``e2e_error``).

    ``status`` is the HTTP status the far side attached, when known; ``detail`` is the decoded
    error object exactly as sent (it is the caller's own data, never logged by pqe2ee).
    """

    default_code = ErrorCode.REMOTE_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        status: int | None = None,
        detail: object = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.detail = detail


class RelayError(PQE2EEError):
    """The relay (control plane) answered an invocation or discovery with an error status."""

    default_code = ErrorCode.RELAY_ERROR

    def __init__(
        self, message: str, *, code: ErrorCode | None = None, status: int | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
