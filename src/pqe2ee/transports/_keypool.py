"""Small pools of pre-generated, one-use response keypairs: ML-KEM-768 for v1
(:class:`KeyPool`), X-Wing for v2 (:class:`XWingKeyPool`).

Every request seals its reply to a fresh keypair that is never used again; a key leaves the
pool exactly once and the caller wipes it (``wipe()``) once the reply is open. :meth:`take`
never waits: an empty pool generates the key inline.

Whether a filler thread keeps ``size`` keys ready depends on what a key costs. Handing a key
over from another thread (lock, notify, the filler waking and re-taking the GIL) costs about
:data:`HANDOFF_COST`; a backend whose keygen is cheaper than that gains nothing from a thread
(measured on a 2-core x86-64, CPython 3.11, medians: ML-KEM-768 keygen pycryptodome 34 us,
pqcrypto 56 us, pyca 98-148 us; X-Wing pyca 133 us, pycryptodome 184 us; a Condition round
trip 39 us, a ``SimpleQueue`` round trip 18 us; liboqs keygen 17 us). By default
(``filler=None``) the first :meth:`take` makes its key and then :data:`PROBES` more back to
back, timed, and kept in the pool; a filler starts only when the fastest of them took longer
than :data:`HANDOFF_COST`; ``filler=True``/``False`` decides it outright. The probes run warm on
purpose: timing the first keys of a client that has just done network I/O measured liboqs at
44-183 us (cold caches) and started a thread that only cost CPU. A thread never saves CPU (it
moves keygen off the request path and adds the hand-off); it saves latency when keygen is
slower than the hand-off.

The filler works in batches: a :meth:`take` wakes it only when the pool is below half full, and
it then refills the pool, so a hand-off is paid per batch rather than per key.

The filler belongs to the pool's owner: it starts on a :meth:`take` (an unused transport costs
no thread), and :meth:`close` - called by the owning transport's ``close``/``aclose`` - stops
it *and waits for it* (at most one keygen), so a closed transport leaves nothing running. A
forked child, which has no threads, starts its own.

Many transports can share one pair of pools (:class:`SharedKeyPools`, passed as
``ClientOptions(key_pools=...)``): the proxy, which makes one transport per API key, then runs
at most one filler per key type instead of one per key. A shared pool has one user per
transport plus its maker; each closes it once, and it really closes (filler joined, keys
wiped) when the last of them has.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass
from typing import Final, Generic, Protocol, Self, TypeVar

from pqe2ee.backends.base import KEM, KEMPrivateKey
from pqe2ee.backends.xwing import XWing, XWingPrivateKey

__all__ = [
    "DEFAULT_KEY_POOL_SIZE",
    "HANDOFF_COST",
    "PROBES",
    "KeyPool",
    "SharedKeyPools",
    "XWingKeyPool",
]

#: One-use response keys kept ready per key type (0: every key is made when needed).
DEFAULT_KEY_POOL_SIZE: Final = 4
#: Seconds a key costs to hand over from a filler thread (measured: see the module docstring).
HANDOFF_COST: Final = 40e-6
#: Inline keygens timed before deciding whether a filler thread pays off.
PROBES: Final = 3
#: Longest wait in :meth:`_Pool.close` for the filler to finish the key it is making.
_JOIN_TIMEOUT: Final = 5.0

#: Forks this process descends from (bumped in each child): a pool made before the last fork
#: holds its parent's keys and thread, and drops them on its first :meth:`_Pool.take` - a
#: comparison per take instead of an ``os.getpid()`` call.
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):  # (no fork on Windows)
    os.register_at_fork(after_in_child=_forked)


class _Wipeable(Protocol):
    def wipe(self) -> None: ...


K = TypeVar("K", bound=_Wipeable)
K_co = TypeVar("K_co", bound=_Wipeable, covariant=True)


class _Generator(Protocol[K_co]):
    name: str

    def generate(self) -> K_co: ...


class _Pool(Generic[K]):
    """Pre-generated one-use keys for one transport (thread-safe)."""

    def __init__(
        self, kem: _Generator[K], size: int = DEFAULT_KEY_POOL_SIZE, *, filler: bool | None = None
    ) -> None:
        if size < 0:
            raise ValueError("key pool size must be >= 0")
        self._kem = kem
        self._size = size
        self._keys: collections.deque[K] = collections.deque()
        # The condition's lock itself, for take(): holding it is holding the condition (a
        # C-level ``with``; Condition's own __enter__/__exit__ are Python frames).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._thread: threading.Thread | None = None
        self._forks = _forks
        #: True: a filler thread keeps the pool full; False: never; None: not decided yet.
        self.filler: bool | None = False if size == 0 else filler
        self._probes: list[float] = []
        self._users = 1
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

    @property
    def backend(self) -> str:
        """The name of the backend that makes the keys."""
        return self._kem.name

    @property
    def running(self) -> bool:
        """Whether a filler thread is alive right now."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def take(self) -> K:
        """A key nobody else has had or will have. Never waits for the filler."""
        with self._lock:
            if self._forks != _forks:  # forked: the parent's keys and thread are not ours
                self._keys.clear()
                self._thread = None
                self._forks = _forks
            key = self._keys.popleft() if self._keys else None
            if self.filler and not self._closed and 2 * len(self._keys) < self._size:
                self._ensure_thread()
                self._cond.notify()
        if key is None:  # (made here, not in a method of its own: a frame per request)
            self.generated_inline += 1
            key = self._kem.generate()
            if self.filler is None:
                self._probe()  # right after a keygen: caches are warm
        return key

    def share(self) -> Self:
        """This pool, with one more user who must :meth:`close` it once (see the module
        docstring)."""
        with self._cond:
            if self._closed:
                raise ValueError("the key pool is closed")
            self._users += 1
        return self

    def close(self) -> None:
        """Stop the filler thread, wait for it, and wipe the keys still pooled - once every
        user has closed a shared pool. Idempotent; :meth:`take` still works afterwards
        (inline, without a thread)."""
        with self._cond:
            self._users -= 1
            if self._users > 0 and not self._closed:
                return
            self._closed = True
            keys = list(self._keys)
            self._keys.clear()
            thread = self._thread
            self._cond.notify_all()
        for key in keys:
            key.wipe()
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)

    def _probe(self) -> None:
        """Time :data:`PROBES` keygens back to back, keep the keys, decide on the filler."""
        keys: list[K] = []
        for _ in range(PROBES):
            started = time.perf_counter()
            keys.append(self._kem.generate())
            self._probes.append(time.perf_counter() - started)
        with self._cond:
            room = 0 if self._closed else max(0, self._size - len(self._keys))
            self._keys.extend(keys[:room])
            self.filler = min(self._probes) > HANDOFF_COST
        for extra in keys[room:]:
            extra.wipe()

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

    def __init__(
        self, kem: KEM, size: int = DEFAULT_KEY_POOL_SIZE, *, filler: bool | None = None
    ) -> None:
        super().__init__(kem, size, filler=filler)


