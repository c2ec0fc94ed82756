"""v2 requests: the client seals ``H || enc || ct``; the instance checks H, opens, and checks again.

Request blob (the body of ``POST /e2e/invoke``, opaque to the relay)::

    H (hdr_len bytes) || enc (1120, X-Wing) || ct (HPKE Seal, seq 0, aad "")

with ``info = "pqe2ee/v2 req" || 00 || SHA-256(H)``. The plaintext ``P`` is::

    pflags (1; bit0 gzip, others 0) || resp_pk (1216) || body_len (u32) || body || zero padding

``resp_pk`` is a fresh per-request X-Wing key of the client; the response keys need both it and
``exp = Export("pqe2ee/v2 resp", 32)`` of the request context (see records.py).

Instance checks, in this order (spec/v2.md §4.2): parse (``bad_header``), ``pk_hash`` is a
current key (``unknown_key``), chute / instance / path / stream / relay nonce equal what the
instance saw (``context_mismatch``), ``|now - ts| <= W`` (``stale``), then Open
(``decrypt_failed``), P well formed (``malformed_payload`` / ``bad_padding`` / ``oversize``),
body ``model`` / ``stream`` equal H (``context_mismatch``), ``request_id`` new (``replay``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from pqe2ee.backends.base import AEAD
from pqe2ee.backends.kdf import RandomBytes
from pqe2ee.backends.kdf import random_bytes as system_random
from pqe2ee.backends.xwing import (
    XWING_CT_LEN,
    XWING_PK_LEN,
    XWing,
    XWingPrivateKey,
    check_xwing_public_key,
)
from pqe2ee.errors import (
    ErrorCode,
    LimitExceeded,
    LocalProtocolError,
    MalformedError,
    PQE2EEError,
    RemoteProtocolError,
)
from pqe2ee.protocol._codec import gunzip_bounded, gzip_compress, json_decode_object, stream_flag
from pqe2ee.protocol.v2.header import (
    FIXED_LEN,
    MAX_HEADER_LEN,
    ContextHeader,
    header_info,
    parse_header,
)
from pqe2ee.protocol.v2.hpke import open_base, seal_base
from pqe2ee.protocol.v2.padding import BodyPadding, pad_length
from pqe2ee.protocol.v2.replay import Admission, ReplayCache

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_WINDOW_MS",
    "EXPORT_CONTEXT",
    "P_FIXED_LEN",
    "InstanceV2",
    "OpenedRequestV2",
    "ParsedRequest",
    "ResponseSecrets",
    "SealedRequestV2",
    "build_plaintext",
    "instance_error_response",
    "parse_instance_hint",
    "parse_plaintext",
    "parse_request_blob",
    "pk_hash",
    "seal_request_v2",
]


EXPORT_CONTEXT: Final = b"pqe2ee/v2 resp"
EXPORT_LEN: Final = 32
PFLAG_GZIP: Final = 0x01
P_FIXED_LEN: Final = 1 + XWING_PK_LEN + 4  # 1221
DEFAULT_WINDOW_MS: Final = 120_000
DEFAULT_MAX_BODY: Final = 64 * 1024 * 1024
TAG_LEN: Final = 16
_UUID_RE: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def pk_hash(public_key: bytes) -> bytes:
    """``SHA-256`` of an instance's 1216-byte X-Wing public key: the key id in H."""
    return hashlib.sha256(public_key).digest()


@dataclass(frozen=True, slots=True)
class ResponseSecrets:
    """What the client keeps to open the response: ``exp`` and its response key."""

    exporter: bytes
    key: XWingPrivateKey
    stream: bool


