"""The instance's keys: the ML-KEM-768 key of v1 and the X-Wing key of v2, their backends, the
v2 replay cache, and the rotation of a generated v2 key (current + previous).

A key comes from the caller (tests), from a key file (0600, created when missing), or is made
at start ("ephemeral"). Only an ephemeral v2 key rotates: a key from a file outlives the
process, so its ``not_after`` rolls forward instead, and an in-memory replay cache is floored at
the start time (a request admitted by an earlier process cannot be replayed after a restart).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid
from collections.abc import Callable, Collection
from typing import Any

import anyio
import anyio.to_thread

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.backends.base import AEAD, KEM, KEMPrivateKey
from pqe2ee.backends.xwing import XWING_KEM_ID, XWing, XWingPrivateKey, get_xwing
from pqe2ee.errors import BackendError, LocalProtocolError
from pqe2ee.protocol._codec import b64encode
from pqe2ee.protocol.v2 import VERSION, InstanceV2, MemoryReplayCache, ParsedRequest, ReplayCache
from pqe2ee.protocol.v2.hpke import AEAD_ID, KDF_ID
from pqe2ee.protocol.v2.request import DEFAULT_WINDOW_MS
from pqe2ee.server.instance.config import InstanceConfig, default_instance_id, model_chute_id
from pqe2ee.server.instance.exchange import logger
from pqe2ee.server.keyfile import load_or_create_key, load_or_create_xwing_key, seed_kem
from pqe2ee.server.replaycache import (
    FloorReplayCache,
    LockedReplayCache,
    RedisReplayCache,
    ReplayCacheError,
)

__all__ = ["Keys"]


class _ServerInstanceV2(InstanceV2):
    """:class:`InstanceV2` whose own chute id is fixed, or - without one - any chute of a model
    it serves (``own_chutes()``) or the chute of H.model (the model list may lag the engine).

    Derived: a header naming one of those chutes is compared as if it named a random, never
    published placeholder id (H must hold a UUID, so the placeholder is one); any other chute id
    in H then mismatches the placeholder. (A request may name a chute and use its UUID as the
    model, as Chutes clients do: the engine then answers, as with v1.)
    """

    def __init__(
        self,
        *,
        chute_id: str | None,
        own_chutes: Callable[[], Collection[str]],
        **kw: Any,
    ) -> None:
        super().__init__(chute_id=chute_id or str(uuid.uuid4()), **kw)
        self._derived = chute_id is None
        self._own_chutes = own_chutes

    def check(self, parsed: ParsedRequest, **kw: Any) -> XWingPrivateKey:
        h = parsed.header
        if self._derived and (
            h.chute_id in self._own_chutes() or h.chute_id == model_chute_id(h.model)
        ):
            # The chute this request names is one of ours: compare it as our own.
            parsed = dataclasses.replace(
                parsed, header=dataclasses.replace(h, chute_id=self.chute_id)
            )
        return super().check(parsed, **kw)


def _xwing_for(backend: str) -> XWing:
    """The X-Wing backend named like the KEM backend when there is one, else the default."""
    try:
        return get_xwing(backend)
    except BackendError:
        return get_xwing("auto")


def _aead_for(backend: str) -> AEAD:
    try:
        return get_aead(backend)
    except BackendError:
        return get_aead("auto")  # KEM-only backends (liboqs, pqcrypto) pair with pyca's AEAD


class Keys:
    """The keys of one instance and everything that decides how requests are opened.

    ``own_chutes`` lists the chutes of the models the engine serves (v2 without a configured
    ``chute_id``). ``v2_key`` and ``replay_cache`` override the v2 key and the replay cache
    (tests); a cache passed in is neither checked at start nor closed.
    """

    def __init__(
        self,
        config: InstanceConfig,
        *,
        own_chutes: Callable[[], Collection[str]],
        private_key: KEMPrivateKey | None = None,
        v2_key: XWingPrivateKey | None = None,
        replay_cache: ReplayCache | None = None,
    ) -> None:
        self.config = config
        self.kem: KEM = get_kem(config.backend)
        self.aead: AEAD = _aead_for(config.backend)
        if private_key is not None:
            self.key_source = "given"
        elif config.key_file is not None:
            private_key, created = load_or_create_key(
                config.key_file, seed_kem(config.backend), allow_symlink=config.allow_key_symlink
            )
            self.key_source = "created" if created else "loaded"
        else:
            private_key = self.kem.generate()
            self.key_source = "ephemeral"
        self.private_key = private_key
        self.public_key: bytes = private_key.public_key
        self.pubkey_b64 = b64encode(self.public_key).decode("ascii")
        self.instance_id: str = config.instance_id or default_instance_id(self.public_key)
        self.v2: InstanceV2 | None = None
        self.v2_key_source = "off"
        self.owned_cache: RedisReplayCache | None = None
        self.v2_threaded = False
        self.replay_cache_kind = "off"
        self.v2_since = time.time()
        if config.v2:
            self._setup_v2(v2_key, replay_cache, own_chutes)

    def _setup_v2(
        self,
        key: XWingPrivateKey | None,
        cache: ReplayCache | None,
        own_chutes: Callable[[], Collection[str]],
    ) -> None:
        cfg = self.config
        self.xwing: XWing = _xwing_for(cfg.backend)
        if key is not None:
            self.v2_key_source = "given"
        elif cfg.v2_key_file is not None:
            key, created = load_or_create_xwing_key(
                cfg.v2_key_file, self.xwing, allow_symlink=cfg.allow_key_symlink
            )
            self.v2_key_source = "created" if created else "loaded"
        else:
            key = self.xwing.generate()
            self.v2_key_source = "ephemeral"
        if cache is None:
            if cfg.redis_url:
                cache = self.owned_cache = RedisReplayCache(cfg.redis_url)
            else:
                cache = MemoryReplayCache(cfg.replay_max_entries)
                if self.v2_key_source != "ephemeral":
                    # The key outlives this process but the cache does not: refuse what a
                    # previous process with this key may have admitted (spec/v2.md §4.3).
                    start_ms = int(time.time() * 1000)
                    cache = FloorReplayCache(cache, start_ms + DEFAULT_WINDOW_MS)
        # Anything but the in-memory cache may block (network): open v2 requests off the loop.
        self.v2_threaded = not isinstance(cache, MemoryReplayCache | FloorReplayCache)
        self.replay_cache_kind = "redis" if self.owned_cache is not None else type(cache).__name__
        if not self.v2_threaded:
            # Opened on the loop, except bodies over the thread threshold: serialise admit.
            cache = LockedReplayCache(cache)
        self.v2 = _ServerInstanceV2(
            chute_id=cfg.chute_id,
            own_chutes=own_chutes,
            instance_id=self.instance_id,
            keys=[key],
            aead=self.aead,
            replay_cache=cache,
            max_body=cfg.max_plaintext,
        )
        self.v2_since = time.time()

    # -- lifecycle ----------------------------------------------------------------------------

    async def check_cache(self) -> None:
        """Start-up: a Redis replay cache must answer (``RuntimeError`` otherwise)."""
        cache = self.owned_cache
        if cache is not None:
            try:
                # A key made here cannot have had requests admitted before: no closed window.
                fresh = self.v2_key_source in ("ephemeral", "created", "given")
                await anyio.to_thread.run_sync(lambda: cache.check(fresh_keys=fresh))
            except ReplayCacheError as exc:
                raise RuntimeError(f"v2 replay cache unavailable: {exc.message}") from None

    async def aclose(self) -> None:
        if self.owned_cache is not None:
            await anyio.to_thread.run_sync(self.owned_cache.close)

    # -- v2 key rotation ----------------------------------------------------------------------

    @property
    def rotates_v2(self) -> bool:
        """True when the v2 key is generated here (not from a file or given) and so rotates."""
        return self.v2 is not None and self.v2_key_source == "ephemeral"

    def rotate_v2(self) -> None:
        """Make a fresh v2 key current; the current one becomes previous, the previous one is
        erased (its requests now get ``unknown_key``)."""
        if self.v2 is None:
            raise LocalProtocolError("this instance does not serve v2")
        self.v2.rotate(self.xwing.generate())
        self.v2_since = time.time()
        logger.info("v2 key rotated: now sha256:%s", self.v2_fingerprint())

    def fingerprint(self) -> str:
        return hashlib.sha256(self.public_key).hexdigest()[:16]

    def v2_fingerprint(self) -> str:
        assert self.v2 is not None
        return hashlib.sha256(self.v2.public_key).hexdigest()[:16]

    def v2_offer(self, now: float | None = None) -> dict[str, Any] | None:
        """The ``e2e_v2`` discovery object (spec/v2.md §8.1), or None without v2.

        ``not_after`` is when the key is erased: a generated key is current for one lifetime
        and previous for one more. A key from a file is never rotated or erased while the
        process runs; its ``not_after`` rolls forward (now + two lifetimes).
        """
        if self.v2 is None:
            return None
        lifetime = self.config.v2_key_lifetime
        base = self.v2_since if self.rotates_v2 else (time.time() if now is None else now)
        return {
            "v": VERSION,
            "kem_id": XWING_KEM_ID,
            "kdf_id": KDF_ID,
            "aead_id": AEAD_ID,
            "pk": b64encode(self.v2.public_key).decode("ascii"),
            "not_after": int(base + 2 * lifetime),
        }

    async def rotation_loop(self) -> None:
        """Rotate the generated v2 key every ``v2_key_lifetime`` seconds (run in the lifespan)."""
        while True:
            due = self.v2_since + self.config.v2_key_lifetime
            await anyio.sleep(max(0.0, due - time.time()))
            if time.time() >= self.v2_since + self.config.v2_key_lifetime:
                self.rotate_v2()
