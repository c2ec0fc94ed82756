"""The clients of ``bench_server.py``'s three paths (plaintext, ours, floor E2EE) and the
request they all send. Measuring instruments (tests/test_bench_server.py and
tests/test_bench_floor_instance.py keep them honest)."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Iterator
from typing import Any

from _floor_client import FloorCrypto, RecordOpener  # (beside this file)

KEY = "bench-key-0123456789"
MODEL = "dev-echo"
PROMPT = " ".join(f"word{i}" for i in range(24))  # a 24-word prompt: ~28 stream events
CHAT = "/v1/chat/completions"


class PlainClient:
    def __init__(self, base: str, client: Any) -> None:
        self.base = base
        self.client = client

    def worker(self, i: int) -> PlainClient:
        return self  # (no per-client state)

    async def call(self, stream: bool) -> None:
        body = chat_body(stream)
        headers = {"content-type": "application/json"}
        async with self.client.stream(
            "POST", self.base + CHAT, content=body, headers=headers
        ) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"plaintext call failed: {resp.status_code}")
            data = b"".join([c async for c in resp.aiter_raw()])
        if stream:
            if not data.rstrip().endswith(b"data: [DONE]"):
                raise RuntimeError("plaintext stream incomplete")
        else:
            json.loads(data)


class E2EClient:
    """Discovery + nonce pool + seal/open, all from pqe2ee.protocol."""

    def __init__(self, relay: str, client: Any, backends: tuple[Any, Any] | None = None) -> None:
        from pqe2ee.backends import get_aead, get_kem
        from pqe2ee.protocol.client import ClientLimits
        from pqe2ee.server.relay import chute_id_for

        self.relay = relay
        self.client = client
        self.kem, self.aead = backends or (get_kem(), get_aead())
        self.workers: dict[int, E2EClient] = {}  # a cell's clients (their own pools)
        self.chute = chute_id_for(MODEL)
        self.pool: collections.deque[tuple[Any, str]] = collections.deque()
        self.low_watermark = ClientLimits().low_watermark
        self.refill: asyncio.Task[None] | None = None  # the discovery in flight, if any
        self.queue = asyncio.Lock()
        self.discoveries = 0
        self.waited = 0  # leases that found the pool empty and waited for a discovery

    def worker(self, i: int) -> E2EClient:
        """Client ``i`` of a cell: its own nonce pool (kept from slice to slice), this one's
        HTTP client and backends."""
        child = self.workers.get(i)
        if child is None:
            child = self.workers[i] = type(self)(self.relay, self.client, (self.kem, self.aead))
        return child

    def total(self, counter: str) -> int:
        """``discoveries`` or ``waited`` over this client and its workers."""
        return int(getattr(self, counter)) + sum(
            int(getattr(w, counter)) for w in self.workers.values()
        )

    async def lease(self) -> tuple[Any, str]:
        if not self.pool:
            self.waited += 1
            # The waiters queue: one at a time waits for the refill and takes a nonce, then
            # the next is woken (not all of them at every discovery).
            async with self.queue:
                while not self.pool:
                    await asyncio.shield(self.prefetch())
        leased = self.pool.popleft()
        if len(self.pool) <= self.low_watermark:
            self.prefetch()
        return leased

    def prefetch(self) -> asyncio.Task[None]:
        """The discovery in flight, started if there is none (one at a time, as the
        transports do per chute)."""
        if self.refill is None:
            self.refill = asyncio.create_task(self._refill())
            self.refill.add_done_callback(_forgiven)
        return self.refill

    async def _refill(self) -> None:
        try:
            await self._discover()
        finally:
            # Not in a done callback: until that ran, a lease could be handed the finished
            # task as the one in flight, and awaiting a finished task never yields, so a
            # waiter finding the pool emptied again would spin without letting it run.
            self.refill = None

    async def _discover(self) -> None:
        resp = await self.client.get(
            f"{self.relay}/e2e/instances/{self.chute}",
            headers={"authorization": f"Bearer {KEY}"},
        )
        resp.raise_for_status()
        self.discoveries += 1
        self.pool.extend(self.leases(resp.content))

    def leases(self, doc: bytes) -> Iterator[tuple[Any, str]]:
        """(instance, nonce) of each nonce of a discovery document."""
        from pqe2ee.protocol import parse_discovery

        for inst in parse_discovery(doc, time.time()).instances:
            yield from ((inst, n) for n in inst.nonces)

    def headers(self, instance_id: str, nonce: str, stream: bool) -> dict[str, str]:
        """The v1 headers of ``POST /e2e/invoke``."""
        return {
            "authorization": f"Bearer {KEY}",
            "x-chute-id": self.chute,
            "x-instance-id": instance_id,
            "x-e2e-nonce": nonce,
            "x-e2e-stream": "true" if stream else "false",
            "x-e2e-path": CHAT,
            "content-type": "application/octet-stream",
        }

    async def call(self, stream: bool) -> None:
        from pqe2ee.protocol import StreamDecryptor, open_response, seal_request

        inst, nonce = await self.lease()
        body = chat_body(stream)
        sealed = seal_request(
            body, inst.public_key, response_key=self.kem.generate(), kem=self.kem, aead=self.aead
        )
        headers = self.headers(inst.instance_id, nonce, stream)
        async with self.client.stream(
            "POST", self.relay + "/e2e/invoke", content=sealed.blob, headers=headers
        ) as resp:
            if resp.status_code != 200:
                await resp.aread()
                raise RuntimeError(f"encrypted call failed: {resp.status_code} {resp.text[:200]}")
            if stream:
                # As much checking as the plaintext client's "ends with [DONE]", no more: every
                # record is decrypted and the authenticated inner [DONE] must arrive; the usage
                # events nobody reads are checked, not built (as the transports do without
                # on_usage), and the inner events are dropped as they come.
                dec = StreamDecryptor(sealed.response_key, aead=self.aead, decode_usage=False)
                async for chunk in resp.aiter_raw():
                    dec.receive_data(chunk)
                    dec.events()
                dec.receive_eof()
                if not dec.complete:
                    raise RuntimeError("encrypted stream incomplete")
            else:
                blob = b"".join([c async for c in resp.aiter_raw()])
                json.loads(open_response(blob, sealed.response_key, aead=self.aead))


class FloorClient(E2EClient):
    """The floor path's client: :class:`E2EClient`'s nonce pool and refill, the wire's steps on
    ``_floor_client.py``'s primitives (seal, open, record decoder); discovery read with one
    msgspec decode. It checks as much as :class:`PlainClient` (the JSON parses; the stream ends
    with ``data: [DONE]``)."""

    def __init__(self, relay: str, client: Any, backends: tuple[Any, Any] | None = None) -> None:
        super().__init__(relay, client, backends)
        self.crypto = FloorCrypto()

    def leases(self, doc: bytes) -> Iterator[tuple[Any, str]]:
        """((instance id, its public key), nonce) of each nonce."""
        import binascii

        import msgspec

        for row in msgspec.json.decode(doc)["instances"]:
            inst = (row["instance_id"], binascii.a2b_base64(row["e2e_pubkey"]))
            yield from ((inst, n) for n in row["nonces"])

    async def call(self, stream: bool) -> None:
        (instance_id, instance_pk), nonce = await self.lease()
        blob, sk = self.crypto.seal(chat_body(stream), instance_pk)
        headers = self.headers(instance_id, nonce, stream)
        async with self.client.stream(
            "POST", self.relay + "/e2e/invoke", content=blob, headers=headers
        ) as resp:
            if resp.status_code != 200:
                await resp.aread()
                raise RuntimeError(f"floor call failed: {resp.status_code} {resp.text[:200]}")
            if stream:
                records, last = RecordOpener(sk, self.crypto.decaps), b""
                async for chunk in resp.aiter_raw():
                    last = records.feed(chunk) or last
                if not last.rstrip().endswith(b"data: [DONE]"):
                    raise RuntimeError("floor stream incomplete")
            else:
                blob = b"".join([c async for c in resp.aiter_raw()])
                json.loads(self.crypto.open(sk, blob))


def chat_body(stream: bool, prompt: str = PROMPT) -> bytes:
    """The chat request body every client sends."""
    return json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": stream}
    ).encode()


def _forgiven(task: asyncio.Task[None]) -> None:
    """A failed prefetch nobody waited for is forgiven (as in the transports): the next lease
    that finds the pool empty discovers again and gets the error itself."""
    if not task.cancelled():
        task.exception()