@dataclass(frozen=True, slots=True)
class SealedRequestV2:
    """A sealed v2 request and what the client keeps."""

    blob: bytes
    header: ContextHeader
    header_bytes: bytes
    enc: bytes
    secrets: ResponseSecrets

    @property
    def stream(self) -> bool:
        return self.header.stream

    @property
    def model(self) -> str:
        return self.header.model

    @property
    def request_id(self) -> bytes:
        return self.header.request_id

    @property
    def transcript_hash(self) -> bytes:
        """``SHA-256(H || enc)``: names this request in a usage receipt."""
        return hashlib.sha256(self.header_bytes + self.enc).digest()

    def invoke_headers(self, api_key: str | None) -> list[tuple[str, str]]:
        """The unchanged v1 ``/e2e/invoke`` headers, every value taken from H."""
        h = self.header
        headers = [
            ("X-Chute-Id", h.chute_id),
            ("X-Instance-Id", h.instance_id),
            ("X-E2E-Nonce", h.relay_nonce),
            ("X-E2E-Stream", "true" if h.stream else "false"),
            ("X-E2E-Path", h.path),
            ("Content-Type", "application/octet-stream"),
        ]
        if api_key:
            headers.insert(0, ("Authorization", f"Bearer {api_key}"))
        return headers


def build_plaintext(
    body: bytes,
    response_public_key: bytes,
    *,
    compress: bool,
    compresslevel: int = 1,
    pad: BodyPadding = "padme",
) -> bytes:
    """``P = pflags || resp_pk || body_len || body' || zeros`` (``body'`` gzip'd if ``compress``)."""
    payload = gzip_compress(body, compresslevel) if compress else bytes(body)
    if len(payload) >= 1 << 32:
        raise LimitExceeded("request body is too large for v2")
    unpadded = P_FIXED_LEN + len(payload)
    return b"".join(
        (
            bytes((PFLAG_GZIP if compress else 0,)),
            response_public_key,
            len(payload).to_bytes(4, "big"),
            payload,
            bytes(pad_length(unpadded, pad) - unpadded),
        )
    )


def parse_plaintext(p: bytes, *, max_body: int = DEFAULT_MAX_BODY) -> tuple[bytes, bytes, bool]:
    """``(body, resp_pk, compressed)`` from P; body decompressed (at most ``max_body`` bytes).

    Raises MalformedError (``malformed_payload``), ``bad_padding`` for non-zero padding, and
    LimitExceeded beyond ``max_body``.
    """
    if len(p) < P_FIXED_LEN:
        raise MalformedError("request plaintext is too short", code=ErrorCode.MALFORMED_PAYLOAD)
    pflags = p[0]
    if pflags & ~PFLAG_GZIP:
        raise MalformedError(
            "request pflags has reserved bits set", code=ErrorCode.MALFORMED_PAYLOAD
        )
    resp_pk = bytes(p[1 : 1 + XWING_PK_LEN])
    body_len = int.from_bytes(p[1 + XWING_PK_LEN : P_FIXED_LEN], "big")
    end = P_FIXED_LEN + body_len
    if end > len(p):
        raise MalformedError("request body_len runs past the end", code=ErrorCode.MALFORMED_PAYLOAD)
    if any(p[end:]):
        raise MalformedError("request padding is not all zero", code=ErrorCode.BAD_PADDING)
    payload = bytes(p[P_FIXED_LEN:end])
    if pflags & PFLAG_GZIP:
        body = gunzip_bounded(payload, limit=max_body, what="request body")
    else:
        if len(payload) > max_body:
            raise LimitExceeded(f"request body is larger than {max_body} bytes")
        body = payload
    return body, resp_pk, bool(pflags & PFLAG_GZIP)


def _canonical_uuid(value: str, what: str) -> str:
    if not _UUID_RE.fullmatch(value):
        raise LocalProtocolError(f"{what} must be a UUID", code=ErrorCode.INVALID_ARGUMENT)
    return value.lower()


def _body_object(
    body: bytes | Mapping[str, Any], decoded: dict[str, Any] | None
) -> tuple[bytes, dict[str, Any]]:
    if isinstance(body, (bytes, bytearray, memoryview)):
        raw = bytes(body)
        if decoded is not None:  # the caller decoded these bytes already
            return raw, decoded
        # invalid_body: the caller's own body, a LocalProtocolError
        return raw, json_decode_object(raw, what="request body", code=ErrorCode.INVALID_BODY)
    if not isinstance(body, Mapping):
        raise LocalProtocolError("request body must be a JSON object", code=ErrorCode.INVALID_BODY)
    obj = dict(body)
    try:
        return msgspec.json.encode(obj), obj
    except (TypeError, msgspec.EncodeError, RecursionError):  # (RecursionError: too deep)
        raise LocalProtocolError(
            "request body is not JSON-serialisable", code=ErrorCode.INVALID_BODY
        ) from None


