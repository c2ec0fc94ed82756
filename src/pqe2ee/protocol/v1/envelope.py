"""v1 envelopes: sealing and opening the request blob and the non-stream response blob.

Blob layout (request and non-stream response alike)::

    kem_ciphertext (1088) || nonce (12) || ciphertext (n) || tag (16)

The plaintext is gzip(JSON). A request's JSON is the caller's body plus one top-level field
``e2e_response_pk`` (standard base64 of a fresh 1184-byte ML-KEM-768 public key) to which the
response is sealed. Keys come from :func:`~pqe2ee.protocol.kdf.derive_key`.

Nothing here does I/O or reads a clock; randomness is a parameter (``random_bytes``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from pqe2ee.backends.base import (
    AEAD,
    CHACHA_NONCE_LEN,
    CHACHA_TAG_LEN,
    KEM,
    MLKEM768_CT_LEN,
    MLKEM768_PK_LEN,
    KEMPrivateKey,
)
from pqe2ee.backends.kdf import RandomBytes
from pqe2ee.backends.kdf import random_bytes as system_random
from pqe2ee.errors import ErrorCode, LimitExceeded, LocalProtocolError, MalformedError
from pqe2ee.protocol._codec import (
    b64decode,
    b64encode,
    gunzip_bounded,
    gzip_compress,
    json_decode_object,
    stream_flag,
)
from pqe2ee.protocol.kdf import INFO_REQUEST, INFO_RESPONSE, derive_key

__all__ = [
    "BLOB_OVERHEAD",
    "DEFAULT_COMPRESSLEVEL",
    "DEFAULT_MAX_PLAINTEXT",
    "RESPONSE_PK_FIELD",
    "STORE_BELOW",
    "OpenedRequest",
    "SealedRequest",
    "open_request",
    "open_response",
    "seal_request",
    "seal_response",
    "stream_flag",
]

RESPONSE_PK_FIELD: Final = "e2e_response_pk"
BLOB_OVERHEAD: Final = MLKEM768_CT_LEN + CHACHA_NONCE_LEN + CHACHA_TAG_LEN  # 1116
DEFAULT_COMPRESSLEVEL: Final = 1
# With ``compresslevel=None`` (the default) a plaintext shorter than this is sent stored (gzip
# level 0): deflating a few KiB costs more time than the bytes save (~30 us for a 1 KiB chat
# request, most of it on the 1.6 KiB base64 response key, which hardly compresses); larger
# plaintexts use DEFAULT_COMPRESSLEVEL. Any level is valid gzip to every v1 receiver.
STORE_BELOW: Final = 4096
DEFAULT_MAX_PLAINTEXT: Final = 64 * 1024 * 1024


_RESPONSE_PK_PREFIX: Final = b'"' + RESPONSE_PK_FIELD.encode() + b'":"'


@dataclass(frozen=True, slots=True)
class SealedRequest:
    """What a client sends, and what it keeps to open the reply."""

    blob: bytes
    response_key: KEMPrivateKey
    stream: bool
    model: str | None


@dataclass(frozen=True, slots=True)
class OpenedRequest:
    """What an instance learns from a request blob.

    ``body`` is the caller's JSON object without ``e2e_response_pk``; ``json`` is ``body``
    encoded again (compact) for forwarding to the engine.
    """

    body: dict[str, Any]
    json: bytes
    response_public_key: bytes
    stream: bool


def _seal(
    plaintext: bytes,
    level: int | None,
    public_key: bytes,
    info: bytes,
    kem: KEM,
    aead: AEAD,
    random_bytes: RandomBytes,
) -> bytes:
    """The blob of ``plaintext`` gzipped at ``level`` (None: stored below STORE_BELOW)."""
    if level is None:
        level = 0 if len(plaintext) < STORE_BELOW else DEFAULT_COMPRESSLEVEL
    kem_ct, shared_secret = kem.encapsulate(public_key)
    key = derive_key(shared_secret, kem_ct, info)
    nonce = random_bytes(CHACHA_NONCE_LEN)
    return b"".join((kem_ct, nonce, aead.seal(key, nonce, gzip_compress(plaintext, level))))


def _open(blob: bytes, private_key: KEMPrivateKey, info: bytes, aead: AEAD, *, what: str) -> bytes:
    if len(blob) < BLOB_OVERHEAD:
        raise MalformedError(
            f"{what} blob is {len(blob)} bytes, shorter than the {BLOB_OVERHEAD}-byte minimum",
            code=ErrorCode.MALFORMED_BLOB,
        )
    mv = memoryview(blob)
    kem_ct = bytes(mv[:MLKEM768_CT_LEN])
    nonce = bytes(mv[MLKEM768_CT_LEN : MLKEM768_CT_LEN + CHACHA_NONCE_LEN])
    shared_secret = private_key.decapsulate(kem_ct)
    key = derive_key(shared_secret, kem_ct, info)
    return aead.open(key, nonce, bytes(mv[MLKEM768_CT_LEN + CHACHA_NONCE_LEN :]))


def _body_json(
    body: bytes | Mapping[str, Any],
    response_pk_b64: bytes,
    decoded: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """The request JSON with ``e2e_response_pk`` appended, and the decoded caller body
    (``decoded``, when the caller decoded the bytes already)."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        raw = bytes(body).strip()
        # invalid_body: the caller's own body, a LocalProtocolError (not a remote one)
        obj = (
            json_decode_object(raw, what="request body", code=ErrorCode.INVALID_BODY)
            if decoded is None
            else decoded
        )
        if RESPONSE_PK_FIELD in obj:
            raise LocalProtocolError(
                f"request body must not contain {RESPONSE_PK_FIELD!r}", code=ErrorCode.INVALID_BODY
            )
        # Append the field to the caller's own bytes: no re-serialisation of their JSON.
        sep = b"" if not obj else b","
        return b"".join((raw[:-1].rstrip(), sep, _RESPONSE_PK_PREFIX, response_pk_b64, b'"}')), obj
    if not isinstance(body, Mapping):
        raise LocalProtocolError("request body must be a JSON object", code=ErrorCode.INVALID_BODY)
    if RESPONSE_PK_FIELD in body:
        raise LocalProtocolError(
            f"request body must not contain {RESPONSE_PK_FIELD!r}", code=ErrorCode.INVALID_BODY
        )
    obj = dict(body)
    try:
        encoded = msgspec.json.encode({**obj, RESPONSE_PK_FIELD: response_pk_b64.decode("ascii")})
    except (TypeError, msgspec.EncodeError, RecursionError):  # (RecursionError: too deep)
        raise LocalProtocolError(
            "request body is not JSON-serialisable", code=ErrorCode.INVALID_BODY
        ) from None
    return encoded, obj


