"""pqe2ee: post-quantum end-to-end encryption for AI inference (Chutes E2EE v1 compatible).

The error tree (:mod:`pqe2ee.errors`) is re-exported here whole; the httpx2 transports are
imported on first use, since they need the ``[httpx]`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pqe2ee import errors as _errors
from pqe2ee.errors import *  # noqa: F403 - the whole tree, listed once in errors.__all__

__version__ = "0.1.0"

__all__ = ["AsyncE2EETransport", "E2EETransport", "__version__", *_errors.__all__]

if TYPE_CHECKING:
    from pqe2ee.transports.httpx2 import AsyncE2EETransport, E2EETransport


def __getattr__(name: str) -> Any:
    # The httpx2 transports need the [httpx] extra; import them only when asked for.
    if name in ("E2EETransport", "AsyncE2EETransport"):
        from pqe2ee.transports import httpx2 as _mod

        return getattr(_mod, name)
    raise AttributeError(name)
