#!/usr/bin/env python3
"""Generate, or check, the v2 golden vectors in ``spec/vectors/v2.json`` (see spec/v2.md §11).

    python scripts/gen_vectors_v2.py            # (re)write spec/vectors/v2.json
    python scripts/gen_vectors_v2.py --check    # regenerate in memory, compare with the file

Every vector is made with the project's own core (``pqe2ee.protocol.v2``) from fixed inputs:

* X-Wing key seeds: ``sha256("pqe2ee-v2-vector-" || name)`` (32 bytes);
* randomness (request ids, encapsulation ``eseed``): blocks of
  ``sha256("pqe2ee-v2-random-" || name || "/" || counter as u64 big-endian)``;
* X-Wing encapsulation goes through the pycryptodome backend's ``encapsulate_derand`` (pinned
  4.4.x), so the file is bit-reproducible; ``--check`` needs it.

Gzip output depends on the zlib build; the file records ``zlib_version`` and ``--check`` only
compares byte for byte when it matches. tests/test_v2_vectors.py opens every vector with the
decrypting side of each backend and checks every negative case fails with its listed code.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import zlib
from pathlib import Path
from typing import Any

import msgspec

from pqe2ee.backends import get_aead
from pqe2ee.backends.base import MLKEM768_PK_LEN
from pqe2ee.backends.xwing import XWING_LABEL, get_xwing
from pqe2ee.errors import ErrorCode, PQE2EEError
from pqe2ee.protocol.v2 import (
    ContextHeader,
    InstanceV2,
    MemoryReplayCache,
    ResponseSealer,
    StreamEncoderV2,
    UpstreamError,
    bucket,
    header_info,
    padme,
    pow2,
    record_nonce,
    seal_base,
    seal_request_v2,
    seal_response_v2,
)
from pqe2ee.protocol.v2.header import MAX_HEADER_LEN, MAX_LP1, MAX_PATH_LEN
from pqe2ee.protocol.v2.records import DATA, END, HEAD, USAGE, encode_inner, encrypt_record
from pqe2ee.protocol.v2.request import EXPORT_CONTEXT, build_plaintext, pk_hash
from pqe2ee.protocol.v2.stream import record_event, usage_copy_event

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "spec" / "vectors" / "v2.json"
SHARED = Path("/work/shared/vectors")

SEED_PREFIX = b"pqe2ee-v2-vector-"
RANDOM_PREFIX = b"pqe2ee-v2-random-"

CHUTE = "5f0b7ad3-1c2e-4d5a-9b8c-7e6f5a4b3c2d"
INSTANCE = "0e9d8c7b-6a59-4837-a625-140f3e2d1c0b"
OTHER_INSTANCE = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
NONCE = "b7c1e0f2a9d84c3e8f61a2b3c4d5e6f7"
PATH = "/v1/chat/completions"
TS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
WINDOW = 120_000

XW = get_xwing("pycryptodome")
AEAD = get_aead("pyca")


def seed_for(name: str) -> bytes:
    return hashlib.sha256(SEED_PREFIX + name.encode()).digest()


class DeterministicRandom:
    def __init__(self, name: str) -> None:
        self._prefix = RANDOM_PREFIX + name.encode() + b"/"
        self._counter = 0
        self._buf = b""

    def __call__(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._buf += hashlib.sha256(self._prefix + self._counter.to_bytes(8, "big")).digest()
            self._counter += 1
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def _hex(b: bytes) -> str:
    return b.hex()


def _json(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


def _chunk(i: int, delta: dict[str, Any], finish: str | None) -> bytes:
    obj = {
        "id": "chatcmpl-v2",
        "object": "chat.completion.chunk",
        "created": 1767225600,
        "model": "dev-echo",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + _json(obj) + b"\n\n"


def engine_stream(words: list[str]) -> tuple[list[bytes], dict[str, int]]:
    usage = {"prompt_tokens": 9, "total_tokens": 9 + len(words), "completion_tokens": len(words)}
    chunks = [_chunk(0, {"role": "assistant", "content": ""}, None)]
    chunks += [_chunk(i, {"content": w}, None) for i, w in enumerate(words, 1)]
    chunks.append(_chunk(len(words) + 1, {}, "stop"))
    tail = {"id": "chatcmpl-v2", "object": "chat.completion.chunk", "created": 1767225600}
    chunks.append(
        b"data: " + _json({**tail, "model": "dev-echo", "choices": [], "usage": usage}) + b"\n\n"
    )
    chunks.append(b"data: [DONE]\n\n")
    return chunks, usage


def completion(text: str) -> tuple[bytes, dict[str, int]]:
    usage = {"prompt_tokens": 11, "total_tokens": 11 + 4, "completion_tokens": 4}
    body = _json(
        {
            "id": "chatcmpl-v2",
            "object": "chat.completion",
            "created": 1767225600,
            "model": "dev-echo",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    )
    return body, usage


def chat_body(content: str, *, stream: bool, model: str = "dev-echo") -> bytes:
    obj: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        obj["stream"] = True
    return _json(obj)


def _event_json(ev: Any) -> dict[str, Any]:
    from pqe2ee.protocol.v2 import Data, End, Head, UsageUpdate

    if isinstance(ev, Head):
        return {
            "type": "head",
            "status": ev.status,
            "content_type": ev.content_type,
            "content_encoding": ev.content_encoding,
        }
    if isinstance(ev, Data):
        return {"type": "data", "data": ev.data.decode("utf-8")}
    if isinstance(ev, UsageUpdate):
        return {"type": "usage", "usage": ev.usage}
    if isinstance(ev, End):
        err = (
            None
            if ev.error is None
            else {"type": ev.error.type, "message": ev.error.message, "status": ev.error.status}
        )
        return {
            "type": "end",
            "usage": ev.usage,
            "error": err,
            "records": ev.records,
            "data_bytes": ev.data_bytes,
        }
    raise TypeError(type(ev))


class Generator:
    def __init__(self) -> None:
        self.instance_seed = seed_for("instance")
        self.instance_key = XW.from_seed(self.instance_seed)
        self.requests: list[dict[str, Any]] = []
        self._sealed: list[Any] = []
        self._opened: list[Any] = []
        self._sealers: dict[int, ResponseSealer] = {}

    # -- X-Wing and HPKE (copied from the shared, published vectors) ------------------------------

    @staticmethod
    def xwing() -> list[dict[str, Any]]:
        src = json.loads((SHARED / "xwing" / "xwing_draft_test_vectors.json").read_text())
        return [{k: v[k] for k in ("seed", "pk", "eseed", "ct", "ss")} for v in src]

    @staticmethod
    def hpke() -> dict[str, Any]:
        src = json.loads((SHARED / "hpke-pq" / "hpke_pq_xwing_test_vectors.json").read_text())
        (v,) = [s for s in src if (s["kem_id"], s["kdf_id"], s["aead_id"]) == (0x647A, 1, 3)]
        keep = (
            "mode",
            "kem_id",
            "kdf_id",
            "aead_id",
            "info",
            "skRm",
            "pkRm",
            "ikmE",
            "enc",
            "shared_secret",
            "suite_id",
            "key",
            "base_nonce",
            "exporter_secret",
            "encryptions",
            "exports",
        )
        return {k: v[k] for k in keep}

    def kem_negative(self) -> list[dict[str, Any]]:
        v0 = self.xwing()[0]
        ct = bytes.fromhex(v0["ct"])
        pk = bytes.fromhex(v0["pk"])
        order8 = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
        bad_t = b"\xff\xff" + pk[2:]  # first coefficient 0xfff >= q = 3329
        out = [
            {
                "name": "decaps ct_X all-zero point",
                "op": "decaps",
                "seed": v0["seed"],
                "ct": _hex(ct[:1088] + bytes(32)),
                "code": ErrorCode.DECRYPT_FAILED,
            },
            {
                "name": "decaps ct_X u=1 (low order)",
                "op": "decaps",
                "seed": v0["seed"],
                "ct": _hex(ct[:1088] + (1).to_bytes(32, "little")),
                "code": ErrorCode.DECRYPT_FAILED,
            },
            {
                "name": "decaps ct_X order-8 point",
                "op": "decaps",
                "seed": v0["seed"],
                "ct": _hex(ct[:1088] + order8),
                "code": ErrorCode.DECRYPT_FAILED,
            },
            {
                "name": "decaps ciphertext 1119 bytes",
                "op": "decaps",
                "seed": v0["seed"],
                "ct": _hex(ct[:-1]),
                "code": ErrorCode.MALFORMED_BLOB,
            },
            {
                "name": "decaps ciphertext 1121 bytes",
                "op": "decaps",
                "seed": v0["seed"],
                "ct": _hex(ct + b"\x00"),
                "code": ErrorCode.MALFORMED_BLOB,
            },
            {
                "name": "encaps public key 1215 bytes",
                "op": "encaps",
                "pk": _hex(pk[:-1]),
                "code": ErrorCode.INVALID_KEY,
            },
            {
                "name": "encaps public key 1217 bytes",
                "op": "encaps",
                "pk": _hex(pk + b"\x00"),
                "code": ErrorCode.INVALID_KEY,
            },
            {
                "name": "encaps ML-KEM half fails the FIPS 203 modulus check",
                "op": "encaps",
                "pk": _hex(bad_t),
                "code": ErrorCode.INVALID_KEY,
            },
            {
                "name": "encaps X25519 half is the all-zero point",
                "op": "encaps",
                "pk": _hex(pk[:MLKEM768_PK_LEN] + bytes(32)),
                "code": ErrorCode.INVALID_KEY,
            },
            {
                "name": "encaps X25519 half is an order-8 point",
                "op": "encaps",
                "pk": _hex(pk[:MLKEM768_PK_LEN] + order8),
                "code": ErrorCode.INVALID_KEY,
            },
        ]
        return [{**c, "code": c["code"].value} for c in out]

    # -- header -----------------------------------------------------------------------------------

    def header(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        positives = []
        cases = [
            ("chat, non-stream, no response padding", False, 0, PATH, "dev-echo"),
            ("stream, response padding 256", True, 256, PATH, "dev-echo"),
            (
                "stream, response padding 128, UTF-8 model",
                True,
                128,
                "/v1/completions",
                "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8 ✓",
            ),
        ]
        rng = DeterministicRandom("header")
        base: ContextHeader | None = None
        for name, stream, padding, path, model in cases:
            h = ContextHeader(
                stream=stream,
                pk_hash=pk_hash(self.instance_key.public_key),
                ts_ms=TS,
                request_id=rng(16),
                chute_id=CHUTE,
                instance_id=INSTANCE,
                relay_nonce=NONCE,
                path=path,
                model=model,
                response_padding=padding,
            )
            base = base or h
            hb = h.encode()
            positives.append(
                {
                    "name": name,
                    "fields": {
                        "stream": stream,
                        "response_padding": padding,
                        "pk_hash": _hex(h.pk_hash),
                        "ts_ms": TS,
                        "request_id": _hex(h.request_id),
                        "chute_id": CHUTE,
                        "instance_id": INSTANCE,
                        "relay_nonce": NONCE,
                        "path": path,
                        "model": model,
                    },
                    "flags": h.flags,
                    "h": _hex(hb),
                    "sha256": hashlib.sha256(hb).hexdigest(),
                    "info": _hex(header_info(hb)),
                }
            )
        assert base is not None
        hb = base.encode()

        def with_len(b: bytes) -> bytes:
            return b[:5] + len(b).to_bytes(2, "big") + b[7:]

        def var_replace(old: bytes, new: bytes) -> bytes:
            assert hb.count(old) == 1
            return with_len(hb.replace(old, new))

        negs: list[tuple[str, bytes]] = [
            ("trailing byte", with_len(hb + b"\x00")),
            ("hdr_len one more than the bytes", hb[:5] + (len(hb) + 1).to_bytes(2, "big") + hb[7:]),
            ("bad magic", b"PQE3" + hb[4:]),
            ("version 3", hb[:4] + b"\x03" + hb[5:]),
            ("version 1", hb[:4] + b"\x01" + hb[5:]),
            ("kem_id 0x0041 (ML-KEM-768 alone)", hb[:8] + b"\x00\x41" + hb[10:]),
            ("kdf_id 0x0011", hb[:10] + b"\x00\x11" + hb[12:]),
            ("aead_id 0x0001 (AES-128-GCM)", hb[:12] + b"\x00\x01" + hb[14:]),
            ("response padding value 3", hb[:7] + bytes((hb[7] | 0x06,)) + hb[8:]),
        ]
        negs += [
            (f"reserved flag bit {b}", hb[:7] + bytes((hb[7] | (1 << b),)) + hb[8:])
            for b in range(3, 8)
        ]
        model_lp = b"\x08dev-echo"
        negs += [
            ("empty model", var_replace(model_lp, b"\x00")),
            ("model length runs past the end", hb[:-9] + b"\x09dev-echo"),
            (
                "non-ASCII path (UTF-8 'é')",
                var_replace(
                    b"\x00\x14" + PATH.encode(), b"\x00\x15" + "/v1/chat/complétions".encode()
                ),
            ),
            (
                "path with a '?'",
                var_replace(b"\x00\x14" + PATH.encode(), b"\x00\x15" + PATH.encode() + b"?"),
            ),
            (
                "path without a leading '/'",
                var_replace(b"\x00\x14" + PATH.encode(), b"\x00\x13" + PATH[1:].encode()),
            ),
            (
                "uppercase chute_id",
                var_replace(b"\x24" + CHUTE.encode(), b"\x24" + CHUTE.upper().encode()),
            ),
            ("instance_id is not a UUID", var_replace(b"\x24" + INSTANCE.encode(), b"\x05node1")),
            ("empty relay nonce", var_replace(b"\x20" + NONCE.encode(), b"\x00")),
            ("relay nonce with a space", var_replace(b"\x20" + NONCE.encode(), b"\x03a b")),
            ("shorter than the fixed part", hb[:69]),
        ]
        negatives = [{"name": n, "h": _hex(b), "code": ErrorCode.BAD_HEADER.value} for n, b in negs]
        return positives, negatives

    # -- requests ---------------------------------------------------------------------------------

    def request(
        self,
        name: str,
        body: bytes,
        *,
        compress: bool,
        pad: str,
        response_padding: int,
        path: str = PATH,
    ) -> int:
        rng = DeterministicRandom(f"request/{name}")
        response_seed = seed_for(f"response-key/{name}")
        eseed = rng(64)
        sealed = seal_request_v2(
            body,
            self.instance_key.public_key,
            chute_id=CHUTE,
            instance_id=INSTANCE,
            relay_nonce=NONCE,
            path=path,
            now_ms=TS,
            xwing=XW,
            aead=AEAD,
            random_bytes=rng,
            compress=compress,
            pad=pad,  # type: ignore[arg-type]
            response_padding=response_padding,
            response_key=XW.from_seed(response_seed),
            eseed=eseed,
        )
        # P itself, for ports that check the plaintext layout
        p = build_plaintext(
            body, XW.from_seed(response_seed).public_key, compress=compress, pad=pad
        )  # type: ignore[arg-type]
        inst = InstanceV2(
            chute_id=CHUTE,
            instance_id=INSTANCE,
            keys=[XW.from_seed(self.instance_seed)],
            aead=AEAD,
            replay_cache=MemoryReplayCache(),
        )
        opened = inst.open(sealed.blob, path=path.ljust(24, "?"), stream=sealed.stream, now_ms=TS)
        assert opened.body == body and opened.exporter == sealed.secrets.exporter
        self._sealed.append(sealed)
        self._opened.append(opened)
        self.requests.append(
            {
                "name": name,
                "body": body.decode("utf-8"),
                "compress": compress,
                "pad": pad,
                "response_padding": response_padding,
                "instance_seed": _hex(self.instance_seed),
                "instance_pk_sha256": hashlib.sha256(self.instance_key.public_key).hexdigest(),
                "response_seed": _hex(response_seed),
                "eseed": _hex(eseed),
                "ts_ms": TS,
                "request_id": _hex(sealed.request_id),
                "chute_id": CHUTE,
                "instance_id": INSTANCE,
                "relay_nonce": NONCE,
                "path": path,
                "delivered_path": path.ljust(24, "?"),
                "stream": sealed.stream,
                "h": _hex(sealed.header_bytes),
                "info": _hex(header_info(sealed.header_bytes)),
                "enc": _hex(sealed.enc),
                "p": _hex(p),
                "blob": _hex(sealed.blob),
                "exporter": _hex(sealed.secrets.exporter),
                "transcript_hash": _hex(sealed.transcript_hash),
            }
        )
        return len(self.requests) - 1

    def sealer(self, idx: int, name: str) -> tuple[ResponseSealer, bytes]:
        eseed = DeterministicRandom(f"response/{name}")(64)
        return ResponseSealer.for_request(
            self._opened[idx], xwing=XW, aead=AEAD, eseed=eseed
        ), eseed

    def schedule(
        self, idx: int, sealer: ResponseSealer, eseed: bytes, final_seq: int
    ) -> dict[str, Any]:
        k = sealer.keys
        resp_key = XW.from_seed(bytes.fromhex(self.requests[idx]["response_seed"]))
        ss_r = resp_key.decapsulate(k.resp_init[6:])
        return {
            "eseed": _hex(eseed),
            "enc_r": _hex(k.resp_init[6:]),
            "ss_r": _hex(ss_r),
            "resp_init": _hex(k.resp_init),
            "prk_r": _hex(k.prk),
            "k_r": _hex(k.key),
            "np_r": _hex(k.nonce_prefix),
            "nonces": {
                "seq0": _hex(record_nonce(k.nonce_prefix, 0, False)),
                "seq1": _hex(record_nonce(k.nonce_prefix, 1, False)),
                f"final_seq{final_seq}": _hex(record_nonce(k.nonce_prefix, final_seq, True)),
            },
        }

    def single_response(
        self,
        idx: int,
        name: str,
        *,
        status: int,
        body: bytes,
        usage: dict[str, int] | None,
        compress: bool,
        error: UpstreamError | None = None,
    ) -> dict[str, Any]:
        sealer, eseed = self.sealer(idx, name)
        out = seal_response_v2(
            sealer, status=status, body=body, usage=usage, error=error, compress=compress
        )
        records = []
        pos = len(sealer.resp_init)
        while pos < len(out):
            n = int.from_bytes(out[pos : pos + 4], "big")
            records.append(_hex(out[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        return {
            "name": name,
            "request": idx,
            "kind": "single",
            "schedule": self.schedule(idx, sealer, eseed, len(records) - 1),
            "records": records,
            "body": _hex(out),
            "expect": {
                "status": status,
                "content_type": "application/json",
                "body": body.decode("utf-8"),
                "usage": usage,
                "error": None
                if error is None
                else {"type": error.type, "message": error.message, "status": error.status},
            },
        }

    def stream_response(
        self,
        idx: int,
        name: str,
        chunks: list[bytes],
        *,
        error: UpstreamError | None = None,
        status: int = 200,
        auth_usage: dict[str, int] | None = None,
    ) -> tuple[dict[str, Any], list[bytes], ResponseSealer]:
        sealer, eseed = self.sealer(idx, name)
        enc = StreamEncoderV2(sealer)
        events = [enc.start(status)]
        for c in chunks:
            events.append(enc.feed(c))
        if auth_usage is not None:
            events.append(enc.usage(auth_usage))
        events.append(enc.finish(error=error))
        wire = b"".join(events)
        lines = [ln + b"\n\n" for ln in wire.split(b"\n\n") if ln]
        from pqe2ee.protocol.v2 import StreamDecryptorV2

        resp_key = XW.from_seed(bytes.fromhex(self.requests[idx]["response_seed"]))
        sec = type(self._sealed[idx].secrets)(self._sealed[idx].secrets.exporter, resp_key, True)
        dec = StreamDecryptorV2(sec, aead=AEAD)
        dec.receive_data(wire)
        dec.receive_eof()
        evs = [e for e in dec.events() if e.__class__.__name__ != "EndOfStream"]
        return (
            {
                "name": name,
                "request": idx,
                "kind": "stream",
                "schedule": self.schedule(idx, sealer, eseed, sealer.records - 1),
                "wire": wire.decode("ascii"),
                "events": [_event_json(e) for e in evs],
                "data": b"".join(chunks).decode("utf-8"),
            },
            lines,
            sealer,
        )

    # -- spec clarifications that decide accepted inputs (issue 13) ----------------------------

    def longest_header(self) -> bytes:
        """The longest valid H: every variable field at its bound (spec/v2.md §3: 2706 bytes)."""
        h = ContextHeader(
            stream=True,
            pk_hash=pk_hash(self.instance_key.public_key),
            ts_ms=TS,
            request_id=DeterministicRandom("longest header")(16),
            chute_id=CHUTE,
            instance_id=INSTANCE,
            relay_nonce="n" * MAX_LP1,
            path="/" + "p" * (MAX_PATH_LEN - 1),
            model="m" * MAX_LP1,
            response_padding=256,
        )
        hb = h.encode()
        assert len(hb) == MAX_HEADER_LEN == 2706, len(hb)
        return hb

    def header_clarifications(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(edges that must be accepted, negatives) for the §3 bound ``hdr_len <= 2706``."""
        hb = self.longest_header()
        over = hb[:5] + (len(hb) + 1).to_bytes(2, "big") + hb[7:] + b"\x00"
        edges = [{"name": "longest valid H (2706 bytes)", "h": _hex(hb), "code": None}]
        negatives = [
            {
                "name": "hdr_len 2707 (the longest valid H plus one byte)",
                "h": _hex(over),
                "code": ErrorCode.BAD_HEADER.value,
            }
        ]
        return edges, negatives

    @staticmethod
    def base64_clarifications(
        idx: int, lines: list[bytes], data: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Stream wires for spec/v2.md §1 base64: non-zero unused bits in the last quantum are
        ignored (an edge that must be accepted, same data); a record whose ``=`` padding is
        stripped is rejected (``malformed_event``)."""
        prefix, suffix = b'data: {"e2e_v2":"', b'"}\n\n'
        i = next(
            n
            for n, ln in enumerate(lines)
            if n > 0 and ln.startswith(prefix) and ln.endswith(b"=" + suffix)
        )
        b64 = lines[i][len(prefix) : -len(suffix)]
        body = b64.rstrip(b"=")
        unused = 4 if len(b64) - len(body) == 2 else 2  # bits of the last char no byte uses
        alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        last = alphabet.index(body[-1:])
        assert last & ((1 << unused) - 1) == 0  # senders write them as zero
        odd = body[:-1] + alphabet[last | 1 : (last | 1) + 1] + b64[len(body) :]
        assert base64.b64decode(odd) == base64.b64decode(b64) and odd != b64

        def wire(line: bytes) -> str:
            return b"".join([*lines[:i], prefix + line + suffix, *lines[i + 1 :]]).decode()

        edges = [
            {
                "name": f"record {i - 1} base64 with a non-zero unused bit (RFC 4648 §3.5)",
                "request": idx,
                "wire": wire(odd),
                "data": data,
                "code": None,
            }
        ]
        negatives = [
            {
                "name": f"record {i - 1} base64 without its '=' padding",
                "request": idx,
                "wire": wire(body),
                "code": ErrorCode.MALFORMED_EVENT.value,
            }
        ]
        return edges, negatives

    # -- negatives --------------------------------------------------------------------------------

    def stream_negatives(
        self,
        idx: int,
        lines: list[bytes],
        sealer: ResponseSealer,
        other_same: list[bytes],
        other_req: list[bytes],
    ) -> list[dict[str, Any]]:
        """``lines``: the events of a valid stream: [init, HEAD, DATA..., usage copy, END]."""
        init, head, *rest = lines
        end = rest[-1]
        copy = rest[-2]
        datas = rest[:-2]
        assert copy.startswith(b'data: {"usage"')
        k = sealer.keys
        cipher = AEAD.new(k.key)

        def rec(seq: int, final: bool, inner: bytes) -> bytes:
            return record_event(encrypt_record(cipher, k.nonce_prefix, seq, final, inner))

        def b64rec(line: bytes) -> bytes:
            return base64.b64decode(line[len(b'data: {"e2e_v2":"') : -4])

        def edit(line: bytes, fn: Any) -> bytes:
            return record_event(fn(bytearray(b64rec(line))))

        def flip_final(r: bytearray) -> bytes:
            r[0] ^= 1
            return bytes(r)

        def set_seq(r: bytearray) -> bytes:
            r[1:5] = (int.from_bytes(r[1:5], "big") + 1).to_bytes(4, "big")
            return bytes(r)

        def flip_ct(r: bytearray) -> bytes:
            r[10] ^= 0x01
            return bytes(r)

        n_end = len(datas) + 1  # END's seq: HEAD + DATA records precede it
        cases: list[tuple[str, list[bytes], ErrorCode]] = [
            (
                "drop END (EOF after the usage copy)",
                [init, head, *datas, copy],
                ErrorCode.STREAM_TRUNCATED,
            ),
            ("cut after HEAD", [init, head], ErrorCode.STREAM_TRUNCATED),
            ("empty stream", [], ErrorCode.STREAM_TRUNCATED),
            (
                "cut inside the END event line",
                [init, head, *datas, copy, end[: len(end) // 2]],
                ErrorCode.STREAM_TRUNCATED,
            ),
            (
                "swap records 1 and 2",
                [init, head, datas[1], datas[0], *datas[2:], copy, end],
                ErrorCode.RECORD_OUT_OF_ORDER,
            ),
            (
                "duplicate record 1",
                [init, head, datas[0], datas[0], *datas[1:], copy, end],
                ErrorCode.DUPLICATE_RECORD,
            ),
            (
                "drop middle record 2",
                [init, head, datas[0], *datas[2:], copy, end],
                ErrorCode.RECORD_OUT_OF_ORDER,
            ),
            ("duplicate END", [init, head, *datas, copy, end, end], ErrorCode.DATA_AFTER_END),
            ("record before init", [head, init, *datas, copy, end], ErrorCode.RECORD_BEFORE_INIT),
            ("second init", [init, init, head, *datas, copy, end], ErrorCode.DUPLICATE_INIT),
            (
                "splice record 1 from another response to the same request",
                [init, head, other_same[2], *datas[1:], copy, end],
                ErrorCode.RECORD_AUTH_FAILED,
            ),
            (
                "splice record 1 from a response to another request",
                [init, head, other_req[2], *datas[1:], copy, end],
                ErrorCode.RECORD_AUTH_FAILED,
            ),
            (
                "splice the init of another response to the same request",
                [other_same[0], head, *datas, copy, end],
                ErrorCode.RECORD_AUTH_FAILED,
            ),
            (
                "final flag set on record 1",
                [init, head, edit(datas[0], flip_final), *datas[1:], copy, end],
                ErrorCode.RECORD_AUTH_FAILED,
            ),
            (
                "final flag cleared on END",
                [init, head, *datas, copy, edit(end, flip_final)],
                ErrorCode.RECORD_AUTH_FAILED,
            ),
            (
                "seq hint of record 1 changed to 2",
                [init, head, edit(datas[0], set_seq), *datas[1:], copy, end],
                ErrorCode.RECORD_OUT_OF_ORDER,
            ),
            (
                "bit flipped in the ciphertext of record 1",
                [init, head, edit(datas[0], flip_ct), *datas[1:], copy, end],
                ErrorCode.RECORD_AUTH_FAILED,
            ),
            (
                "DATA after END (sealed by the instance key holder)",
                [init, head, *datas, copy, end, rec(n_end + 1, False, encode_inner(DATA, b"late"))],
                ErrorCode.DATA_AFTER_END,
            ),
            (
                "non-zero padding",
                [
                    init,
                    head,
                    rec(2 - 1, False, encode_inner(DATA, b"x") + b"\x00\x01"),
                    *datas[1:],
                    copy,
                    end,
                ],
                ErrorCode.BAD_PADDING,
            ),
            (
                "unknown record type 0x04",
                [init, head, rec(1, False, encode_inner(0x04, b"x")), *datas[1:], copy, end],
                ErrorCode.UNKNOWN_RECORD_TYPE,
            ),
            (
                "END not final",
                [
                    init,
                    head,
                    *datas,
                    rec(n_end, False, encode_inner(END, b'{"records":%d,"data_bytes":0}' % n_end)),
                ],
                ErrorCode.RECORD_GRAMMAR,
            ),
            (
                "DATA marked final",
                [init, head, rec(1, True, encode_inner(DATA, b"x"))],
                ErrorCode.RECORD_GRAMMAR,
            ),
            (
                "second HEAD",
                [init, head, rec(1, False, encode_inner(HEAD, b'{"status":200}'))],
                ErrorCode.RECORD_GRAMMAR,
            ),
            (
                "DATA before HEAD",
                [init, rec(0, False, encode_inner(DATA, b"x"))],
                ErrorCode.RECORD_GRAMMAR,
            ),
            (
                "USAGE before HEAD",
                [init, rec(0, False, encode_inner(USAGE, b"{}"))],
                ErrorCode.RECORD_GRAMMAR,
            ),
            (
                "END counts disagree",
                [
                    init,
                    head,
                    *datas,
                    rec(n_end, True, encode_inner(END, b'{"records":1,"data_bytes":0}')),
                ],
                ErrorCode.RECORD_GRAMMAR,
            ),
            (
                "plaintext usage copy differs from END",
                [
                    init,
                    head,
                    *datas,
                    copy.replace(b'"completion_tokens":', b'"completion_tokens":1'),
                    end,
                ],
                ErrorCode.USAGE_MISMATCH,
            ),
            (
                "plaintext usage copy after END differs",
                [init, head, *datas, end, usage_copy_event({"prompt_tokens": 1})],
                ErrorCode.USAGE_MISMATCH,
            ),
            (
                "unknown outer event",
                [init, head, b'data: {"e2e":"AAAA"}\n\n'],
                ErrorCode.MALFORMED_EVENT,
            ),
            (
                "record is not base64",
                [init, head, b'data: {"e2e_v2":"!!!!"}\n\n'],
                ErrorCode.MALFORMED_EVENT,
            ),
            (
                "unauthenticated relay error before END",
                [init, head, b'data: {"error":{"message":"x"}}\n\n'],
                ErrorCode.RELAY_ERROR,
            ),
        ]
        return [
            {"name": n, "request": idx, "wire": b"".join(ls).decode("ascii"), "code": c.value}
            for n, ls, c in cases
        ]

    def single_negatives(self, idx: int, body: bytes, sealer_name: str) -> list[dict[str, Any]]:
        init_len = 1126
        init = body[:init_len]
        recs: list[bytes] = []
        pos = init_len
        while pos < len(body):
            n = int.from_bytes(body[pos : pos + 4], "big")
            recs.append(body[pos : pos + 4 + n])
            pos += 4 + n
        head, *datas, end = recs
        cases: list[tuple[str, bytes, ErrorCode]] = [
            ("drop END", init + head + b"".join(datas), ErrorCode.STREAM_TRUNCATED),
            (
                "cut inside END",
                init + head + b"".join(datas) + end[:-3],
                ErrorCode.STREAM_TRUNCATED,
            ),
            ("cut inside the init", init[:100], ErrorCode.STREAM_TRUNCATED),
            ("empty body", b"", ErrorCode.STREAM_TRUNCATED),
            ("bytes after END", body + b"\x00\x00\x00\x01\x00", ErrorCode.DATA_AFTER_END),
            (
                "record repeated",
                init + head + head + b"".join(datas) + end,
                ErrorCode.DUPLICATE_RECORD,
            ),
            ("HEAD dropped", init + b"".join(datas) + end, ErrorCode.RECORD_OUT_OF_ORDER),
            (
                "kind byte changed to stream",
                init[:5] + b"\x02" + init[6:] + b"".join(recs),
                ErrorCode.MALFORMED_EVENT,
            ),
            (
                "enc_r bit flipped",
                init[:200] + bytes((init[200] ^ 1,)) + init[201:] + b"".join(recs),
                ErrorCode.RECORD_AUTH_FAILED,
            ),
        ]
        return [{"name": n, "request": idx, "body": _hex(b), "code": c.value} for n, b, c in cases]

    def instance_negatives(self, idx: int) -> list[dict[str, Any]]:
        req = self.requests[idx]
        blob = bytes.fromhex(req["blob"])
        hb = bytes.fromhex(req["h"])
        rest = blob[len(hb) :]
        view = {
            "chute_id": CHUTE,
            "instance_id": INSTANCE,
            "path": req["delivered_path"],
            "stream": req["stream"],
            "now_ms": TS,
        }

        def with_h(new_h: bytes) -> bytes:
            return new_h + rest

        def swap(old: bytes, new: bytes) -> bytes:
            assert hb.count(old) == 1 and len(old) == len(new)
            return hb.replace(old, new)

        ts2 = hb[:46] + (TS + 1).to_bytes(8, "big") + hb[54:]
        rid2 = hb[:54] + bytes((hb[54] ^ 1,)) + hb[55:]
        cases: list[tuple[str, bytes, dict[str, Any], ErrorCode]] = [
            ("H ts_ms +1 ms (within the window)", with_h(ts2), view, ErrorCode.DECRYPT_FAILED),
            ("H request_id bit flipped", with_h(rid2), view, ErrorCode.DECRYPT_FAILED),
            (
                "H model changed",
                with_h(swap(b"dev-echo", b"dev-echO")),
                view,
                ErrorCode.DECRYPT_FAILED,
            ),
            (
                "H relay nonce changed (instance cannot see it)",
                with_h(swap(NONCE.encode(), NONCE[::-1].encode())),
                view,
                ErrorCode.DECRYPT_FAILED,
            ),
            (
                "H response padding changed",
                with_h(hb[:7] + bytes((hb[7] ^ 0x02,)) + hb[8:]),
                view,
                ErrorCode.DECRYPT_FAILED,
            ),
            (
                "H path and delivered path changed together",
                with_h(swap(b"/v1/chat/completions", b"/v1/chat/completionz")),
                {**view, "path": "/v1/chat/completionz????"},
                ErrorCode.DECRYPT_FAILED,
            ),
            (
                "H stream flag and X-E2E-Stream changed together",
                with_h(hb[:7] + bytes((hb[7] ^ 1,)) + hb[8:]),
                {**view, "stream": not req["stream"]},
                ErrorCode.DECRYPT_FAILED,
            ),
            (
                "enc bit flipped",
                with_h(hb)[: len(hb) + 5] + bytes((blob[len(hb) + 5] ^ 1,)) + blob[len(hb) + 6 :],
                view,
                ErrorCode.DECRYPT_FAILED,
            ),
            ("ciphertext truncated by one byte", blob[:-1], view, ErrorCode.DECRYPT_FAILED),
            (
                "wrong instance",
                blob,
                {**view, "instance_id": OTHER_INSTANCE},
                ErrorCode.CONTEXT_MISMATCH,
            ),
            ("wrong chute", blob, {**view, "chute_id": OTHER_INSTANCE}, ErrorCode.CONTEXT_MISMATCH),
            (
                "relay delivered another path",
                blob,
                {**view, "path": "/v1/completions?????????"},
                ErrorCode.CONTEXT_MISMATCH,
            ),
            (
                "relay X-E2E-Stream differs",
                blob,
                {**view, "stream": not req["stream"]},
                ErrorCode.CONTEXT_MISMATCH,
            ),
            (
                "relay nonce forwarded and different",
                blob,
                {**view, "relay_nonce": "other-nonce"},
                ErrorCode.CONTEXT_MISMATCH,
            ),
            (
                "pk_hash of another key",
                with_h(hb[:14] + bytes(32) + hb[46:]),
                view,
                ErrorCode.UNKNOWN_KEY,
            ),
            ("now = ts + W + 1 s", blob, {**view, "now_ms": TS + WINDOW + 1000}, ErrorCode.STALE),
            ("now = ts - W - 1 s", blob, {**view, "now_ms": TS - WINDOW - 1000}, ErrorCode.STALE),
            ("bad magic", b"PQE1" + blob[4:], view, ErrorCode.BAD_HEADER),
            ("shorter than a header", blob[:50], view, ErrorCode.BAD_HEADER),
            ("no ciphertext after enc", blob[: len(hb) + 1120], view, ErrorCode.MALFORMED_BLOB),
        ]
        out = [
            {"name": n, "request": idx, "blob": _hex(b), "view": v, "code": c.value}
            for n, b, v, c in cases
        ]
        out.append(
            {
                "name": "replayed request_id (second open of the same blob)",
                "request": idx,
                "blob": req["blob"],
                "view": {**view, "now_ms": TS + 30_000},
                "open_twice": True,
                "code": ErrorCode.REPLAY.value,
            }
        )
        out.append(
            {
                "name": "now = ts + W exactly is accepted",
                "request": idx,
                "blob": req["blob"],
                "view": {**view, "now_ms": TS + WINDOW},
                "code": None,
            }
        )
        # body model / stream differ from H: sealed by a (buggy or hostile) client
        for name, body, code in [
            (
                "body model differs from H",
                chat_body("hi", stream=False, model="other-model"),
                ErrorCode.CONTEXT_MISMATCH,
            ),
            (
                "body stream differs from H",
                chat_body("hi", stream=True),
                ErrorCode.CONTEXT_MISMATCH,
            ),
            ("body is not JSON", b"not json", ErrorCode.MALFORMED_PAYLOAD),
        ]:
            out.append(
                {
                    "name": name,
                    "request": idx,
                    "blob": _hex(self._inconsistent(hb, body)),
                    "view": view,
                    "code": code.value,
                }
            )
        p_bad = (
            build_plaintext(
                chat_body("hi", stream=False),
                XW.from_seed(seed_for("x")).public_key,
                compress=False,
                pad="none",
            )
            + b"\x00\x00\x01"
        )
        out.append(
            {
                "name": "P padding not all zero",
                "request": idx,
                "blob": _hex(self._seal_p(hb, p_bad)),
                "view": view,
                "code": ErrorCode.BAD_PADDING.value,
            }
        )
        return out

    def _seal_p(self, hb: bytes, p: bytes) -> bytes:
        eseed = DeterministicRandom("inconsistent/" + hashlib.sha256(p).hexdigest())(64)
        enc, ct, _ = seal_base(
            self.instance_key.public_key, header_info(hb), b"", p, xwing=XW, aead=AEAD, eseed=eseed
        )
        return hb + enc + ct

    def _inconsistent(self, hb: bytes, body: bytes) -> bytes:
        p = build_plaintext(
            body, XW.from_seed(seed_for("x")).public_key, compress=False, pad="none"
        )
        return self._seal_p(hb, p)

    # -- padding, negotiation, usage --------------------------------------------------------------

    @staticmethod
    def padding() -> dict[str, Any]:
        lengths = [0, 1, 2, 3, 9, 255, 256, 1000, 1221, 65537, 10**6]
        inner = [5, 6, 128, 129, 200, 256, 257, 300, 1000]
        return {
            "padme": {str(n): padme(n) for n in lengths},
            "pow2": {str(n): pow2(n) for n in lengths},
            "bucket128": {str(n): bucket(n, 128) for n in inner},
            "bucket256": {str(n): bucket(n, 256) for n in inner},
        }

    def negotiation(self) -> list[dict[str, Any]]:
        pk_v1 = base64.b64encode(bytes(1184)).decode()
        v2_pk = base64.b64encode(self.instance_key.public_key).decode()
        now = TS / 1000

        def row(iid: str, v2: dict[str, Any] | None) -> dict[str, Any]:
            r: dict[str, Any] = {"instance_id": iid, "e2e_pubkey": pk_v1, "nonces": ["n1", "n2"]}
            if v2 is not None:
                r["e2e_v2"] = v2
            return r

        good = {
            "v": 2,
            "kem_id": 25722,
            "kdf_id": 1,
            "aead_id": 3,
            "pk": v2_pk,
            "not_after": int(now) + 3600,
        }

        def doc(*rows: dict[str, Any]) -> str:
            return json.dumps({"instances": list(rows), "nonce_expires_in": 55})

        v1_only = doc(row(INSTANCE, None), row(OTHER_INSTANCE, None))
        mixed = doc(row(INSTANCE, good), row(OTHER_INSTANCE, None))
        invalid = doc(
            row(INSTANCE, {**good, "kem_id": 0x41}),
            row(OTHER_INSTANCE, {**good, "pk": base64.b64encode(bytes(1215)).decode()}),
        )
        expired = doc(row(INSTANCE, {**good, "not_after": int(now) - 301}))
        return [
            {
                "name": "strict, no e2e_v2: downgrade refused before any invoke",
                "policy": {"min_version": 2},
                "steps": [
                    {
                        "now": now,
                        "discovery": v1_only,
                        "expect": {"code": "downgrade_refused", "invokes": 0},
                    }
                ],
            },
            {
                "name": "prefer, never saw v2: v1 with a warning",
                "policy": {"min_version": 1},
                "steps": [
                    {
                        "now": now,
                        "discovery": v1_only,
                        "expect": {
                            "version": 1,
                            "instances": [INSTANCE, OTHER_INSTANCE],
                            "downgraded": True,
                        },
                    }
                ],
            },
            {
                "name": "prefer, mixed chute: only the v2 instance; pinned; then v2 vanishes",
                "policy": {"min_version": 1, "pin_ttl_s": 86400},
                "steps": [
                    {
                        "now": now,
                        "discovery": mixed,
                        "expect": {"version": 2, "instances": [INSTANCE], "downgraded": False},
                    },
                    {
                        "now": now + 60,
                        "discovery": v1_only,
                        "expect": {"code": "downgrade_suspected", "invokes": 0},
                    },
                    {
                        "now": now + 86400 + 61,
                        "discovery": v1_only,
                        "expect": {
                            "version": 1,
                            "instances": [INSTANCE, OTHER_INSTANCE],
                            "downgraded": True,
                        },
                    },
                ],
            },
            {
                "name": "invalid offers count as absent (strict refuses)",
                "policy": {"min_version": 2},
                "steps": [
                    {
                        "now": now,
                        "discovery": invalid,
                        "expect": {"code": "downgrade_refused", "invokes": 0},
                    }
                ],
            },
            {
                "name": "expired key (beyond the 300 s skew) counts as absent",
                "policy": {"min_version": 1},
                "steps": [
                    {
                        "now": now,
                        "discovery": expired,
                        "expect": {"version": 1, "instances": [INSTANCE], "downgraded": True},
                    }
                ],
            },
            {
                "name": "v1-only policy ignores e2e_v2",
                "policy": {"min_version": 1, "prefer_v2": False},
                "steps": [
                    {
                        "now": now,
                        "discovery": mixed,
                        "expect": {
                            "version": 1,
                            "instances": [INSTANCE, OTHER_INSTANCE],
                            "downgraded": False,
                        },
                    }
                ],
            },
        ]

    @staticmethod
    def usage() -> list[dict[str, Any]]:
        auth = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
        return [
            {"name": "copy equals END.usage", "copy": auth, "authenticated": auth, "matches": True},
            {
                "name": "copy with extra fields still matches",
                "copy": {**auth, "prompt_tokens_details": None},
                "authenticated": auth,
                "matches": True,
            },
            {
                "name": "completion_tokens differ",
                "copy": {**auth, "completion_tokens": 40},
                "authenticated": auth,
                "matches": False,
                "code": "usage_mismatch",
            },
            {
                "name": "copy without authenticated usage",
                "copy": auth,
                "authenticated": None,
                "matches": False,
                "code": "usage_mismatch",
            },
            {"name": "no copy", "copy": None, "authenticated": auth, "matches": True},
        ]

    # -- document ---------------------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        words = ["Post", "-quantum", " hello", ",", " wörld", " 🔐", "."]
        chunks, _stream_usage = engine_stream(words)
        single_body, single_usage = completion("Hello from v2 ✓")
        r0 = self.request(
            "single-gzip-padme",
            chat_body("Say hello.", stream=False),
            compress=True,
            pad="padme",
            response_padding=0,
        )
        r1 = self.request(
            "stream-identity-nopad",
            chat_body("Say hello, streaming.", stream=True),
            compress=False,
            pad="none",
            response_padding=0,
        )
        r2 = self.request(
            "stream-gzip-pow2-pad256",
            chat_body("Pad the stream to 256.", stream=True),
            compress=True,
            pad="pow2",
            response_padding=256,
        )
        r3 = self.request(
            "single-padme-resp-padme",
            chat_body("Pad the single response.", stream=False),
            compress=False,
            pad="padme",
            response_padding=128,
        )
        r4 = self.request(
            "stream-pad128-completions",
            _json({"model": "dev-echo", "prompt": "Grüße, 世界", "stream": True}),
            compress=True,
            pad="padme",
            response_padding=128,
            path="/v1/completions",
        )
        responses = [
            self.single_response(
                r0, "single-ok", status=200, body=single_body, usage=single_usage, compress=True
            ),
            self.single_response(
                r3,
                "single-padded",
                status=200,
                body=single_body,
                usage=single_usage,
                compress=False,
            ),
            self.single_response(
                r0,
                "single-upstream-400",
                status=400,
                body=_json({"error": {"message": "bad request", "type": "BadRequestError"}}),
                usage=None,
                compress=True,
                error=UpstreamError("BadRequestError", "bad request", 400),
            ),
        ]
        s1, lines1, sealer1 = self.stream_response(r1, "stream-ok", chunks)
        _, other_same, _ = self.stream_response(r1, "stream-ok-again", chunks)
        s2, _, _ = self.stream_response(r2, "stream-pad256", chunks)
        s4, lines4, _ = self.stream_response(
            r4,
            "stream-pad128",
            chunks[:3],
            auth_usage={"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
        )
        s_err, _, _ = self.stream_response(
            r1,
            "stream-upstream-failure",
            chunks[:3],
            error=UpstreamError("EngineDied", "engine crashed", 502),
        )
        responses += [s1, s2, s4, s_err]
        header_pos, header_neg = self.header()
        header_edge, header_more = self.header_clarifications()
        stream_edge, stream_more = self.base64_clarifications(r1, lines1, s1["data"])
        # a v1 runtime given a v2 blob: its key is ML-KEM-768 (64-byte seed)
        v1_seed = hashlib.sha512(b"pqe2ee-v2-vector-v1-runtime").digest()
        return {
            "format": "pqe2ee-vectors/2",
            "protocol": "pqe2ee wire profile v2",
            "spec": "spec/v2.md",
            "generator": "scripts/gen_vectors_v2.py",
            "zlib_version": zlib.ZLIB_VERSION,
            "seed_rule": 'X-Wing seeds: sha256("pqe2ee-v2-vector-" || name)',
            "random_rule": 'random bytes: sha256("pqe2ee-v2-random-" || name || "/" || u64be counter) blocks',
            "labels": {
                "xwing": _hex(XWING_LABEL),
                "info_prefix": _hex(b"pqe2ee/v2 req\x00"),
                "export_context": EXPORT_CONTEXT.decode(),
                "response_key": "pqe2ee/v2 rk",
                "response_nonce": "pqe2ee/v2 rn",
                "evidence": "pqe2ee/v2 evidence",
            },
            "xwing": self.xwing(),
            "xwing_source": "dconnolly/draft-connolly-cfrg-xwing-kem spec/test-vectors.json @ 9b6ce9e",
            "hpke": self.hpke(),
            "hpke_source": "hpkewg/hpke-pq test-vectors.json @ 74dafaa, suite (0x647A, 0x0001, 0x0003)",
            "kem_negative": self.kem_negative(),
            "header": header_pos,
            "header_negative": header_neg + header_more,
            "header_edge": header_edge,
            "request": self.requests,
            "response": responses,
            "stream_negative": self.stream_negatives(r1, lines1, sealer1, other_same, lines4)
            + stream_more,
            "stream_edge": stream_edge,
            "single_negative": self.single_negatives(
                r0, bytes.fromhex(responses[0]["body"]), "single-ok"
            ),
            "instance_negative": self.instance_negatives(r0),
            "v1_runtime": {
                "name": "a v2 blob sent to a v1 runtime",
                "request": r0,
                "v1_seed": _hex(v1_seed),
                "code": ErrorCode.DECRYPT_FAILED.value,
            },
            "padding": self.padding(),
            "negotiation": self.negotiation(),
            "usage": self.usage(),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file")
    parser.add_argument("--output", type=Path, default=OUT)
    args = parser.parse_args(argv)
    try:
        fresh = Generator().document()
    except PQE2EEError as exc:
        print(f"generator failed: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(fresh, indent=1, ensure_ascii=False) + "\n"
    if not args.check:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {args.output} ({len(text.encode())} bytes)")
        return 0
    committed = json.loads(args.output.read_text(encoding="utf-8"))
    if committed.get("zlib_version") != fresh["zlib_version"]:
        print(
            f"{args.output}: zlib differs ({committed.get('zlib_version')} vs "
            f"{fresh['zlib_version']}); not compared byte for byte"
        )
        return 0
    if committed != fresh:
        print(f"{args.output} is stale: regenerate and review the diff", file=sys.stderr)
        return 1
    print(f"{args.output}: identical to a fresh run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
