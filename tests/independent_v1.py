"""An independent v1 opener, written from SPEC.md alone.

It must not import pqe2ee (a test checks this): it uses pyca/cryptography for ML-KEM-768 (from
the 64-byte seed), HKDF-SHA256 and ChaCha20-Poly1305, and the standard library for gzip, JSON
and base64. Section numbers below refer to SPEC.md. Whole inputs are processed at once (this is
a test oracle, not a streaming client), but in the order the specification prescribes.

* :func:`open_request` / :func:`open_response` open blobs (sections 5-7);
* :func:`open_stream` decrypts an outer SSE stream (sections 8-9) and returns the concatenated
  record plaintexts, the inner event data and the plaintext usage objects;
* every rejection is a :class:`Rejected` carrying the SPEC.md section 13 code.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["Rejected", "StreamResult", "open_request", "open_response", "open_stream"]

# section 3 / 5
CT_LEN = 1088
EK_LEN = 1184
NONCE_LEN = 12
TAG_LEN = 16
BLOB_MIN = CT_LEN + NONCE_LEN + TAG_LEN
LABEL_REQUEST = b"e2e-req-v1"
LABEL_RESPONSE = b"e2e-resp-v1"
LABEL_STREAM = b"e2e-stream-v1"

# section 1
WHITESPACE = b"\t\n\x0b\x0c\r "
_BASE64 = re.compile(rb"\A[A-Za-z0-9+/]*={0,2}\Z")
_IGNORED_FIELDS = (b"event", b"id", b"retry")


class Rejected(Exception):
    """The input breaks SPEC.md; ``code`` is the section 13 code."""

    def __init__(self, code: str, why: str) -> None:
        super().__init__(f"{code}: {why}")
        self.code = code


def _b64(text: str | bytes, code: str) -> bytes:
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    if len(raw) % 4 or not _BASE64.match(raw):
        raise Rejected(code, "not strict base64")
    return base64.b64decode(raw, validate=True)


def _derive(seed: bytes, kem_ct: bytes, label: bytes) -> bytes:
    """Section 5.1: decapsulate with the seed's key, HKDF with salt = c[0:16]."""
    ss = MLKEM768PrivateKey.from_seed_bytes(seed).decapsulate(kem_ct)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=kem_ct[:16], info=label)
    return hkdf.derive(ss)


def _open_blob(blob: bytes, seed: bytes, label: bytes) -> bytes:
    """Section 5.2 opening and 5.3 decompression."""
    if len(blob) < BLOB_MIN:
        raise Rejected("malformed_blob", f"{len(blob)} bytes < {BLOB_MIN}")
    kem_ct, nonce, sealed = (
        blob[:CT_LEN],
        blob[CT_LEN : CT_LEN + NONCE_LEN],
        blob[CT_LEN + NONCE_LEN :],
    )
    try:
        gz = ChaCha20Poly1305(_derive(seed, kem_ct, label)).decrypt(nonce, sealed, b"")
    except InvalidTag:
        raise Rejected("decrypt_failed", "tag") from None
    try:
        return gzip.decompress(gz)
    except (OSError, EOFError) as exc:
        raise Rejected("malformed_payload", f"gzip: {exc}") from None