def seal_request_v2(
    body: bytes | Mapping[str, Any],
    instance_public_key: bytes,
    *,
    chute_id: str,
    instance_id: str,
    relay_nonce: str,
    path: str,
    now_ms: int,
    xwing: XWing,
    aead: AEAD,
    random_bytes: RandomBytes = system_random,
    compress: bool = False,
    compresslevel: int = 1,
    pad: BodyPadding = "padme",
    response_padding: int = 256,
    response_key: XWingPrivateKey | None = None,
    eseed: bytes | None = None,
    decoded: dict[str, Any] | None = None,
    key_hash: bytes | None = None,
) -> SealedRequestV2:
    """Seal a JSON request body to an instance's v2 key (client side).

    ``body`` (JSON bytes, kept byte for byte, or a mapping) must be an object with a non-empty
    string ``model``; ``stream`` is its truthiness, as in v1. ``path`` is the request path (a
    query is dropped). ``response_padding`` (0, 128, 256; default 256) asks the instance to pad
    response records (single responses: Padmé; streams: that bucket). ``compress`` (default
    off: gzip next to caller-influenced text is a length oracle) also asks for a compressed
    single response. Randomness: ``request_id`` and the response key seed come from ``random_bytes``;
    ``response_key`` and ``eseed`` override them (test vectors). ``decoded``: the body's bytes
    already decoded by the caller (a JSON object), so they are not parsed a second time.
    ``key_hash``: :func:`pk_hash` of ``instance_public_key`` when the caller keeps it (a
    :class:`~pqe2ee.protocol.v2.negotiation.V2Offer`'s ``pk_hash``), so the key is not hashed
    per request.
    """
    if len(instance_public_key) != XWING_PK_LEN:  # the backend checks the rest when encapsulating
        check_xwing_public_key(instance_public_key)
    raw, obj = _body_object(body, decoded)
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise LocalProtocolError(
            "v2 request body needs a non-empty string 'model'", code=ErrorCode.INVALID_BODY
        )
    header = ContextHeader(
        stream=stream_flag(obj),
        pk_hash=pk_hash(instance_public_key) if key_hash is None else key_hash,
        ts_ms=now_ms,
        request_id=random_bytes(16),
        chute_id=_canonical_uuid(chute_id, "chute_id"),
        instance_id=_canonical_uuid(instance_id, "instance_id"),
        relay_nonce=relay_nonce,
        path=path.split("?", 1)[0],
        model=model,
        response_padding=response_padding,
    )
    if response_key is None:
        response_key = xwing.from_seed(random_bytes(32))
    h = header.encode()
    p = build_plaintext(
        raw, response_key.public_key, compress=compress, compresslevel=compresslevel, pad=pad
    )
    enc, ct, ctx = seal_base(
        instance_public_key, header_info(h), b"", p, xwing=xwing, aead=aead, eseed=eseed
    )
    secrets = ResponseSecrets(ctx.export(EXPORT_CONTEXT, EXPORT_LEN), response_key, header.stream)
    return SealedRequestV2(b"".join((h, enc, ct)), header, h, enc, secrets)


# -- instance side ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    header: ContextHeader
    header_bytes: bytes
    enc: bytes
    ciphertext: bytes


def parse_request_blob(blob: bytes) -> ParsedRequest:
    """Split a request blob; raises MalformedError ``bad_header`` / ``malformed_blob``."""
    if len(blob) < FIXED_LEN:
        raise MalformedError("v2 request is shorter than its header", code=ErrorCode.BAD_HEADER)
    hdr_len = int.from_bytes(blob[5:7], "big")
    if hdr_len < FIXED_LEN or hdr_len > MAX_HEADER_LEN or hdr_len > len(blob):
        raise MalformedError("v2 request has a bad hdr_len", code=ErrorCode.BAD_HEADER)
    mv = memoryview(blob)
    header_bytes = bytes(mv[:hdr_len])
    header = parse_header(header_bytes)
    if len(blob) < hdr_len + XWING_CT_LEN + TAG_LEN:
        raise MalformedError("v2 request is too short", code=ErrorCode.MALFORMED_BLOB)
    enc = bytes(mv[hdr_len : hdr_len + XWING_CT_LEN])
    return ParsedRequest(header, header_bytes, enc, bytes(mv[hdr_len + XWING_CT_LEN :]))


