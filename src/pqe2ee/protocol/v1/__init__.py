"""Wire profile v1 (SPEC.md): ML-KEM-768 envelopes and the v1 stream, as the reference
runtime speaks them. Keys come from :mod:`pqe2ee.protocol.kdf`; the events shared with v2 from
:mod:`pqe2ee.protocol._events`."""

from pqe2ee.protocol.v1.envelope import (
    BLOB_OVERHEAD,
    DEFAULT_MAX_PLAINTEXT,
    RESPONSE_PK_FIELD,
    OpenedRequest,
    SealedRequest,
    open_request,
    open_response,
    seal_request,
    seal_response,
)
from pqe2ee.protocol.v1.stream import (
    RemoteErrorEvent,
    StreamDecryptor,
    StreamEncoder,
    StreamEvent,
    StreamSealer,
    Usage,
)

__all__ = [
    "BLOB_OVERHEAD",
    "DEFAULT_MAX_PLAINTEXT",
    "RESPONSE_PK_FIELD",
    "OpenedRequest",
    "RemoteErrorEvent",
    "SealedRequest",
    "StreamDecryptor",
    "StreamEncoder",
    "StreamEvent",
    "StreamSealer",
    "Usage",
    "open_request",
    "open_response",
    "seal_request",
    "seal_response",
]