class XWingKeyPool(_Pool[XWingPrivateKey]):
    """Pre-generated one-use X-Wing keys (v2 response keys) for one transport."""

    def __init__(
        self, xwing: XWing, size: int = DEFAULT_KEY_POOL_SIZE, *, filler: bool | None = None
    ) -> None:
        super().__init__(xwing, size, filler=filler)


@dataclass(frozen=True, slots=True)
class SharedKeyPools:
    """One v1 and one v2 key pool for many transports (``ClientOptions(key_pools=...)``).

    Whoever makes it owns it and closes it (``with SharedKeyPools(...)`` or :meth:`close`) when
    its transports are done; each transport closes its share when it closes. ``v2`` is
    ``None`` when the transports speak v1 only (``prefer_v2=False``). Their backends must be
    the ones the transports use.
    """

    v1: KeyPool
    v2: XWingKeyPool | None = None

    @classmethod
    def make(
        cls, kem: KEM, xwing: XWing | None, size: int = DEFAULT_KEY_POOL_SIZE
    ) -> SharedKeyPools:
        return cls(KeyPool(kem, size), None if xwing is None else XWingKeyPool(xwing, size))

    def close(self) -> None:
        """The maker's share: the pools close once every transport has closed too."""
        self.v1.close()
        if self.v2 is not None:
            self.v2.close()

    def __enter__(self) -> SharedKeyPools:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
