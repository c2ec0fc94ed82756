"""Single-use nonces and discovery rate limits for the relay: in memory or in Redis.

A nonce is issued by ``GET /e2e/instances/{chute_id}`` for one (API key, chute, instance) and
consumed by exactly one ``POST /e2e/invoke`` naming the same three. :meth:`NonceStore.consume`
removes the nonce *before* comparing, atomically, so two relays sharing one Redis can never both
accept it; a mismatching attempt therefore burns the nonce too (fail closed, like the real
network, which consumes the nonce before any later check).

API keys never reach a store: callers pass :func:`api_key_id` (a SHA-256 hex prefix) instead.

``MemoryNonceStore`` is for one relay process; ``RedisNonceStore`` lets several relays share
nonces and rate-limit counters (redis-py asyncio; needs Redis >= 7.0 for ``GETDEL`` and
``EXPIRE NX``, checked by :meth:`RedisNonceStore.ping` when the relay starts).
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from pqe2ee.errors import ErrorCode, LocalProtocolError, StoreUnavailable
from pqe2ee.server._redis import import_redis, redis_failures

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "MemoryNonceStore",
    "NonceStore",
    "NonceStoreError",
    "RedisNonceStore",
    "api_key_id",
]

DEFAULT_MAX_ENTRIES: Final = 1_000_000
_SEP: Final = "|"


def api_key_id(api_key: str) -> str:
    """A stable, non-reversible id for an API key: the first 32 hex digits of its SHA-256."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _binding(api_key_id: str, chute_id: str, instance_id: str) -> str:
    for part in (api_key_id, chute_id, instance_id):
        if _SEP in part:
            raise LocalProtocolError(f"nonce binding parts must not contain {_SEP!r}")
    return _SEP.join((api_key_id, chute_id, instance_id))


class NonceStoreError(StoreUnavailable):
    """The store cannot answer (Redis down, store full). The relay answers 503; fail closed."""

    default_code = ErrorCode.NONCE_STORE_UNAVAILABLE


class NonceStore(abc.ABC):
    """What the relay needs from a nonce store. Every method is a coroutine.

    :meth:`issue` and :meth:`consume` are written here once (binding, constant-time compare);
    a store implements the primitives :meth:`_put` and :meth:`_take` (atomic get-and-delete),
    and :meth:`hit`, :meth:`ping`, :meth:`aclose`.
    """

    async def issue(
        self,
        api_key_id: str,
        chute_id: str,
        instance_id: str,
        nonces: Sequence[str],
        ttl: float,
    ) -> None:
        """Remember ``nonces`` for this (key, chute, instance) for ``ttl`` seconds."""
        await self._put(_binding(api_key_id, chute_id, instance_id).encode(), nonces, ttl)

    async def consume(self, nonce: str, api_key_id: str, chute_id: str, instance_id: str) -> bool:
        """Atomically remove ``nonce``; True only if it existed, unexpired, for exactly these."""
        stored = await self._take(nonce)
        if stored is None:
            return False
        try:
            wanted = _binding(api_key_id, chute_id, instance_id).encode()
        except LocalProtocolError:
            return False
        return hmac.compare_digest(stored, wanted)

    @abc.abstractmethod
    async def _put(self, binding: bytes, nonces: Sequence[str], ttl: float) -> None:
        """Store each nonce with ``binding`` for ``ttl`` seconds."""

    @abc.abstractmethod
    async def _take(self, nonce: str) -> bytes | None:
        """Remove ``nonce`` atomically; its binding if it was there, unexpired."""

    @abc.abstractmethod
    async def hit(self, key: str, window: float, limit: int) -> bool:
        """Count one event for ``key`` in a fixed ``window``; False when over ``limit``."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`NonceStoreError` unless the store is usable."""

    @abc.abstractmethod
    async def aclose(self) -> None: ...


class MemoryNonceStore(NonceStore):
    """Nonces in a dict with expiry; fine for one relay process (not shared between processes).

    Bounded: expired entries are purged as new ones arrive, and once ``max_entries`` live
    nonces are held, :meth:`issue` raises :class:`NonceStoreError` instead of growing.
    ``clock`` (monotonic seconds) can be injected for tests.
    """

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise LocalProtocolError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        # insertion order ~ expiry order (one ttl per relay), so purging pops from the front
        self._nonces: dict[str, tuple[bytes, float]] = {}
        self._counters: dict[str, tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self._nonces)

    def _purge_front(self, now: float) -> None:
        nonces = self._nonces
        while nonces:
            first = next(iter(nonces))
            if nonces[first][1] > now:
                break
            del nonces[first]

    def _purge_all(self, now: float) -> None:
        self._nonces = {k: v for k, v in self._nonces.items() if v[1] > now}

    async def _put(self, binding: bytes, nonces: Sequence[str], ttl: float) -> None:
        now = self._clock()
        self._purge_front(now)
        if len(self._nonces) + len(nonces) > self.max_entries:
            self._purge_all(now)
            if len(self._nonces) + len(nonces) > self.max_entries:
                raise NonceStoreError(f"nonce store is full ({self.max_entries} live nonces)")
        entry = (binding, now + ttl)
        for nonce in nonces:
            self._nonces[nonce] = entry

    async def _take(self, nonce: str) -> bytes | None:
        entry = self._nonces.pop(nonce, None)  # no await between lookup and removal: atomic
        if entry is None:
            return None
        binding, expires = entry
        return binding if expires > self._clock() else None

    async def hit(self, key: str, window: float, limit: int) -> bool:
        now = self._clock()
        count, reset = self._counters.get(key, (0, 0.0))
        if reset <= now:
            count, reset = 0, now + window
            if len(self._counters) >= self.max_entries:
                self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
                if len(self._counters) >= self.max_entries:
                    raise NonceStoreError("rate-limit table is full")
        count += 1
        self._counters[key] = (count, reset)
        return count <= limit

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


