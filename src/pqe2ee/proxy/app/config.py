"""The proxy's settings: one frozen :class:`ProxyConfig`, validated on construction."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pqe2ee.attest.gate import AttestMode, AttestOptions
from pqe2ee.errors import LocalProtocolError

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_HOST",
    "DEFAULT_MODELS_BASE",
    "DEFAULT_PORT",
    "ProxyConfig",
]

MiB: Final = 1024 * 1024
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8787
DEFAULT_API_BASE: Final = "https://api.chutes.ai"
DEFAULT_MODELS_BASE: Final = "https://llm.chutes.ai"


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything the proxy needs. Sizes are bytes, durations seconds.

    ``api_key`` is used for callers that bring no key of their own. ``max_body`` bounds a
    request body (413 beyond it), ``max_response`` a non-streamed reply read whole, ``max_event``
    one SSE event of a translated stream. ``max_keys`` transports (one per API key) are kept,
    least recently used first out; one unused for ``key_idle_ttl`` is closed; each holds at
    most ``max_connections`` connections to the relay (calls beyond wait for one, at most
    ``connect_timeout``). ``read_timeout`` is the longest silence accepted from upstream
    mid-response; ``deadline`` bounds one model call in all (discovery, invoke and the whole
    reply, streamed or not; ``ClientOptions.deadline`` of every per-key transport). On shutdown, open streams get ``shutdown_grace`` seconds to finish, then end
    with their dialect's error event. ``transport_options`` are passed to :class:`pqe2ee.AsyncE2EETransport` as
    keywords (``max_attempts``, ``limits``, ``on_usage``, ...); the proxy always sets
    ``strict=True`` (a model call that cannot be encrypted is refused, never sent in plaintext).

    ``min_version`` / ``prefer_v2`` are the wire-profile policy (spec/v2.md §8.2) of every
    per-key transport, which share one set of per-chute v2 pins: by default v2 where a chute
    offers it, and a chute once seen with v2 is refused (``downgrade_suspected``) if it comes
    back without; ``min_version=2`` refuses v1 outright (``downgrade_refused``, before any
    nonce is spent) - the setting for instances you run yourself; ``prefer_v2=False`` speaks v1
    only.

    ``attest`` (``auto`` / ``require`` / ``off`` or an :class:`~pqe2ee.attest.gate.AttestOptions`)
    is the TEE attestation of every per-key transport, which share one gate (verdicts, pins):
    a chute that serves evidence is verified before its first prompt and fails closed.
    ``hosted_tools`` is what a Responses call's hosted tools (``web_search``, ...: the engine
    runs none) get: ``"drop"`` (left out, logged once per type) or ``"refuse"`` (a 400).
    ``model_map`` is ``(pattern, model)`` pairs (shell-style ``*``/``?``, first match wins):
    a call whose model matches is sent as that model (clients' built-in ids such as
    ``claude-*`` reach a served model); the reply still names the model the caller asked for.
    """

    def map_model(self, model: str) -> str:
        """The model a call for ``model`` is sent as (see ``model_map``)."""
        for pattern, target in self.model_map:
            if fnmatch.fnmatchcase(model, pattern):
                return target
        return model

    api_base: str = DEFAULT_API_BASE
    models_base: str = DEFAULT_MODELS_BASE
    api_key: str | None = field(default=None, repr=False)
    backend: str = "auto"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_body: int = 32 * MiB
    max_response: int = 64 * MiB
    max_event: int = 16 * MiB
    max_keys: int = 64
    key_idle_ttl: float = 300.0
    max_connections: int = 256
    connect_timeout: float = 30.0
    read_timeout: float = 900.0
    write_timeout: float = 60.0
    deadline: float = 1800.0
    shutdown_grace: float = 5.0
    transport_options: Mapping[str, Any] = field(default_factory=dict)
    min_version: int = 1
    prefer_v2: bool = True
    attest: AttestOptions | str = "auto"
    hosted_tools: str = "drop"
    model_map: Sequence[tuple[str, str]] = ()
    allow_hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("api_base", "models_base"):
            url = getattr(self, name)
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise LocalProtocolError(f"{name} must be an http:// or https:// URL")
            object.__setattr__(self, name, url.rstrip("/"))
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise LocalProtocolError("api_key must be non-empty, without surrounding spaces")
        for name in ("max_body", "max_response", "max_event", "max_keys", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LocalProtocolError(f"{name} must be a positive integer")
        for name in ("key_idle_ttl", "connect_timeout", "read_timeout", "write_timeout"):
            if not float(getattr(self, name)) > 0:
                raise LocalProtocolError(f"{name} must be positive")
        if not 0 < float(self.deadline) < math.inf:
            raise LocalProtocolError("deadline must be a finite number of seconds > 0")
        if not float(self.shutdown_grace) >= 0:
            raise LocalProtocolError("shutdown_grace must be >= 0")
        if not 0 <= self.port <= 65535:
            raise LocalProtocolError("port must be in 0..65535")
        if self.min_version not in (1, 2) or isinstance(self.min_version, bool):
            raise LocalProtocolError("min_version must be 1 or 2")
        if not isinstance(self.prefer_v2, bool):
            raise LocalProtocolError("prefer_v2 must be a bool")
        if self.min_version == 2 and not self.prefer_v2:
            raise LocalProtocolError("min_version=2 needs prefer_v2 (v2 is the only choice)")
        if isinstance(self.attest, str):
            if self.attest not in tuple(AttestMode):
                raise LocalProtocolError("attest must be 'auto', 'require' or 'off'")
            object.__setattr__(self, "attest", AttestOptions(mode=AttestMode(self.attest)))
        elif not isinstance(self.attest, AttestOptions):
            raise LocalProtocolError("attest must be a mode or an AttestOptions")
        clash = {"min_version", "prefer_v2", "negotiator", "attest"} & set(self.transport_options)
        if clash:
            raise LocalProtocolError(
                f"set {', '.join(sorted(clash))} on ProxyConfig, not in transport_options"
            )
        object.__setattr__(self, "transport_options", dict(self.transport_options))
        if self.hosted_tools not in ("drop", "refuse"):
            raise LocalProtocolError("hosted_tools must be 'drop' or 'refuse'")
        pairs = tuple(tuple(p) for p in self.model_map)
        if any(len(p) != 2 or not all(isinstance(x, str) and x for x in p) for p in pairs):
            raise LocalProtocolError(
                "model_map must be (pattern, model) pairs of non-empty strings"
            )
        object.__setattr__(self, "model_map", pairs)
        # Who may call (proxy/app/browser_guard.py): Host names beyond loopback and the listen
        # address ("*": any), web origins let in (with CORS answers).
        object.__setattr__(self, "allow_hosts", tuple(self.allow_hosts))
        object.__setattr__(self, "allow_origins", tuple(self.allow_origins))
        for origin in self.allow_origins:
            if not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
                raise LocalProtocolError(
                    f"allow_origins: {origin!r} is not an origin (scheme://host[:port])"
                )
