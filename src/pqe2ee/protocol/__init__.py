"""Sans-IO protocol core: envelopes, key schedule, stream state machine, discovery state.

No sockets, no asyncio, no HTTP client, no clock reads: bytes and events in, bytes and events
out; time and randomness are parameters. Every transport and server in pqe2ee uses this package
and nothing else for crypto or SSE framing.
"""

from pqe2ee.protocol._codec import extract_usage, stream_flag
from pqe2ee.protocol._events import NEED_DATA, Done, EndOfStream, InnerEvent
from pqe2ee.protocol.discovery import (
    DiscoveryResult,
    InstanceInfo,
    Lease,
    ModelMap,
    NoncePool,
    RateLimiter,
    looks_like_uuid,
    parse_discovery,
    parse_models,
)
from pqe2ee.protocol.kdf import INFO_REQUEST, INFO_RESPONSE, INFO_STREAM, derive_key
from pqe2ee.protocol.sse import LineSplitter, SSEEvent, SSEParser
from pqe2ee.protocol.v1.envelope import (
    BLOB_OVERHEAD,
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
    "INFO_REQUEST",
    "INFO_RESPONSE",
    "INFO_STREAM",
    "NEED_DATA",
    "RESPONSE_PK_FIELD",
    "DiscoveryResult",
    "Done",
    "EndOfStream",
    "InnerEvent",
    "InstanceInfo",
    "Lease",
    "LineSplitter",
    "ModelMap",
    "NoncePool",
    "OpenedRequest",
    "RateLimiter",
    "RemoteErrorEvent",
    "SSEEvent",
    "SSEParser",
    "SealedRequest",
    "StreamDecryptor",
    "StreamEncoder",
    "StreamEvent",
    "StreamSealer",
    "Usage",
    "derive_key",
    "extract_usage",
    "looks_like_uuid",
    "open_request",
    "open_response",
    "parse_discovery",
    "parse_models",
    "seal_request",
    "seal_response",
    "stream_flag",
]
