# TEMP-SHIM: remove after merge
"""Moved to :mod:`pqe2ee.protocol.v1.envelope` (``stream_flag``: :mod:`pqe2ee.protocol._codec`)."""

from pqe2ee.protocol._codec import stream_flag
from pqe2ee.protocol.v1.envelope import (
    BLOB_OVERHEAD,
    DEFAULT_COMPRESSLEVEL,
    DEFAULT_MAX_PLAINTEXT,
    RESPONSE_PK_FIELD,
    STORE_BELOW,
    OpenedRequest,
    SealedRequest,
    open_request,
    open_response,
    seal_request,
    seal_response,
)

__all__ = [
    "BLOB_OVERHEAD",
    "DEFAULT_COMPRESSLEVEL",
    "DEFAULT_MAX_PLAINTEXT",
    "RESPONSE_PK_FIELD",
    "STORE_BELOW",
    "OpenedRequest",
    "SealedRequest",
    "open_request",
    "open_response",
    "seal_request",
    "seal_response",
    "stream_flag",
]
