"""The one way a server here builds its HTTP client toward what stands behind it (the engine
for the instance, the instances for the relay).

Environment proxies are ignored (``trust_env=False``: nothing may reroute that traffic), and
idle connections expire after 2 s - below uvicorn's 5 s keep-alive - so a connection the peer
is about to close is never reused (that race shows up as a stray 502 under load).
"""

from __future__ import annotations

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
) -> httpx2.AsyncClient:
    """An ``httpx2.AsyncClient``; the pool wait is bounded by ``connect`` too."""
    return httpx2.AsyncClient(
        timeout=httpx2.Timeout(connect=connect, read=read, write=write, pool=connect),
        limits=httpx2.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive,
            keepalive_expiry=_KEEPALIVE_EXPIRY,
        ),
        follow_redirects=False,
        trust_env=False,
    )