@dataclass(frozen=True, slots=True)
class OpenedRequestV2:
    """An accepted request. ``body`` is the client's JSON bytes exactly as sealed."""

    header: ContextHeader
    body: bytes
    json: dict[str, Any]
    response_public_key: bytes
    exporter: bytes
    compressed: bool
    transcript_hash: bytes

    @property
    def stream(self) -> bool:
        return self.header.stream


def _mismatch(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"{what} does not match", code=ErrorCode.CONTEXT_MISMATCH)


@dataclass(slots=True)
class _Keys:
    by_hash: dict[bytes, XWingPrivateKey] = field(default_factory=dict)
    order: list[bytes] = field(default_factory=list)


class InstanceV2:
    """Instance-side v2 request acceptance (sans-IO; the caller passes ``now_ms``).

    ``keys``: current key first, then at most one previous key (kept after a rotation so that
    requests sealed to it still open; older keys are dropped and should be erased).

    No locks (the protocol layer has none): a server that opens requests in worker threads
    while it rotates keys, or whose replay cache is not thread-safe, serialises those calls.
    """

    def __init__(
        self,
        *,
        chute_id: str,
        instance_id: str,
        keys: Sequence[XWingPrivateKey],
        aead: AEAD,
        replay_cache: ReplayCache,
        window_ms: int = DEFAULT_WINDOW_MS,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        if not keys or len(keys) > 2:
            raise LocalProtocolError(
                "give the current key and at most one previous key", code=ErrorCode.INVALID_ARGUMENT
            )
        self.chute_id = chute_id.lower()
        self.instance_id = instance_id.lower()
        self.aead = aead
        self.replay_cache = replay_cache
        self.window_ms = window_ms
        self.max_body = max_body
        self._keys = _Keys()
        for key in reversed(keys):
            self._add(key)

    def _add(self, key: XWingPrivateKey) -> None:
        h = pk_hash(key.public_key)
        self._keys.by_hash[h] = key
        if h in self._keys.order:
            self._keys.order.remove(h)
        self._keys.order.insert(0, h)
        while len(self._keys.order) > 2:
            old = self._keys.order.pop()
            self._keys.by_hash.pop(old).wipe()

    def rotate(self, new_key: XWingPrivateKey) -> None:
        """Make ``new_key`` current; the old current becomes previous; older keys are wiped."""
        self._add(new_key)

    @property
    def public_key(self) -> bytes:
        """The current public key (what discovery publishes in ``e2e_v2.pk``)."""
        return self._keys.by_hash[self._keys.order[0]].public_key

    def check(
        self,
        parsed: ParsedRequest,
        *,
        path: str,
        stream: bool,
        now_ms: int,
        relay_nonce: str | None = None,
    ) -> XWingPrivateKey:
        """The cheap checks before decapsulation; returns the key to open with.

        ``path`` is what the relay delivered (its ``?`` padding is removed here); ``stream`` is
        the relay's ``X-E2E-Stream``; ``relay_nonce`` is checked when the relay forwards it.
        """
        h = parsed.header
        key = self._keys.by_hash.get(h.pk_hash)
        if key is None:
            raise RemoteProtocolError(
                "request is sealed to an unknown key", code=ErrorCode.UNKNOWN_KEY
            )
        if h.chute_id != self.chute_id:
            raise _mismatch("chute_id")
        if h.instance_id != self.instance_id:
            raise _mismatch("instance_id")
        if h.path != path.rstrip("?"):
            raise _mismatch("path")
        if h.stream != stream:
            raise _mismatch("stream flag")
        if relay_nonce is not None and h.relay_nonce != relay_nonce:
            raise _mismatch("relay nonce")
        if abs(now_ms - h.ts_ms) > self.window_ms:
            raise RemoteProtocolError(
                "request timestamp is outside the acceptance window", code=ErrorCode.STALE
            )
        return key

    def open(
        self,
        blob: bytes,
        *,
        path: str,
        stream: bool,
        now_ms: int,
        relay_nonce: str | None = None,
        max_body: int | None = None,
    ) -> OpenedRequestV2:
        """Run every check and open the request; raises the typed error of the first failure.

        ``max_body`` lowers ``self.max_body`` for this call (a server's bounded first try on
        its event loop). A body over the bound is refused before the replay cache sees the
        request id, so the same blob may be opened again with a higher bound."""
        parsed = parse_request_blob(blob)
        key = self.check(parsed, path=path, stream=stream, now_ms=now_ms, relay_nonce=relay_nonce)
        h = parsed.header
        p, ctx = open_base(
            parsed.enc,
            key,
            header_info(parsed.header_bytes),
            b"",
            parsed.ciphertext,
            aead=self.aead,
        )
        body, resp_pk, compressed = parse_plaintext(
            p, max_body=self.max_body if max_body is None else min(max_body, self.max_body)
        )
        try:
            check_xwing_public_key(resp_pk)
        except LocalProtocolError:
            raise MalformedError(
                "request carries an invalid response key", code=ErrorCode.MALFORMED_PAYLOAD
            ) from None
        obj = json_decode_object(body, what="request body", code=ErrorCode.MALFORMED_PAYLOAD)
        if obj.get("model") != h.model:
            raise _mismatch("body model")
        if stream_flag(obj) != h.stream:
            raise _mismatch("body stream flag")
        verdict = self.replay_cache.admit(h.request_id, h.ts_ms + self.window_ms, now_ms)
        if verdict is Admission.REPLAY:
            raise RemoteProtocolError("request_id was seen before", code=ErrorCode.REPLAY)
        if verdict is Admission.TOO_OLD:
            raise RemoteProtocolError(
                "request is older than the replay cache can vouch for", code=ErrorCode.STALE
            )
        return OpenedRequestV2(
            header=h,
            body=body,
            json=obj,
            response_public_key=resp_pk,
            exporter=ctx.export(EXPORT_CONTEXT, EXPORT_LEN),
            compressed=compressed,
            transcript_hash=hashlib.sha256(parsed.header_bytes + parsed.enc).digest(),
        )


# -- plaintext error hints ------------------------------------------------------------------------

_HINT_STATUS: Final[dict[ErrorCode, int]] = {ErrorCode.REPLAY: 409, ErrorCode.OVERSIZE: 413}
_HINT_RE: Final = re.compile(rb"e2e_v2:([a-z_]{1,40})")
_HINT_CODES: Final = frozenset(
    {
        ErrorCode.BAD_HEADER,
        ErrorCode.UNKNOWN_KEY,
        ErrorCode.CONTEXT_MISMATCH,
        ErrorCode.STALE,
        ErrorCode.REPLAY,
        ErrorCode.DECRYPT_FAILED,
        ErrorCode.MALFORMED_BLOB,
        ErrorCode.MALFORMED_PAYLOAD,
        ErrorCode.BAD_PADDING,
        ErrorCode.OVERSIZE,
    }
)


def instance_error_response(exc: PQE2EEError) -> tuple[int, bytes]:
    """``(status, body)`` for a refused request: ``{"detail":"e2e_v2:<code>"}``, 400 (409 for a
    replay, 413 for oversize). Codes outside the request checks become ``decrypt_failed``."""
    code = exc.code if exc.code in _HINT_CODES else ErrorCode.DECRYPT_FAILED
    body = msgspec.json.encode({"detail": f"e2e_v2:{code.value}"})
    return _HINT_STATUS.get(code, 400), body


def parse_instance_hint(body: bytes) -> ErrorCode | None:
    """The ``e2e_v2:<code>`` an instance put in a plaintext error, even when the relay wrapped
    it (``{"detail":"{\\"detail\\":\\"e2e_v2:stale\\"}"}``). Unauthenticated: a hint only."""
    m = _HINT_RE.search(body[:4096])
    if m is None:
        return None
    try:
        code = ErrorCode(m.group(1).decode("ascii"))
    except ValueError:
        return None
    return code if code in _HINT_CODES else None
