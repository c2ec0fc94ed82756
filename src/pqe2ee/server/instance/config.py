"""The instance's configuration (:class:`InstanceConfig`) and the ids it derives.

Everything here is checked when the value is built, so a bad flag fails before a key is
loaded or a port bound.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, field
from typing import Final

import httpx2

from pqe2ee.errors import LocalProtocolError
from pqe2ee.protocol import looks_like_uuid

__all__ = [
    "DEFAULT_ALLOW_PATHS",
    "V2_KEY_LIFETIME",
    "InstanceConfig",
    "MiB",
    "default_instance_id",
    "model_chute_id",
]

DEFAULT_ALLOW_PATHS: Final = ("/v1/chat/completions", "/v1/completions")
MiB: Final = 1024 * 1024
V2_KEY_LIFETIME: Final = 3600.0  # a generated v2 key is current this long, then previous as long


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    """Configuration of one instance.

    ``upstream`` is the engine's base URL *without* ``/v1`` (``http://127.0.0.1:8000``); a
    request for ``X-E2E-Path: /v1/chat/completions`` goes to ``{upstream}/v1/chat/completions``.

    ``continuous_usage``: for streams the instance forces ``stream_options.include_usage`` and,
    when this is True (the default, as the Chutes runtime does), ``continuous_usage_stats``. With
    continuous stats the engine puts ``usage`` in every chunk, and every such chunk is preceded by
    a *plaintext* usage event on the outer stream: per-chunk token counts and timing are then
    visible to the relay. Set it to False to leak only the final totals. (v2 streams never force
    ``continuous_usage_stats``: spec/v2.md §5.6.)

    v2: ``v2`` serves wire profile v2 next to v1 (default); ``v2_only`` refuses v1 blobs (426
    ``v1_disabled``; the v1 key is still made and published, because discovery rows need a
    valid ``e2e_pubkey`` and the attestation binding names both keys, but it never opens
    anything). ``v2_key_file`` keeps the X-Wing key on disk (same 0600 rules as ``key_file``,
    its own first line; such a key is not rotated); without it a fresh key is made at start and
    rotated every ``v2_key_lifetime`` seconds, the previous key staying valid one more period.
    ``chute_id`` is the chute this instance serves (a Chutes deployment); without it, as behind
    ``pqe2ee relay``, every model is its own chute (``uuid5(URL, "pqe2ee:model:" + model)``)
    and H's chute id must be the chute of a model the engine lists, or of H.model. ``redis_url`` keeps the v2 replay cache in Redis
    (several processes serving one key); default in memory (``replay_max_entries`` ids).
    """

    upstream: str
    host: str = "127.0.0.1"
    port: int = 8002
    key_file: str | os.PathLike[str] | None = None
    allow_paths: tuple[str, ...] = DEFAULT_ALLOW_PATHS
    max_body: int = 16 * MiB
    max_plaintext: int = 64 * MiB
    max_response: int = 64 * MiB
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 600.0
    max_concurrency: int = 64
    backend: str = "auto"
    instance_id: str | None = None
    continuous_usage: bool = True
    upstream_api_key: str | None = field(default=None, repr=False)
    models_ttl: float = 60.0
    models_timeout: float = 5.0
    v2: bool = True
    v2_only: bool = False
    v2_key_file: str | os.PathLike[str] | None = None
    allow_key_symlink: bool = False  # key files: follow a symbolic link (server/keyfile.py)
    v2_key_lifetime: float = V2_KEY_LIFETIME
    chute_id: str | None = None
    redis_url: str | None = field(default=None, repr=False)
    replay_max_entries: int = 100_000
    tee: str | None = None
    tsm_path: str = "/sys/kernel/config/tsm/report"

    def __post_init__(self) -> None:
        if self.tee not in (None, "tdx"):
            raise LocalProtocolError("tee must be 'tdx' (or None)")
        up = self.upstream.strip()
        try:
            url = httpx2.URL(up)
        except httpx2.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise LocalProtocolError("upstream must be an http:// or https:// URL")
        object.__setattr__(self, "upstream", up.rstrip("/"))
        paths = tuple(self.allow_paths)
        for p in paths:
            if not isinstance(p, str) or not p.startswith("/") or "?" in p or "#" in p:
                raise LocalProtocolError(
                    f"allowed path must start with '/' and have no query: {p!r}"
                )
        object.__setattr__(self, "allow_paths", paths)
        for name in ("max_body", "max_plaintext", "max_response", "max_concurrency"):
            if getattr(self, name) < 1:
                raise LocalProtocolError(f"{name} must be at least 1")
        for name in (
            "upstream_connect_timeout",
            "upstream_read_timeout",
            "models_ttl",
            "models_timeout",
        ):
            if not getattr(self, name) > 0:
                raise LocalProtocolError(f"{name} must be positive")
        if not 0 <= self.port <= 65535:
            raise LocalProtocolError("port must be in 0..65535")
        if not self.v2:
            for name, flag in (
                ("--v2-only", self.v2_only),
                ("--v2-key-file", self.v2_key_file is not None),
                ("--redis", self.redis_url is not None),
            ):
                if flag:
                    raise LocalProtocolError(f"{name} needs v2 (it excludes --no-v2)")
        if (
            self.v2_key_file is not None
            and self.key_file is not None
            and os.path.abspath(self.v2_key_file) == os.path.abspath(self.key_file)
        ):
            raise LocalProtocolError("the v1 and v2 keys need two different key files")
        if not 60.0 <= self.v2_key_lifetime <= 86400.0:
            raise LocalProtocolError("v2_key_lifetime must be between 60 and 86400 seconds")
        if self.chute_id is not None:
            if not looks_like_uuid(self.chute_id):
                raise LocalProtocolError("chute_id must be a UUID")
            object.__setattr__(self, "chute_id", self.chute_id.lower())
        if self.replay_max_entries < 1:
            raise LocalProtocolError("replay_max_entries must be at least 1")
        if self.v2 and self.instance_id is not None and not looks_like_uuid(self.instance_id):
            raise LocalProtocolError("instance_id must be a UUID to serve v2 (or pass --no-v2)")


def default_instance_id(public_key: bytes) -> str:
    """The instance id derived from the public key: a UUID (v4 layout) of its SHA-256."""
    return str(uuid.UUID(bytes=hashlib.sha256(public_key).digest()[:16], version=4))


def model_chute_id(model: str) -> str:
    """The chute id of a model behind ``pqe2ee relay`` (``relay.chute_id_for``; kept equal by a
    test): what H.chute_id must be when no ``chute_id`` is configured."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "pqe2ee:model:" + model))
