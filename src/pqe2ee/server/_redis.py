"""What the relay's nonce store and the instance's replay cache share about Redis: importing
redis-py (an extra) with a clear error, and turning any Redis failure into the caller's own
"cannot answer" error - named by type only, since the text may hold the URL and its password.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType

from pqe2ee.errors import ErrorCode, LocalProtocolError

__all__ = ["import_redis", "redis_failures"]


def import_redis(module: str, feature: str) -> ModuleType:
    """``import module`` (``redis`` or ``redis.asyncio``); without redis-py a
    :class:`~pqe2ee.errors.LocalProtocolError` naming ``feature`` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - needs the [redis] extra
        raise LocalProtocolError(
            f"{feature} needs redis-py: pip install 'pqe2ee[redis]'",
            code=ErrorCode.INVALID_ARGUMENT,
        ) from exc


@contextlib.contextmanager
def redis_failures(error: type[Exception]) -> Iterator[None]:
    """Inside the block, a Redis or socket failure raises ``error("redis: <type>")``."""
    from redis.exceptions import RedisError

    try:
        yield
    except (RedisError, OSError) as exc:
        raise error(f"redis: {type(exc).__name__}") from None
