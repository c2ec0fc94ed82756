"""v2 responses: key schedule, STREAM-style records, the sealer and the record decryptor.

Key schedule (instance side; the client mirrors it with its response key)::

    exp       = request context Export("pqe2ee/v2 resp", 32)
    ss_r, enc_r = X-Wing.Encap(resp_pk)                       fresh per response
    resp_init = "PQE2" || 02 || kind (01 single | 02 stream) || enc_r       1126 bytes
    prk_r     = HKDF-Extract(salt = resp_init, IKM = exp || ss_r)
    k_r       = HKDF-Expand(prk_r, "pqe2ee/v2 rk", 32)
    np_r      = HKDF-Expand(prk_r, "pqe2ee/v2 rn", 7)

Record (STREAM construction: the counter and the final flag are in the nonce)::

    record = rflags (1; bit0 final) || seq (u32) || ChaCha20-Poly1305(k_r, nonce, aad, inner)
    nonce  = np_r (7) || seq (u32) || (01 if final else 00)
    aad    = rflags || seq
    inner  = rtype (1) || plen (u32) || payload || zero padding

Types: 01 HEAD, 02 DATA, 03 USAGE, 7F END. Grammar ``HEAD (DATA | USAGE)* END``; END and only
END is final; ``seq`` starts at 0 and counts every record. Overhead 26 bytes per record.

:class:`RecordDecryptor` is the client's state machine. Its transitions are the table
``TRANSITIONS``: a missing pair is a protocol violation with the error code listed in
``VIOLATIONS``. Errors are sticky and wipe the keys.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from pqe2ee.backends.base import AEAD, AEADCipher
from pqe2ee.backends.xwing import XWING_CT_LEN, XWing
from pqe2ee.errors import (
    DecryptError,
    ErrorCode,
    LimitExceeded,
    LocalProtocolError,
    MalformedError,
    PQE2EEError,
    RemoteError,
    StreamError,
)
from pqe2ee.protocol._codec import gunzip_bounded, gzip_compress, json_decode
from pqe2ee.protocol.kdf import hkdf_expand, hkdf_extract
from pqe2ee.protocol.v2.padding import bucket, padme
from pqe2ee.protocol.v2.request import DEFAULT_MAX_BODY, OpenedRequestV2, ResponseSecrets

__all__ = [
    "END",
    "HEAD",
    "KIND_SINGLE",
    "KIND_STREAM",
    "MAX_PAYLOAD",
    "RECORD_OVERHEAD",
    "RESP_INIT_LEN",
    "TRANSITIONS",
    "VIOLATIONS",
    "Data",
    "End",
    "Head",
    "RecordDecryptor",
    "RecordEvent",
    "ResponseKeys",
    "ResponseSealer",
    "ResponseV2",
    "UpstreamError",
    "UsageUpdate",
    "derive_response_keys",
    "encode_inner",
    "encrypt_record",
    "open_response_v2",
    "record_nonce",
    "seal_response_v2",
]

RESP_PREFIX: Final = b"PQE2\x02"
KIND_SINGLE: Final = 0x01
KIND_STREAM: Final = 0x02
RESP_INIT_LEN: Final = len(RESP_PREFIX) + 1 + XWING_CT_LEN  # 1126
LABEL_KEY: Final = b"pqe2ee/v2 rk"
LABEL_NONCE: Final = b"pqe2ee/v2 rn"
NONCE_PREFIX_LEN: Final = 7
RECORD_HEADER_LEN: Final = 5
INNER_HEADER_LEN: Final = 5
TAG_LEN: Final = 16
RECORD_OVERHEAD: Final = RECORD_HEADER_LEN + INNER_HEADER_LEN + TAG_LEN  # 26
MAX_PAYLOAD: Final = 1 << 24
MAX_SEQ: Final = (1 << 32) - 2  # seq < 2^32 - 1
FLAG_FINAL: Final = 0x01

HEAD: Final = 0x01
DATA: Final = 0x02
USAGE: Final = 0x03
END: Final = 0x7F
_RTYPES: Final = frozenset((HEAD, DATA, USAGE, END))
CONTENT_ENCODINGS: Final = frozenset(("identity", "gzip"))


# -- key schedule ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseKeys:
    resp_init: bytes
    prk: bytes
    key: bytes
    nonce_prefix: bytes


def response_init(kind: int, enc_r: bytes) -> bytes:
    return RESP_PREFIX + bytes((kind,)) + enc_r


def derive_response_keys(exporter: bytes, shared_secret: bytes, resp_init: bytes) -> ResponseKeys:
    prk = hkdf_extract(resp_init, exporter + shared_secret)
    return ResponseKeys(
        resp_init,
        prk,
        hkdf_expand(prk, LABEL_KEY, 32),
        hkdf_expand(prk, LABEL_NONCE, NONCE_PREFIX_LEN),
    )


def record_nonce(nonce_prefix: bytes, seq: int, final: bool) -> bytes:
    return nonce_prefix + seq.to_bytes(4, "big") + (b"\x01" if final else b"\x00")


def encode_inner(rtype: int, payload: bytes, padded_len: int | None = None) -> bytes:
    """``rtype || plen || payload || zeros`` (``padded_len`` >= 5 + len(payload))."""
    unpadded = INNER_HEADER_LEN + len(payload)
    pad = 0 if padded_len is None else padded_len - unpadded
    if pad < 0:
        raise LocalProtocolError("padded length is too small", code=ErrorCode.INVALID_ARGUMENT)
    return b"".join((bytes((rtype,)), len(payload).to_bytes(4, "big"), payload, bytes(pad)))


def encrypt_record(
    cipher: AEADCipher, nonce_prefix: bytes, seq: int, final: bool, inner: bytes
) -> bytes:
    """``rflags || seq || AEAD(k_r, nonce(seq, final), rflags || seq, inner)`` - no grammar
    checks (the sealer enforces them; tests use this to build hostile records)."""
    header = bytes((FLAG_FINAL if final else 0,)) + seq.to_bytes(4, "big")
    return header + cipher.encrypt(record_nonce(nonce_prefix, seq, final), inner, header)


# -- payload shapes -------------------------------------------------------------------------------


class _HeadDoc(msgspec.Struct):
    status: int
    content_type: str | None = None
    content_encoding: str = "identity"


class _ErrorDoc(msgspec.Struct):
    type: str
    message: str
    status: int | None = None


class _EndDoc(msgspec.Struct):
    records: int
    data_bytes: int
    usage: dict[str, Any] | None = None
    error: _ErrorDoc | None = None


_head_decoder = msgspec.json.Decoder(_HeadDoc)
_end_decoder = msgspec.json.Decoder(_EndDoc)
_usage_decoder = msgspec.json.Decoder(dict[str, Any])


@dataclass(frozen=True, slots=True)
class UpstreamError:
    """An upstream failure reported inside END (authenticated)."""

    type: str
    message: str
    status: int | None = None


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    content_type: str | None
    content_encoding: str


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


@dataclass(frozen=True, slots=True)
class UsageUpdate:
    """Authenticated usage (cumulative; the last one wins)."""

    usage: dict[str, Any]


@dataclass(frozen=True, slots=True)
class End:
    """Authenticated end of the response. ``usage_copy`` is the last plaintext copy the relay
    showed (streams only) and ``usage_copy_matches`` the cross-check (None without a copy)."""

    usage: dict[str, Any] | None
    error: UpstreamError | None
    records: int
    data_bytes: int
    usage_copy: dict[str, Any] | None = None
    usage_copy_matches: bool | None = None


RecordEvent = Head | Data | UsageUpdate | End


# -- instance side --------------------------------------------------------------------------------


class _SendState(enum.Enum):
    NEW = "new"
    BODY = "body"
    DONE = "done"
    ERROR = "error"


_SEND: Final[dict[tuple[_SendState, int], _SendState]] = {
    (_SendState.NEW, HEAD): _SendState.BODY,
    (_SendState.BODY, DATA): _SendState.BODY,
    (_SendState.BODY, USAGE): _SendState.BODY,
    (_SendState.BODY, END): _SendState.DONE,
}


class ResponseSealer:
    """Seals the records of one response (instance side).

    ``padding`` is H's response padding: 0 none; otherwise stream records pad ``inner`` to a
    multiple of ``padding`` bytes and single responses pad each ``inner`` with Padmé. Misuse
    (records out of grammar, oversize payloads) raises LocalProtocolError / LimitExceeded; a
    failed seal leaves the sealer failed - the runtime must then abort the response.
    """

    __slots__ = (
        "_cipher",
        "_data_bytes",
        "_padding",
        "_seq",
        "_state",
        "keys",
        "stream",
    )

    def __init__(
        self,
        exporter: bytes,
        response_public_key: bytes,
        *,
        stream: bool,
        padding: int = 0,
        xwing: XWing,
        aead: AEAD,
        eseed: bytes | None = None,
    ) -> None:
        if padding not in (0, 128, 256):
            raise LocalProtocolError(
                "padding must be 0, 128 or 256", code=ErrorCode.INVALID_ARGUMENT
            )
        try:
            if eseed is None:
                enc_r, ss_r = xwing.encapsulate(response_public_key)
            else:
                enc_r, ss_r = xwing.encapsulate_derand(response_public_key, eseed)
        except LocalProtocolError as exc:
            if exc.code is not ErrorCode.INVALID_KEY:
                raise
            raise MalformedError(
                "the client's response key is invalid", code=ErrorCode.MALFORMED_PAYLOAD
            ) from None
        self.stream = stream
        init = response_init(KIND_STREAM if stream else KIND_SINGLE, enc_r)
        self.keys = derive_response_keys(exporter, ss_r, init)
        self._cipher: AEADCipher | None = aead.new(self.keys.key)
        self._padding = padding
        self._seq = 0
        self._data_bytes = 0
        self._state = _SendState.NEW

    @classmethod
    def for_request(
        cls, opened: OpenedRequestV2, *, xwing: XWing, aead: AEAD, eseed: bytes | None = None
    ) -> ResponseSealer:
        return cls(
            opened.exporter,
            opened.response_public_key,
            stream=opened.stream,
            padding=opened.header.response_padding,
            xwing=xwing,
            aead=aead,
            eseed=eseed,
        )

    @property
    def resp_init(self) -> bytes:
        return self.keys.resp_init

    @property
    def records(self) -> int:
        return self._seq

    @property
    def done(self) -> bool:
        return self._state is _SendState.DONE

    def _padded(self, inner_len: int) -> int:
        if not self._padding:
            return inner_len
        return bucket(inner_len, self._padding) if self.stream else padme(inner_len)

    def _seal(self, rtype: int, payload: bytes) -> bytes:
        nxt = _SEND.get((self._state, rtype))
        if nxt is None:
            raise LocalProtocolError(
                f"record type {rtype:#x} is not allowed in state {self._state.value}",
                code=ErrorCode.INVALID_ARGUMENT,
            )
        if len(payload) > MAX_PAYLOAD:
            raise LimitExceeded(f"record payload is larger than {MAX_PAYLOAD} bytes")
        if self._seq > MAX_SEQ:
            raise LimitExceeded("response has too many records")
        if rtype != END and self._seq == MAX_SEQ:
            raise LimitExceeded("response has too many records (the last seq is for END)")
        final = rtype == END
        unpadded = INNER_HEADER_LEN + len(payload)
        inner = encode_inner(rtype, payload, self._padded(unpadded))
        assert self._cipher is not None
        try:
            record = encrypt_record(self._cipher, self.keys.nonce_prefix, self._seq, final, inner)
        except PQE2EEError:
            self._state = _SendState.ERROR
            self._cipher = None
            raise
        self._seq += 1
        self._state = nxt
        if final:
            self._cipher = None
        return record

    def head(
        self,
        status: int,
        content_type: str | None = None,
        content_encoding: str = "identity",
    ) -> bytes:
        if not 100 <= status <= 599:
            raise LocalProtocolError("status must be 100-599", code=ErrorCode.INVALID_ARGUMENT)
        if content_encoding not in CONTENT_ENCODINGS or (
            self.stream and content_encoding != "identity"
        ):
            raise LocalProtocolError(
                "content_encoding must be identity (streams) or gzip",
                code=ErrorCode.INVALID_ARGUMENT,
            )
        doc = {"status": status, "content_type": content_type, "content_encoding": content_encoding}
        return self._seal(HEAD, msgspec.json.encode(doc))

    def data(self, payload: bytes) -> bytes:
        record = self._seal(DATA, bytes(payload))
        self._data_bytes += len(payload)
        return record

    def usage(self, usage: dict[str, Any]) -> bytes:
        if not isinstance(usage, dict):
            raise LocalProtocolError("usage must be a JSON object", code=ErrorCode.INVALID_ARGUMENT)
        return self._seal(USAGE, msgspec.json.encode(usage))

    def end(
        self, *, usage: dict[str, Any] | None = None, error: UpstreamError | None = None
    ) -> bytes:
        err = None
        if error is not None:
            err = {"status": error.status, "type": error.type, "message": error.message}
        doc = {
            "records": self._seq,
            "data_bytes": self._data_bytes,
            "usage": usage,
            "error": err,
        }
        return self._seal(END, msgspec.json.encode(doc))


# -- client side ----------------------------------------------------------------------------------


class State(enum.Enum):
    AWAIT_INIT = "await_init"
    AWAIT_HEAD = "await_head"
    BODY = "body"
    DONE = "done"
    CLOSED = "closed"
    ERROR = "error"

    __hash__ = object.__hash__  # members are singletons; the C hash keeps table lookups cheap


class Input(enum.Enum):
    INIT = "init"
    RECORD = "record"  # a record arrived (before it is opened)
    HEAD = "head"
    DATA = "data"
    USAGE = "usage"
    END = "end"
    EOF = "eof"

    __hash__ = object.__hash__


_S, _I = State, Input
_RT_INPUT: Final = {HEAD: _I.HEAD, DATA: _I.DATA, USAGE: _I.USAGE, END: _I.END}

#: (state, input) -> next state
TRANSITIONS: Final[dict[tuple[State, Input], State]] = {
    (_S.AWAIT_INIT, _I.INIT): _S.AWAIT_HEAD,
    (_S.AWAIT_HEAD, _I.RECORD): _S.AWAIT_HEAD,
    (_S.AWAIT_HEAD, _I.HEAD): _S.BODY,
    (_S.BODY, _I.RECORD): _S.BODY,
    (_S.BODY, _I.DATA): _S.BODY,
    (_S.BODY, _I.USAGE): _S.BODY,
    (_S.BODY, _I.END): _S.DONE,
    (_S.DONE, _I.EOF): _S.CLOSED,
}
_GRAMMAR: Final = (ErrorCode.RECORD_GRAMMAR, "record out of grammar HEAD (DATA|USAGE)* END")
#: (state, input) -> the typed error of that violation (anything else: malformed_event)
VIOLATIONS: Final[dict[tuple[State, Input], tuple[ErrorCode, str]]] = {
    (_S.AWAIT_INIT, _I.RECORD): (ErrorCode.RECORD_BEFORE_INIT, "record before the response init"),
    (_S.AWAIT_INIT, _I.EOF): (ErrorCode.STREAM_TRUNCATED, "response ended before its init"),
    (_S.AWAIT_HEAD, _I.INIT): (ErrorCode.DUPLICATE_INIT, "second response init"),
    (_S.BODY, _I.INIT): (ErrorCode.DUPLICATE_INIT, "second response init"),
    (_S.DONE, _I.INIT): (ErrorCode.DUPLICATE_INIT, "response init after END"),
    (_S.AWAIT_HEAD, _I.DATA): _GRAMMAR,
    (_S.AWAIT_HEAD, _I.USAGE): _GRAMMAR,
    (_S.AWAIT_HEAD, _I.END): _GRAMMAR,
    (_S.BODY, _I.HEAD): (ErrorCode.RECORD_GRAMMAR, "second HEAD"),
    (_S.AWAIT_HEAD, _I.EOF): (ErrorCode.STREAM_TRUNCATED, "response ended before END"),
    (_S.BODY, _I.EOF): (ErrorCode.STREAM_TRUNCATED, "response ended before END"),
    (_S.DONE, _I.RECORD): (ErrorCode.DATA_AFTER_END, "record after END"),
}


class RecordDecryptor:
    """Opens the records of one response, in order, live (client side).

    ``receive_init(resp_init)`` once, then ``receive_record(record)`` per record (each returns
    its event), then ``receive_eof()``. Checks, per record: a record may arrive now (not before
    init: ``record_before_init``; not after END: ``data_after_end``); ``seq`` equals the
    receiver's counter (lower: ``duplicate_record``; higher: ``record_out_of_order``, i.e. a
    drop or a reorder); the AEAD opens under ``(seq, final)`` (``record_auth_failed``: tampering,
    a flipped final flag, a record spliced from another response or request); zero padding
    (``bad_padding``); known type (``unknown_record_type``); END iff final, one HEAD first
    (``record_grammar``). EOF before END is ``stream_truncated``. The first error is sticky.
    """

    __slots__ = (
        "_aead",
        "_cipher",
        "_data_bytes",
        "_error",
        "_max_payload",
        "_prefix",
        "_secrets",
        "_seq",
        "_state",
        "end",
        "head",
        "usage",
    )

    def __init__(
        self, secrets: ResponseSecrets, *, aead: AEAD, max_payload: int = MAX_PAYLOAD
    ) -> None:
        self._secrets = secrets
        self._aead = aead
        self._max_payload = min(max_payload, MAX_PAYLOAD)
        self._cipher: AEADCipher | None = None
        self._prefix = b""
        self._seq = 0
        self._data_bytes = 0
        self._state = State.AWAIT_INIT
        self._error: PQE2EEError | None = None
        self.head: Head | None = None
        self.end: End | None = None
        self.usage: dict[str, Any] | None = None

    # -- public ---------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def complete(self) -> bool:
        """True once the authenticated END has been opened."""
        return self._state in (State.DONE, State.CLOSED)

    @property
    def records(self) -> int:
        return self._seq

    def receive_init(self, resp_init: bytes) -> None:
        self._check()
        try:
            self._init(bytes(resp_init))
        except PQE2EEError as exc:
            self.fail(exc)
            raise

    def receive_record(self, record: bytes) -> RecordEvent:
        self._check()
        try:
            return self._record(bytes(record))
        except PQE2EEError as exc:
            self.fail(exc)
            raise

    def receive_eof(self) -> None:
        self._check()
        try:
            self._on(Input.EOF)
        except PQE2EEError as exc:
            self.fail(exc)
            raise

    def fail(self, exc: PQE2EEError) -> None:
        """Enter the sticky error state (also used when an outer layer failed): later calls
        raise ``exc`` again; the keys are dropped and the response key is wiped."""
        if self._error is None:
            self._state = State.ERROR
            self._error = exc
            self._cipher = None
            self._secrets.key.wipe()

    # -- internals ------------------------------------------------------------------------------

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _on(self, inp: Input) -> None:
        nxt = TRANSITIONS.get((self._state, inp))
        if nxt is None:
            code, msg = VIOLATIONS.get(
                (self._state, inp), (ErrorCode.MALFORMED_EVENT, f"unexpected {inp.value}")
            )
            raise StreamError(msg, code=code)
        self._state = nxt

    def _init(self, resp_init: bytes) -> None:
        self._on(Input.INIT)
        if len(resp_init) != RESP_INIT_LEN or resp_init[: len(RESP_PREFIX)] != RESP_PREFIX:
            raise StreamError("response init is malformed", code=ErrorCode.MALFORMED_EVENT)
        kind = resp_init[len(RESP_PREFIX)]
        expected = KIND_STREAM if self._secrets.stream else KIND_SINGLE
        if kind != expected:
            raise StreamError(
                "response kind does not match the request", code=ErrorCode.MALFORMED_EVENT
            )
        ss_r = self._secrets.key.decapsulate(resp_init[len(RESP_PREFIX) + 1 :])
        self._secrets.key.wipe()  # forward secrecy: the response key is single-use
        keys = derive_response_keys(self._secrets.exporter, ss_r, resp_init)
        self._cipher = self._aead.new(keys.key)
        self._prefix = keys.nonce_prefix

    def _record(self, record: bytes) -> RecordEvent:
        self._on(Input.RECORD)
        if len(record) < RECORD_OVERHEAD:
            raise StreamError("record is shorter than 26 bytes", code=ErrorCode.MALFORMED_EVENT)
        rflags = record[0]
        if rflags & ~FLAG_FINAL:
            raise StreamError("record flags have reserved bits set", code=ErrorCode.MALFORMED_EVENT)
        seq = int.from_bytes(record[1:5], "big")
        if seq != self._seq:
            if seq < self._seq:
                raise StreamError(
                    f"record {seq} repeated (expected {self._seq})", code=ErrorCode.DUPLICATE_RECORD
                )
            raise StreamError(
                f"record {seq} arrived, expected {self._seq} (dropped or reordered)",
                code=ErrorCode.RECORD_OUT_OF_ORDER,
            )
        final = bool(rflags & FLAG_FINAL)
        assert self._cipher is not None
        try:
            inner = self._cipher.decrypt(
                record_nonce(self._prefix, seq, final), record[5:], record[:5]
            )
        except DecryptError:
            raise DecryptError(
                f"record {seq} did not authenticate", code=ErrorCode.RECORD_AUTH_FAILED
            ) from None
        rtype = inner[0]
        plen = int.from_bytes(inner[1:5], "big")
        if plen > self._max_payload:
            raise LimitExceeded(f"record payload is larger than {self._max_payload} bytes")
        end = INNER_HEADER_LEN + plen
        if end > len(inner):
            raise StreamError("record plen runs past the end", code=ErrorCode.MALFORMED_EVENT)
        if any(inner[end:]):
            raise MalformedError("record padding is not all zero", code=ErrorCode.BAD_PADDING)
        if rtype not in _RTYPES:
            raise StreamError(f"unknown record type {rtype:#x}", code=ErrorCode.UNKNOWN_RECORD_TYPE)
        if final != (rtype == END):
            raise StreamError(
                "END must be the final record and only END", code=ErrorCode.RECORD_GRAMMAR
            )
        self._on(_RT_INPUT[rtype])
        payload = inner[INNER_HEADER_LEN:end]
        self._seq += 1
        if rtype == DATA:
            self._data_bytes += plen
            return Data(payload)
        if rtype == HEAD:
            doc = self._decode(_head_decoder, payload, "HEAD")
            if not 100 <= doc.status <= 599 or doc.content_encoding not in CONTENT_ENCODINGS:
                raise MalformedError(
                    "HEAD has a bad status or encoding", code=ErrorCode.MALFORMED_PAYLOAD
                )
            if self._secrets.stream and doc.content_encoding != "identity":
                raise MalformedError(
                    "stream HEAD must be identity-encoded", code=ErrorCode.MALFORMED_PAYLOAD
                )
            self.head = Head(doc.status, doc.content_type, doc.content_encoding)
            return self.head
        if rtype == USAGE:
            self.usage = self._decode(_usage_decoder, payload, "USAGE")
            return UsageUpdate(self.usage)
        doc_end = self._decode(_end_decoder, payload, "END")
        if doc_end.records != seq or doc_end.data_bytes != self._data_bytes:
            raise StreamError(
                "END counts disagree with the records received", code=ErrorCode.RECORD_GRAMMAR
            )
        err = doc_end.error
        if doc_end.usage is not None:
            self.usage = doc_end.usage
        self.end = End(
            usage=self.usage,
            error=None if err is None else UpstreamError(err.type, err.message, err.status),
            records=doc_end.records,
            data_bytes=doc_end.data_bytes,
        )
        self._cipher = None
        return self.end

    @staticmethod
    def _decode(decoder: Any, payload: bytes, what: str) -> Any:
        try:
            return json_decode(payload, decoder=decoder)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise MalformedError(
                f"{what} payload is malformed", code=ErrorCode.MALFORMED_PAYLOAD
            ) from None


# -- single (non-stream) responses ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseV2:
    """An opened single response: the upstream status and body, authenticated."""

    status: int
    content_type: str | None
    body: bytes
    usage: dict[str, Any] | None
    error: UpstreamError | None

    def raise_for_error(self) -> None:
        """Raise RemoteError (``upstream_error``) when END reported an upstream failure."""
        if self.error is not None:
            raise RemoteError(
                f"upstream failed: {self.error.type}",
                code=ErrorCode.UPSTREAM_ERROR,
                status=self.error.status,
                detail={"type": self.error.type, "message": self.error.message},
            )


def seal_response_v2(
    sealer: ResponseSealer,
    *,
    status: int,
    body: bytes,
    content_type: str | None = "application/json",
    usage: dict[str, Any] | None = None,
    error: UpstreamError | None = None,
    compress: bool = False,
    compresslevel: int = 1,
    max_record: int = MAX_PAYLOAD,
) -> bytes:
    """A complete single response: ``resp_init || (u32 len || record)+``."""
    if sealer.stream:
        raise LocalProtocolError("this sealer is for a stream", code=ErrorCode.INVALID_ARGUMENT)
    payload = gzip_compress(body, compresslevel) if compress else bytes(body)
    step = max(1, min(max_record, MAX_PAYLOAD))
    records = [sealer.head(status, content_type, "gzip" if compress else "identity")]
    records += [sealer.data(payload[i : i + step]) for i in range(0, len(payload), step)]
    records.append(sealer.end(usage=usage, error=error))
    return sealer.resp_init + b"".join(len(r).to_bytes(4, "big") + r for r in records)


def open_response_v2(
    data: bytes,
    secrets: ResponseSecrets,
    *,
    aead: AEAD,
    max_body: int = DEFAULT_MAX_BODY,
) -> ResponseV2:
    """Open a single response (client side). Every record is checked; nothing is returned
    unless END authenticated."""
    if len(data) > 2 * max_body + RESP_INIT_LEN + (1 << 20):
        raise LimitExceeded(f"response is larger than the {max_body}-byte limit allows")
    dec = RecordDecryptor(secrets, aead=aead)
    if len(data) < RESP_INIT_LEN:
        dec.receive_eof()  # raises stream_truncated: cut inside (or before) the init
    dec.receive_init(data[:RESP_INIT_LEN])
    pos = RESP_INIT_LEN
    parts: list[bytes] = []
    total = 0
    while pos < len(data):
        if dec.complete:
            dec.receive_record(data[pos:])  # raises data_after_end
        if pos + 4 > len(data):
            dec.receive_eof()  # raises stream_truncated
        n = int.from_bytes(data[pos : pos + 4], "big")
        if pos + 4 + n > len(data):
            dec.receive_eof()
        ev = dec.receive_record(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
        if isinstance(ev, Data):
            total += len(ev.data)
            if total > 2 * max_body + (1 << 20):
                raise LimitExceeded("response body is too large")
            parts.append(ev.data)
    dec.receive_eof()
    head, end = dec.head, dec.end
    assert head is not None and end is not None
    body = b"".join(parts)
    if head.content_encoding == "gzip":
        body = gunzip_bounded(body, limit=max_body, what="response body")
    elif len(body) > max_body:
        raise LimitExceeded(f"response body is larger than {max_body} bytes")
    return ResponseV2(head.status, head.content_type, body, end.usage, end.error)
