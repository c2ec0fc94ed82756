"""A replay relay: a real ASGI app (served on loopback by ``servers.run_app``) that answers like
the Chutes API from a saved capture: the model listing, discovery (the captured instance keys,
with fresh nonce expiry: expiry is not attested), the captured evidence whatever nonce is asked
for (so a client with a fresh nonce sees replayed evidence), and Intel's collateral answers with
their captured headers (as a PCS). ``/e2e/invoke`` is recorded and refused (the captured keys'
private halves are not ours): what matters is whether, and to which instance, a prompt was sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MODEL = "zai-org/GLM-5-TEE"
CHUTE = "7c6d64cc-0a2b-5f35-a3c7-1d0f8a9f2d11"


@dataclass
class Replay:
    capture: Path
    extra: list[Path] = field(default_factory=list)
    serve_evidence: bool = True
    confidential: bool | None = None  # the listing row's confidential_compute (absent: None)
    discovery_edit: Any = None  # callable(list of instances) -> list, to swap keys
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    @property
    def invokes(self) -> list[dict[str, str]]:
        return [h for m, p, h in self.seen if m == "POST" and p == "/e2e/invoke"]

    @property
    def evidence_nonces(self) -> list[str]:
        return [h["nonce"] for m, p, h in self.seen if p.endswith("/evidence")]

    def _collateral(self) -> dict[tuple[str, str], Path]:
        """(path, query key) -> the .body of a captured Intel answer."""
        out: dict[tuple[str, str], Path] = {}
        for where in [self.capture, *self.extra]:  # folders, or single .meta.json files
            metas = sorted(where.glob("*.meta.json")) if where.is_dir() else [where]
            for meta_path in metas:
                meta = json.loads(meta_path.read_text())
                url = str(meta.get("url", ""))
                if "trustedservices.intel.com" not in url:
                    continue
                path, _, query = url.partition("://")[2].partition("/")[2].partition("?")
                key = query.split("&")[0] if path.endswith("/tcb") else ""
                out[("/" + path, key)] = meta_path
        return out

    def app(self) -> Starlette:
        collateral = self._collateral()

        async def record(request: Request) -> None:
            info = {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-")}
            info.update(request.query_params)
            self.seen.append((request.method, request.url.path, info))

        async def models(request: Request) -> Response:
            await record(request)
            row: dict[str, object] = {"id": MODEL, "chute_id": CHUTE}
            if self.confidential is not None:
                row["confidential_compute"] = self.confidential
            return JSONResponse({"data": [row]})

        async def discovery(request: Request) -> Response:
            await record(request)
            doc = json.loads((self.capture / "discovery.body").read_bytes())
            doc.pop("nonce_expires_at", None)
            doc["nonce_expires_in"] = 300
            if self.discovery_edit is not None:
                doc["instances"] = self.discovery_edit(doc["instances"])
            return JSONResponse(doc)

        async def evidence(request: Request) -> Response:
            await record(request)
            if not self.serve_evidence:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            body = (self.capture / "evidence.body").read_bytes()
            return Response(body, media_type="application/json")

        async def invoke(request: Request) -> Response:
            await record(request)
            await request.body()
            return JSONResponse({"detail": "replay relay: cannot reach the instance"}, 500)

        async def intel(request: Request) -> Response:
            await record(request)
            tcb_key = f"fmspc={request.query_params.get('fmspc', '').lower()}"
            meta_path = collateral.get((request.url.path, tcb_key)) or collateral.get(
                (request.url.path, "")
            )
            if meta_path is None:
                return JSONResponse({"detail": "no such collateral"}, status_code=404)
            meta = json.loads(meta_path.read_text())
            body = meta_path.with_name(meta_path.name.removesuffix(".meta.json") + ".body")
            headers = {
                k: v[0] for k, v in meta["headers"].items() if k.lower().endswith("issuer-chain")
            }
            return Response(body.read_bytes(), headers=headers)

        return Starlette(
            routes=[
                Route("/v1/models", models),
                Route("/e2e/instances/{chute}", discovery),
                Route("/chutes/{chute}/evidence", evidence),
                Route("/e2e/invoke", invoke, methods=["POST"]),
                Route("/tdx/certification/v4/{rest:path}", intel),
                Route("/sgx/certification/v4/{rest:path}", intel),
                Route("/IntelSGXRootCA.der", intel),
            ]
        )
