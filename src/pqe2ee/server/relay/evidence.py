"""``GET /chutes/{chute_id}/evidence?nonce=<64 hex>``: the chute's TEE evidence in the Chutes
shape, gathered from its instances' ``GET /evidence?nonce=`` (in parallel, each bounded in
time and size). The relay only carries the evidence: it cannot forge it (the quote binds the
caller's nonce and the instance's keys), only withhold it, which verifying clients treat as a
failure (``failed_instance_ids``) or, for a chute none of whose instances serves evidence (404),
as an unattested chute.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import anyio
import httpx2
from starlette.requests import Request
from starlette.responses import Response

from pqe2ee._json import json_decode
from pqe2ee.server._asgi import json_response
from pqe2ee.server.noncestore import NonceStoreError
from pqe2ee.server.relay.answers import detail, store_down, unauthorized

if TYPE_CHECKING:
    from pqe2ee.server.relay.app import _Relay
    from pqe2ee.server.relay.registry import InstanceState

__all__ = ["chute_evidence"]

_NONCE = re.compile(r"[0-9a-f]{64}")
_MAX_ENTRY = 1 << 20
_TIMEOUT = 30.0


async def _fetch(client: httpx2.AsyncClient, inst: InstanceState, nonce: str) -> Any:
    """The instance's evidence entry, ``None`` when it has no evidence endpoint (404), or
    ``False`` when it failed."""
    try:
        with anyio.fail_after(_TIMEOUT):
            async with client.stream("GET", f"{inst.url}/evidence", params={"nonce": nonce}) as r:
                if r.status_code == 404:
                    return None
                body = bytearray()
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_ENTRY:
                        return False
                if r.status_code != 200:
                    return False
        entry = json_decode(bytes(body))
    except (httpx2.HTTPError, TimeoutError, ValueError):
        return False
    if not isinstance(entry, dict) or entry.get("instance_id") != inst.instance_id:
        return False
    return entry


async def chute_evidence(relay: _Relay, request: Request) -> Response:
    key_id = relay.authenticate(request)
    if key_id is None:
        return unauthorized()
    cfg = relay.config
    try:  # its own budget, as large as discovery's: each call fans out to every instance
        allowed = await relay.store.hit(
            "evidence:" + relay.rate_key(request, key_id), cfg.rate_window, cfg.rate_limit
        )
    except NonceStoreError:
        return store_down()
    if not allowed:
        return detail(
            429,
            f"Rate limit exceeded: at most {cfg.rate_limit} evidence requests "
            f"per {cfg.rate_window:g} s",
            {"Retry-After": str(int(cfg.rate_window + 0.999))},
        )
    nonce = request.query_params.get("nonce", "")
    if not _NONCE.fullmatch(nonce):
        return detail(400, "nonce must be 64 lowercase hex digits")
    model = relay.registry.chutes.get(request.path_params["chute_id"])
    if model is None:
        return detail(404, "Chute not found")
    members = relay.registry.members(model)
    client = relay.forwarder.client
    if not members or client is None:
        return detail(404, "No E2E-capable instances available")
    results: dict[str, Any] = {}

    async def one(inst: InstanceState) -> None:
        assert inst.instance_id is not None
        results[inst.instance_id] = await _fetch(client, inst, nonce)

    async with anyio.create_task_group() as tg:
        for inst in members:
            tg.start_soon(one, inst)
    if all(r is None for r in results.values()):
        return detail(404, "No TEE evidence for this chute")
    evidence = [r for r in results.values() if isinstance(r, dict)]
    failed = sorted(i for i, r in results.items() if not isinstance(r, dict))
    return json_response(
        {"evidence": evidence, "failed_instance_ids": failed},
        headers={"Cache-Control": "no-store"},
    )
