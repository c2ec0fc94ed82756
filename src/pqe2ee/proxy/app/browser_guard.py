"""What keeps web pages away from the local proxy (issue 16 item 5).

The proxy holds a default API key and answers on loopback: without these checks any website the
user visits could spend the key with a cross-site "simple" POST (``text/plain`` bodies need no
CORS preflight), and a DNS-rebinding page (its own name resolving to 127.0.0.1) could read the
decrypted replies, since to the browser that is its own origin. :class:`BrowserGuard` refuses:

* a ``Host`` that is not a loopback name, the listen address (any IP literal when listening on
  a wildcard address) or an ``--allow-host`` name: 421 ``host_not_allowed``. A rebinding page
  always sends its own name;
* a request from a web page: an ``Origin`` header (``null`` included) that is not the proxy's
  own origin nor an ``--allow-origin`` origin, or, without ``Origin``, ``Sec-Fetch-Site:
  cross-site / same-site``: 403 ``origin_not_allowed``;
* a POST whose body is not declared ``application/json`` (or ``+json``): 415
  ``unsupported_content_type``. Browsers send a body cross-site without asking only as
  ``text/plain``, a form or multipart, or with no type at all.

An allowed origin gets CORS answers (the preflight and ``Access-Control-Allow-Origin`` on the
reply), so a web UI the user chose can call the proxy. SDKs and CLIs send none of these headers
and are unaffected; ``curl -d`` must add ``-H 'content-type: application/json'``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pqe2ee.proxy.app.failures import Failure, dialect_of
from pqe2ee.server._asgi import json_response

if TYPE_CHECKING:
    from pqe2ee.proxy.app.config import ProxyConfig

__all__ = ["BrowserGuard", "BrowserPolicy", "browser_policy"]

LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::"})
_CORS_METHODS: Final = b"GET, POST, OPTIONS"
_CORS_MAX_AGE: Final = b"600"


def _host_name(value: str) -> str:
    """The name of a ``Host`` value (no port, no brackets, no trailing dot), lowercased."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _origin(value: str) -> str:
    return value.strip().lower().rstrip("/")


@dataclass(frozen=True, slots=True)
class BrowserPolicy:
    """Which ``Host`` names and web origins the proxy answers (see the module text)."""

    hosts: frozenset[str]
    origins: frozenset[str]
    any_ip: bool = False
    any_host: bool = False

    @classmethod
    def of(
        cls, listen_host: str, allow_hosts: Iterable[str] = (), allow_origins: Iterable[str] = ()
    ) -> BrowserPolicy:
        hosts = {_host_name(h) for h in allow_hosts if h.strip()}
        listen = _host_name(listen_host)
        wildcard = listen in _WILDCARDS
        if not wildcard:
            hosts.add(listen)
        return cls(
            hosts=frozenset(hosts - {"*"}) | LOOPBACK_NAMES,
            origins=frozenset(_origin(o) for o in allow_origins if o.strip()),
            any_ip=wildcard,
            any_host="*" in hosts,
        )

    def host_ok(self, host: str | None) -> bool:
        if self.any_host:
            return True
        if not host:
            return False
        name = _host_name(host)
        return name in self.hosts or (self.any_ip and _is_ip(name))

    def origin_ok(self, origin: str, host: str) -> bool:
        origin = _origin(origin)
        return origin in self.origins or origin == "http://" + host.strip().lower()


def browser_policy(config: ProxyConfig) -> BrowserPolicy:
    """The policy of a proxy's settings (listen host, ``allow_hosts``, ``allow_origins``)."""
    return BrowserPolicy.of(config.host, config.allow_hosts, config.allow_origins)


class BrowserGuard:
    """ASGI middleware applying a :class:`BrowserPolicy` before any route runs."""

    def __init__(self, app: Any, *, policy: BrowserPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value.decode("latin-1"))
        host = headers.get(b"host")
        refusal = None
        if not self.policy.host_ok(host):
            refusal = Failure(
                421,
                "invalid_request_error",
                "this proxy does not answer for that Host (start it with --allow-host NAME)",
                code="host_not_allowed",
            )
        origin = headers.get(b"origin")
        allowed = origin is not None and host is not None and self.policy.origin_ok(origin, host)
        if refusal is None and (
            (origin is not None and not allowed)
            or (origin is None and headers.get(b"sec-fetch-site") in ("cross-site", "same-site"))
        ):
            refusal = Failure(
                403,
                "permission_error",
                "requests from web pages are refused (start the proxy with --allow-origin "
                "ORIGIN to let one in)",
                code="origin_not_allowed",
            )
        method = scope["method"]
        if refusal is None and allowed and method == "OPTIONS":
            await self._preflight(origin or "", headers, send)
            return
        if refusal is None and method == "POST" and not _is_json(headers.get(b"content-type")):
            refusal = Failure(
                415,
                "invalid_request_error",
                "the body must be sent with content-type: application/json",
                code="unsupported_content_type",
            )
        if refusal is not None:
            response = json_response(refusal.body(dialect_of(scope["path"])), refusal.status)
            await response(scope, receive, send)
            return
        if not allowed:
            await self.app(scope, receive, send)
            return
        cors = [
            (b"access-control-allow-origin", (origin or "").encode("latin-1")),
            (b"vary", b"Origin"),
        ]

        async def send_cors(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *cors]}
            await send(message)

        await self.app(scope, receive, send_cors)

    @staticmethod
    async def _preflight(origin: str, headers: dict[bytes, str], send: Any) -> None:
        wanted = headers.get(b"access-control-request-headers", "")
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-allow-methods", _CORS_METHODS),
                    (b"access-control-allow-headers", wanted.encode("latin-1")),
                    (b"access-control-max-age", _CORS_MAX_AGE),
                    (b"vary", b"Origin"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )
