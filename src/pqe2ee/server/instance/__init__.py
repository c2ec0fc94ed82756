"""``pqe2ee instance``: the decrypting front that runs inside the GPU machine (ideally a TEE).

It holds a long-lived ML-KEM-768 key (v1) and an X-Wing key (wire profile v2, spec/v2.md), opens
the request blobs that the relay forwards, sends the plaintext JSON to an OpenAI-compatible engine
(vLLM, llama.cpp, Ollama) on ``upstream`` and seals the engine's answer to the client's one-time
response key. Both versions arrive on the same ``POST /e2e/invoke``: a blob starting with
``"PQE2" 02`` (magic and version of the v2 context header) is v2, anything else v1. v1 wire
behaviour follows the Chutes runtime (see /work/shared/design/chutes-v1-notes.md) with three
deliberate differences, each one making a silent failure loud:

* an ``X-E2E-Stream`` header that disagrees with the body's ``stream`` flag is a 400
  (``stream_mismatch``) instead of a broken response;
* an engine error (non-2xx) is sealed and returned *with the engine's status*, so the client can
  read the engine's message;
* a stream whose engine connection breaks ends with an ``e2e_error`` event and an abrupt close
  (no final chunk), never with anything that looks like a clean end.

v2 (spec/v2.md §4.2-§5): the context header H is checked against what the relay delivered
(``X-E2E-Path``, ``X-E2E-Stream``, ``X-E2E-Nonce`` when forwarded, ``X-Chute-Id``) and the
instance's own ids, the client time against a ±120 s window, the request id against a replay
cache (in memory, or Redis shared by several processes). Refusals are plaintext hints
``{"detail":"e2e_v2:<code>"}`` (400; 409 replay; 413 oversize). Once a request opened the answer
is HTTP 200 and everything else - the engine's status, content type, body, usage, and any engine
failure - is inside authenticated records (HEAD ... END). ``--v2-only`` answers v1 blobs with
426 (``v1_disabled``); ``--no-v2`` serves v1 only. Generated v2 keys rotate (current + previous).

Endpoints::

    GET  /health       {"status": "ok"}
    GET  /e2e/info     instance_id, e2e_pubkey (std base64), models, paths, version, protocols,
                       e2e_v2 {v, kem_id, kdf_id, aead_id, pk, not_after} when v2 is served
    POST /e2e/invoke   body: the request blob; headers X-E2E-Path, X-E2E-Stream, X-Instance-Id
                       (v2 also reads X-Chute-Id and X-E2E-Nonce)

All crypto and SSE framing come from :mod:`pqe2ee.protocol`. Logs carry one line per request
(method, path, status, byte counts, duration, ids) and never bodies, keys or prompt text.

Modules: ``config`` (:class:`InstanceConfig`, derived ids), ``keys`` (v1/v2 keys, rotation,
replay cache), ``upstream`` (the engine client, model list, the streamed-answer base),
``exchange`` (one request's log line, slot and early answers), ``v1`` and ``v2`` (the two wire
profiles), ``app`` (:class:`Instance`, :func:`create_app`, :func:`serve`).
"""

from __future__ import annotations

# StreamEncoder is re-exported so tests can substitute it (looked up here by v1 at call time).
from pqe2ee.protocol import StreamEncoder
from pqe2ee.server.instance.app import Instance, create_app, serve
from pqe2ee.server.instance.config import (
    DEFAULT_ALLOW_PATHS,
    InstanceConfig,
    default_instance_id,
    model_chute_id,
)

__all__ = [
    "DEFAULT_ALLOW_PATHS",
    "Instance",
    "InstanceConfig",
    "StreamEncoder",
    "create_app",
    "default_instance_id",
    "model_chute_id",
    "serve",
]