# Each nonce is stored tagged with the run_id of the redis-server process that holds it (a new
# random id at every start): a nonce read back under another run_id - restored from a snapshot
# or AOF after a restart, possibly after it was spent - is refused (and deleted). A restart
# thus voids every outstanding nonce; clients rediscover. Both run in Redis, atomically.
_RUN_ID_LUA: Final = "local id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')\n"
_ISSUE_LUA: Final = (
    _RUN_ID_LUA
    + "for _, k in ipairs(KEYS) do redis.call('SET', k, ARGV[1] .. '|' .. id, 'EX', ARGV[2]) end\n"
    + "return #KEYS\n"
)
_TAKE_LUA: Final = (
    "local v = redis.call('GETDEL', KEYS[1])\n"
    + "if not v then return false end\n"
    + _RUN_ID_LUA
    + "local tail = '|' .. id\n"
    + "if #v <= #tail or string.sub(v, -#tail) ~= tail then return false end\n"
    + "return string.sub(v, 1, #v - #tail)\n"
)


def _waiting_pool(aioredis: Any, on_wait: Callable[[float], None] | None) -> Any:
    """redis-py's blocking pool, reporting each hand-out that waited (> 1 ms) to ``on_wait``."""

    class WaitingPool(aioredis.BlockingConnectionPool):  # type: ignore[misc]
        async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return await super().get_connection()
            finally:
                waited = time.monotonic() - started
                if on_wait is not None and waited > 0.001:
                    on_wait(waited)

    return WaitingPool


class RedisNonceStore(NonceStore):
    """Nonces and rate-limit counters in Redis, shared by every relay that uses the same URL.

    * nonce: ``SET {prefix}n:{nonce} "keyid|chute|instance|<run_id>" EX ttl``; consumed with
      ``GETDEL`` (atomic: of many concurrent attempts on any number of relays exactly one gets
      the value), both in Lua scripts. ``run_id`` is the Redis server's (new at every start): a
      nonce that comes back from a snapshot after a restart - spent or not - is refused, so
      Redis's default RDB persistence (or AOF) cannot bring spent nonces back to life;
    * rate limit: ``INCR`` + ``EXPIRE NX`` in one MULTI/EXEC pipeline (fixed window).

    Any Redis failure raises :class:`NonceStoreError` (the relay answers 503, never "accepted").
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "pqe2ee:",
        client: Any | None = None,
        timeout: float = 5.0,
        max_connections: int = 64,
        pool_timeout: float | None = None,
        on_pool_wait: Callable[[float], None] | None = None,
    ) -> None:
        """``max_connections`` Redis connections at most; a command beyond them waits for one
        (at most ``pool_timeout``, default ``timeout``: then ``NonceStoreError``, "pool
        exhausted") instead of failing at once as redis-py's default pool does past 100.
        ``on_pool_wait(seconds)`` hears every connection hand-out that had to wait."""
        aioredis = import_redis("redis.asyncio", "RedisNonceStore")
        self._prefix = prefix
        if client is None:
            pool = _waiting_pool(aioredis, on_pool_wait).from_url(
                url,
                max_connections=max_connections,
                timeout=timeout if pool_timeout is None else pool_timeout,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                decode_responses=False,
            )
            client = aioredis.Redis.from_pool(pool)
        self._redis: Any = client
        self._issue_script = client.register_script(_ISSUE_LUA)
        self._take_script = client.register_script(_TAKE_LUA)

    def _nkey(self, nonce: str) -> str:
        return f"{self._prefix}n:{nonce}"

    async def _call(self, fn: Callable[[], Any]) -> Any:
        with redis_failures(NonceStoreError):
            return await fn()

    async def _put(self, binding: bytes, nonces: Sequence[str], ttl: float) -> None:
        ex = max(1, int(ttl + 0.999))
        keys = [self._nkey(nonce) for nonce in nonces]
        await self._call(lambda: self._issue_script(keys=keys, args=[binding, ex]))

    async def _take(self, nonce: str) -> bytes | None:
        stored = await self._call(lambda: self._take_script(keys=[self._nkey(nonce)]))
        return None if stored is None else bytes(stored)

    async def hit(self, key: str, window: float, limit: int) -> bool:
        rkey = f"{self._prefix}rl:{key}"
        seconds = max(1, int(window + 0.999))

        async def run() -> Any:
            pipe = self._redis.pipeline(transaction=True)
            pipe.incr(rkey)
            pipe.expire(rkey, seconds, nx=True)
            return await pipe.execute()

        count, _ = await self._call(run)
        return int(count) <= limit

    async def ping(self) -> None:
        """Check the server answers and is new enough (GETDEL and EXPIRE NX: Redis >= 7.0)."""
        info = await self._call(lambda: self._redis.info("server"))
        version = str(info.get("redis_version", "0")) if isinstance(info, dict) else "0"
        try:
            major = int(version.split(".", 1)[0])
        except ValueError:
            major = 0
        if major < 7:
            raise NonceStoreError(f"Redis >= 7.0 is required, the server reports {version}")

    async def aclose(self) -> None:
        try:
            await self._redis.aclose()
        except Exception:  # pragma: no cover - closing a broken connection
            pass
