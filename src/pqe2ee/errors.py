"""One exception tree for pqe2ee, with stable machine-readable codes, each owned by one class.

Tree (the codes each class owns; a class without codes of its own carries its parent's)::

    PQE2EEError                   catch-all root; raise a subclass
    ├── LocalProtocolError        the caller asked for something the protocol cannot do
    │                             invalid_argument, invalid_body, invalid_key, plaintext_refused
    ├── RemoteProtocolError       the peer (instance, relay, engine or client) broke the rules
    │   │                         context_mismatch, unknown_key, stale, replay, usage_mismatch,
    │   │                         downgrade_refused, downgrade_suspected
    │   ├── DecryptError          an AEAD tag or KEM ciphertext did not verify
    │   │                         decrypt_failed, record_auth_failed
    │   ├── MalformedError        a blob, event or document has the wrong shape
    │   │                         malformed_payload, malformed_blob, malformed_discovery,
    │   │                         bad_header, bad_padding
    │   └── StreamError           a stream broke an integrity rule
    │       │                     malformed_event, record_before_init, duplicate_init,
    │       │                     duplicate_record, record_out_of_order, record_grammar,
    │       │                     unknown_record_type, data_after_done, data_after_end,
    │       │                     stream_truncated, invalid_utf8
    │       └── ConnectionLost    the connection broke before the answer was complete
    │                             connection_lost
    ├── LimitExceeded             input went past a configured bound: oversize
    │   └── DeadlineExceeded      a request outlived the client's total deadline
    │                             deadline_exceeded
    ├── BackendError              a crypto backend is missing or refused an operation (``reason``:
    │                             an UnavailableReason) backend_unavailable, unsupported_operation
    ├── RemoteError               the far side reported an error: remote_error, upstream_error
    ├── RelayError                the relay answered with an error status (or discovery failed)
    │                             relay_error, nonce_rejected, path_forbidden, instance_gone,
    │                             instance_busy, key_exchange_required, no_instances,
    │                             model_not_found, discovery_failed, discovery_rate_limited,
    │                             retries_exhausted
    ├── AttestationError          TEE evidence did not prove the instance key (per-check reasons
    │                             in a Verdict; raised as attest_* codes, see pqe2ee.attest)
    └── ServerError               a pqe2ee server refuses or cannot serve a request
        │                         stream_mismatch, instance_mismatch, upstream_timeout,
        │                         v1_disabled
        └── StoreUnavailable      a shared store (replay cache, nonce store) cannot answer:
                                  fail closed (503). replay_cache_unavailable,
                                  nonce_store_unavailable (server.replaycache.ReplayCacheError,
                                  server.noncestore.NonceStoreError)

A class declares the codes it owns with a class keyword, ``class DecryptError(RemoteProtocolError,
codes=(...))``; the first is its ``default_code``. Claiming a code another class owns is a
``TypeError`` when the class is created, so every code has one owner (:func:`error_class`). An
instance may carry the codes of its class; a subclass that declares none (``KeyFileError``,
``RetriesExhausted``, the transports' stream errors) carries those of its nearest declaring
ancestors (:meth:`PQE2EEError.allowed_codes`). tests/test_errors.py checks every ``code=`` in
the source against this rule.

Every error has ``code`` and ``message``; ``RemoteError``, ``RelayError`` and ``ServerError`` also
``status`` (the HTTP status that belongs to the error, or ``None``) and ``detail`` (the far side's
error object, or ``None``). ``str(err)`` is ``"<code>: <message>"``; every error pickles,
whatever its constructor's signature. Messages are short and never contain plaintext, key
material or prompts: they name what was wrong and, where useful, sizes or counts.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any, ClassVar

__all__ = [
    "AttestationError",
    "BackendError",
    "ConnectionLost",
    "DeadlineExceeded",
    "DecryptError",
    "ErrorCode",
    "LimitExceeded",
    "LocalProtocolError",
    "MalformedError",
    "PQE2EEError",
    "RelayError",
    "RemoteError",
    "RemoteProtocolError",
    "ServerError",
    "StoreUnavailable",
    "StreamError",
    "UnavailableReason",
    "error_class",
]


class ErrorCode(enum.StrEnum):
    """Stable error codes. Listed in SPEC.md; never renamed, only added to.

    Each code is owned by exactly one class of the tree (:func:`error_class`).
    """

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
    DEADLINE_EXCEEDED = "deadline_exceeded"
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
    NONCE_STORE_UNAVAILABLE = "nonce_store_unavailable"
    # attestation (SPEC.md "Attestation"): the reasons of a Verdict and the errors raised
    ATTEST_FAILED = "attest_failed"
    ATTEST_UNAVAILABLE = "attest_unavailable"
    ATTEST_DOWNGRADE = "attest_downgrade"
    ATTEST_EVIDENCE_MISSING = "attest_evidence_missing"
    ATTEST_EVIDENCE_MALFORMED = "attest_evidence_malformed"
    ATTEST_COLLATERAL_MISSING = "attest_collateral_missing"
    ATTEST_QUOTE_INVALID = "attest_quote_invalid"
    ATTEST_QUOTE_VERSION = "attest_quote_version"
    ATTEST_TEE_TYPE = "attest_tee_type"
    ATTEST_TCB_STATUS = "attest_tcb_status"
    ATTEST_DEBUG = "attest_debug"
    ATTEST_NONCE_BINDING = "attest_nonce_binding"
    ATTEST_CERT_BINDING = "attest_cert_binding"
    ATTEST_MEASUREMENT = "attest_measurement"
    ATTEST_GPU_MISSING = "attest_gpu_missing"
    ATTEST_GPU_CHAIN = "attest_gpu_chain"
    ATTEST_GPU_SIGNATURE = "attest_gpu_signature"
    ATTEST_GPU_NONCE = "attest_gpu_nonce"
    ATTEST_GPU_UNSUPPORTED = "attest_gpu_unsupported"
    ATTEST_GPU_NRAS = "attest_gpu_nras"
    ATTEST_GPU_NRAS_TOKEN = "attest_gpu_nras_token"


_OWNERS: dict[ErrorCode, type[PQE2EEError]] = {}


def error_class(code: ErrorCode) -> type[PQE2EEError]:
    """The class that owns ``code`` (raise that class, or a subclass of it, with this code)."""
    return _OWNERS[code]


def _rebuild(cls: type[PQE2EEError], args: tuple[Any, ...]) -> PQE2EEError:
    exc = cls.__new__(cls)
    exc.args = args
    return exc


class PQE2EEError(Exception):
    """Base of every pqe2ee error. ``code`` is stable; ``str(err)`` is ``"<code>: <message>"``.

    Catch it; raise a subclass (the root owns no code: its default, ``invalid_argument``, is
    kept for callers that construct it directly).
    """

    #: The codes this class itself owns (set from the ``codes=`` class keyword; ``()`` if none).
    codes: ClassVar[tuple[ErrorCode, ...]] = ()
    default_code: ClassVar[ErrorCode] = ErrorCode.INVALID_ARGUMENT

    def __init_subclass__(cls, *, codes: Iterable[ErrorCode] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        owned = tuple(codes)
        for code in owned:
            if code in _OWNERS:
                raise TypeError(
                    f"{cls.__name__} claims {code.value!r}, owned by {_OWNERS[code].__name__}"
                )
        if owned and vars(cls).get("default_code", owned[0]) not in owned:
            raise TypeError(f"{cls.__name__}.default_code is not one of its codes")
        cls.codes = owned
        _OWNERS.update(dict.fromkeys(owned, cls))
        if owned:
            cls.default_code = vars(cls).get("default_code", owned[0])

    @classmethod
    def allowed_codes(cls) -> frozenset[ErrorCode]:
        """The codes an instance of ``cls`` may carry: those of the most derived classes in its
        MRO that own codes (its own if it owns any)."""
        owners = [k for k in cls.__mro__ if issubclass(k, PQE2EEError) and k.codes]
        nearest = [k for k in owners if not any(o is not k and issubclass(o, k) for o in owners)]
        return frozenset(code for k in nearest for code in k.codes)

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        self.code: ErrorCode = code if code is not None else self.default_code
        self.message = message
        super().__init__(f"{self.code.value}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt without calling __init__ (subclasses have their own signatures), then the
        # attributes are restored from __dict__.
        return (_rebuild, (type(self), self.args), self.__dict__)


class _Answered(PQE2EEError):
    """An error that came with an answer: ``status`` is the HTTP status that belongs to it,
    ``detail`` the far side's error object (``None`` when there is none)."""

    default_status: ClassVar[int | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        status: int | None = None,
        detail: object = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status if status is not None else self.default_status
        self.detail = detail


class LocalProtocolError(
    PQE2EEError,
    codes=(
        ErrorCode.INVALID_ARGUMENT,
        ErrorCode.INVALID_BODY,
        ErrorCode.INVALID_KEY,
        ErrorCode.PLAINTEXT_REFUSED,
    ),
):
    """The local caller broke a rule (bad body, bad key, bad argument)."""


class RemoteProtocolError(
    PQE2EEError,
    codes=(
        ErrorCode.CONTEXT_MISMATCH,
        ErrorCode.UNKNOWN_KEY,
        ErrorCode.STALE,
        ErrorCode.REPLAY,
        ErrorCode.USAGE_MISMATCH,
        ErrorCode.DOWNGRADE_REFUSED,
        ErrorCode.DOWNGRADE_SUSPECTED,
    ),
):
    """The remote side sent something that breaks the protocol."""


class DecryptError(
    RemoteProtocolError, codes=(ErrorCode.DECRYPT_FAILED, ErrorCode.RECORD_AUTH_FAILED)
):
    """Authentication failed: the data was tampered with, truncated, or sealed to another key."""


class MalformedError(
    RemoteProtocolError,
    codes=(
        ErrorCode.MALFORMED_PAYLOAD,
        ErrorCode.MALFORMED_BLOB,
        ErrorCode.MALFORMED_DISCOVERY,
        ErrorCode.BAD_HEADER,
        ErrorCode.BAD_PADDING,
    ),
):
    """A blob, event or JSON document does not have the shape the protocol requires."""


class StreamError(
    RemoteProtocolError,
    codes=(
        ErrorCode.MALFORMED_EVENT,
        ErrorCode.RECORD_BEFORE_INIT,
        ErrorCode.DUPLICATE_INIT,
        ErrorCode.DUPLICATE_RECORD,
        ErrorCode.RECORD_OUT_OF_ORDER,
        ErrorCode.RECORD_GRAMMAR,
        ErrorCode.UNKNOWN_RECORD_TYPE,
        ErrorCode.DATA_AFTER_DONE,
        ErrorCode.DATA_AFTER_END,
        ErrorCode.STREAM_TRUNCATED,
        ErrorCode.INVALID_UTF8,
    ),
):
    """A stream broke an integrity rule: truncated, duplicated, out of order, or malformed."""


class ConnectionLost(StreamError, codes=(ErrorCode.CONNECTION_LOST,)):
    """The connection broke before the answer was complete (a :class:`StreamError`, so code
    that handles broken streams handles it too)."""


class LimitExceeded(PQE2EEError, codes=(ErrorCode.OVERSIZE,)):
    """Input exceeded a configured size or count bound."""


class DeadlineExceeded(LimitExceeded, codes=(ErrorCode.DEADLINE_EXCEEDED,)):
    """A client request (discovery, invoke and the whole answer, a streamed body included)
    took longer than the client's total ``deadline`` (a :class:`LimitExceeded`: a time bound)."""


class UnavailableReason(enum.StrEnum):
    """Why a crypto backend (or one primitive of it) cannot be used here:
    :attr:`BackendError.reason`, shown by ``pqe2ee backends``."""

    UNKNOWN_BACKEND = "unknown backend"
    NOT_INSTALLED = "not installed"  # the Python package is missing
    NATIVE_LIBRARY_MISSING = "native library missing"  # e.g. liboqs, or OpenSSL without ML-KEM
    UNSUPPORTED_VERSION = "unsupported version"  # too old, or not a tested version
    MISSING_API = "missing API"  # the installed library lacks what the adapter calls
    UNSUPPORTED_OPERATION = "unsupported operation"  # the backend does not offer this
    IMPORT_FAILED = "import failed"  # anything else that stopped the adapter from loading


class BackendError(
    PQE2EEError, codes=(ErrorCode.BACKEND_UNAVAILABLE, ErrorCode.UNSUPPORTED_OPERATION)
):
    """A crypto backend is unavailable here, or cannot perform the requested operation.

    ``reason`` says why (an :class:`UnavailableReason`), or is ``None`` where no single backend
    is to blame (``"auto"`` found none).
    """

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        reason: UnavailableReason | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.reason = reason


class RemoteError(_Answered, codes=(ErrorCode.REMOTE_ERROR, ErrorCode.UPSTREAM_ERROR)):
    """The far side reported an error inside the encrypted channel (or as ``e2e_error``).

    ``status`` is the HTTP status the far side attached, when known; ``detail`` is the decoded
    error object exactly as sent (it is the caller's own data, never logged by pqe2ee).
    """


class RelayError(
    _Answered,
    codes=(
        ErrorCode.RELAY_ERROR,
        ErrorCode.NONCE_REJECTED,
        ErrorCode.PATH_FORBIDDEN,
        ErrorCode.INSTANCE_GONE,
        ErrorCode.INSTANCE_BUSY,
        ErrorCode.KEY_EXCHANGE_REQUIRED,
        ErrorCode.NO_INSTANCES,
        ErrorCode.MODEL_NOT_FOUND,
        ErrorCode.DISCOVERY_FAILED,
        ErrorCode.DISCOVERY_RATE_LIMITED,
        ErrorCode.RETRIES_EXHAUSTED,
    ),
):
    """The relay (control plane) answered an invocation or discovery with an error status."""


class AttestationError(
    PQE2EEError,
    codes=(
        ErrorCode.ATTEST_FAILED,
        ErrorCode.ATTEST_UNAVAILABLE,
        ErrorCode.ATTEST_DOWNGRADE,
        ErrorCode.ATTEST_EVIDENCE_MISSING,
        ErrorCode.ATTEST_EVIDENCE_MALFORMED,
        ErrorCode.ATTEST_COLLATERAL_MISSING,
        ErrorCode.ATTEST_QUOTE_INVALID,
        ErrorCode.ATTEST_QUOTE_VERSION,
        ErrorCode.ATTEST_TEE_TYPE,
        ErrorCode.ATTEST_TCB_STATUS,
        ErrorCode.ATTEST_DEBUG,
        ErrorCode.ATTEST_NONCE_BINDING,
        ErrorCode.ATTEST_CERT_BINDING,
        ErrorCode.ATTEST_MEASUREMENT,
        ErrorCode.ATTEST_GPU_MISSING,
        ErrorCode.ATTEST_GPU_CHAIN,
        ErrorCode.ATTEST_GPU_SIGNATURE,
        ErrorCode.ATTEST_GPU_NONCE,
        ErrorCode.ATTEST_GPU_UNSUPPORTED,
        ErrorCode.ATTEST_GPU_NRAS,
        ErrorCode.ATTEST_GPU_NRAS_TOKEN,
    ),
):
    """TEE evidence did not prove that the instance key belongs to a genuine, up-to-date,
    non-debug TEE answering for our nonce (or it could not be checked here).

    ``verdicts`` holds the per-instance :class:`pqe2ee.attest.Verdict` values when there are
    any (every one rejected); a verdict's reasons are codes of this class. ``attest_failed``:
    no instance passed; ``attest_unavailable``: the verifier (extra ``[attest]``) or its
    collateral is missing here; ``attest_downgrade``: a chute verified before came back with
    no TEE listing or evidence.
    """

    def __init__(
        self, message: str, *, code: ErrorCode | None = None, verdicts: tuple[object, ...] = ()
    ) -> None:
        super().__init__(message, code=code)
        self.verdicts = verdicts


class ServerError(
    _Answered,
    codes=(
        ErrorCode.STREAM_MISMATCH,
        ErrorCode.INSTANCE_MISMATCH,
        ErrorCode.UPSTREAM_TIMEOUT,
        ErrorCode.V1_DISABLED,
    ),
):
    """A pqe2ee server (instance or relay) refuses a request or cannot serve it.

    ``status`` is the HTTP status it answers with. These are the codes the instance puts in its
    plaintext refusals (``{"detail": ..., "code": ...}``).
    """


class StoreUnavailable(
    ServerError,
    codes=(ErrorCode.REPLAY_CACHE_UNAVAILABLE, ErrorCode.NONCE_STORE_UNAVAILABLE),
):
    """A shared store (the v2 replay cache, the relay's nonce store) cannot answer.

    The stores raise their own subclasses (:class:`pqe2ee.server.replaycache.ReplayCacheError`,
    :class:`pqe2ee.server.noncestore.NonceStoreError`), each with its code.

    Fail closed: the request is refused with 503, never admitted.
    """

    default_status = 503
