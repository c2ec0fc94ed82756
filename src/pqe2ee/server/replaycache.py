"""Replay caches for the instance's v2 request ids (spec/v2.md §4.3), beyond the in-memory one.

:class:`~pqe2ee.protocol.v2.replay.MemoryReplayCache` serves one process. Several workers or
machines serving one instance key share :class:`RedisReplayCache`::

    SET <prefix><hex request_id> 1 NX PX <expires_at_ms - now_ms + 1>

``NX`` makes admission atomic across every process using the same Redis: of any number of
concurrent attempts with one id exactly one gets ``OK``. The key expires exactly when the id
could no longer pass the instance's ±W window check (inclusive: one millisecond after
``expires_at``), so Redis holds at most the ids of the last 2W. Run Redis with ``maxmemory-policy noeviction``: an evicted live id could be replayed
(:meth:`RedisReplayCache.check` warns otherwise). Any Redis failure raises
:class:`ReplayCacheError`: the instance then refuses the request (503), never admits it.

:class:`FloorReplayCache` refuses every request created before a point in time. An instance
whose v2 key outlives the process (``--v2-key-file``) but whose cache does not (in memory) uses
it with the start time: a request captured before a restart cannot be replayed after it.

Calls block (redis-py's synchronous client, with timeouts): the instance runs them in a worker
thread, never on its event loop.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Final

from pqe2ee.errors import ErrorCode, LocalProtocolError, StoreUnavailable
from pqe2ee.protocol.v2.replay import Admission, ReplayCache
from pqe2ee.protocol.v2.request import DEFAULT_WINDOW_MS
from pqe2ee.server._redis import import_redis, redis_failures

__all__ = [
    "DEFAULT_PREFIX",
    "FloorReplayCache",
    "LockedReplayCache",
    "RedisReplayCache",
    "ReplayCacheError",
]

logger = logging.getLogger("pqe2ee.instance")

DEFAULT_PREFIX: Final = "pqe2ee:v2:rid:"


class ReplayCacheError(StoreUnavailable):
    """The replay cache cannot answer (Redis down or timing out). Fail closed: refuse (503)."""

    default_code = ErrorCode.REPLAY_CACHE_UNAVAILABLE


# The generation marker ``<prefix>generation`` = "<run_id>|<floor_ms>": the redis-server process
# (run_id, new at every start) whose data the ids are, and a floor under which requests are
# refused. Missing (data lost, a first start with a loaded key) or of another run (a restart,
# from a snapshot or not): the ids admitted before may be gone, so the floor becomes now +
# ``lost_span_ms`` (2W): a request is refused while ``expires_at <= floor`` (created up to W
# after the loss was seen - one window for clients with synchronised clocks), then all resumes.
_RUN_ID_LUA: Final = "local id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')\n"
_ADMIT_LUA: Final = (
    _RUN_ID_LUA
    + "local floor = nil\n"
    + "local m = redis.call('GET', KEYS[2])\n"
    + "if m then\n"
    + "  local mid, f = string.match(m, '^(%w+)|(%d+)$')\n"
    + "  if mid == id then floor = tonumber(f) end\n"
    + "end\n"
    + "if not floor then\n"
    + "  floor = tonumber(ARGV[2]) + tonumber(ARGV[4])\n"
    + "  redis.call('SET', KEYS[2], id .. '|' .. string.format('%d', floor))\n"
    + "end\n"
    + "if tonumber(ARGV[3]) <= floor then return 2 end\n"
    + "if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 1 end\n"
    + "return 0\n"
)
_START_LUA: Final = (
    _RUN_ID_LUA
    + "local m = redis.call('GET', KEYS[1])\n"
    + "if m and string.match(m, '^(%w+)|') == id then return 0 end\n"
    + "redis.call('SET', KEYS[1], id .. '|0')\n"
    + "return 1\n"
)


class RedisReplayCache:
    """A :class:`~pqe2ee.protocol.v2.replay.ReplayCache` in Redis, shared by every process that
    uses the same URL and prefix. Thread-safe (redis-py's connection pool)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 2.0,
        client: Any | None = None,
        lost_span_ms: int = 2 * DEFAULT_WINDOW_MS,
    ) -> None:
        redis = import_redis("redis", "RedisReplayCache")
        if not prefix:
            raise LocalProtocolError("prefix must not be empty", code=ErrorCode.INVALID_ARGUMENT)
        self.prefix = prefix
        self._redis: Any = (
            client
            if client is not None
            else redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                decode_responses=False,
            )
        )

        self._marker = prefix + "generation"
        self.lost_span_ms = lost_span_ms
        self._admit_script = self._redis.register_script(_ADMIT_LUA)
        self._start_script = self._redis.register_script(_START_LUA)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with redis_failures(ReplayCacheError):
            return fn(*args, **kwargs)

    def admit(self, request_id: bytes, expires_at_ms: int, now_ms: int) -> Admission:
        # Inclusive, as the in-memory cache (spec/v2.md §4.3): the id is kept while
        # now <= expires_at, so the key lives one millisecond past expires_at.
        ttl_ms = int(expires_at_ms) - int(now_ms) + 1
        if ttl_ms <= 0:
            return Admission.TOO_OLD
        key = self.prefix + bytes(request_id).hex()
        args = [ttl_ms, int(now_ms), int(expires_at_ms), self.lost_span_ms]
        verdict = self._call(self._admit_script, keys=[key, self._marker], args=args)
        if verdict == 2:
            logger.warning("replay cache: Redis lost its state (restart or flush); refusing v2 "
                           "requests that may predate it")  # fmt: skip
            raise ReplayCacheError(
                "replay cache: Redis lost its state; refusing requests that may predate it"
            )
        return Admission.FRESH if verdict == 1 else Admission.REPLAY

    def check(self, *, fresh_keys: bool = False) -> None:
        """Raise :class:`ReplayCacheError` unless Redis answers; warn when its eviction policy
        could drop live ids (anything but ``noeviction``; not readable on some managed Redis).

        ``fresh_keys``: every v2 key of this process is new (nothing sealed to it can have been
        admitted before): a missing generation marker is then written open at once instead of
        closing the cache for a window at the first request."""
        self._call(self._redis.ping)
        if fresh_keys:
            self._call(self._start_script, keys=[self._marker])
        try:
            policy = self._redis.config_get("maxmemory-policy").get(b"maxmemory-policy")
        except Exception:  # CONFIG may be disabled: nothing to check then
            return
        if policy is not None and bytes(policy) != b"noeviction":
            logger.warning(
                "replay cache: Redis maxmemory-policy is %s; use noeviction, or under memory "
                "pressure an evicted request id could be replayed",
                bytes(policy).decode("ascii", "replace"),
            )

    def close(self) -> None:
        try:
            self._redis.close()
        except Exception:  # pragma: no cover - closing a broken connection
            pass


