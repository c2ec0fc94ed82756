"""Property tests for the v1 stream decryptor (hypothesis).

Streams are realistic vLLM SSE (content words, a usage chunk, ``data: [DONE]``), sealed with
StreamEncoder (one record per line, plaintext usage events, as the real runtime does) or sealed
as records cut at random points (as a custom cord may do), with a deterministic ``random_bytes``.

(a) chunking never changes the outcome; (b) a single bit flip anywhere gives a typed error, or -
only in bytes v1 ignores by design - the same authenticated content; (c) a truncation is an error
unless the inner ``data: [DONE]\\n`` was fully received; (d) duplicated records are always caught,
dropped or reordered records never make the decryptor invent content (v1 cannot detect those: the
records carry no sequence number - see chutes-v1-notes.md section 7).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.errors import (
    DecryptError,
    ErrorCode,
    LimitExceeded,
    MalformedError,
    PQE2EEError,
    StreamError,
)
from pqe2ee.protocol import (
    NEED_DATA,
    Done,
    EndOfStream,
    InnerEvent,
    StreamDecryptor,
    StreamEncoder,
    StreamEvent,
    StreamSealer,
    Usage,
)

KEM = get_kem("pyca")
AEAD = get_aead("pyca")
SEED = hashlib.sha512(b"pqe2ee property tests").digest()
PK = KEM.from_seed(SEED).public_key
TYPED = (StreamError, DecryptError, LimitExceeded, MalformedError)

# PQE2EE_PROPERTY_EXAMPLES raises the example count for a longer hunt (the suite uses 200).
SETTINGS = settings(
    max_examples=int(os.environ.get("PQE2EE_PROPERTY_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def det_random(seed: int) -> Callable[[int], bytes]:
    counter = itertools.count()
    return lambda n: hashlib.sha256(b"%d/%d" % (seed, next(counter))).digest()[:n]


def vllm_stream(words: list[str]) -> bytes:
    def line(obj: dict[str, object]) -> bytes:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        return b"data: " + text.encode() + b"\n\n"

    out = []
    for i, word in enumerate(["", *words]):
        out.append(
            line(
                {
                    "id": "chatcmpl-9",
                    "object": "chat.completion.chunk",
                    "created": 1718000000,
                    "model": "org/model",
                    "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
                    "usage": {"prompt_tokens": 11, "total_tokens": 11 + i, "completion_tokens": i},
                }
            )
        )
    n = len(words)
    out.append(
        line(
            {
                "id": "chatcmpl-9",
                "choices": [],
                "usage": {"prompt_tokens": 11, "total_tokens": 11 + n, "completion_tokens": n},
            }
        )
    )
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


@dataclass(frozen=True)
class Sealed:
    inner: bytes
    outer: bytes
    records: tuple[bytes, ...]  # plaintexts, in order
    per_line: bool  # StreamEncoder (with usage events) or records cut at random points


words_st = st.lists(st.text(max_size=12), max_size=6)


@st.composite
def sealed_streams(draw: st.DrawFn) -> Sealed:
    inner = vllm_stream(draw(words_st))
    sealer = StreamSealer(
        PK, kem=KEM, aead=AEAD, random_bytes=det_random(draw(st.integers(0, 2**32)))
    )
    if draw(st.booleans()):
        enc = StreamEncoder(sealer)
        outer = enc.start() + enc.feed(inner) + enc.finish()
        return Sealed(inner, outer, tuple(inner.splitlines(keepends=True)), True)
    cuts = sorted(draw(st.sets(st.integers(1, len(inner) - 1), max_size=12)))
    records = tuple(inner[a:b] for a, b in zip([0, *cuts], [*cuts, len(inner)], strict=True))
    outer = sealer.init_event() + b"".join(sealer.seal_record(r) for r in records)
    return Sealed(inner, outer, records, False)


def decryptor() -> StreamDecryptor:
    return StreamDecryptor(KEM.from_seed(SEED), aead=AEAD)


def collect(pieces: Iterable[bytes]) -> tuple[list[StreamEvent], PQE2EEError | None]:
    """Feed ``pieces`` then EOF; the events pulled before any error, and the error."""
    dec = decryptor()
    out: list[StreamEvent] = []
    try:
        for piece in pieces:
            dec.receive_data(piece)
            while (ev := dec.next_event()) is not NEED_DATA:
                out.append(ev)  # type: ignore[arg-type]
        dec.receive_eof()
        while (ev := dec.next_event()) is not NEED_DATA:
            out.append(ev)  # type: ignore[arg-type]
    except PQE2EEError as exc:
        assert isinstance(exc, TYPED), repr(exc)
        return out, exc
    return out, None


def authenticated(events: list[StreamEvent]) -> list[StreamEvent]:
    """What the AEAD vouches for, plus the end marker; Usage events are plaintext."""
    return [e for e in events if not isinstance(e, Usage)]


def inner_bytes(events: list[StreamEvent]) -> bytes:
    return b"".join(e.raw for e in events if isinstance(e, InnerEvent | Done))


def outcome(pieces: Iterable[bytes]) -> object:
    events, err = collect(pieces)
    return ("error", err.code) if err is not None else ("ok", events)


@settings(max_examples=50, deadline=None)
@given(sealed_streams())
def test_generated_streams_decrypt(s: Sealed) -> None:
    events, err = collect([s.outer])
    assert err is None
    assert inner_bytes(events) == s.inner
    assert events[-2:] == [Done(raw=b"data: [DONE]\n\n"), EndOfStream(complete=True)]


def offsets(data: bytes) -> st.SearchStrategy[int]:
    """An offset into ``data``, spread evenly over its lines (then anywhere within the line, its
    newline included), so that every outer event gets its share of the examples."""
    starts = [0, *(i + 1 for i, b in enumerate(data) if b == 0x0A)]
    bounds = [(a, b) for a, b in zip(starts, [*starts[1:], len(data)], strict=True) if b > a]
    return st.sampled_from(bounds).flatmap(lambda ab: st.integers(ab[0], ab[1] - 1))


# -- (a) chunking ---------------------------------------------------------------------------------


def split(data: bytes, points: Iterable[int]) -> list[bytes]:
    cuts = sorted(set(points))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@SETTINGS
@given(sealed_streams(), st.data())
def test_chunking_does_not_change_events(s: Sealed, data: st.DataObject) -> None:
    points = data.draw(st.lists(st.integers(0, len(s.outer)), max_size=40))
    whole, err = collect([s.outer])
    assert err is None
    assert collect(split(s.outer, points)) == (whole, None)
    assert collect([s.outer[:-300], *(bytes([b]) for b in s.outer[-300:])]) == (whole, None)


@SETTINGS
@given(sealed_streams(), st.data())
def test_chunking_does_not_change_errors(s: Sealed, data: st.DataObject) -> None:
    bit = data.draw(offsets(s.outer)) * 8 + data.draw(st.integers(0, 7))
    corrupt = bytearray(s.outer)
    corrupt[bit // 8] ^= 1 << (bit % 8)
    points = data.draw(st.lists(st.integers(0, len(corrupt)), max_size=40))
    assert outcome(split(bytes(corrupt), points)) == outcome([bytes(corrupt)])


# -- (b) bit flips --------------------------------------------------------------------------------


def ignorable_bytes(outer: bytes) -> set[int]:
    """Offsets where a flip may go unnoticed by design: plaintext usage events, base64 padding
    bits of the last character before '=', the newline ending a data line (0x0A -> 0x0B: the
    vertical tab is trimmed like other whitespace around the payload, and the blank line that
    follows ends the line instead) and the outer stream's final newline (a line cut short after
    the authenticated end)."""
    spans: set[int] = {len(outer) - 1}
    pos = 0
    for line in outer.split(b"\n"):
        if line.startswith(b'data: {"usage":'):
            spans.update(range(pos, pos + len(line)))
        elif line.endswith(b'="}'):
            spans.add(pos + len(line.rstrip(b'="}')) - 1)
        if line:
            spans.add(pos + len(line))
        pos += len(line) + 1
    return spans


@SETTINGS
@given(sealed_streams(), st.data())
def test_single_bit_flip(s: Sealed, data: st.DataObject) -> None:
    pos = data.draw(offsets(s.outer))
    corrupt = bytearray(s.outer)
    corrupt[pos] ^= 1 << data.draw(st.integers(0, 7))
    events, err = collect([bytes(corrupt)])
    if err is not None:
        event(f"flip -> {err.code.value}")
        return
    event("flip ignored")
    assert pos in ignorable_bytes(s.outer), (pos, bytes(corrupt[pos - 20 : pos + 5]))
    original, _ = collect([s.outer])
    assert authenticated(events) == authenticated(original)


# -- (c) truncation -------------------------------------------------------------------------------


def done_point(s: Sealed) -> int:
    """Outer offset from which a cut still holds all of ``data: [DONE]\\n``: the end of the
    line (without its newline) of the record that completes it."""
    done_end = s.inner.rindex(b"data: [DONE]\n") + len(b"data: [DONE]\n")
    covered = 0
    for k, plaintext in enumerate(s.records):  # noqa: B007 - k is used after the loop
        covered += len(plaintext)
        if covered >= done_end:
            break
    # the k-th record line (0-based, init excluded) in the outer stream
    starts = [i for i in range(len(s.outer)) if s.outer.startswith(b'data: {"e2e":"', i)]
    return s.outer.index(b"\n", starts[k])


@SETTINGS
@given(sealed_streams(), st.data())
def test_truncation(s: Sealed, data: st.DataObject) -> None:
    cut = data.draw(st.one_of(offsets(s.outer), st.just(len(s.outer))))
    full, _ = collect([s.outer])
    # fed line by line, so the events seen before an error can be compared with the full list
    pieces = s.outer[:cut].splitlines(keepends=True)
    events, err = collect(pieces)
    if cut >= done_point(s):
        assert err is None, err
        assert events == full
        assert events[-1] == EndOfStream(complete=True)
    else:
        assert err is not None
        assert events == full[: len(events)]
        assert not any(isinstance(e, Done | EndOfStream) for e in events)


# -- (d) replayed, dropped and reordered records ---------------------------------------------------


def outer_events(outer: bytes) -> list[bytes]:
    return [part + b"\n\n" for part in outer.split(b"\n\n") if part]


@SETTINGS
@given(sealed_streams(), st.sampled_from(["drop", "duplicate", "move"]), st.data())
def test_record_replay_drop_reorder(s: Sealed, op: str, data: st.DataObject) -> None:
    evs = outer_events(s.outer)
    plaintext = dict(
        zip((e for e in evs if e.startswith(b'data: {"e2e":"')), s.records, strict=True)
    )
    rec_idx = [i for i, e in enumerate(evs) if e in plaintext]
    i = data.draw(st.sampled_from(rec_idx))
    j = data.draw(st.integers(1, len(evs)))  # anywhere after the init event
    edited = list(evs)
    if op == "drop":
        del edited[i]
    elif op == "duplicate":
        edited.insert(j, evs[i])
    else:
        moved = edited.pop(i)
        edited.insert(min(j, len(edited)), moved)
    events, err = collect([b"".join(edited)])
    if op == "duplicate":
        # the second copy always carries a nonce already seen (or the first one is data after a
        # premature [DONE]): a replay never goes through
        assert err is not None
        event(f"duplicate -> {err.code.value}")
        return
    if err is not None:
        event(f"{op} -> {err.code.value}")
        return
    # Not detected (v1 has no record sequence numbers). The decryptor still never invents
    # anything: what it delivers is exactly the records it received, in the order received.
    expected = b"".join(plaintext[e] for e in edited if e in plaintext)
    got = inner_bytes(events)
    if expected.startswith(got):
        rest = expected[len(got) :]  # whitespace-only records may follow the inner [DONE]
    else:  # the stream ended right after "data: [DONE]\n": Done.raw has the final blank line
        assert got.endswith(b"data: [DONE]\n\n")
        assert expected.startswith(got[:-1])
        rest = expected[len(got) - 1 :]
    assert not rest.strip()
    assert events[-1] == EndOfStream(complete=True)
    event(f"{op} undetected, {'same' if got == s.inner else 'different'} plaintext")


def test_dropping_the_done_record_is_detected() -> None:
    inner = vllm_stream(["a", "b"])
    sealer = StreamSealer(PK, kem=KEM, aead=AEAD, random_bytes=det_random(1))
    enc = StreamEncoder(sealer)
    evs = outer_events(enc.start() + enc.feed(inner) + enc.finish())
    done_record = len(evs) - 2  # [..., "data: [DONE]\n", "\n"]
    edited = evs[:done_record] + evs[done_record + 1 :]
    events, err = collect([b"".join(edited)])
    assert err is not None
    assert err.code is ErrorCode.STREAM_TRUNCATED
    assert not any(isinstance(e, Done) for e in events)


def test_a_dropped_line_is_not_detectable_in_v1() -> None:
    """Documents the v1 limitation (notes section 7.1): a relay that drops one content line and
    its blank-line record leaves a stream that decrypts as complete."""
    inner = vllm_stream(["a", "b"])
    sealer = StreamSealer(PK, kem=KEM, aead=AEAD, random_bytes=det_random(2))
    enc = StreamEncoder(sealer, emit_usage=False)
    evs = outer_events(enc.start() + enc.feed(inner) + enc.finish())
    edited = evs[:3] + evs[5:]  # init, line 0, blank 0, [line 1, blank 1 dropped], ...
    events, err = collect([b"".join(edited)])
    assert err is None
    assert events[-1] == EndOfStream(complete=True)
    assert b'"content":"a"' not in inner_bytes(events)
    assert b'"content":"a"' in inner
