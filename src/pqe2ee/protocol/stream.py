# TEMP-SHIM: remove after merge
"""Moved to :mod:`pqe2ee.protocol.v1.stream` (shared events: :mod:`pqe2ee.protocol._events`,
``extract_usage``: :mod:`pqe2ee.protocol._codec`)."""

from pqe2ee.protocol._codec import extract_usage
from pqe2ee.protocol._events import NEED_DATA, Done, EndOfStream, InnerEvent
from pqe2ee.protocol.v1.stream import (
    DEFAULT_MAX_RECORD,
    RemoteErrorEvent,
    StreamDecryptor,
    StreamEncoder,
    StreamEvent,
    StreamSealer,
    Usage,
)

__all__ = [
    "DEFAULT_MAX_RECORD",
    "NEED_DATA",
    "Done",
    "EndOfStream",
    "InnerEvent",
    "RemoteErrorEvent",
    "StreamDecryptor",
    "StreamEncoder",
    "StreamEvent",
    "StreamSealer",
    "Usage",
    "extract_usage",
]
