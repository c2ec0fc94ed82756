"""Sans-IO protocol core of both wire profiles: bytes and events in, bytes and events out.

No sockets, no asyncio, no HTTP client, no locks, no clock reads, no randomness of its own and
no crypto library: time and randomness are parameters (time in two types kept apart,
:mod:`~pqe2ee.protocol.clocks`), and crypto primitives come from :mod:`pqe2ee.backends`. A test
walks every module here to keep it so. Every transport and server in pqe2ee uses this package
for crypto, SSE framing and client state.

Layout (shared first, then each profile, then what sits on both)::

    _events.py   NEED_DATA, InnerEvent, Done, EndOfStream; the decryptors' event queue
    _codec.py    strict base64, bounded gzip, JSON objects, the stream flag, usage lines
    sse.py       SSE line splitting and parsing
    kdf.py       every key derivation (v1 key schedule, HPKE labeled extract/expand), one HKDF
    clocks.py    Monotonic vs UnixTime
    v1/          envelope.py (ML-KEM-768 blobs), stream.py (the v1 stream state machine)
    v2/          header, hpke, request, records, stream, negotiation, padding, replay, usage
    response.py  ResponseDecoder: the answer to a request, v1 or v2, single or streamed
    discovery.py model listing, discovery documents, nonce pools, rate limiter
    client.py    ClientState and the relay-answer classifiers a transport drives
"""

from pqe2ee.protocol._codec import extract_usage, stream_flag
from pqe2ee.protocol._events import NEED_DATA, Done, EndOfStream, InnerEvent
from pqe2ee.protocol.clocks import Monotonic, UnixTime
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
from pqe2ee.protocol.response import Opened, ResponseDecoder
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
    "Monotonic",
    "NoncePool",
    "Opened",
    "OpenedRequest",
    "RateLimiter",
    "RemoteErrorEvent",
    "ResponseDecoder",
    "SSEEvent",
    "SSEParser",
    "SealedRequest",
    "StreamDecryptor",
    "StreamEncoder",
    "StreamEvent",
    "StreamSealer",
    "UnixTime",
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
