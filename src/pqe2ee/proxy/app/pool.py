"""One ``httpx2.AsyncClient`` over its own strict E2EE transport per API key, pooled.

:class:`ClientPool` keeps them LRU with an idle TTL; :func:`client_factory` builds them from a
:class:`~pqe2ee.proxy.app.config.ProxyConfig` and the :func:`upstream_options` every transport
shares - including one set of response-key pools (``ClientOptions.make_key_pools``), so many
keys still mean at most one key filler thread per key type. Keys are held only inside the transports: the
pool indexes them by digest. An entry evicted while calls still use it is closed when the last
of them ends; everything is closed when the pool is.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import httpx2

from pqe2ee.proxy.app.config import ProxyConfig
from pqe2ee.proxy.app.failures import Failure
from pqe2ee.transports._common import KEEPALIVE_EXPIRY
from pqe2ee.transports.options import ClientOptions

__all__ = ["ClientPool", "PoolEntry", "client_factory", "client_timeout", "upstream_options"]

log = logging.getLogger("pqe2ee.proxy")


@dataclass(slots=True, eq=False)
class PoolEntry:
    """One pooled client: ``users`` calls hold it; ``retired`` once evicted from the pool."""

    client: httpx2.AsyncClient
    users: int = 0
    last_used: float = 0.0
    retired: bool = False


class ClientPool:
    """``httpx2.AsyncClient`` (each over its own E2EE transport) per API key, LRU + idle TTL.

    Keys are held only inside the transports; the pool indexes them by a SHA-256 digest. An
    entry evicted while calls still use it is closed when the last of them ends.
    """

    def __init__(
        self,
        factory: Callable[[str], httpx2.AsyncClient],
        *,
        max_size: int,
        idle_ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = factory
        self._max = max_size
        self._ttl = idle_ttl
        self._clock = clock
        self._entries: OrderedDict[bytes, PoolEntry] = OrderedDict()
        self._closed = False

    def __len__(self) -> int:
        return len(self._entries)

    def fingerprints(self) -> list[str]:
        """The pooled keys as the first 16 hex digits of their SHA-256 (for the status page)."""
        return sorted(ident.hex()[:16] for ident in self._entries)

    @staticmethod
    def _ident(key: str) -> bytes:
        return hashlib.sha256(key.encode()).digest()

    def _expired(self, now: float) -> list[PoolEntry]:
        """Remove idle entries past the TTL (oldest first); return the ones to close."""
        out: list[PoolEntry] = []
        entries = self._entries
        while entries:  # oldest first: the first one still in use or fresh ends the sweep
            ident, entry = next(iter(entries.items()))
            if entry.users or now - entry.last_used < self._ttl:
                break
            del entries[ident]
            entry.retired = True
            out.append(entry)
        return out

    async def acquire(self, key: str) -> PoolEntry:
        if self._closed:
            raise Failure(503, "server_error", "the proxy is shutting down")
        now = self._clock()
        ident = self._ident(key)
        to_close = self._expired(now)
        entry = self._entries.get(ident)
        if entry is None:
            while len(self._entries) >= self._max:
                _, old = self._entries.popitem(last=False)
                old.retired = True
                if not old.users:
                    to_close.append(old)
            entry = PoolEntry(self._factory(key))
            self._entries[ident] = entry
        else:
            self._entries.move_to_end(ident)
        entry.users += 1
        entry.last_used = now
        if to_close:  # nothing to close on almost every call: no shielded scope for it
            await self._close_all(to_close)
        return entry

    async def release(self, entry: PoolEntry) -> None:
        entry.users -= 1
        entry.last_used = self._clock()
        if entry.retired and not entry.users:
            await self._close_all([entry])

    async def sweep(self) -> None:
        await self._close_all(self._expired(self._clock()))

    async def aclose(self) -> None:
        self._closed = True
        entries = list(self._entries.values())
        self._entries.clear()
        await self._close_all(entries)

    @staticmethod
    async def _close_all(entries: list[PoolEntry]) -> None:
        with anyio.CancelScope(shield=True):
            for entry in entries:
                try:
                    await entry.client.aclose()
                except Exception as exc:  # closing must not fail a request
                    log.warning("closing an upstream client failed (%s)", type(exc).__name__)


def client_timeout(config: ProxyConfig) -> httpx2.Timeout:
    """The httpx2 timeouts of every upstream call (the pool wait is the connect timeout)."""
    return httpx2.Timeout(
        connect=config.connect_timeout,
        read=config.read_timeout,
        write=config.write_timeout,
        pool=config.connect_timeout,
    )


def upstream_options(config: ProxyConfig) -> ClientOptions:
    """The options of every per-key transport: *strict* (a model call that cannot be
    encrypted is refused by the transport, never sent in plaintext), the proxy's version
    policy in one shared :class:`~pqe2ee.protocol.v2.Negotiator` (a chute pinned to v2
    through one key is pinned for all), and ``config.transport_options`` on top. The API key
    and the inner transport are set per key."""
    from pqe2ee.protocol.v2.negotiation import E2EPolicy, Negotiator

    extra = dict(config.transport_options)
    extra.pop("inner", None)  # each key's transport gets its own connection pool
    base = extra.pop("options", None)
    negotiator = Negotiator(E2EPolicy(min_version=config.min_version, prefer_v2=config.prefer_v2))
    return ClientOptions.of(
        base,
        **{
            **extra,
            "api_base": config.api_base,
            "models_base": config.models_base,
            "backend": config.backend,
            "strict": True,
            "deadline": config.deadline,
            "negotiator": negotiator,
            "attest": config.attest,  # one AttestOptions, so one gate for every key
        },
    )


def client_factory(
    config: ProxyConfig, options: ClientOptions
) -> Callable[[str], httpx2.AsyncClient]:
    """One client per API key over an E2EE transport with ``options`` (see
    :func:`upstream_options`; give them shared ``key_pools`` so that the per-key transports
    run one set of key fillers, not one per key)."""
    from pqe2ee.transports.httpx2 import AsyncE2EETransport

    timeout = client_timeout(config)
    limits = httpx2.Limits(
        max_connections=config.max_connections,
        max_keepalive_connections=min(config.max_connections, 64),
        keepalive_expiry=KEEPALIVE_EXPIRY,  # below the relay's keep-alive (see the constant)
    )

    def make(key: str) -> httpx2.AsyncClient:
        inner = httpx2.AsyncHTTPTransport(limits=limits)
        transport = AsyncE2EETransport(options=options, api_key=key, inner=inner)
        return httpx2.AsyncClient(transport=transport, base_url=config.models_base, timeout=timeout)

    return make
