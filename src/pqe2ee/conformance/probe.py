"""The server under test, seen from the wire: discovery, nonces, sealed invokes (v1 and v2).

:class:`ServerProbe` talks HTTP with httpx2 and does every byte of crypto with
:mod:`pqe2ee.protocol`, so a case can send exactly what it means to (a spent nonce, a flipped
bit, a header that contradicts the body) and look at exactly what came back. It keeps one pool
of discovered nonces and rediscovers only when the pool is dry, so a full run stays far below
the relay's discovery limit (SPEC §10.2: 10 a minute).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import msgspec

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.backends.base import AEAD, KEM, KEMPrivateKey
from pqe2ee.backends.xwing import get_xwing
from pqe2ee.conformance.model import CaseFailed, CaseSkipped
from pqe2ee.errors import PQE2EEError
from pqe2ee.protocol import (
    InstanceInfo,
    Monotonic,
    looks_like_uuid,
    parse_discovery,
    parse_models,
    seal_request,
)
from pqe2ee.protocol.v2 import SealedRequestV2, V2Offer, parse_v2_offer, seal_request_v2

__all__ = ["CHAT", "Invoke", "ServerProbe", "chat_body"]

CHAT = "/v1/chat/completions"


def chat_body(text: str, model: str, *, stream: Any = False) -> bytes:
    """A one-message chat request as JSON bytes (``stream`` is sent as given)."""
    message = {"role": "user", "content": text}
    return msgspec.json.encode({"model": model, "messages": [message], "stream": stream})


@dataclass
class Invoke:
    """One sealed request ready to send: body, headers, and the secrets to open the answer."""

    blob: bytes
    headers: dict[str, str]
    instance: InstanceInfo
    nonce: str
    v1_key: KEMPrivateKey | None = None
    v2: SealedRequestV2 | None = None


@dataclass
class ServerProbe:
    base_url: str
    api_key: str | None
    model: str
    models_base: str | None = None
    timeout: float = 30.0
    kem: KEM = field(default_factory=get_kem)
    aead: AEAD = field(default_factory=get_aead)
    _http: httpx2.Client | None = None
    _chute_id: str | None = None
    _pool: list[tuple[InstanceInfo, str]] = field(default_factory=list)
    _known: list[InstanceInfo] = field(default_factory=list)
    discoveries: int = 0
    last_discovery: dict[str, Any] | None = None

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def http(self) -> httpx2.Client:
        if self._http is None:
            self._http = httpx2.Client(base_url=self.base_url, timeout=self.timeout)
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, url: str) -> httpx2.Response:
        try:
            return self.http.get(url, headers=self.auth())
        except httpx2.TransportError as exc:
            raise CaseFailed(f"GET {url}: {type(exc).__name__}: {exc}") from None

    def post(self, inv: Invoke, **override: str | None) -> httpx2.Response:
        """Send ``inv`` to ``/e2e/invoke``; ``override`` replaces (or with None drops) headers,
        named with underscores (``X_E2E_Stream="true"``)."""
        headers = dict(inv.headers)
        for name, value in override.items():
            name = name.replace("_", "-")
            headers = {k: v for k, v in headers.items() if k.lower() != name.lower()}
            if value is not None:
                headers[name] = value
        try:
            return self.http.post("/e2e/invoke", content=inv.blob, headers=headers)
        except httpx2.TransportError as exc:
            raise CaseFailed(f"POST /e2e/invoke: {type(exc).__name__}: {exc}") from None

    def stream(self, inv: Invoke) -> Iterator[tuple[int, str, bytes]]:
        """Send ``inv`` and yield ``(status, content_type, chunk)`` as the body arrives."""
        try:
            with self.http.stream(
                "POST", "/e2e/invoke", content=inv.blob, headers=inv.headers
            ) as r:
                ctype = r.headers.get("content-type", "")
                for chunk in r.iter_raw():
                    yield r.status_code, ctype, chunk
                yield r.status_code, ctype, b""
        except httpx2.TransportError as exc:
            raise CaseFailed(f"stream: {type(exc).__name__}: {exc}") from None

    # -- discovery --------------------------------------------------------------------------

    @property
    def chute_id(self) -> str:
        if self._chute_id is None:
            if looks_like_uuid(self.model):
                self._chute_id = self.model
            else:
                base = (self.models_base or self.base_url).rstrip("/")
                r = self.get(base + "/v1/models")
                if r.status_code != 200:
                    raise CaseFailed(f"GET /v1/models answered {r.status_code}")
                try:
                    mapping = parse_models(r.content)
                except PQE2EEError as exc:
                    raise CaseFailed(f"/v1/models: {exc.code.value}: {exc.message}") from None
                if self.model not in mapping:
                    raise CaseFailed(f"/v1/models does not list {self.model!r} with a chute_id")
                self._chute_id = mapping[self.model]
        return self._chute_id

    def discover(self) -> list[InstanceInfo]:
        r = self.get(f"/e2e/instances/{self.chute_id}")
        self.discoveries += 1
        if r.status_code != 200:
            raise CaseFailed(f"discovery answered {r.status_code}: {r.text[:200]}")
        try:
            result = parse_discovery(r.content, Monotonic(time.time()))
        except PQE2EEError as exc:
            raise CaseFailed(f"discovery: {exc.code.value}: {exc.message}") from None
        self.last_discovery = r.json()
        if not result.instances:
            raise CaseFailed("discovery lists no usable instance row")
        self._pool = [(inst, n) for inst in result.instances for n in inst.nonces]
        self._known = list(result.instances)
        return list(result.instances)

    def instances(self) -> list[InstanceInfo]:
        """The instances of the latest discovery (discovering once if there was none)."""
        return self._known or self.discover()

    def lease(self, *, v2: bool = False, avoid: str | None = None) -> tuple[InstanceInfo, str]:
        """An unused (instance, nonce); with ``v2`` only from rows with a valid v2 offer."""
        for attempt in range(2):
            for i, (inst, nonce) in enumerate(self._pool):
                if inst.instance_id == avoid or (v2 and self.offer(inst) is None):
                    continue
                del self._pool[i]
                return inst, nonce
            if attempt == 0:
                self.discover()
        if v2:
            raise CaseSkipped("no instance offers v2")
        raise CaseFailed("no nonce left after a fresh discovery")

    def has_v2(self) -> bool:
        if not self._pool:
            self.discover()
        return any(self.offer(inst) is not None for inst, _ in self._pool)

    def offer(self, inst: InstanceInfo) -> V2Offer | None:
        try:
            return parse_v2_offer(inst.extra, time.time())
        except PQE2EEError:
            return None

    # -- sealing ----------------------------------------------------------------------------

    def _headers(self, inst: InstanceInfo, nonce: str, stream: bool, path: str) -> dict[str, str]:
        return {
            **self.auth(),
            "X-Chute-Id": self.chute_id,
            "X-Instance-Id": inst.instance_id,
            "X-E2E-Nonce": nonce,
            "X-E2E-Stream": "true" if stream else "false",
            "X-E2E-Path": path,
            "Content-Type": "application/octet-stream",
        }

    def seal_v1(
        self, body: bytes, *, path: str = CHAT, lease: tuple[InstanceInfo, str] | None = None
    ) -> Invoke:
        inst, nonce = lease or self.lease()
        sealed = seal_request(
            body, inst.public_key, response_key=self.kem.generate(), kem=self.kem, aead=self.aead
        )
        headers = self._headers(inst, nonce, sealed.stream, path)
        return Invoke(sealed.blob, headers, inst, nonce, v1_key=sealed.response_key)

    def seal_v2(
        self, body: bytes, *, path: str = CHAT, lease: tuple[InstanceInfo, str] | None = None
    ) -> Invoke:
        inst, nonce = lease or self.lease(v2=True)
        offer = self.offer(inst)
        if offer is None:
            raise CaseSkipped("no instance offers v2")
        sealed = seal_request_v2(
            body,
            offer.public_key,
            chute_id=self.chute_id,
            instance_id=inst.instance_id,
            relay_nonce=nonce,
            path=path,
            now_ms=int(time.time() * 1000),
            xwing=get_xwing(),
            aead=self.aead,
        )
        headers = {**self.auth(), **dict(sealed.invoke_headers(None))}
        return Invoke(sealed.blob, headers, inst, nonce, v2=sealed)