class FloorReplayCache:
    """Refuses (``TOO_OLD``) every id expiring at or before ``floor_ms``, else asks ``inner``.

    With ``floor_ms = start_ms + W`` that is every request whose client time is at or before
    ``start_ms``: what a previous process with the same key may have admitted. (A request with
    a client clock ahead of the server's could still have been admitted before a restart and be
    replayed after it; share a :class:`RedisReplayCache` when that matters.)
    """

    __slots__ = ("floor_ms", "inner")

    def __init__(self, inner: ReplayCache, floor_ms: int) -> None:
        self.inner = inner
        self.floor_ms = floor_ms

    def admit(self, request_id: bytes, expires_at_ms: int, now_ms: int) -> Admission:
        if expires_at_ms <= self.floor_ms:
            return Admission.TOO_OLD
        return self.inner.admit(request_id, expires_at_ms, now_ms)


class LockedReplayCache:
    """Serialises :meth:`admit` of an in-memory cache (``MemoryReplayCache``, or a
    :class:`FloorReplayCache` over one) that is reached from worker threads as well as from the
    event loop: the instance opens bodies over its thread threshold off the loop, and the
    protocol layer's caches hold no locks. The lock is held for one dictionary update."""

    __slots__ = ("_lock", "inner")

    def __init__(self, inner: ReplayCache) -> None:
        self.inner = inner
        self._lock = threading.Lock()

    def admit(self, request_id: bytes, expires_at_ms: int, now_ms: int) -> Admission:
        with self._lock:
            return self.inner.admit(request_id, expires_at_ms, now_ms)
