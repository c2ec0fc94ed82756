"""v1 streaming: the instance-side sealer and the client-side decryptor state machine.

Outer stream (what the relay carries), one SSE event per line pair::

    data: {"e2e_init":"<b64 kem_ciphertext>"}        once, first
    data: {"e2e":"<b64 nonce || ciphertext || tag>"}  one per record
    data: {"usage":{...}}                             plaintext, unauthenticated, interleaved
    data: {"e2e_error":{...}}                         a reported failure

Records decrypt to bytes that are concatenated into the *inner* stream (the engine's own SSE);
only that reassembled byte stream is parsed as SSE. The stream key is
``derive_key(ss, kem_ct, "e2e-stream-v1")``.

:class:`StreamDecryptor` follows h11's pattern: ``receive_data`` buffers, ``next_event`` returns
an event or :data:`NEED_DATA`; errors are sticky.
"""

from __future__ import annotations

import binascii
import enum
import functools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from pqe2ee.backends.base import (
    AEAD,
    CHACHA_NONCE_LEN,
    CHACHA_TAG_LEN,
    KEM,
    MLKEM768_CT_LEN,
    KEMPrivateKey,
    TagErrors,
    tag_mismatch,
)
from pqe2ee.backends.kdf import RandomBytes
from pqe2ee.backends.kdf import random_bytes as system_random
from pqe2ee.errors import ErrorCode, LimitExceeded, LocalProtocolError, PQE2EEError, StreamError
from pqe2ee.protocol._codec import (
    a2b_base64_compact,
    a2b_base64_quoted,
    b64decode,
    b64encode,
    extract_usage,
)
from pqe2ee.protocol._events import (
    Done,
    EndOfStream,
    EventQueue,
    InnerEvent,
    data_event,
    inner_event,
    outer_event,
)
from pqe2ee.protocol.kdf import INFO_STREAM, derive_key
from pqe2ee.protocol.sse import LineSplitter, SSEParser

__all__ = [
    "DEFAULT_MAX_RECORD",
    "RemoteErrorEvent",
    "StreamDecryptor",
    "StreamEncoder",
    "StreamEvent",
    "StreamSealer",
    "Usage",
]


DEFAULT_MAX_RECORD: Final = 16 * 1024 * 1024
DEFAULT_MAX_RECORDS: Final = 1_000_000

_INIT_PREFIX: Final = b'data: {"e2e_init":"'
_RECORD_PREFIX: Final = b'data: {"e2e":"'
_QUOTE_START: Final = len(_RECORD_PREFIX) - 1  # a record's base64 with its quotes: line[13:-1]
_RECORD_LEN: Final = len(_RECORD_PREFIX)
_INIT_QUOTE_START: Final = len(_INIT_PREFIX) - 1  # the same for the init event's
_USAGE_PREFIX: Final = b'data: {"usage"'
#: A usage event in its compact spelling: ``data: {"usage":<one JSON value>}``.
_USAGE_START: Final = b'data: {"usage":'
_USAGE_VALUE: Final = len(_USAGE_START)  # the value: line[_USAGE_VALUE:-1]
_USAGE_OBJECT: Final = _USAGE_START[6:]  # the same without "data: "
_EVENT_SUFFIX: Final = b'"}\n\n'
_MIN_RECORD: Final = CHACHA_NONCE_LEN + CHACHA_TAG_LEN
# SSE fields other than "data" that an outer stream may carry; they hold nothing for v1. Any other
# field name means the stream is corrupt (e.g. a flipped bit in "data:" must not drop a record).


# --------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Usage:
    """A plaintext usage event from the outer stream. NOT authenticated: for billing display only."""

    usage: Any


@dataclass(frozen=True, slots=True)
class RemoteErrorEvent:
    """An ``e2e_error`` (or relay ``error``) event. NOT authenticated."""

    error: Any


StreamEvent = InnerEvent | Done | Usage | RemoteErrorEvent | EndOfStream


