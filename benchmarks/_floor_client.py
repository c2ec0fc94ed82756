"""A measuring instrument, not a client: the least a Python v1 E2EE client can cost on this stack.

Bench-only code (like ``bench_proxy.py``'s ten-line forwarder): ``bench_client.py`` runs it as
the ``floor-e2ee`` client, an ``httpx2.BaseTransport`` under the SDK's own ``httpx2.Client``,
exactly where ``pqe2ee.E2EETransport`` sits, so that "ours − floor" is what our library costs
above the minimum and "reference / floor" is the best ratio any Python client could reach here.
Never use it for anything else.

Per request it does only what the v1 wire (SPEC.md §5-8) requires, with the fastest direct calls:

* one JSON parse of the body for ``model`` and ``stream`` (msgspec into a two-field struct);
* an ephemeral ML-KEM-768 key pair, encapsulation to the instance key (liboqs's C functions on
  the shared descriptor of ``pqe2ee.backends.liboqs``, else pyca), HKDF-SHA256 (stdlib
  ``hmac.digest``, two calls), ``e2e_response_pk`` appended to the caller's bytes, gzip
  (stored, as ours below 4 KiB: one stored block written directly), ChaCha20-Poly1305 (pyca,
  no AAD);
* ``POST /e2e/invoke`` through one inner ``httpx2.HTTPTransport`` (URL parsed once, the six v1
  headers plus Authorization, Host and Content-Length);
* non-stream: read the blob, decapsulate, derive, open, gunzip, and hand the SDK the JSON as an
  already-read ``httpx2.Response``;
* stream: a minimal record decoder: split lines, ``e2e_init`` → key, ``e2e`` records →
  base64 (binascii) → open → plaintext SSE bytes, one joined chunk per upstream read; every
  other line (plaintext usage, blanks) is dropped.

What it skips, on purpose (each is something pqe2ee does and the wire does not force): model
listing and discovery are done once at start-up (and again only when the nonces run out or
expire: the relay hands out ``--nonces-per-instance`` at once); it always uses the first
instance; no attestation gate, no v2, no negotiation, no retries (a non-200 answer raises), no
limits or bounds (record size, gunzip size, blob size), no strict base64, no checks of key or
blob lengths, no deadline handling, no truncation / ``[DONE]`` check, no usage callback, no
error mapping, no plaintext passthrough (every request is taken to be an E2EE chat), no thread
safety, no key wiping. Keys are made inline on the request path (no pool: the benchmark counts
the whole process's CPU, and a pool only moves keygen elsewhere).
"""

from __future__ import annotations

import binascii
import ctypes
import hmac
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import msgspec
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = ["FloorCrypto", "FloorTransport", "RecordOpener", "gzip_stored", "kem_functions"]

_CT = 1088
_PK = 1184
_SK = 2400
_SS = 32
_NONCE = 12
_REQ_INFO = b"e2e-req-v1\x01"  # HKDF-Expand's single block: info || 0x01
_RESP_INFO = b"e2e-resp-v1\x01"
_STREAM_INFO = b"e2e-stream-v1\x01"
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\x03"  # deflate, mtime 0, Unix
_PK_FIELD = b',"e2e_response_pk":"'
_INIT = b'data: {"e2e_init":"'
_RECORD = b'data: {"e2e":"'
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]

Keygen = Callable[[], tuple[bytes, Any]]
Encaps = Callable[[bytes], tuple[bytes, bytes]]
Decaps = Callable[[Any, bytes], bytes]


class _Body(msgspec.Struct):
    model: str
    stream: bool = False


_decode_body = msgspec.json.Decoder(_Body).decode


def _liboqs() -> tuple[Keygen, Encaps, Decaps]:
    from pqe2ee.backends import liboqs  # the loaded library and its shared OQS_KEM descriptor

    kem = liboqs._ENCAPS_KEM._kem
    keypair, encaps, decaps = liboqs._KEYPAIR, liboqs._ENCAPS, liboqs._DECAPS
    buf = ctypes.create_string_buffer

    def keygen() -> tuple[bytes, Any]:
        pk, sk = buf(_PK), buf(_SK)
        keypair(kem, pk, sk)
        return pk.raw, sk

    def encapsulate(public_key: bytes) -> tuple[bytes, bytes]:
        ct, ss = buf(_CT), buf(_SS)
        encaps(kem, ct, ss, public_key)
        return ct.raw, ss.raw

    def decapsulate(sk: Any, ct: bytes) -> bytes:
        ss = buf(_SS)
        decaps(kem, ss, ct, sk)
        return ss.raw

    return keygen, encapsulate, decapsulate