def seal_request(
    body: bytes | Mapping[str, Any],
    instance_public_key: bytes,
    *,
    response_key: KEMPrivateKey,
    kem: KEM,
    aead: AEAD,
    random_bytes: RandomBytes = system_random,
    compresslevel: int | None = None,
    decoded: dict[str, Any] | None = None,
) -> SealedRequest:
    """Seal a Chat/Completions request body to an instance (client side).

    ``response_key`` must be fresh and used for this request only; the reply is sealed to its
    public half. ``body`` may be the caller's JSON bytes (kept byte for byte) or a mapping.
    ``decoded``: those bytes already decoded by the caller (a JSON object, e.g. from
    :func:`~pqe2ee.protocol.client.e2e_request`), so they are not parsed a second time.
    ``compresslevel``: a zlib level, or None to store short plaintexts (see STORE_BELOW).
    """
    if len(instance_public_key) != MLKEM768_PK_LEN:
        raise LocalProtocolError(
            f"instance public key must be {MLKEM768_PK_LEN} bytes, got {len(instance_public_key)}",
            code=ErrorCode.INVALID_KEY,
        )
    plaintext, obj = _body_json(body, b64encode(response_key.public_key), decoded)
    model = obj.get("model")
    blob = _seal(
        plaintext,
        compresslevel,
        instance_public_key,
        INFO_REQUEST,
        kem,
        aead,
        random_bytes,
    )
    return SealedRequest(
        blob=blob,
        response_key=response_key,
        stream=stream_flag(obj),
        model=model if isinstance(model, str) else None,
    )


def open_request(
    blob: bytes,
    private_key: KEMPrivateKey,
    *,
    aead: AEAD,
    max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
) -> OpenedRequest:
    """Open a request blob (instance side). Bounded: gunzip output is capped at ``max_plaintext``."""
    gz = _open(blob, private_key, INFO_REQUEST, aead, what="request")
    plaintext = gunzip_bounded(gz, limit=max_plaintext, what="request plaintext")
    body = json_decode_object(plaintext, what="request plaintext")
    pk_b64 = body.pop(RESPONSE_PK_FIELD, None)
    if not isinstance(pk_b64, str):
        raise MalformedError(
            f"request lacks a string {RESPONSE_PK_FIELD!r}", code=ErrorCode.MALFORMED_PAYLOAD
        )
    response_pk = b64decode(pk_b64, what=RESPONSE_PK_FIELD)
    if len(response_pk) != MLKEM768_PK_LEN:
        raise MalformedError(
            f"{RESPONSE_PK_FIELD} must hold {MLKEM768_PK_LEN} bytes, got {len(response_pk)}",
            code=ErrorCode.MALFORMED_PAYLOAD,
        )
    return OpenedRequest(
        body=body,
        json=msgspec.json.encode(body),
        response_public_key=response_pk,
        stream=stream_flag(body),
    )


def seal_response(
    body: bytes,
    response_public_key: bytes,
    *,
    kem: KEM,
    aead: AEAD,
    random_bytes: RandomBytes = system_random,
    compresslevel: int | None = None,
) -> bytes:
    """Seal a non-stream response body (any bytes; normally the engine's JSON) to the client.

    ``compresslevel``: a zlib level, or None to store short bodies (see STORE_BELOW).
    """
    return _seal(
        body,
        compresslevel,
        response_public_key,
        INFO_RESPONSE,
        kem,
        aead,
        random_bytes,
    )


def open_response(
    blob: bytes,
    response_key: KEMPrivateKey,
    *,
    aead: AEAD,
    max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
) -> bytes:
    """Open a non-stream response blob (client side); returns the decompressed bytes as sent."""
    if len(blob) > max_plaintext + BLOB_OVERHEAD + 1024 * 1024 and max_plaintext > 0:
        # gzip never expands more than ~0.03% + header; far larger blobs are abuse.
        raise LimitExceeded(f"response blob is larger than the {max_plaintext}-byte limit allows")
    gz = _open(blob, response_key, INFO_RESPONSE, aead, what="response")
    return gunzip_bounded(gz, limit=max_plaintext, what="response plaintext")
