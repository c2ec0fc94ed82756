"""Helpers shared by the relay tests: a real dev-engine -> instance -> relay stack on loopback,
and a small client built from ``pqe2ee.protocol`` + httpx2 (no transport shims involved), for
v1 and for wire profile v2 (``seal_v2`` / ``open_v2`` / ``read_stream_v2``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.backends.xwing import get_xwing
from pqe2ee.protocol import (
    Done,
    InnerEvent,
    InstanceInfo,
    StreamDecryptor,
    open_response,
    parse_discovery,
    seal_request,
)
from pqe2ee.protocol.v2 import (
    Data,
    End,
    Head,
    ResponseV2,
    SealedRequestV2,
    StreamDecryptorV2,
    UsageUpdate,
    open_response_v2,
    parse_v2_offer,
    seal_request_v2,
)
from pqe2ee.server import instance
from servers import serve_chain

KEY_A = "pk-test-alpha-0123456789"
KEY_B = "pk-test-bravo-9876543210"
CHAT = "/v1/chat/completions"

KEM = get_kem()
AEAD = get_aead()
XWING = get_xwing()

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class InvokeCounter:
    """Wraps an ASGI app and counts the ``POST /e2e/invoke`` requests that reach it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.invokes = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/e2e/invoke":
            self.invokes += 1
        await self.app(scope, receive, send)


@dataclass
class Stack:
    engine: str
    engine_app: Any
    instances: list[str]
    counters: list[InvokeCounter]
    relay: str
    relay_app: Any
    extra: dict[str, Any] = field(default_factory=dict)

    def stats(self) -> dict[str, int]:
        return dict(httpx2.get(self.engine + "/dev/stats", timeout=10).json())

    def server(self, i: int = 0) -> instance.Instance:
        """The running :class:`~pqe2ee.server.instance.Instance` behind ``instances[i]``."""
        inst: instance.Instance = self.counters[i].app.state.instance
        return inst


@contextlib.contextmanager
def serve_stack(
    n_instances: int = 1,
    *,
    api_keys: Sequence[str] = (KEY_A,),
    instance_models: Sequence[Sequence[str] | None] | None = None,
    instance_kw: dict[str, Any] | None = None,
    **relay_kw: Any,
) -> Iterator[Stack]:
    """dev-engine, ``n_instances`` real instances in front of it (each behind an
    :class:`InvokeCounter`), one relay in front of those (:func:`servers.serve_chain`).

    ``instance_models[i]`` restricts instance i to those engine models (its own dev-engine).
    """
    with serve_chain(
        n_instances,
        api_keys=api_keys,
        instance_kw=instance_kw,
        instance_models=instance_models,
        wrap_instance=InvokeCounter,
        **relay_kw,
    ) as chain:
        yield Stack(
            chain.engine,
            chain.engine_app,
            chain.instances,
            chain.instance_apps,
            chain.relay,
            chain.relay_app,
        )


def sdk_on(relay: str, prefer_v2: bool, key: str = KEY_A) -> Any:
    """The openai SDK on our blocking httpx2 transport to ``relay``."""
    import openai

    from pqe2ee.transports import httpx2 as tx_httpx2

    transport = tx_httpx2.E2EETransport(
        api_key=key, api_base=relay, models_base=relay, prefer_v2=prefer_v2
    )
    return openai.OpenAI(
        base_url=relay + "/v1",
        api_key=key,
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def discover(
    client: httpx2.Client, chute_id: str, key: str = KEY_A
) -> tuple[list[InstanceInfo], dict[str, Any]]:
    resp = client.get(f"/e2e/instances/{chute_id}", headers=auth(key))
    assert resp.status_code == 200, resp.text
    result = parse_discovery(resp.content, time.time())
    assert result.skipped == 0
    return list(result.instances), resp.json()


def chat_body(text: str, *, stream: bool = False, model: str = "dev-echo") -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}
    ).encode()


@dataclass
class Sealed:
    blob: bytes
    headers: dict[str, str]
    key: Any
    stream: bool


