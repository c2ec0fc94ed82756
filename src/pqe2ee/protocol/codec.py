# TEMP-SHIM: remove after merge
"""Moved to :mod:`pqe2ee.protocol._codec`."""

from pqe2ee.protocol._codec import (
    b64decode,
    b64encode,
    extract_usage,
    gunzip_bounded,
    gzip_compress,
    json_decode_object,
    stream_flag,
)

__all__ = [
    "b64decode",
    "b64encode",
    "extract_usage",
    "gunzip_bounded",
    "gzip_compress",
    "json_decode_object",
    "stream_flag",
]