def _pyca() -> tuple[Keygen, Encaps, Decaps]:
    from cryptography.hazmat.primitives.asymmetric import mlkem

    parsed: dict[bytes, Any] = {}

    def keygen() -> tuple[bytes, Any]:
        sk = mlkem.MLKEM768PrivateKey.generate()
        return sk.public_key().public_bytes_raw(), sk

    def encapsulate(public_key: bytes) -> tuple[bytes, bytes]:
        pk = parsed.get(public_key)
        if pk is None:
            pk = parsed[public_key] = mlkem.MLKEM768PublicKey.from_public_bytes(public_key)
        ss, ct = pk.encapsulate()
        return ct, ss

    def decapsulate(sk: Any, ct: bytes) -> bytes:
        return bytes(sk.decapsulate(ct))

    return keygen, encapsulate, decapsulate


def kem_functions() -> tuple[str, Keygen, Encaps, Decaps]:
    """The fastest ML-KEM-768 here: liboqs when it loads (as ``auto`` picks it), else pyca."""
    try:
        return ("liboqs", *_liboqs())
    except Exception:  # no liboqs: pyca
        return ("pyca", *_pyca())


def gzip_stored(data: bytes) -> bytes:
    """gzip, stored (level 0): one stored block written directly, as pqe2ee's codec does (zlib's
    ``compress(level=0)`` sets up a whole deflate stream first: ~90 µs here against ~2)."""
    n = len(data)
    if n > 0xFFFF:  # (more than one stored block: let zlib write them)
        return zlib.compress(data, 0, 31)
    block = struct.pack("<BHH", 1, n, n ^ 0xFFFF)
    return b"".join((_GZIP_HEADER, block, data, struct.pack("<II", zlib.crc32(data), n)))


def _key(ss: bytes, ct: bytes, info: bytes) -> bytes:
    """v1's HKDF-SHA256(ss, salt = ct[:16], info, 32): extract, then one expand block."""
    return hmac.digest(hmac.digest(ct[:16], ss, "sha256"), info, "sha256")


class FloorCrypto:
    """The floor's v1 steps on the wire's bytes: seal a request, open a non-stream answer (and
    :class:`RecordOpener` a stream's records). :class:`FloorTransport` and ``bench_server.py``'s
    floor client (async) both run on it."""

    def __init__(self) -> None:
        self.kem, self._keygen, self._encaps, self.decaps = kem_functions()

    def seal(self, body: bytes, instance_pk: bytes) -> tuple[bytes, Any]:
        """The blob of JSON object ``body`` with ``e2e_response_pk`` appended, sealed to
        ``instance_pk``, and the response private key."""
        pk, sk = self._keygen()
        ct, ss = self._encaps(instance_pk)
        nonce = os.urandom(_NONCE)
        plain = b"".join(
            (body.rstrip()[:-1], _PK_FIELD, binascii.b2a_base64(pk, newline=False), b'"}')
        )
        gz = gzip_stored(plain)
        sealed = ChaCha20Poly1305(_key(ss, ct, _REQ_INFO)).encrypt(nonce, gz, None)
        return b"".join((ct, nonce, sealed)), sk

    def open(self, sk: Any, data: bytes) -> bytes:
        """The plaintext of a non-stream answer's blob."""
        kem_ct = data[:_CT]
        key = _key(self.decaps(sk, kem_ct), kem_ct, _RESP_INFO)
        gz = ChaCha20Poly1305(key).decrypt(data[_CT : _CT + _NONCE], data[_CT + _NONCE :], None)
        return zlib.decompress(gz, 31)


class RecordOpener:
    """The record decoder of one streamed answer: split lines, ``e2e_init`` -> key, ``e2e``
    records -> base64 (binascii) -> open -> plaintext SSE bytes; every other line (plaintext
    usage, blanks) is dropped."""

    __slots__ = ("_decaps", "_open", "_rest", "_sk")

    def __init__(self, sk: Any, decaps: Decaps) -> None:
        self._sk = sk
        self._decaps = decaps
        self._open: Any = None  # the stream key's decrypt, once e2e_init is in
        self._rest = b""  # the line the last chunk cut short

    def feed(self, chunk: bytes) -> bytes:
        """The inner stream's bytes of the records ``chunk`` completes."""
        a2b = binascii.a2b_base64
        lines = (self._rest + chunk).split(b"\n")
        self._rest = lines.pop()
        out = []
        for line in lines:
            if line.startswith(_RECORD):
                raw = a2b(line[14:-2])
                out.append(self._open(raw[:_NONCE], raw[_NONCE:], None))
            elif line.startswith(_INIT):
                ct = a2b(line[19:-2])
                key = _key(self._decaps(self._sk, ct), ct, _STREAM_INFO)
                self._open = ChaCha20Poly1305(key).decrypt
        return b"".join(out)


