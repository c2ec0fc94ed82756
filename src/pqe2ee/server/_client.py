"""The one way a server here builds its HTTP client toward what stands behind it (the engine
for the instance, the instances for the relay).

Environment proxies are ignored (``trust_env=False``: nothing may reroute that traffic), and
idle connections expire after 2 s - below uvicorn's 5 s keep-alive - so a connection the peer
is about to close is never reused (that race shows up as a stray 502 under load).
"""

from __future__ import annotations

import ssl
from typing import Final

import httpx2

__all__ = ["backend_client"]

_KEEPALIVE_EXPIRY: Final = 2.0


def backend_client(
    *,
    connect: float,
    read: float,
    write: float,
    max_connections: int,
    max_keepalive: int,
    ca_file: str | None = None,
) -> httpx2.AsyncClient:
    """An ``httpx2.AsyncClient``; the pool wait is bounded by ``connect`` too. ``ca_file``
    replaces the system trust store for https peers (a private CA, or one self-signed
    certificate: then only that certificate is accepted)."""
    return httpx2.AsyncClient(
        verify=ssl.create_default_context(cafile=ca_file) if ca_file else True,
        timeout=httpx2.Timeout(connect=connect, read=read, write=write, pool=connect),
        limits=httpx2.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive,
            keepalive_expiry=_KEEPALIVE_EXPIRY,
        ),
        follow_redirects=False,
        trust_env=False,
    )
