"""A measuring instrument, not an instance: the least a v1 E2EE instance can cost on this stack.

Bench-only code (like ``_floor_client.py`` and ``bench_server.py``'s plaintext forwarders):
``bench_server.py`` runs it as the instance of its "floor E2EE" path, behind a plaintext
forwarder standing in for the relay, so that "ours / floor" says how much of the servers' E2EE
cost is our code and "floor / plaintext" how much the wire itself forces. Never use it for
anything else.

It is the forwarders' skeleton (``bench_server._skeleton``: Starlette + httpx2, run by uvicorn
with the same settings) doing only what the v1 wire (SPEC.md §5-8, §10.2) needs, with pqe2ee's
backends (``get_kem`` / ``get_aead``: ``auto`` picks liboqs / pyca, as the real instance) and the
protocol's HKDF (``derive_key``):

* ``GET /e2e/instances/{chute}``: the discovery answer itself (one row: its id, its public key,
  10 fresh nonces, which join the set of nonces issued);
* ``POST /e2e/invoke``: the nonce leaves the set (an unknown one is a 403 that names it, as the
  relay answers), decapsulate, HKDF, open, gunzip, one JSON decode, ``e2e_response_pk`` popped;
  the engine gets the rest, and for a stream ``stream_options`` with ``include_usage`` and (as
  the real instance, unless ``BENCH_CONTINUOUS_USAGE=0``) ``continuous_usage_stats``;
* non-stream: the engine's body, gzip (stored, ``_floor_client``'s writer), sealed to the
  response key with label ``e2e-resp-v1``, with the engine's status;
* stream: ``e2e_init``, then one record per engine line (its LF included), each preceded by the
  plaintext ``usage`` event the real instance writes for a ``data:`` line carrying a non-null
  ``usage`` (the same bytes); nonces read from the OS 32 at a time; the records of one
  engine chunk joined, the init event sent alone and the chunks that arrived together in one body
  message (the real instance's :class:`~pqe2ee.server._coalesce.Coalescer`, ``first_alone``), so
  that the servers send the same messages.

Happy path only, on purpose: no limits (body, gunzip, line), no metrics, no logs, no path or
instance-id checks, no stream-flag check against the header, no concurrency cap, no nonce
expiry, no disconnect watch, no sealed errors beyond the engine's own answer, no v2.
"""

from __future__ import annotations

import binascii
import os
import secrets
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import msgspec
from _floor_client import gzip_stored  # (beside this file)
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.backends.base import AEAD, KEM
from pqe2ee.protocol.kdf import INFO_REQUEST, INFO_RESPONSE, INFO_STREAM, derive_key
from pqe2ee.server._coalesce import Coalescer

__all__ = ["StreamRecords", "routes"]

_CT = 1088
_NONCE = 12
_NONCES_PER_DISCOVERY = 10  # as the real relay hands out
_NONCE_POOL = 32 * _NONCE  # record nonces read from the OS at once (as the real instance)
_INIT_OPEN = b'data: {"e2e_init":"'
_INIT_CLOSE = b'"}\n\n'
_RECORD_OPEN = b'data: {"e2e":'  # + the record as a JSON string (msgspec: padded base64)
_RECORD_CLOSE = b"}\n\n"
_USAGE_OPEN = b'data: {"usage":'
_USAGE_CLOSE = b"}\n\n"
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]


class _Usage(msgspec.Struct):
    usage: Any = None


_usage_of = msgspec.json.Decoder(_Usage).decode
_encode = msgspec.json.encode


