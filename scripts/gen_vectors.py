#!/usr/bin/env python3
"""Generate, or check, the v1 golden vectors in ``spec/vectors/v1.json`` (see SPEC.md).

    python scripts/gen_vectors.py            # (re)write spec/vectors/v1.json
    python scripts/gen_vectors.py --check    # verify the committed file; write nothing

Every vector is made with the project's own core (``pqe2ee.protocol``) from fixed inputs:

* key seeds: ``sha512(b"pqe2ee-v1-vector-" + seed_label)`` (64 bytes, the ML-KEM-768 seed
  d || z); every vector records its ``seed_label``;
* randomness (KEM encapsulation coins m and AEAD nonces): a deterministic stream of
  ``sha256(b"pqe2ee-v1-random-" + random_label + b"/" + counter as 8 bytes big-endian)`` blocks;
* ML-KEM encapsulation goes through the pycryptodome backend's ``encapsulate_derand`` so the
  output is bit-reproducible. Without it, pyca's randomized encapsulation is used and the file
  says ``"reproducible": false``.

Gzip output depends on the zlib build; the file records ``zlib_version``. ``--check`` regenerates
in memory, checks the shape and the counts of the committed file, opens every vector with the
current core (and checks every negative case raises its listed error code), and, when the run is
reproducible with the same zlib, requires the regenerated document to equal the committed one.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from pqe2ee.backends import get_kem
from pqe2ee.backends.base import KEM, KEMPrivateKey
from pqe2ee.backends.pyca import PycaAEAD, PycaKEM
from pqe2ee.errors import BackendError, ErrorCode, PQE2EEError
from pqe2ee.protocol import (
    INFO_REQUEST,
    INFO_RESPONSE,
    INFO_STREAM,
    RESPONSE_PK_FIELD,
    Done,
    InnerEvent,
    RemoteErrorEvent,
    StreamDecryptor,
    StreamEncoder,
    StreamSealer,
    Usage,
    derive_key,
    open_request,
    open_response,
    seal_request,
    seal_response,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "spec" / "vectors" / "v1.json"

SEED_PREFIX = b"pqe2ee-v1-vector-"
RANDOM_PREFIX = b"pqe2ee-v1-random-"

MIN_COUNTS = {"request": 3, "response": 2, "stream": 3}
REQUIRED_NEGATIVE_CODES = {
    ErrorCode.STREAM_TRUNCATED,
    ErrorCode.DUPLICATE_RECORD,
    ErrorCode.DECRYPT_FAILED,
    ErrorCode.RECORD_BEFORE_INIT,
    ErrorCode.DATA_AFTER_DONE,
    ErrorCode.MALFORMED_EVENT,
}

_PYCA_KEM = PycaKEM()
_AEAD = PycaAEAD()


# ------------------------------------------------------------------------------------------------
# Deterministic inputs


def seed_for(name: str) -> bytes:
    return hashlib.sha512(SEED_PREFIX + name.encode()).digest()


class DeterministicRandom:
    """``random_bytes`` for the core: sha256(prefix || name || "/" || counter) blocks."""

    def __init__(self, name: str) -> None:
        self._prefix = RANDOM_PREFIX + name.encode() + b"/"
        self._counter = 0
        self._buf = b""

    def __call__(self, n: int) -> bytes:
        while len(self._buf) < n:
            block = self._prefix + self._counter.to_bytes(8, "big")
            self._buf += hashlib.sha256(block).digest()
            self._counter += 1
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


class RecordingKEM(KEM):
    """A KEM for the core that encapsulates with coins from ``random_bytes`` (when the derand
    backend exists) and remembers every (coins, ciphertext, shared secret) it produced."""

    name = "vector-kem"

    def __init__(self, random_bytes: Callable[[int], bytes], derand: KEM | None) -> None:
        self._random = random_bytes
        self._derand = derand
        self.log: list[tuple[bytes | None, bytes, bytes]] = []

    def generate(self) -> KEMPrivateKey:
        raise NotImplementedError("vector keys come from seeds")

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        if self._derand is not None:
            coins: bytes | None = self._random(32)
            ct, ss = self._derand.encapsulate_derand(public_key, coins)
        else:
            coins = None
            ct, ss = _PYCA_KEM.encapsulate(public_key)
        self.log.append((coins, ct, ss))
        return ct, ss


def derand_kem() -> KEM | None:
    """The pycryptodome backend when it can encapsulate with fixed coins, else None."""
    try:
        kem = get_kem("pycryptodome")
        probe = _PYCA_KEM.from_seed(seed_for("probe")).public_key
        kem.encapsulate_derand(probe, bytes(32))
    except BackendError:
        return None
    return kem


# ------------------------------------------------------------------------------------------------
# Sample payloads (engine shapes follow vLLM's OpenAI-compatible server)


def _json(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


def _chunk(
    delta: dict[str, Any], finish: str | None, usage: dict[str, int] | None, cid: str
) -> bytes:
    obj: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "dev-echo",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + _json(obj) + b"\n\n"


def engine_stream(words: list[str], *, cid: str, continuous_usage: bool) -> bytes:
    """A vLLM-shaped SSE body: role chunk, one chunk per word, finish chunk, usage, [DONE]."""
    prompt = 5
    parts = []

    def usage(n: int) -> dict[str, int] | None:
        if not continuous_usage:
            return None
        return {"prompt_tokens": prompt, "total_tokens": prompt + n, "completion_tokens": n}

    parts.append(_chunk({"role": "assistant", "content": ""}, None, usage(0), cid))
    for i, word in enumerate(words, 1):
        parts.append(_chunk({"content": word}, None, usage(i), cid))
    parts.append(_chunk({}, "stop", usage(len(words)), cid))
    final = {"prompt_tokens": prompt, "total_tokens": prompt + len(words)}
    final["completion_tokens"] = len(words)
    tail = {"id": cid, "object": "chat.completion.chunk", "created": 1700000000}
    parts.append(b"data: " + _json({**tail, "model": "dev-echo", "choices": [], "usage": final}))
    parts.append(b"\n\ndata: [DONE]\n\n")
    return b"".join(parts)


def long_context(target: int) -> str:
    """Deterministic prose of about ``target`` UTF-8 bytes (not trivially compressible)."""
    vocab = (
        "the of and to in is that for it as with was on be by this are from or at which an "
        "encrypted lattice module kernel nonce record stream relay instance engine token prompt "
        "Gittersignatur Schlüssel clé chiffrée ключ шифр 鍵 暗号 密钥 🔐 ∀x∈ℤ: x²≥0"
    ).split()
    rng = DeterministicRandom("long-context")
    words: list[str] = []
    size = 0
    while size < target:
        word = vocab[rng(1)[0] % len(vocab)]
        words.append(word)
        size += len(word.encode()) + 1
    return " ".join(words)


# ------------------------------------------------------------------------------------------------
# Generation


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _respace(event: bytes) -> bytes:
    """Rewrite ``data: {compact}\\n\\n`` with ``", "``/``": "`` separators (still valid)."""
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return b"data: " + json.dumps(json.loads(event[6:-2])).encode() + b"\n\n"


def _escape_solidus(event: bytes) -> bytes:
    """Escape every ``/`` in the outer JSON as ``\\/`` (still the same JSON value)."""
    return event.replace(b"/", b"\\/")


class Generator:
    def __init__(self) -> None:
        self.derand = derand_kem()

    def _kem(self, rng: DeterministicRandom) -> RecordingKEM:
        return RecordingKEM(rng, self.derand)

    # -- requests ---------------------------------------------------------------------------

    def request(self, name: str, description: str, body: bytes | dict[str, Any]) -> dict[str, Any]:
        instance = _PYCA_KEM.from_seed(seed_for(name + "/instance"))
        client_seed = seed_for(name + "/client")
        response_key = _PYCA_KEM.from_seed(client_seed)
        rng = DeterministicRandom(name)
        kem = self._kem(rng)
        sealed = seal_request(
            body,
            instance.public_key,
            response_key=response_key,
            kem=kem,
            aead=_AEAD,
            random_bytes=rng,
        )
        ((coins, ct, ss),) = kem.log
        blob = sealed.blob
        plaintext = _plaintext(blob, derive_key(ss, ct, INFO_REQUEST))
        return {
            "description": description,
            "instance_seed": seed_for(name + "/instance").hex(),
            "seed_label": name + "/instance",
            "random_label": name,
            "blob": blob.hex(),
            "plaintext_json": json.loads(plaintext),
            "plaintext": plaintext.decode(),
            "instance_public_key": instance.public_key.hex(),
            "response_seed": client_seed.hex(),
            "response_seed_label": name + "/client",
            "response_public_key": response_key.public_key.hex(),
            "stream": sealed.stream,
            "x_e2e_stream": "true" if sealed.stream else "false",
            "encaps_coins": coins.hex() if coins is not None else None,
            "kem_ciphertext": ct.hex(),
            "shared_secret": ss.hex(),
            "key": derive_key(ss, ct, INFO_REQUEST).hex(),
            "nonce": blob[1088:1100].hex(),
        }

    # -- responses --------------------------------------------------------------------------

    def response(
        self, name: str, description: str, body: bytes, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        client_seed = seed_for(name + "/client")
        client = _PYCA_KEM.from_seed(client_seed)
        rng = DeterministicRandom(name)
        kem = self._kem(rng)
        blob = seal_response(body, client.public_key, kem=kem, aead=_AEAD, random_bytes=rng)
        ((coins, ct, ss),) = kem.log
        return {
            "description": description,
            "client_seed": client_seed.hex(),
            "seed_label": name + "/client",
            "random_label": name,
            "blob": blob.hex(),
            "plaintext_json": json.loads(body),
            "plaintext": body.decode(),
            **(extra or {}),
            "client_public_key": client.public_key.hex(),
            "encaps_coins": coins.hex() if coins is not None else None,
            "kem_ciphertext": ct.hex(),
            "shared_secret": ss.hex(),
            "key": derive_key(ss, ct, INFO_RESPONSE).hex(),
            "nonce": blob[1088:1100].hex(),
        }

    # -- streams ----------------------------------------------------------------------------

    def _sealer(self, name: str, seed: bytes) -> tuple[StreamSealer, RecordingKEM]:
        client = _PYCA_KEM.from_seed(seed)
        rng = DeterministicRandom(name)
        kem = self._kem(rng)
        return StreamSealer(client.public_key, kem=kem, aead=_AEAD, random_bytes=rng), kem

    def stream(
        self,
        name: str,
        description: str,
        build: Callable[[StreamSealer], tuple[bytes, bytes]],
        *,
        seed_name: str | None = None,
    ) -> dict[str, Any]:
        seed_label = (seed_name or name) + "/client"
        client_seed = seed_for(seed_label)
        sealer, kem = self._sealer(name, client_seed)
        sse, plaintext = build(sealer)
        ((coins, ct, ss),) = kem.log
        return {
            "description": description,
            "client_seed": client_seed.hex(),
            "seed_label": seed_label,
            "random_label": name,
            "sse": sse.decode(),
            "plaintext": plaintext.decode(),
            "encaps_coins": coins.hex() if coins is not None else None,
            "kem_ciphertext": ct.hex(),
            "shared_secret": ss.hex(),
            "key": derive_key(ss, ct, INFO_STREAM).hex(),
        }

    # -- the document -----------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        small = {"model": "dev-echo", "messages": [{"role": "user", "content": "Hello"}]}
        unicode_body = (
            '{"model": "dev-echo", "stream": true, "messages": [{"role": "system", '
            '"content": "Réponds en français 🇫🇷"}, {"role": "user", "content": '
            '"Grüß dich! 你好，世界 — مرحبا — 🙂👩‍💻 — e\u0301 (combining) — \\u00e9 (escaped)"}]}'
        ).encode()
        big = {
            "model": "dev-echo",
            "max_tokens": 64,
            "messages": [
                {"role": "system", "content": "Summarise the context."},
                {"role": "user", "content": long_context(100 * 1024)},
            ],
        }
        reference_style = json.dumps(
            {
                "model": "dev-echo",
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "Ünïcödé, ASCII-escaped"}],
            }
        ).encode()
        requests = [
            self.request(
                "request-small",
                "small chat request given as a mapping (compact JSON); stream absent",
                small,
            ),
            self.request(
                "request-unicode",
                "unicode chat request given as the caller's own JSON bytes (raw UTF-8, spaced, "
                "one \\u escape kept); stream true",
                unicode_body,
            ),
            self.request(
                "request-100k",
                "about 100 KiB of mixed-script context in one message",
                big,
            ),
            self.request(
                "request-reference-style",
                "body as the reference client's json.dumps writes it (ASCII escapes, spaces); "
                "e2e_response_pk appended to the caller's bytes",
                reference_style,
            ),
        ]

        completion = _json(
            {
                "id": "chatcmpl-v1vector",
                "object": "chat.completion",
                "created": 1700000000,
                "model": "dev-echo",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Echo: Grüß dich! 你好 🙂"},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "total_tokens": 8, "completion_tokens": 5},
            }
        )
        error_body = _json(
            {
                "object": "error",
                "message": "The model `no-such-model` does not exist.",
                "type": "NotFoundError",
                "param": None,
                "code": 404,
            }
        )
        responses = [
            self.response(
                "response-completion",
                "non-stream chat completion (compact UTF-8 JSON, as the engine sent it)",
                completion,
            ),
            self.response(
                "response-upstream-error",
                "pqe2ee extension: sealed upstream error - the engine's 404 error body, sent "
                "with HTTP status 404 and Content-Type application/octet-stream",
                error_body,
                {"status": 404, "extension": "sealed-upstream-error"},
            ),
        ]

        streams = [
            self.stream(
                "stream-lines",
                "engine stream through StreamEncoder: one record per engine line, blank lines "
                "are records of their own, a plaintext usage event before every line that "
                "carries usage (continuous usage stats); compact outer JSON",
                _stream_lines,
            ),
            self.stream(
                "stream-split",
                "custom generator: records split lines at arbitrary bytes, one inside a 4-byte "
                "UTF-8 character; spaced outer JSON; interleaved plaintext usage events",
                _stream_split,
            ),
            self.stream(
                "stream-coalesced",
                "custom generator: several lines and events per record, an inner SSE comment; "
                "compact and spaced outer JSON mixed; interleaved plaintext usage events",
                _stream_coalesced,
            ),
            self.stream(
                "stream-framing",
                "outer framing variants: CRLF line ends, outer SSE comments, 'data:' without "
                "a space, JSON-escaped solidus in a record, an ignored outer 'data: [DONE]'; "
                "the inner stream ends right after 'data: [DONE]\\n' (no blank line): complete",
                _stream_framing,
            ),
        ]
        for vec in streams:
            vec["events"], vec["usage"] = _inner_summary(vec)

        negatives = self.negatives()
        return {
            "format": "pqe2ee golden vectors",
            "protocol": "chutes-e2ee-v1",
            "spec": "SPEC.md",
            "generator": "scripts/gen_vectors.py",
            "reproducible": self.derand is not None,
            "kem_encapsulation": (
                "pycryptodome encapsulate_derand (FIPS 203 Encaps_internal with encaps_coins)"
                if self.derand is not None
                else "pyca randomized encapsulation (encaps_coins is null)"
            ),
            "zlib_version": zlib.ZLIB_VERSION,
            "seed_rule": "seed = SHA-512(ASCII 'pqe2ee-v1-vector-' || seed_label)",
            "random_rule": (
                "the blocks SHA-256(ASCII 'pqe2ee-v1-random-' || random_label || '/' || counter "
                "as 8 bytes big-endian), counter = 0, 1, ..., concatenated and consumed in order: "
                "32 bytes of encaps coins per KEM encapsulation, 12 bytes per AEAD nonce"
            ),
            "labels": {
                "request": INFO_REQUEST.decode(),
                "response": INFO_RESPONSE.decode(),
                "stream": INFO_STREAM.decode(),
            },
            "request": requests,
            "response": responses,
            "stream": streams,
            "negative": negatives,
        }

    def negatives(self) -> list[dict[str, Any]]:
        """Broken streams, each with the error code a v1 client must raise."""
        seed = seed_for("stream-negative/client")
        cases: list[dict[str, Any]] = []
        for name, description, code, mutate in _NEGATIVE_CASES:
            sealer, _ = self._sealer("negative-" + name, seed)
            events = [
                sealer.init_event(),
                sealer.usage_event({"prompt_tokens": 2, "total_tokens": 3, "completion_tokens": 1}),
                *(sealer.seal_record(line) for line in _NEGATIVE_LINES),
            ]
            cases.append(
                {
                    "description": description,
                    "client_seed": seed.hex(),
                    "seed_label": "stream-negative/client",
                    "random_label": "negative-" + name,
                    "sse": b"".join(mutate(events, sealer)).decode(),
                    "expected_error": code.value,
                }
            )
        # e2e_init and records made for another key: implicit rejection gives a wrong stream
        # key, so the first record fails its tag.
        other = _PYCA_KEM.from_seed(seed_for("stream-negative-other/client"))
        rng = DeterministicRandom("negative-wrong-key")
        foreign = StreamSealer(other.public_key, kem=self._kem(rng), aead=_AEAD, random_bytes=rng)
        sse = [foreign.init_event(), *(foreign.seal_record(x) for x in _NEGATIVE_LINES)]
        cases.append(
            {
                "description": "e2e_init and records sealed to another client's key",
                "client_seed": seed.hex(),
                "seed_label": "stream-negative/client",
                "random_label": "negative-wrong-key",
                "sse": b"".join(sse).decode(),
                "expected_error": ErrorCode.DECRYPT_FAILED.value,
            }
        )
        return cases


_NEGATIVE_LINES = (b"data: a\n", b"\n", b"data: b\n", b"\n", b"data: [DONE]\n", b"\n")


def _flip(event: bytes) -> bytes:
    raw = base64.b64decode(json.loads(event[6:])["e2e"])
    raw = raw[:20] + bytes([raw[20] ^ 0x01]) + raw[21:]
    return _record_b64(raw)


def _record_b64(raw: bytes) -> bytes:
    return b'data: {"e2e":"' + base64.b64encode(raw) + b'"}\n\n'


Mutation = Callable[[list[bytes], StreamSealer], list[bytes]]

# The unmutated events are: [init, usage, rec "data: a\n", rec "\n", rec "data: b\n", rec "\n",
# rec "data: [DONE]\n", rec "\n"].
_NEGATIVE_CASES: tuple[tuple[str, str, ErrorCode, Mutation], ...] = (
    (
        "truncated",
        "EOF before the inner [DONE]",
        ErrorCode.STREAM_TRUNCATED,
        lambda ev, s: ev[:6],
    ),
    (
        "truncated-mid-line",
        "EOF inside the [DONE] line: the last record holds 'data: [DO' only",
        ErrorCode.STREAM_TRUNCATED,
        lambda ev, s: [*ev[:6], s.seal_record(b"data: [DO")],
    ),
    (
        "no-init",
        "only a plaintext usage event, then EOF: nothing authenticated ever arrived",
        ErrorCode.STREAM_TRUNCATED,
        lambda ev, s: ev[1:2],
    ),
    (
        "duplicate-record",
        "the first blank-line record is sent twice",
        ErrorCode.DUPLICATE_RECORD,
        lambda ev, s: [*ev[:4], ev[3], *ev[4:]],
    ),
    (
        "tampered-record",
        "one bit of a record's ciphertext flipped",
        ErrorCode.DECRYPT_FAILED,
        lambda ev, s: [*ev[:4], _flip(ev[4]), *ev[5:]],
    ),
    (
        "record-before-init",
        "a record arrives before e2e_init",
        ErrorCode.RECORD_BEFORE_INIT,
        lambda ev, s: [ev[2], ev[0], *ev[3:]],
    ),
    (
        "duplicate-init",
        "a second e2e_init mid-stream",
        ErrorCode.DUPLICATE_INIT,
        lambda ev, s: [*ev[:4], ev[0], *ev[4:]],
    ),
    (
        "data-after-done",
        "a non-blank record after the inner [DONE]",
        ErrorCode.DATA_AFTER_DONE,
        lambda ev, s: [*ev, s.seal_record(b"data: late\n")],
    ),
    (
        "data-after-done-same-record",
        "the record that carries the inner [DONE] goes on with a partial event",
        ErrorCode.DATA_AFTER_DONE,
        lambda ev, s: [*ev[:6], s.seal_record(b"data: [DONE]\n\ndata: late\n")],
    ),
    (
        "outer-unknown-field",
        "an outer line that is neither data:, a comment nor event:/id:/retry: (a corrupted "
        "'data:' prefix must not drop a record silently)",
        ErrorCode.MALFORMED_EVENT,
        lambda ev, s: [*ev[:4], b"dat" + ev[4][4:], *ev[5:]],
    ),
    (
        "invalid-base64",
        "a record that is not valid base64",
        ErrorCode.MALFORMED_EVENT,
        lambda ev, s: [*ev[:3], b'data: {"e2e":"!!not base64!!"}\n\n', *ev[3:]],
    ),
    (
        "short-record",
        "a record shorter than nonce and tag (27 bytes)",
        ErrorCode.MALFORMED_EVENT,
        lambda ev, s: [*ev[:3], _record_b64(bytes(27)), *ev[3:]],
    ),
    (
        "outer-not-json",
        "an outer data line that is not JSON",
        ErrorCode.MALFORMED_EVENT,
        lambda ev, s: [*ev[:3], b'data: {"e2e": \n\n', *ev[3:]],
    ),
    (
        "outer-unknown-member",
        "an outer event whose only member is unknown",
        ErrorCode.MALFORMED_EVENT,
        lambda ev, s: [*ev[:3], b'data: {"e2e_extra":"x"}\n\n', *ev[3:]],
    ),
    (
        "init-wrong-length",
        "e2e_init holding 1087 bytes",
        ErrorCode.MALFORMED_EVENT,
        lambda ev, s: [_init_b64(bytes(1087)), *ev[1:]],
    ),
    (
        "invalid-utf8",
        "a record whose plaintext line is not UTF-8",
        ErrorCode.INVALID_UTF8,
        lambda ev, s: [*ev[:3], s.seal_record(b"data: \xff\xfe\n"), *ev[3:]],
    ),
    (
        "e2e-error",
        "the far side reports e2e_error after one record: unauthenticated, the stream is "
        "incomplete, and the client surfaces a remote error",
        ErrorCode.REMOTE_ERROR,
        lambda ev, s: [*ev[:4], s.error_event({"message": "engine failed", "type": "upstream"})],
    ),
)


def _init_b64(raw: bytes) -> bytes:
    return b'data: {"e2e_init":"' + base64.b64encode(raw) + b'"}\n\n'


def _plaintext(blob: bytes, key: bytes) -> bytes:
    gz = _AEAD.new(key).decrypt(blob[1088:1100], blob[1100:])
    return zlib.decompress(gz, wbits=31)


# -- stream builders: each returns (outer SSE bytes, concatenated record plaintext) --------------


def _stream_lines(sealer: StreamSealer) -> tuple[bytes, bytes]:
    engine = engine_stream(
        ["Echo:", " Grüß", " dich", " 👋"], cid="chatcmpl-lines", continuous_usage=True
    )
    enc = StreamEncoder(sealer)
    out = [enc.start()]
    # The engine's bytes arrive in uneven chunks; the encoder re-splits them into lines.
    for i in range(0, len(engine), 97):
        out.append(enc.feed(engine[i : i + 97]))
    out.append(enc.finish())
    return b"".join(out), engine


def _stream_split(sealer: StreamSealer) -> tuple[bytes, bytes]:
    engine = engine_stream(["Hi", " 🙂", " there"], cid="chatcmpl-split", continuous_usage=False)
    emoji = engine.index("🙂".encode())
    cuts = sorted({7, 50, emoji + 2, emoji + 30, len(engine) - 9, len(engine) - 3})
    chunks = [engine[a:b] for a, b in zip([0, *cuts], [*cuts, len(engine)], strict=True)]
    out = [_respace(sealer.init_event())]
    for i, chunk in enumerate(chunks):
        if i % 2 == 0:
            usage = {"prompt_tokens": 4, "total_tokens": 4 + i, "completion_tokens": i}
            out.append(_respace(sealer.usage_event(usage)))
        out.append(_respace(sealer.seal_record(chunk)))
    return b"".join(out), engine


def _stream_coalesced(sealer: StreamSealer) -> tuple[bytes, bytes]:
    engine = engine_stream(
        ["One", " two", " three", " four"], cid="chatcmpl-coal", continuous_usage=False
    )
    events = [e + b"\n\n" for e in engine.split(b"\n\n") if e]
    records = [
        events[0] + b": keep-alive comment\n\n",
        events[1] + events[2],
        events[3],
        b"".join(events[4:]),
    ]
    out = [sealer.init_event()]
    for i, record in enumerate(records):
        usage = {"prompt_tokens": 4, "total_tokens": 4 + i, "completion_tokens": i}
        ev = sealer.usage_event(usage)
        out.append(_respace(ev) if i % 2 else ev)
        sealed = sealer.seal_record(record)
        out.append(sealed if i % 2 else _respace(sealed))
    return b"".join(out), b"".join(records)


def _stream_framing(sealer: StreamSealer) -> tuple[bytes, bytes]:
    records = [b'data: {"text":"x/y"}\n', b"\n", b"data: [DONE]\n"]
    out = [b": outer comment\r\n", sealer.init_event().replace(b"\n", b"\r\n")]
    sealed = [sealer.seal_record(r) for r in records]
    # Make sure the escaped variant really contains an escape: pick a record with a "/".
    with_slash = next(i for i, ev in enumerate(sealed) if b"/" in ev[6:])
    for i, ev in enumerate(sealed):
        if i == with_slash:
            ev = _escape_solidus(_respace(ev))
        elif i == 1:
            ev = b"data:" + ev[6:]  # no space after the colon
        out.append(ev.replace(b"\n", b"\r\n") if i != with_slash else ev)
        out.append(b": ping\n\n")
    out.append(b"data: [DONE]\n\n")  # an outer terminator (not v1; ignored, not authenticated)
    return b"".join(out), b"".join(records)


def _inner_summary(vec: dict[str, Any]) -> tuple[list[str], list[Any]]:
    """The inner SSE data values (``[DONE]`` included) and the plaintext usage objects, as the
    core sees them - handy for ports that check their SSE parsing too."""
    key = _PYCA_KEM.from_seed(bytes.fromhex(vec["client_seed"]))
    dec = StreamDecryptor(key, aead=_AEAD)
    dec.receive_data(vec["sse"].encode())
    dec.receive_eof()
    data: list[str] = []
    usage: list[Any] = []
    for ev in dec.events():
        if isinstance(ev, InnerEvent):
            data.append(ev.data)
        elif isinstance(ev, Done):
            data.append("[DONE]")
        elif isinstance(ev, Usage):
            usage.append(ev.usage)
    return data, usage


# ------------------------------------------------------------------------------------------------
# Checking


class CheckFailed(Exception):
    pass


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def _hex(value: Any, what: str, length: int | None = None, minimum: int = 0) -> bytes:
    _need(isinstance(value, str), f"{what} must be a hex string")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise CheckFailed(f"{what} is not hex") from None
    _need(length is None or len(raw) == length, f"{what} must be {length} bytes")
    _need(len(raw) >= minimum, f"{what} must be at least {minimum} bytes")
    return raw


def check_shape(doc: dict[str, Any]) -> None:
    """The required fields, types and minimum counts."""
    for section, fields in (
        ("request", ("description", "instance_seed", "blob", "plaintext_json")),
        ("response", ("description", "client_seed", "blob", "plaintext_json")),
        ("stream", ("description", "client_seed", "sse", "plaintext")),
        ("negative", ("description", "client_seed", "sse", "expected_error")),
    ):
        vectors = doc.get(section)
        _need(isinstance(vectors, list), f"{section} must be a list")
        _need(len(vectors) >= MIN_COUNTS.get(section, 1), f"too few {section} vectors")
        for i, vec in enumerate(vectors):
            where = f"{section}[{i}]"
            _need(isinstance(vec, dict), f"{where} must be an object")
            for field in fields:
                _need(field in vec, f"{where} lacks {field!r}")
            _need(isinstance(vec["description"], str) and vec["description"], f"{where} desc")
            seed_field = "instance_seed" if section == "request" else "client_seed"
            _hex(vec[seed_field], f"{where}.{seed_field}", 64)
            if "blob" in fields:
                _hex(vec["blob"], f"{where}.blob", minimum=1116)
                _need(isinstance(vec["plaintext_json"], dict), f"{where}.plaintext_json")
            else:
                _need(isinstance(vec["sse"], str), f"{where}.sse must be a string")
    for i, vec in enumerate(doc["request"]):
        _need(RESPONSE_PK_FIELD in vec["plaintext_json"], f"request[{i}] lacks {RESPONSE_PK_FIELD}")
    sizes = [len(json.dumps(v["plaintext_json"]).encode()) for v in doc["request"]]
    _need(max(sizes) >= 100 * 1024, "no request of about 100 KiB")
    _need(
        any(
            not json.dumps(v["plaintext_json"], ensure_ascii=False).isascii()
            for v in doc["request"]
        ),
        "no unicode request",
    )
    sse = [v["sse"] for v in doc["stream"]]
    _need(any('"usage"' in s for s in sse), "no stream with plaintext usage events")
    _need(any('{"e2e": "' in s for s in sse), "no stream with spaced outer JSON")
    codes = {v["expected_error"] for v in doc["negative"]}
    _need(codes <= {c.value for c in ErrorCode}, f"unknown error codes: {codes}")
    missing = {c.value for c in REQUIRED_NEGATIVE_CODES} - codes
    _need(not missing, f"negative cases missing for {sorted(missing)}")


def open_with_core(doc: dict[str, Any]) -> None:
    """Open every vector with the current core; negative cases must raise their listed code."""
    for i, vec in enumerate(doc["request"]):
        key = _PYCA_KEM.from_seed(bytes.fromhex(vec["instance_seed"]))
        opened = open_request(bytes.fromhex(vec["blob"]), key, aead=_AEAD)
        got = {**opened.body, RESPONSE_PK_FIELD: _b64(opened.response_public_key)}
        _need(got == vec["plaintext_json"], f"request[{i}] opens to different JSON")
    for i, vec in enumerate(doc["response"]):
        key = _PYCA_KEM.from_seed(bytes.fromhex(vec["client_seed"]))
        body = open_response(bytes.fromhex(vec["blob"]), key, aead=_AEAD)
        _need(json.loads(body) == vec["plaintext_json"], f"response[{i}] opens to different JSON")
        if "plaintext" in vec:
            _need(body == vec["plaintext"].encode(), f"response[{i}] bytes differ")
    for i, vec in enumerate(doc["stream"]):
        data, usage = _inner_summary(vec)
        key = _PYCA_KEM.from_seed(bytes.fromhex(vec["client_seed"]))
        dec = StreamDecryptor(key, aead=_AEAD)
        dec.receive_data(vec["sse"].encode())
        dec.receive_eof()
        raw = b"".join(e.raw for e in dec.events() if isinstance(e, (InnerEvent, Done)))
        _need(dec.complete, f"stream[{i}] is not complete")
        plaintext = vec["plaintext"].encode()
        # A stream cut right after "data: [DONE]\n" reports the [DONE] event with its blank line.
        expected = plaintext if plaintext.endswith(b"\n\n") else plaintext + b"\n"
        _need(raw == expected, f"stream[{i}] decrypts to different bytes")
        if "events" in vec:
            _need(data == vec["events"] and usage == vec["usage"], f"stream[{i}] events differ")
    for i, vec in enumerate(doc["negative"]):
        key = _PYCA_KEM.from_seed(bytes.fromhex(vec["client_seed"]))
        dec = StreamDecryptor(key, aead=_AEAD)
        code: str | None = None
        try:
            dec.receive_data(vec["sse"].encode())
            dec.receive_eof()
            if any(isinstance(e, RemoteErrorEvent) for e in dec.events()):
                code = ErrorCode.REMOTE_ERROR.value
        except PQE2EEError as exc:
            code = exc.code.value
        _need(code == vec["expected_error"], f"negative[{i}] gave {code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="verify the committed file")
    parser.add_argument("--output", type=Path, default=OUT)
    args = parser.parse_args(argv)

    fresh = Generator().document()
    try:
        check_shape(fresh)
        open_with_core(fresh)
    except CheckFailed as exc:
        print(f"generator produced a bad document: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(fresh, indent=1, ensure_ascii=False) + "\n"

    if not args.check:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
        print(
            f"wrote {args.output} ({len(text.encode())} bytes, reproducible={fresh['reproducible']})"
        )
        return 0

    try:
        committed = json.loads(args.output.read_text(encoding="utf-8"))
        check_shape(committed)
        open_with_core(committed)
    except (OSError, ValueError, CheckFailed, PQE2EEError) as exc:
        print(f"{args.output}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    comparable = (
        fresh["reproducible"]
        and committed.get("reproducible")
        and committed.get("zlib_version") == fresh["zlib_version"]
    )
    if comparable and committed != fresh:
        print(
            f"{args.output} is stale: regenerating gives different vectors "
            "(run scripts/gen_vectors.py and review the diff)",
            file=sys.stderr,
        )
        return 1
    counts = ", ".join(
        f"{len(committed[s])} {s}" for s in ("request", "response", "stream", "negative")
    )
    state = "identical to a fresh run" if comparable else "not compared byte for byte"
    print(f"{args.output}: ok ({counts}; {state})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
