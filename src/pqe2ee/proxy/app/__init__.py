"""``pqe2ee proxy``: a local OpenAI / Responses / Anthropic endpoint that encrypts every call.

Point any OpenAI or Anthropic client (the SDKs, Codex, Claude Code, ...) at the proxy; it speaks
plain HTTP to them on loopback and end-to-end encrypted Chutes v1 or pqe2ee profile v2 (where
the chute offers it; see :class:`ProxyConfig` ``min_version`` / ``prefer_v2``) to the network::

    POST /v1/chat/completions       body forwarded byte for byte, encrypted; replies decrypted
    POST /v1/completions            the same (legacy completions)
    POST /v1/responses              OpenAI Responses  -> Chat Completions -> encrypted call
    POST /v1/messages               Anthropic Messages -> Chat Completions -> encrypted call
    POST /v1/messages/count_tokens  an *estimate* computed locally (nothing leaves the machine)
    GET  /v1/models                 plaintext passthrough of the model list (models_base)
    GET  /health                    {"status": "ok"}
    GET  /metrics                   Prometheus text: counts and latencies only

Every model call goes through one :class:`pqe2ee.AsyncE2EETransport` per API key (inside an
``httpx2.AsyncClient``), pooled LRU with an idle TTL and closed on shutdown. The caller's own key
(``Authorization: Bearer`` or ``x-api-key``) is used when present, else the configured key, else
the call is refused with a 401 in the dialect's shape.

Streams are passed on as they arrive: chat and completions streams byte for byte as the transport
decrypts them; Responses and Anthropic streams are parsed with
:class:`pqe2ee.protocol.sse.SSEParser` and re-emitted by the translators in
:mod:`pqe2ee.proxy.translate`. A stream that breaks mid-way
ends with the dialect's error event (``data: {"error": ...}`` for chat, ``response.failed`` for
Responses, ``event: error`` for Anthropic) and never with a clean end. A client that hangs up
cancels the upstream call at once.

Logs carry method, path, status, byte counts and durations: never bodies, prompts or keys.

Modules: :mod:`.config` (settings), :mod:`.failures` (errors as answers in each dialect),
:mod:`._plumbing` (bounded reads and JSON, answered as refusals), :mod:`.pool` (per-key clients),
:mod:`.metrics` (Prometheus and the access log), :mod:`.streaming` (SSE out), :mod:`.routes`
(the endpoints and :func:`create_app`), :mod:`.server` (uvicorn and :func:`serve`).
"""

from __future__ import annotations

from pqe2ee.proxy.app import config
from pqe2ee.proxy.app.config import *  # noqa: F403  (ProxyConfig and the defaults, as asyncio does)
from pqe2ee.proxy.app.routes import create_app
from pqe2ee.proxy.app.server import ProxyServer, serve, server_config

__all__ = ["ProxyServer", "create_app", "serve", "server_config"]
__all__ += config.__all__