class StreamRecords:
    """The outer v1 stream of one answer: :attr:`init` first, then :meth:`feed` per engine chunk
    and :meth:`finish` at its end."""

    __slots__ = ("_nonces", "_rest", "_seal", "init")

    def __init__(self, response_pk: bytes, kem: KEM, aead: AEAD) -> None:
        ct, ss = kem.encapsulate(response_pk)
        self.init = b"".join((_INIT_OPEN, binascii.b2a_base64(ct, newline=False), _INIT_CLOSE))
        self._seal: Callable[[bytes, bytes, bytes | None], bytes]
        self._seal = aead.new(derive_key(ss, ct, INFO_STREAM)).sealer()
        self._rest = b""  # the line the last chunk cut short
        self._nonces = b""  # record nonces not used yet

    def feed(self, chunk: bytes) -> bytes:
        lines = (self._rest + chunk).split(b"\n")
        self._rest = lines.pop()
        return self._sealed([line + b"\n" for line in lines])

    def finish(self) -> bytes:
        return self._sealed([self._rest]) if self._rest else b""

    def _sealed(self, lines: list[bytes]) -> bytes:
        seal = self._seal
        need = _NONCE * len(lines)
        if len(self._nonces) < need:
            self._nonces += os.urandom(max(need, _NONCE_POOL))
        nonces, self._nonces = self._nonces[:need], self._nonces[need:]
        out: list[bytes] = []
        at = 0
        for line in lines:
            if line.startswith(b"data: ") and b'"usage"' in line:
                value = _usage_of(line[6:]).usage
                if value is not None:
                    out += (_USAGE_OPEN, _encode(value), _USAGE_CLOSE)
            nonce = nonces[at : at + _NONCE]
            at += _NONCE
            out += (_RECORD_OPEN, _encode(nonce + seal(nonce, line, None)), _RECORD_CLOSE)
        return b"".join(out)


class _Streamed(Response):
    """The outer stream of an engine stream: init event alone, then the chunks' records."""

    def __init__(self, upstream: httpx2.Response, records: StreamRecords) -> None:
        self.upstream = upstream
        self.records = records
        self.background = None

    async def _outer(self) -> AsyncIterator[bytes]:
        records = self.records
        yield records.init
        async for chunk in self.upstream.aiter_raw():
            yield records.feed(chunk)
        yield records.finish()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})

        async def sink(data: bytes, more: bool) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        try:
            await Coalescer(first_alone=True).run(self._outer(), sink)
        finally:
            await self.upstream.aclose()


def routes(upstream: str, state: dict[str, Any], *, continuous_usage: bool = True) -> list[Route]:
    """The floor instance's routes in front of the engine at ``upstream``; ``state["client"]``
    is the httpx2 client to it (the forwarders' skeleton: ``bench_server._skeleton``)."""
    kem, aead = get_kem(), get_aead()
    key = kem.generate()
    instance_id = "floor-" + secrets.token_hex(4)
    pubkey = binascii.b2a_base64(key.public_key, newline=False).decode()
    issued: set[str] = set()

    async def discover(request: Request) -> Response:
        nonces = [secrets.token_urlsafe(24) for _ in range(_NONCES_PER_DISCOVERY)]
        issued.update(nonces)
        row = {"instance_id": instance_id, "e2e_pubkey": pubkey, "nonces": nonces}
        doc = {"instances": [row], "nonce_expires_in": 60}
        return Response(_encode(doc), media_type="application/json")

    async def invoke(request: Request) -> Response:
        nonce = request.headers.get("x-e2e-nonce", "")
        if nonce not in issued:
            return Response(b'{"detail":"Invalid, expired, or already-used nonce"}', 403)
        issued.discard(nonce)
        blob = await request.body()
        ct = blob[:_CT]
        gz = aead.open(
            derive_key(key.decapsulate(ct), ct, INFO_REQUEST),
            blob[_CT : _CT + _NONCE],
            blob[_CT + _NONCE :],
        )
        body = msgspec.json.decode(zlib.decompress(gz, 31))
        response_pk = binascii.a2b_base64(body.pop("e2e_response_pk"))
        stream = bool(body.get("stream"))
        if stream:
            options = body.get("stream_options")
            merged = dict(options) if isinstance(options, dict) else {}
            merged["include_usage"] = True
            if continuous_usage:
                merged["continuous_usage_stats"] = True
            body["stream_options"] = merged
        client = state["client"]
        url = upstream + request.headers.get("x-e2e-path", "/")
        engine = await client.send(
            client.build_request("POST", url, headers=_JSON, content=_encode(body)), stream=True
        )
        if stream and engine.status_code == 200:
            return _Streamed(engine, StreamRecords(response_pk, kem, aead))
        try:
            answer = await engine.aread()
        finally:
            await engine.aclose()
        kem_ct, ss = kem.encapsulate(response_pk)
        nonce = os.urandom(_NONCE)
        sealed = aead.seal(derive_key(ss, kem_ct, INFO_RESPONSE), nonce, gzip_stored(answer))
        return Response(
            b"".join((kem_ct, nonce, sealed)),
            status_code=engine.status_code,
            media_type="application/octet-stream",
        )

    return [
        Route("/e2e/instances/{chute}", discover),
        Route("/e2e/invoke", invoke, methods=["POST"]),
    ]
