"""The relay's configuration (:class:`RelayConfig`), API keys from the environment, and the
chute id it gives a model. Everything is checked when the value is built."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from pqe2ee.errors import ErrorCode, LocalProtocolError

__all__ = [
    "API_KEYS_ENV",
    "DEFAULT_PORT",
    "MIB",
    "RelayConfig",
    "api_keys_from_env",
    "chute_id_for",
    "config_error",
]

API_KEYS_ENV: Final = "PQE2EE_API_KEYS"
DEFAULT_PORT: Final = 8000
MIB: Final = 1024 * 1024
_KEY_RE: Final = re.compile(r"^[\x21-\x2b\x2d-\x7e]{1,512}$")  # printable, no space/comma


def chute_id_for(model: str) -> str:
    """The chute_id the relay gives ``model``: stable for a model name, across relays."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "pqe2ee:model:" + model))


def api_keys_from_env(environ: Mapping[str, str]) -> tuple[str, ...]:
    """API keys from ``PQE2EE_API_KEYS`` (comma-separated; blanks ignored)."""
    raw = environ.get(API_KEYS_ENV, "")
    return tuple(k.strip() for k in raw.split(",") if k.strip())


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Everything the relay needs. Durations are seconds; sizes are bytes.

    ``api_keys`` is required unless ``no_auth`` is set explicitly (then anyone who can reach
    the relay may use it; nonces are still single use, rate limits are per client address).
    ``tee`` only sets ``confidential_compute`` in ``/v1/models``: set it when every instance
    runs in an attested TEE.
    """

    instances: tuple[str, ...]
    api_keys: tuple[str, ...] = ()
    no_auth: bool = False
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    rate_limit: int = 10  # discovery calls per API key per rate_window
    rate_window: float = 60.0
    nonces_per_instance: int = 10
    nonce_expires_in: int = 60  # what clients are told
    nonce_store_ttl: int = 75  # how long the store keeps them (as the real relay)
    max_instances: int = 5
    max_body: int = 64 * MIB
    connect_timeout: float = 5.0
    read_timeout: float = 900.0  # longest silence from an instance mid-response
    write_timeout: float = 60.0
    info_timeout: float = 5.0
    startup_wait: float = 3.0  # how long start-up keeps retrying instances that are down
    probe_interval: float = 2.0  # re-probe instances that are down this often
    refresh_interval: float = 30.0  # re-read /e2e/info of healthy instances this often
    gone_for: float = 5.0  # after a failed connect, wait this long before probing again
    tee: bool = False
    max_connections: int = 1000  # to all instances together
    max_memory_nonces: int = 1_000_000
    instance_ca: str | None = None  # CA bundle (or pinned self-signed cert) for https instances

    def __post_init__(self) -> None:
        urls = (self.instances,) if isinstance(self.instances, str) else self.instances
        object.__setattr__(self, "instances", tuple(_normalise_url(u) for u in urls))
        keys = (self.api_keys,) if isinstance(self.api_keys, str) else self.api_keys
        object.__setattr__(self, "api_keys", tuple(keys))
        if not self.instances:
            raise config_error("at least one --instance URL is required")
        if len(set(self.instances)) != len(self.instances):
            raise config_error("the same instance URL is listed twice")
        for key in self.api_keys:
            if not isinstance(key, str) or not _KEY_RE.match(key):
                raise config_error(
                    "API keys must be non-empty printable ASCII, without spaces or commas"
                )
        if self.api_keys and self.no_auth:
            raise config_error("--no-auth and API keys exclude each other")
        positive_ints = {
            "port": self.port,
            "rate_limit": self.rate_limit,
            "nonces_per_instance": self.nonces_per_instance,
            "nonce_expires_in": self.nonce_expires_in,
            "nonce_store_ttl": self.nonce_store_ttl,
            "max_instances": self.max_instances,
            "max_body": self.max_body,
            "max_connections": self.max_connections,
            "max_memory_nonces": self.max_memory_nonces,
        }
        for name, value in positive_ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise config_error(f"{name} must be a positive integer")
        if self.port > 65535:
            raise config_error("port must be at most 65535")
        if self.nonces_per_instance > 1000:
            raise config_error("nonces_per_instance must be at most 1000")
        if self.nonce_store_ttl < self.nonce_expires_in:
            raise config_error("nonce_store_ttl must be at least nonce_expires_in")
        for name in (
            "rate_window",
            "connect_timeout",
            "read_timeout",
            "write_timeout",
            "info_timeout",
            "probe_interval",
            "refresh_interval",
            "gone_for",
        ):
            if not float(getattr(self, name)) > 0:
                raise config_error(f"{name} must be positive")
        if not float(self.startup_wait) >= 0:
            raise config_error("startup_wait must be >= 0")


def config_error(message: str) -> LocalProtocolError:
    return LocalProtocolError(message, code=ErrorCode.INVALID_ARGUMENT)


def _normalise_url(url: str) -> str:
    if not isinstance(url, str):
        raise config_error("instance URLs must be strings")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise config_error(f"not an http(s) base URL: {url!r}")
    return url.strip().rstrip("/")
