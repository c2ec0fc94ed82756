"""Small pools of pre-generated, one-use response keypairs: ML-KEM-768 for v1
(:class:`KeyPool`), X-Wing for v2 (:class:`XWingKeyPool`).

Every request seals its reply to a fresh keypair that is never used again. Generating one
costs a fraction of a millisecond; :class:`KeyPool` keeps a few ready (``size``, default 4),
refilled by a daemon thread, so a request rarely pays for it. When the pool is empty
:meth:`KeyPool.take` generates a key inline. A key leaves the pool exactly once; the caller
wipes it (``KEMPrivateKey.wipe()``) once the reply is open. :meth:`KeyPool.close` stops the
thread and wipes the keys still waiting.

The thread starts on the first :meth:`take` (so an unused transport costs no thread) and is
restarted if a process forks (the child has no threads).
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Final, Generic, Protocol, TypeVar

from pqe2ee.backends.base import KEM, KEMPrivateKey
from pqe2ee.backends.xwing import XWing, XWingPrivateKey

__all__ = ["DEFAULT_KEY_POOL_SIZE", "KeyPool", "XWingKeyPool"]

DEFAULT_KEY_POOL_SIZE: Final = 4


class _Wipeable(Protocol):
    def wipe(self) -> None: ...


K = TypeVar("K", bound=_Wipeable)
K_co = TypeVar("K_co", bound=_Wipeable, covariant=True)


class _Generator(Protocol[K_co]):
    def generate(self) -> K_co: ...


class _Pool(Generic[K]):
    """Pre-generated one-use keys for one transport (thread-safe)."""

    def __init__(self, kem: _Generator[K], size: int = DEFAULT_KEY_POOL_SIZE) -> None:
        if size < 0:
            raise ValueError("key pool size must be >= 0")
        self._kem = kem
        self._size = size
        self._keys: collections.deque[K] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self.generated_inline = 0  # keys made on the caller's thread because the pool was empty

    @property
    def size(self) -> int:
        return self._size

    @property
    def ready(self) -> int:
        """Keys waiting in the pool right now."""
        with self._cond:
            return len(self._keys)

    @property
    def closed(self) -> bool:
        return self._closed

    def take(self) -> K:
        """A key nobody else has had or will have. Never blocks on the filler thread."""
        with self._cond:
            if self._pid != os.getpid():  # forked: the parent's keys and thread are not ours
                self._keys.clear()
                self._thread = None
                self._pid = os.getpid()
            key = self._keys.popleft() if self._keys else None
            if not self._closed and self._size:
                self._ensure_thread()
                self._cond.notify()
        if key is None:
            self.generated_inline += 1
            key = self._kem.generate()
        return key

    def close(self) -> None:
        """Stop the filler thread (without waiting for it) and wipe the keys still pooled."""
        with self._cond:
            self._closed = True
            keys = list(self._keys)
            self._keys.clear()
            self._cond.notify_all()
        for key in keys:
            key.wipe()

    def _ensure_thread(self) -> None:
        # called with the condition held
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._fill, name="pqe2ee-keypool", daemon=True)
            self._thread.start()

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._keys) >= self._size:
                    self._cond.wait()
                if self._closed:
                    return
            key = self._kem.generate()  # outside the lock: takers never wait for a keygen
            with self._cond:
                if self._closed:
                    key.wipe()
                    return
                self._keys.append(key)


class KeyPool(_Pool[KEMPrivateKey]):
    """Pre-generated one-use ML-KEM-768 keys (v1 response keys) for one transport."""

    def __init__(self, kem: KEM, size: int = DEFAULT_KEY_POOL_SIZE) -> None:
        super().__init__(kem, size)


class XWingKeyPool(_Pool[XWingPrivateKey]):
    """Pre-generated one-use X-Wing keys (v2 response keys) for one transport."""

    def __init__(self, xwing: XWing, size: int = DEFAULT_KEY_POOL_SIZE) -> None:
        super().__init__(xwing, size)