# --------------------------------------------------------------------------------------------
# Instance side


#: How many bytes of the system CSPRNG a sealer reads at once for its record nonces.
_NONCE_POOL: Final = 32 * CHACHA_NONCE_LEN
_RECORD_OPEN: Final = _RECORD_PREFIX[:-1]  # a record event: this + the record as a JSON string
_RECORD_CLOSE: Final = _EVENT_SUFFIX[1:]  # ... + this
_USAGE_CLOSE: Final = b"}\n\n"  # a usage event: _USAGE_START + the usage's JSON + this
_json_encode: Final = msgspec.json.encode


class StreamSealer:
    """Seals records into outer SSE events for one response stream (instance side).

    With the default ``random_bytes`` the nonces are read ``_NONCE_POOL`` bytes at a time (one
    system call per 32 records instead of one each, once the largest single cost of sealing a
    short record; each byte is handed out once) and sealed by the cipher library's own call
    (:meth:`AEADCipher.sealer`: they are 12 bytes by construction). A ``random_bytes`` passed
    in is called once per record for 12 bytes, as before, and its nonces go through
    :meth:`AEADCipher.encrypt`, which checks them.
    """

    __slots__ = ("_at", "_encrypt", "_kem_ct", "_pool", "_pool_size", "_random")

    def __init__(
        self,
        response_public_key: bytes,
        *,
        kem: KEM,
        aead: AEAD,
        random_bytes: RandomBytes = system_random,
    ) -> None:
        kem_ct, shared_secret = kem.encapsulate(response_public_key)
        self._kem_ct = kem_ct
        cipher = aead.new(derive_key(shared_secret, kem_ct, INFO_STREAM))
        self._random = random_bytes
        self._encrypt: Callable[[bytes, bytes, bytes | None], bytes]
        if random_bytes is system_random:
            self._pool_size, self._encrypt = _NONCE_POOL, cipher.sealer()
        else:
            self._pool_size, self._encrypt = CHACHA_NONCE_LEN, cipher.encrypt
        self._pool = b""  # the nonces not handed out yet: _pool[_at:]
        self._at = 0

    def init_event(self) -> bytes:
        """``data: {"e2e_init":"<b64 kem ct>"}\\n\\n`` - send it first."""
        return b"".join((_INIT_PREFIX, b64encode(self._kem_ct), _EVENT_SUFFIX))

    def seal_record(self, plaintext: bytes) -> bytes:
        """One ``data: {"e2e":"..."}\\n\\n`` event carrying ``plaintext``."""
        return self.seal_lines((plaintext,))

    def seal_lines(self, plaintexts: Sequence[bytes], *, usage: bool = False) -> bytes:
        """:meth:`seal_record`'s events of each of ``plaintexts`` in turn, joined; with
        ``usage``, a plaintext that is an engine line carrying ``usage`` is preceded by its
        :meth:`usage_event` (see :class:`StreamEncoder`).

        Written as one loop on purpose (the instance's per-record path: an engine chunk's lines
        sealed in one frame, one join): the chunk's nonces are taken from the pool first, in
        one step, so none is handed out twice whatever fails later."""
        at = self._at
        end = at + len(plaintexts) * CHACHA_NONCE_LEN
        if end > len(self._pool):
            at, end = self._refill(end - at)
        self._at = end
        pool, encrypt = self._pool, self._encrypt
        out: list[bytes] = []
        for plaintext in plaintexts:
            if usage and plaintext != b"\n":  # (a blank line, an event's end, has no usage)
                value = extract_usage(plaintext)
                if value is not None:
                    out += (_USAGE_START, _json_encode(value), _USAGE_CLOSE)
            nxt = at + CHACHA_NONCE_LEN
            nonce = pool[at:nxt]
            # msgspec writes bytes as a JSON string of their standard base64 (padded, no
            # newline), faster than binascii.b2a_base64 with its keyword argument.
            out += (
                _RECORD_OPEN,
                _json_encode(nonce + encrypt(nonce, plaintext, None)),
                _RECORD_CLOSE,
            )
            at = nxt
        return b"".join(out)

    def _refill(self, need: int) -> tuple[int, int]:
        """A pool holding the nonces left and fresh ones, ``need`` bytes of nonces at least
        (read ``_pool_size`` bytes at a time): where they start and end in it."""
        parts = [self._pool[self._at :]]
        have = len(parts[0])
        while have < need:
            fresh = self._random(self._pool_size)
            if len(fresh) != self._pool_size:  # a source passed in: the nonce encrypt() checks
                raise LocalProtocolError("nonce must be 12 bytes", code=ErrorCode.INVALID_ARGUMENT)
            parts.append(fresh)
            have += len(fresh)
        self._pool = b"".join(parts)
        return 0, need

    @staticmethod
    def usage_event(usage: Any) -> bytes:
        return b"".join((_USAGE_START, _json_encode(usage), _USAGE_CLOSE))

    @staticmethod
    def error_event(error: Any) -> bytes:
        return b"data: " + msgspec.json.encode({"e2e_error": error}) + b"\n\n"