class _Stream(httpx2.SyncByteStream):
    """The decrypted inner SSE bytes of one streamed answer."""

    def __init__(self, upstream: Any, records: RecordOpener) -> None:
        self._upstream = upstream  # the inner transport's ResponseStream
        self._records = records

    def __iter__(self) -> Iterator[bytes]:
        feed = self._records.feed
        for chunk in self._upstream:
            out = feed(chunk)
            if out:
                yield out

    def close(self) -> None:
        self._upstream.close()


class FloorTransport(httpx2.BaseTransport):
    """The thinnest correct v1 client (see the module's docstring for all it leaves out)."""

    def __init__(self, api_key: str, relay: str, inner: httpx2.BaseTransport | None = None) -> None:
        self._inner = httpx2.HTTPTransport() if inner is None else inner
        self._relay = relay
        self._auth = f"Bearer {api_key}"
        self._invoke = httpx2.URL(relay + "/e2e/invoke")
        self._host = self._invoke.netloc
        self._crypto = FloorCrypto()
        self.kem = self._crypto.kem
        rows = self._get(relay + "/v1/models")["data"]
        self._chutes = {row["id"]: row["chute_id"] for row in rows}
        # per chute: (instance id, instance key, nonces left, renew after (monotonic))
        self._leases: dict[str, tuple[str, bytes, list[str], float]] = {}

    def _get(self, url: str) -> Any:
        request = httpx2.Request("GET", url, headers={"Authorization": self._auth})
        response = self._inner.handle_request(request)
        try:
            return msgspec.json.decode(b"".join(response.stream))
        finally:
            response.stream.close()

    def _discover(self, chute: str) -> tuple[str, bytes, list[str], float]:
        found = self._get(f"{self._relay}/e2e/instances/{chute}")
        row = found["instances"][0]
        renew = time.monotonic() + found.get("nonce_expires_in", 55) - 5
        lease = (row["instance_id"], binascii.a2b_base64(row["e2e_pubkey"]), row["nonces"], renew)
        self._leases[chute] = lease
        return lease

    def close(self) -> None:
        self._inner.close()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        body = request.read()
        parsed = _decode_body(body)
        chute = self._chutes[parsed.model]
        lease = self._leases.get(chute)
        if lease is None or not lease[2] or time.monotonic() > lease[3]:
            lease = self._discover(chute)
        instance, instance_pk, nonces, _ = lease

        blob, sk = self._crypto.seal(body, instance_pk)
        headers = [
            (b"Host", self._host),
            (b"Authorization", self._auth.encode()),
            (b"X-Chute-Id", chute.encode()),
            (b"X-Instance-Id", instance.encode()),
            (b"X-E2E-Nonce", nonces.pop().encode()),
            (b"X-E2E-Stream", b"true" if parsed.stream else b"false"),
            (b"X-E2E-Path", request.url.raw_path.split(b"?", 1)[0]),
            (b"Content-Type", b"application/octet-stream"),
            (b"Content-Length", str(len(blob)).encode()),
        ]
        relayed = httpx2.Request(
            "POST",
            self._invoke,
            headers=headers,
            stream=httpx2.ByteStream(blob),
            extensions=request.extensions,
        )
        answer = self._inner.handle_request(relayed)
        upstream = answer.stream
        if answer.status_code != 200:
            upstream.close()
            raise RuntimeError(f"relay answered {answer.status_code}")
        if parsed.stream:
            stream = _Stream(upstream, RecordOpener(sk, self._crypto.decaps))
            return httpx2.Response(200, headers=_SSE_HEADERS, stream=stream, request=request)
        try:
            data = b"".join(upstream)
        finally:
            upstream.close()
        content = self._crypto.open(sk, data)
        response = httpx2.Response(
            200, headers=_JSON_HEADERS, stream=httpx2.ByteStream(content), request=request
        )
        response._content = content  # already read, as httpx2's ``content=`` leaves it
        response.is_stream_consumed = response.is_closed = True
        return response
