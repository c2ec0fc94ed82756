"""The one way a server here builds its HTTP client toward what stands behind it (the engine
for the instance, the instances for the relay).

Environment proxies are ignored (``trust_env=False``: nothing may reroute that traffic), and
idle connections expire after 2 s - below uvicorn's 5 s keep-alive - so a connection the peer
is about to close is never reused (that race shows up as a stray 502 under load).

:class:`PostTarget` is the part of ``client.build_request("POST", url, headers=...)`` that does
not change between requests to one URL, worked out once: a hot path builds its request from it
(~20 us less each) and still sends what ``build_request`` would.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import httpx2

__all__ = ["PostTarget", "backend_client"]

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


#: Headers that belong to each request, not to its target.
_PER_REQUEST: Final = (b"content-length", b"cookie")


@dataclass(frozen=True, slots=True)
class PostTarget:
    """A URL POSTed to over and over with one client: the parsed URL, the headers
    ``client.build_request`` sends before a body's own (``Host``, the client's defaults merged
    with ``headers``), and the client's timeouts. Cookies are taken from the client's jar per
    request, as ``build_request`` does."""

    url: httpx2.URL
    headers: tuple[tuple[bytes, bytes], ...]
    timeout: dict[str, float | None]

    @classmethod
    def of(
        cls, client: httpx2.AsyncClient, url: str, headers: Mapping[str, str] | None = None
    ) -> PostTarget:
        probe = client.build_request("POST", url, headers=headers, content=b"")
        kept = tuple((k, v) for k, v in probe.headers.raw if k.lower() not in _PER_REQUEST)
        return cls(probe.url, kept, client.timeout.as_dict())

    def request(
        self,
        client: httpx2.AsyncClient,
        *,
        headers: Iterable[tuple[bytes, bytes]] = (),
        content: bytes | None = None,
        stream: httpx2.AsyncByteStream | None = None,
    ) -> httpx2.Request:
        """The request ``client.build_request`` would build with these headers appended and this
        body (``content`` gets its ``Content-Length``; with ``stream`` the caller sends it)."""
        cookies = client.cookies or None
        if content is not None and stream is None and cookies is None:
            # What ``content=`` works out (the body's Content-Length after every other header,
            # the body read), given as a ready stream: no content-type, multipart or header
            # merging pass, ~15 us less per request. With cookies their header comes first.
            request = httpx2.Request(
                "POST",
                self.url,
                headers=[*self.headers, *headers, (b"Content-Length", b"%d" % len(content))],
                stream=httpx2.ByteStream(content),
                extensions={"timeout": self.timeout},
            )
            request.read()
            return request
        return httpx2.Request(
            "POST",
            self.url,
            headers=[*self.headers, *headers],
            content=content,
            stream=stream,
            cookies=cookies,
            extensions={"timeout": self.timeout},
        )