class StreamEncoder:
    """Turns an engine's SSE byte stream into the outer v1 stream, as the real runtime does.

    One record per engine line (its ``\\n`` included; blank lines are records of their own),
    preceded by a plaintext usage event when the line carries ``usage`` (``emit_usage``).
    ``start()`` gives the init event; ``feed(chunk)`` and ``finish()`` give outer bytes.
    """

    __slots__ = ("_emit_usage", "_lines", "_sealer")

    def __init__(
        self, sealer: StreamSealer, *, max_line: int = DEFAULT_MAX_RECORD, emit_usage: bool = True
    ) -> None:
        self._sealer = sealer
        self._lines = LineSplitter(max_line)
        self._emit_usage = emit_usage

    def start(self) -> bytes:
        return self._sealer.init_event()

    def feed(self, chunk: bytes) -> bytes:
        return self._sealer.seal_lines(self._lines.feed(chunk), usage=self._emit_usage)

    def finish(self) -> bytes:
        tail = self._lines.flush()
        return self._sealer.seal_lines((tail,), usage=self._emit_usage) if tail else b""


# --------------------------------------------------------------------------------------------
# Client side


#: Checks that bytes are one JSON value (whitespace around it allowed), without building it:
#: ``{"usage":`` + one JSON value + ``}`` is a one-key usage object. (No struct per event:
#: a one-field struct decoder did the same check at more cost.)
_json_value = msgspec.json.Decoder(msgspec.Raw)


class _State(enum.Enum):
    AWAIT_INIT = "await_init"
    OPEN = "open"
    DONE = "done"
    FAILED_REMOTE = "failed_remote"  # an e2e_error was reported
    CLOSED = "closed"
    ERROR = "error"

    __hash__ = object.__hash__  # Enum's hashes the name, in Python: slow keys for _TRANSITIONS


class _Input(enum.Enum):
    INIT = "init"
    RECORD = "record"
    USAGE = "usage"
    REMOTE_ERROR = "remote_error"
    EOF = "eof"

    __hash__ = object.__hash__


