"""``pqe2ee relay``: the control plane - discovery, single-use nonces, forwarding sealed bytes.

It plays the part of ``api.chutes.ai`` (``/e2e/instances``, ``/e2e/invoke``) and of
``llm.chutes.ai``'s ``/v1/models`` in front of one or more ``pqe2ee instance`` servers, on the
same wire contract, so the published Chutes clients work against it unchanged.

The relay holds no key that opens anything: it reads each instance's *public* key from
``GET {instance}/e2e/info`` and hands it out; request and response bodies are streamed through
as opaque bytes, never parsed, never buffered whole, never logged.

Endpoints::

    GET  /v1/models                  model list; chute_id = uuid5(URL, "pqe2ee:model:" + model)
    GET  /e2e/instances/{chute_id}   <= max_instances instances in random order, each with
                                     nonces_per_instance single-use nonces (Bearer auth,
                                     rate-limited per API key) and, for instances serving
                                     wire profile v2, their ``e2e_v2`` offer (spec/v2.md §8.1)
    POST /e2e/invoke                 consume the nonce, forward the blob to the instance,
                                     stream the answer back (Bearer auth)
    GET  /health                     {"status": "ok"|"degraded", "instances": {...}}
    GET  /metrics                    Prometheus text (counts and latencies only)

Error statuses follow the real relay (design notes ``chutes-v1-notes.md``, section 5), with two
deliberate improvements: an instance's *sealed* error (``application/octet-stream``,
any status) is passed through unchanged, so the client can open the engine's message; and an
instance's v2 plaintext hint (``{"detail":"e2e_v2:<code>"}``) keeps its text on 409 (replay) and
413 as on 400, nested in ``detail`` the way the real relay nests a 400.

v2 needs nothing else from the relay: its blobs and stream lines pass through like v1's (the
body is never parsed or rewritten; the headers are forwarded as for v1). Instances announce v2
in ``/e2e/info`` (``protocols``, ``e2e_v2``); the relay checks the offer when it reads it (an
invalid one is dropped, with a warning, from an instance that also serves v1; an instance that
serves only v2 and has no valid offer is unavailable) and copies it into discovery rows.

``confidential_compute`` in ``/v1/models`` is ``false`` unless :attr:`RelayConfig.tee` says the
instances run in attested TEEs; some third-party Chutes clients refuse models without it.

Modules: ``config`` (:class:`RelayConfig`, API keys, chute ids), ``registry`` (instances and
probing), ``forward`` (one invocation to its instance and back), ``answers`` (the relay's own
error answers), ``metrics`` (Prometheus), ``app`` (endpoints, :func:`create_app`, :func:`serve`).
"""

from __future__ import annotations

from pqe2ee.server.relay.app import create_app, serve
from pqe2ee.server.relay.config import (
    API_KEYS_ENV,
    DEFAULT_PORT,
    RelayConfig,
    api_keys_from_env,
    chute_id_for,
)

__all__ = [
    "API_KEYS_ENV",
    "DEFAULT_PORT",
    "RelayConfig",
    "api_keys_from_env",
    "chute_id_for",
    "create_app",
    "serve",
]