def seal(
    inst: InstanceInfo,
    nonce: str,
    chute_id: str,
    body: bytes,
    *,
    key: str = KEY_A,
    path: str = CHAT,
) -> Sealed:
    sealed = seal_request(body, inst.public_key, response_key=KEM.generate(), kem=KEM, aead=AEAD)
    headers = {
        **auth(key),
        "X-Chute-Id": chute_id,
        "X-Instance-Id": inst.instance_id,
        "X-E2E-Nonce": nonce,
        "X-E2E-Stream": "true" if sealed.stream else "false",
        "X-E2E-Path": path,
        "Content-Type": "application/octet-stream",
    }
    return Sealed(sealed.blob, headers, sealed.response_key, sealed.stream)


def open_blob(sealed: Sealed, blob: bytes) -> dict[str, Any]:
    return dict(json.loads(open_response(blob, sealed.key, aead=AEAD)))


def decrypt_stream(sealed: Sealed, chunks: Iterator[bytes]) -> tuple[str, bool]:
    """Concatenated ``delta.content`` of a chat stream, and whether the inner [DONE] came."""
    dec = StreamDecryptor(sealed.key, aead=AEAD)
    text: list[str] = []
    done = False

    def drain() -> None:
        nonlocal done
        for ev in dec.events():
            if isinstance(ev, InnerEvent):
                obj = json.loads(ev.data)
                for choice in obj.get("choices", []):
                    text.append(choice.get("delta", {}).get("content") or "")
            elif isinstance(ev, Done):
                done = True

    for chunk in chunks:
        dec.receive_data(chunk)
        drain()
    dec.receive_eof()
    drain()
    return "".join(text), done


def wait_until(pred: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``pred`` until true; fail (never hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- wire profile v2 ------------------------------------------------------------------------------


@dataclass
class SealedV2:
    sealed: SealedRequestV2
    headers: dict[str, str]

    @property
    def blob(self) -> bytes:
        return self.sealed.blob


def v2_key(inst: InstanceInfo) -> bytes:
    """The instance's v2 public key from its discovery row (the offer must be valid)."""
    offer = parse_v2_offer(inst.extra, time.time())
    assert offer is not None, "the discovery row has no e2e_v2 offer"
    return offer.public_key


def seal_v2(
    public_key: bytes,
    instance_id: str,
    nonce: str,
    chute_id: str,
    body: bytes,
    *,
    key: str = KEY_A,
    path: str = CHAT,
    now_ms: int | None = None,
    **kw: Any,
) -> SealedV2:
    """A v2 request and the unchanged v1 invoke headers, every value taken from H."""
    sealed = seal_request_v2(
        body,
        public_key,
        chute_id=chute_id,
        instance_id=instance_id,
        relay_nonce=nonce,
        path=path,
        now_ms=int(time.time() * 1000) if now_ms is None else now_ms,
        xwing=XWING,
        aead=AEAD,
        **kw,
    )
    return SealedV2(sealed, dict(sealed.invoke_headers(key)))


def open_v2(sealed: SealedV2, data: bytes) -> ResponseV2:
    return open_response_v2(data, sealed.sealed.secrets, aead=AEAD)


@dataclass
class StreamV2:
    head: Head | None = None
    data: bytes = b""
    usage: list[dict[str, Any]] = field(default_factory=list)
    end: End | None = None

    def text(self) -> str:
        """Concatenated ``delta.content`` of the engine's chat SSE inside the DATA records."""
        out: list[str] = []
        for line in self.data.split(b"\n"):
            if not line.startswith(b"data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                out.append(choice.get("delta", {}).get("content") or "")
        return "".join(out)


def read_stream_v2(sealed: SealedV2, chunks: Iterator[bytes]) -> StreamV2:
    """Feed outer SSE chunks to the v2 decryptor; raises its typed error on any violation."""
    dec = StreamDecryptorV2(sealed.sealed.secrets, aead=AEAD)
    out = StreamV2()

    def drain() -> None:
        for ev in dec.events():
            if isinstance(ev, Head):
                out.head = ev
            elif isinstance(ev, Data):
                out.data += ev.data
            elif isinstance(ev, UsageUpdate):
                out.usage.append(ev.usage)
            elif isinstance(ev, End):
                out.end = ev

    for chunk in chunks:
        dec.receive_data(chunk)
        drain()
    dec.receive_eof()
    drain()
    assert dec.complete
    return out