_S, _I = _State, _Input
# For the per-record and per-usage paths: reading an Enum member off its class costs ~0.1 µs, a
# global much less.
_OPEN, _DONE, _FAILED_REMOTE = _State.OPEN, _State.DONE, _State.FAILED_REMOTE
_EOF, _USAGE = _Input.EOF, _Input.USAGE
# (state, input) -> next state. A missing pair is a protocol violation; the error code for it is
# in _VIOLATIONS (or malformed_event by default). RECORD in OPEN/DONE and EOF in OPEN are refined
# by the handlers (inner [DONE] moves OPEN -> DONE; EOF in OPEN may be a clean cut after [DONE]).
_TRANSITIONS: Final[dict[tuple[_State, _Input], _State]] = {
    (_S.AWAIT_INIT, _I.INIT): _S.OPEN,
    (_S.AWAIT_INIT, _I.USAGE): _S.AWAIT_INIT,
    (_S.AWAIT_INIT, _I.REMOTE_ERROR): _S.FAILED_REMOTE,
    (_S.OPEN, _I.RECORD): _S.OPEN,
    (_S.OPEN, _I.USAGE): _S.OPEN,
    (_S.OPEN, _I.REMOTE_ERROR): _S.FAILED_REMOTE,
    (_S.OPEN, _I.EOF): _S.CLOSED,
    (_S.DONE, _I.RECORD): _S.DONE,
    (_S.DONE, _I.USAGE): _S.DONE,
    (_S.DONE, _I.REMOTE_ERROR): _S.FAILED_REMOTE,
    (_S.DONE, _I.EOF): _S.CLOSED,
    (_S.FAILED_REMOTE, _I.USAGE): _S.FAILED_REMOTE,
    (_S.FAILED_REMOTE, _I.REMOTE_ERROR): _S.FAILED_REMOTE,
    (_S.FAILED_REMOTE, _I.RECORD): _S.FAILED_REMOTE,
    (_S.FAILED_REMOTE, _I.EOF): _S.CLOSED,
}
_VIOLATIONS: Final[dict[tuple[_State, _Input], tuple[ErrorCode, str]]] = {
    (_S.AWAIT_INIT, _I.RECORD): (ErrorCode.RECORD_BEFORE_INIT, "record before e2e_init"),
    (_S.AWAIT_INIT, _I.EOF): (ErrorCode.STREAM_TRUNCATED, "stream ended before e2e_init"),
    (_S.OPEN, _I.INIT): (ErrorCode.DUPLICATE_INIT, "second e2e_init"),
    (_S.DONE, _I.INIT): (ErrorCode.DUPLICATE_INIT, "second e2e_init"),
    (_S.FAILED_REMOTE, _I.INIT): (ErrorCode.DUPLICATE_INIT, "e2e_init after an error"),
}
#: The states a usage event leaves as they are (the table's, for the path that skips _on).
_USAGE_STATES: Final = frozenset(
    state for (state, inp), nxt in _TRANSITIONS.items() if inp is _I.USAGE and nxt is state
)
# ... which are all the states receive_data runs in (not ERROR: the error is raised first; not
# CLOSED: only EOF closes): its per-chunk loop checks a usage line without looking at the state.
assert {_S.AWAIT_INIT, _S.OPEN, _S.DONE, _S.FAILED_REMOTE} <= _USAGE_STATES


