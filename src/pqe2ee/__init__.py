"""pqe2ee: post-quantum end-to-end encryption for AI inference (Chutes E2EE v1 compatible)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pqe2ee.errors import (
    BackendError,
    DecryptError,
    ErrorCode,
    LimitExceeded,
    LocalProtocolError,
    MalformedError,
    PQE2EEError,
    RelayError,
    RemoteError,
    RemoteProtocolError,
    StreamError,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncE2EETransport",
    "BackendError",
    "DecryptError",
    "E2EETransport",
    "ErrorCode",
    "LimitExceeded",
    "LocalProtocolError",
    "MalformedError",
    "PQE2EEError",
    "RelayError",
    "RemoteError",
    "RemoteProtocolError",
    "StreamError",
    "__version__",
]

if TYPE_CHECKING:
    from pqe2ee.transports.httpx2 import AsyncE2EETransport, E2EETransport


def __getattr__(name: str) -> Any:
    # The httpx2 transports need the [httpx] extra; import them only when asked for.
    if name in ("E2EETransport", "AsyncE2EETransport"):
        from pqe2ee.transports import httpx2 as _mod

        return getattr(_mod, name)
    raise AttributeError(name)