def open_request(blob: bytes, instance_seed: bytes) -> dict[str, Any]:
    """Section 6.4: the request JSON object, ``e2e_response_pk`` included (and checked)."""
    plaintext = _open_blob(blob, instance_seed, LABEL_REQUEST)
    try:
        obj = json.loads(plaintext.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Rejected("malformed_payload", "not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("e2e_response_pk"), str):
        raise Rejected("malformed_payload", "no e2e_response_pk")
    if len(_b64(obj["e2e_response_pk"], "malformed_payload")) != EK_LEN:
        raise Rejected("malformed_payload", "e2e_response_pk is not 1184 bytes")
    return obj


def open_response(blob: bytes, client_seed: bytes) -> bytes:
    """Section 7: the engine's body bytes."""
    return _open_blob(blob, client_seed, LABEL_RESPONSE)


@dataclass
class StreamResult:
    plaintext: bytes = b""  # every record's plaintext, concatenated
    records: list[bytes] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # inner event data, "[DONE]" included
    usage: list[Any] = field(default_factory=list)
    remote_error: Any = None


@dataclass
class _Stream:
    seed: bytes
    out: StreamResult = field(default_factory=StreamResult)
    cipher: ChaCha20Poly1305 | None = None
    failed_remote: bool = False
    done: bool = False
    nonces: set[bytes] = field(default_factory=set)
    tail: bytes = b""  # inner bytes after the last LF
    data: list[str] | None = None  # data lines of the inner event being built

    # -- section 9.1: outer lines -------------------------------------------------------------

    def line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line or line.startswith(b":"):
            return
        if not line.startswith(b"data:"):
            if line.split(b":", 1)[0] in _IGNORED_FIELDS:
                return
            raise Rejected("malformed_event", "unknown outer line")
        value = line[5:].strip(WHITESPACE)
        if value == b"[DONE]":
            return
        try:
            obj = json.loads(value.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise Rejected("malformed_event", "outer JSON") from None
        if not isinstance(obj, dict) or len(obj) != 1:
            raise Rejected("malformed_event", "outer event must have exactly one member")
        ((name, member),) = obj.items()
        if name == "e2e_init":
            self.init(member)
        elif name == "e2e":
            self.record(member)
        elif name == "usage":
            self.out.usage.append(member)
        elif name in ("e2e_error", "error"):
            self.failed_remote = True
            self.out.remote_error = member
        else:
            raise Rejected("malformed_event", f"unknown member {name!r}")

    # -- section 9.2 / 9.3 --------------------------------------------------------------------

    def init(self, member: Any) -> None:
        if self.cipher is not None or self.failed_remote:
            raise Rejected("duplicate_init", "second e2e_init")
        if not isinstance(member, str):
            raise Rejected("malformed_event", "e2e_init is not a string")
        kem_ct = _b64(member, "malformed_event")
        if len(kem_ct) != CT_LEN:
            raise Rejected("malformed_event", "e2e_init is not 1088 bytes")
        self.cipher = ChaCha20Poly1305(_derive(self.seed, kem_ct, LABEL_STREAM))

    def record(self, member: Any) -> None:
        if self.failed_remote:
            return
        if self.cipher is None:
            raise Rejected("record_before_init", "record before e2e_init")
        if not isinstance(member, str):
            raise Rejected("malformed_event", "e2e is not a string")
        raw = _b64(member, "malformed_event")
        if len(raw) < NONCE_LEN + TAG_LEN:
            raise Rejected("malformed_event", "record under 28 bytes")
        nonce = raw[:NONCE_LEN]
        if nonce in self.nonces:
            raise Rejected("duplicate_record", "nonce seen before")
        try:
            plaintext = self.cipher.decrypt(nonce, raw[NONCE_LEN:], b"")
        except InvalidTag:
            raise Rejected("decrypt_failed", "record tag") from None
        self.nonces.add(nonce)
        self.out.records.append(plaintext)
        self.out.plaintext += plaintext
        if self.done:
            if plaintext.strip(WHITESPACE):
                raise Rejected("data_after_done", "data after [DONE]")
            return
        self.inner(plaintext)

    def inner(self, data: bytes) -> None:
        """Reassembled inner stream, parsed as SSE (section 1) line by line."""
        buf = self.tail + data
        while not self.done and b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            self.inner_line(line[:-1] if line.endswith(b"\r") else line)
        if self.done and buf.strip(WHITESPACE):
            raise Rejected("data_after_done", "data after [DONE] in the same record")
        self.tail = b"" if self.done else buf

    def inner_line(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("invalid_utf8", "inner line") from None
        if not text:
            if self.data is not None:
                value = "\n".join(self.data)
                self.out.events.append(value)
                self.done = value == "[DONE]"
            self.data = None
            return
        if text.startswith(":"):
            return
        name, colon, value = text.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self.data = [*(self.data or []), value]

    def cut_after_done(self) -> bool:
        """Section 9.3: the stream stopped between ``data: [DONE]`` + LF and its blank line."""
        return not self.tail and self.data == ["[DONE]"]

    def eof(self, last: bytes) -> None:
        if last.strip(WHITESPACE) and not (self.done or self.cut_after_done()):
            self.line(last)
        if self.failed_remote:
            raise Rejected("remote_error", "the far side reported e2e_error")
        if self.cipher is None:
            raise Rejected("stream_truncated", "no e2e_init")
        if not self.done:
            if not self.cut_after_done():
                raise Rejected("stream_truncated", "EOF before [DONE]")
            self.out.events.append("[DONE]")
            self.done = True


def open_stream(sse: bytes, client_seed: bytes) -> StreamResult:
    """Decrypt a whole outer stream (sections 8-9); raise :class:`Rejected` on any violation."""
    stream = _Stream(client_seed)
    *lines, last = sse.split(b"\n")
    for line in lines:
        stream.line(line)
    stream.eof(last)
    return stream.out