class StreamDecryptor(EventQueue[StreamEvent]):
    """Client-side v1 stream state machine.

    Feed network bytes with :meth:`receive_data` (split anywhere), call :meth:`receive_eof` when
    the connection ends, and pull events with :meth:`next_event` until it returns
    :data:`NEED_DATA` or an :class:`EndOfStream`. Every protocol violation raises a
    :class:`~pqe2ee.errors.StreamError` (or LimitExceeded / DecryptError) with a stable code and
    the decryptor stays failed: later calls raise the same error.

    Checks: record before init, second init, repeated record nonce, undecryptable or malformed
    record, invalid UTF-8, non-whitespace data after the inner ``[DONE]``, truncation (EOF before
    the inner ``[DONE]``), and size bounds (``max_record`` per record, ``max_records`` per stream,
    ``max_event`` per inner event). Memory is bounded by these limits.
    """

    def __init__(
        self,
        response_key: KEMPrivateKey,
        *,
        aead: AEAD,
        max_record: int = DEFAULT_MAX_RECORD,
        max_records: int = DEFAULT_MAX_RECORDS,
        max_event: int = DEFAULT_MAX_RECORD,
        decode_usage: bool = True,
    ) -> None:
        self._key = response_key
        # False: nobody reads the plaintext usage events, so they are checked (one-key JSON
        # object) but neither built nor emitted as Usage events (~2 us each).
        self._decode_usage = decode_usage
        self._aead = aead
        self._max_records = max_records
        # base64 of a record + JSON wrapper; generous so a legal record always fits.
        self._max_line = (max_record + _MIN_RECORD) * 4 // 3 + 256
        self._buf = bytearray()  # the unterminated outer line
        self._max_event = max_event
        # The parser's state as the record path needs it (see _records): whether it holds
        # nothing, its last event id, and a "data: ...\n" line held back from it.
        self._inner_idle = True
        self._inner_id: str | None = None
        self._held: tuple[str, bytes] | None = None
        self._cipher: Any = None
        # The cipher's own open (AEADCipher.opener): nonce and length are checked here.
        self._decrypt: Callable[[bytes, bytes, None], bytes] | None = None
        self._tag_errors: TagErrors = ()
        self._seen: set[bytes] = set()  # the record nonces
        self._events: deque[StreamEvent] = deque()
        self._state = _State.AWAIT_INIT
        self._eof = False
        self._error: PQE2EEError | None = None
        self._done_seen = False

    @functools.cached_property
    def _inner(self) -> SSEParser:
        """The inner stream's SSE parser, made when first needed: the records of a usual stream
        take the path that skips it (see _records), and a stream ending at the inner ``[DONE]``
        never looks at it."""
        return SSEParser(max_event=self._max_event)

    # -- public API ---------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def records(self) -> int:
        """How many records were opened (each nonce is kept to refuse a repeat)."""
        return len(self._seen)

    @property
    def complete(self) -> bool:
        """True once the authenticated inner ``[DONE]`` has been seen (and no fault since)."""
        return self._done_seen and self._error is None

    def receive_data(self, data: bytes) -> None:
        """Outer bytes, split anywhere: split into lines (bounded by ``_max_line``), each
        handled in order (one frame per chunk: the hot path of a paced stream)."""
        if self._error is not None:
            raise self._error
        if self._eof:
            raise StreamError("data after EOF", code=ErrorCode.MALFORMED_EVENT)
        if not data:
            return
        try:
            buf = self._buf
            max_line = self._max_line
            if buf:  # (a chunk with nothing held is split as it is; its tail is held below)
                if data.find(b"\n") < 0:  # (find: bytes `in` raises and clears a TypeError)
                    buf += data  # at most one chunk past the bound before refusing
                    if len(buf) > max_line:
                        raise LimitExceeded(f"line longer than {max_line} bytes")
                    return
                buf += data
                data = bytes(buf)
                buf.clear()
            *lines, tail = data.split(b"\n")
            # Checked once for the whole chunk rather than per line: no line of a chunk shorter than
            # the bound is too long, and a chunk without a backslash has no JSON escape anywhere.
            long = len(data) >= max_line
            compact = data.find(b"\\") < 0
            quiet = not self._decode_usage
            records: list[bytes] = []  # record lines in a row, opened together
            for line in lines:
                if not line:
                    continue  # blank lines separate outer events and carry nothing
                over = long and len(line) >= max_line  # with its newline, longer than the bound
                # Prefixes compared as slices and the last bytes as ints: bytes.startswith and
                # endswith parse their arguments (~400 instructions a call, 7 calls an event).
                if (
                    compact
                    and not over
                    and line[:_RECORD_LEN] == _RECORD_PREFIX
                    and line[-1] == 0x7D  # '"}'
                    and line[-2] == 0x22
                ):
                    records.append(line[_QUOTE_START:-1])  # _line's fast path, inlined
                    continue
                if (
                    quiet
                    and not over
                    and line[:_USAGE_VALUE] == _USAGE_START
                    and line[-1] == 0x7D  # "}"
                    and line.isascii()
                ):
                    try:  # _usage_checked, inlined (the state takes a usage line: see above)
                        _json_value.decode(line[_USAGE_VALUE:-1])
                        # Checked, and nothing else to do: neither an event nor a state change
                        # nor an error, so the records on either side stay one run.
                        continue
                    except msgspec.DecodeError:
                        pass  # _line decides (other spellings, stray spaces: the same verdict)
                if records:  # the records before this line first, in order
                    self._records(records, True)
                    records = []
                if over:
                    raise LimitExceeded(f"line longer than {max_line} bytes")
                self._line(line)
            if records:
                self._records(records, True)
            if tail:
                if long and len(tail) > max_line:
                    raise LimitExceeded(f"line longer than {max_line} bytes")
                buf += tail
        except PQE2EEError as exc:
            self._failed(exc)
            raise
        except Exception as exc:
            raise self._unexpected(exc) from exc

    def receive_eof(self) -> None:
        # Written flat (_mark_eof and _guard inlined, _unhold only when a line is held): once
        # per stream, but a short stream's fixed cost.
        if self._error is not None:
            raise self._error
        if self._eof:
            return
        self._eof = True
        try:
            if self._held is not None:
                self._unhold()  # the parser decides what a cut means
            tail = bytes(self._buf)
            self._buf.clear()
            # An unterminated last line is read while the stream still needs it. Once the inner
            # [DONE] is in, it can only be a line cut short after the authenticated end: dropped.
            if tail.strip() and not (self._done_seen or self._inner.partial_is("[DONE]")):
                try:
                    self._line(tail)
                except StreamError as exc:
                    if exc.code is not ErrorCode.MALFORMED_EVENT:
                        raise
                    # A last line that does not parse was cut short: that is truncation.
                    raise self._fail(
                        ErrorCode.STREAM_TRUNCATED, "stream ended inside an outer event"
                    ) from None
                if self._held is not None:
                    self._unhold()  # (the last line was one to hold)
            self._on(_Input.EOF)
        except PQE2EEError as exc:
            self._failed(exc)
            raise
        except Exception as exc:
            raise self._unexpected(exc) from exc

    # -- internals ----------------------------------------------------------------------------

    def _failed(self, exc: PQE2EEError) -> None:
        super()._failed(exc)
        self._state = _State.ERROR
        self._cipher = self._decrypt = None
        self._key.wipe()

    def _fail(self, code: ErrorCode, message: str) -> StreamError:
        return StreamError(message, code=code)

    def _on(self, inp: _Input) -> _State:
        nxt = _TRANSITIONS.get((self._state, inp))
        if nxt is None:
            code, msg = _VIOLATIONS.get(
                (self._state, inp), (ErrorCode.MALFORMED_EVENT, f"unexpected {inp.value}")
            )
            raise self._fail(code, msg)
        if inp is _EOF and self._state is _OPEN:
            # A cut right after the inner "data: [DONE]\n" (before its blank line) is complete.
            if self._inner.partial_is("[DONE]"):
                self._done_seen = True
                self._events.append(Done(raw=self._inner.buffered() + b"\n"))
            else:
                raise self._fail(ErrorCode.STREAM_TRUNCATED, "stream ended before the inner [DONE]")
        if inp is _EOF:
            self._events.append(EndOfStream(complete=self._state is not _FAILED_REMOTE))
        self._state = nxt
        return nxt

    def _line(self, line: bytes) -> None:
        """Handle one outer line (its newline excluded)."""
        # Fast path for the runtime's compact form; a JSON escape (e.g. "\/") takes the slow
        # path, which decodes the string properly.
        if line.startswith(_RECORD_PREFIX) and line.endswith(b'"}') and line.find(b"\\") < 0:
            self._records((line[_QUOTE_START:-1],), True)
            return
        if line.startswith(_INIT_PREFIX) and line.endswith(b'"}') and line.find(b"\\") < 0:
            # The init line's compact form (once per stream): its base64 decoded where it lies,
            # as a record's. What msgspec refuses takes the slow path, for its verdict.
            try:
                kem_ct = a2b_base64_compact(line[_INIT_QUOTE_START:-1])
            except ValueError:
                pass
            else:
                self._on(_Input.INIT)
                self._open(kem_ct)
                return
        if not self._decode_usage and line.startswith(_USAGE_PREFIX) and self._usage_checked(line):
            return
        event = outer_event(line)
        if event is not None:
            self._outer_event(*event)

    def _usage_checked(self, line: bytes) -> bool:
        """Nobody listens for usage: True when ``line`` is a usage event whose shape checks out
        (a one-key JSON object), checked without building it, in a state that takes one as
        it is (the transition table's ``USAGE`` loops). False: the slow path decides."""
        if self._state not in _USAGE_STATES:
            return False
        payload = line[5:].strip()
        if not (payload.startswith(_USAGE_OBJECT) and payload.endswith(b"}") and payload.isascii()):
            return False
        try:
            _json_value.decode(payload[len(_USAGE_OBJECT) : -1])
        except msgspec.DecodeError:
            return False  # the slow path says what is wrong with it
        return True

    def _outer_event(self, key: str, value: Any) -> None:
        if key == "e2e":
            if not isinstance(value, str):
                raise self._fail(ErrorCode.MALFORMED_EVENT, "e2e record must be a string")
            self._records((b'"' + value.encode("ascii", "replace") + b'"',))
        elif key == "e2e_init":
            if not isinstance(value, str):
                raise self._fail(ErrorCode.MALFORMED_EVENT, "e2e_init must be a string")
            self._init(value.encode("ascii", "replace"))
        elif key == "usage":
            self._on(_USAGE)
            self._events.append(Usage(value))
        elif key in ("e2e_error", "error"):
            self._on(_Input.REMOTE_ERROR)
            self._events.append(RemoteErrorEvent(value))
        else:
            raise self._fail(ErrorCode.MALFORMED_EVENT, "unknown outer event")

    def _b64(self, b64: bytes, *, what: str) -> bytes:
        try:
            return b64decode(b64, what=what, code=ErrorCode.MALFORMED_EVENT)
        except StreamError as exc:  # sticky, like every other bad event
            raise self._fail(exc.code, exc.message) from None

    def _init(self, b64: bytes) -> None:
        self._on(_Input.INIT)
        self._open(self._b64(b64, what="e2e_init"))

    def _open(self, kem_ct: bytes) -> None:
        """The stream key from the init event's KEM ciphertext (the state moved already)."""
        if len(kem_ct) != MLKEM768_CT_LEN:
            raise self._fail(
                ErrorCode.MALFORMED_EVENT, f"e2e_init must hold {MLKEM768_CT_LEN} bytes"
            )
        shared_secret = self._key.decapsulate(kem_ct)
        self._key.wipe()
        self._cipher = self._aead.new(derive_key(shared_secret, kem_ct, INFO_STREAM))
        self._decrypt, self._tag_errors = self._cipher.opener()

    def _records(self, quoted: Iterable[bytes], compact: bool = False) -> None:
        """``e2e`` records in a row, each one's base64 given with the quotes around it in its
        JSON line (``compact``: with no backslash between them): the hot path of a stream,
        one call for the records of a network chunk (hence the local names).

        The state and the held line live in locals here: the held line is written back at the
        end (and before ``_unhold``, which reads it), the state re-read after a call that moves
        it. A fault fails the decryptor for good: nothing reads either after one."""
        seen, events = self._seen, self._events
        decrypt, tag_errors, max_records = self._decrypt, self._tag_errors, self._max_records
        state, held = self._state, self._held
        for b64 in quoted:
            if state is not _OPEN:  # (OPEN, RECORD) -> OPEN; the table decides the rest
                state = self._on(_Input.RECORD)
                if state is _FAILED_REMOTE:
                    continue
            try:  # codec.b64decode, inlined (compact: its backslash check was done per chunk)
                raw = a2b_base64_compact(b64) if compact else a2b_base64_quoted(b64)
            except (binascii.Error, ValueError):
                raw = self._strict_b64(b64)
            if len(raw) < _MIN_RECORD:
                raise self._fail(ErrorCode.MALFORMED_EVENT, "e2e record shorter than nonce and tag")
            nonce = raw[:CHACHA_NONCE_LEN]
            if nonce in seen:
                raise self._fail(ErrorCode.DUPLICATE_RECORD, "record nonce repeated")
            if len(seen) >= max_records:  # (seen: the records opened so far)
                raise LimitExceeded(f"stream has more than {max_records} records")
            assert decrypt is not None  # set with the cipher, by the init event
            try:
                plaintext = decrypt(nonce, raw[CHACHA_NONCE_LEN:], None)
            except tag_errors:
                raise tag_mismatch() from None
            seen.add(nonce)
            if state is _DONE:
                if plaintext.strip():
                    raise self._fail(ErrorCode.DATA_AFTER_DONE, "data after the inner [DONE]")
                continue

            # The inner stream. While the SSE parser holds nothing, the records streams are
            # made of skip it, giving the events it would give: a whole one-line event
            # "data: ...\n\n", or an engine line "data: ...\n" (held here) followed by a
            # record "\n".
            if held is not None:
                if plaintext == b"\n":
                    text, line = held
                    held = None
                    if text == "[DONE]":
                        self._dispatch(text, line + plaintext)
                        state = _DONE
                    else:  # _dispatch's usual case, inlined (once per event of such a stream)
                        events.append(data_event(text, self._inner_id, line + plaintext))
                    continue
                self._held, held = held, None
                self._unhold()
            elif self._inner_idle and plaintext[:6] == b"data: ":  # (no startswith: see above)
                n = len(plaintext)
                nl = plaintext.find(b"\n")
                if (
                    nl >= n - 2
                    and (nl == n - 1 or plaintext[n - 1] == 0x0A)
                    and plaintext[nl - 1] != 0x0D  # "\r\n" line ends take the parser
                    and n < self._max_event  # (room for the "\n" a held line waits for)
                ):
                    try:
                        text = plaintext[6:nl].decode("utf-8")
                    except UnicodeDecodeError:
                        raise self._fail(
                            ErrorCode.INVALID_UTF8, "stream text is not valid UTF-8"
                        ) from None
                    if nl == n - 1:
                        held = (text, plaintext)
                    else:
                        self._dispatch(text, plaintext)
                        state = self._state
                    continue

            parser = self._inner
            inner = parser.feed(plaintext)
            self._inner_idle = not parser.has_partial
            self._inner_id = parser.last_event_id
            for ev in inner:
                if self._state is _DONE:
                    raise self._fail(ErrorCode.DATA_AFTER_DONE, "event after the inner [DONE]")
                if ev.data == "[DONE]":
                    self._state = _DONE
                    self._done_seen = True
                    events.append(Done(raw=ev.raw))
                else:
                    events.append(inner_event(ev))
            state = self._state
            if state is _DONE and parser.buffered().strip():
                # the rest of the record that carried [DONE]: a partial event, a comment, ...
                raise self._fail(ErrorCode.DATA_AFTER_DONE, "data after the inner [DONE]")
        self._held = held

    def _strict_b64(self, quoted: bytes) -> bytes:
        """A record's base64 that msgspec refused: binascii's verdict (the error path)."""
        try:
            return a2b_base64_quoted(quoted)
        except (binascii.Error, ValueError):
            raise self._fail(ErrorCode.MALFORMED_EVENT, "e2e record is not valid base64") from None

    def _dispatch(self, text: str, raw: bytes) -> None:
        """The event of one ``data`` line, built here as the parser would (it holds nothing)."""
        if text == "[DONE]":
            self._state = _DONE
            self._done_seen = True
            self._events.append(Done(raw=raw))
        else:
            self._events.append(data_event(text, self._inner_id, raw))

    def _unhold(self) -> None:
        """Give the held line to the parser (one ``data`` line: no event yet)."""
        if self._held is not None:
            self._inner.feed(self._held[1])
            self._held = None
            self._inner_idle = False
