"""Records whose boundaries ignore inner lines, made where they can be made: at the instance.

A relay cannot re-seal, so records that split one inner SSE line over several records, or hold
several lines in one, come from the instance side:

* v1 seals one record per engine line (:class:`~pqe2ee.protocol.StreamEncoder`);
  :class:`RechunkingEncoder` replaces it (``pqe2ee.server.instance.StreamEncoder`` is the
  documented substitution point) with records of cycling sizes, as a custom Chutes cord that
  yields arbitrary chunks would.
* v2 seals one DATA record per upstream chunk, so :class:`RechunkingEngine` (an ASGI wrapper
  around the engine) re-chunks the engine's SSE body: tiny pieces, or the whole body at once,
  and the real instance encoder turns them into records.

Both are legal server behaviour (SPEC §9.1, spec/v2.md §5.3: a record carries bytes of the inner
stream, not events); a client that assumes one event per record garbles or drops text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio

from pqe2ee.protocol import LineSplitter, StreamEncoder, StreamSealer, extract_usage

__all__ = [
    "MergingEncoder",
    "RechunkingEncoder",
    "RechunkingEngine",
    "SplittingEncoder",
    "instance_encoder",
]

ASGI = Callable[..., Any]


class RechunkingEncoder(StreamEncoder):
    """A :class:`StreamEncoder` whose records ignore line boundaries.

    Record sizes cycle through :attr:`SIZES`, so one record may hold part of a line, a line
    and a half, or several events; plaintext usage events still come before the record that
    completes a line carrying ``usage``.
    """

    __slots__ = ("_buf", "_seal", "_splitter", "_turn")

    SIZES: ClassVar[Sequence[int]] = (1, 7, 300, 2, 1024, 13, 64)
    streams: ClassVar[int] = 0  # streams encoded this way (so a test can check it was used)

    def __init__(self, sealer: StreamSealer, **kwargs: Any) -> None:
        super().__init__(sealer, **kwargs)
        type(self).streams += 1
        self._seal = sealer
        self._splitter = LineSplitter(16 * 1024 * 1024)
        self._buf = b""
        self._turn = 0

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for line in self._splitter.feed(chunk):
            usage = extract_usage(line)
            if usage is not None:
                out.append(self._seal.usage_event(usage))
        self._buf += chunk
        while True:
            size = self.SIZES[self._turn % len(self.SIZES)]
            if len(self._buf) < size:
                break
            self._turn += 1
            out.append(self._seal.seal_record(self._buf[:size]))
            self._buf = self._buf[size:]
        return b"".join(out)

    def finish(self) -> bytes:
        tail, self._buf = self._buf, b""
        return self._seal.seal_record(tail) if tail else b""


class SplittingEncoder(RechunkingEncoder):
    """Every inner line split over several small records."""

    __slots__ = ()
    SIZES: ClassVar[Sequence[int]] = (5, 1, 11, 3)


class MergingEncoder(RechunkingEncoder):
    """The whole inner stream in as few records as possible (one for a short answer)."""

    __slots__ = ()
    SIZES: ClassVar[Sequence[int]] = (1 << 20,)


@contextlib.contextmanager
def instance_encoder(encoder: type[StreamEncoder] | None) -> Iterator[None]:
    """Make the in-process v1 instances seal with ``encoder`` (None: leave them alone)."""
    from pqe2ee.server import instance

    if encoder is None:
        yield
        return
    saved = instance.StreamEncoder
    instance.StreamEncoder = encoder  # type: ignore[misc]
    try:
        yield
    finally:
        instance.StreamEncoder = saved  # type: ignore[misc]


@dataclass
class RechunkingEngine:
    """An engine wrapper: ``mode`` None passes through; ``"split"`` sends every SSE body in
    ``piece``-byte pieces (a short pause between, so the instance reads them one by one);
    ``"merge"`` sends the whole SSE body as one piece."""

    app: ASGI
    mode: str | None = None
    piece: int = 7

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        mode = self.mode
        if scope["type"] != "http" or mode is None:
            await self.app(scope, receive, send)
            return
        sse = False
        held = bytearray()

        async def rechunk(message: Any) -> None:
            nonlocal sse
            if message["type"] == "http.response.start":
                sse = any(
                    k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                    for k, v in message.get("headers", [])
                )
                await send(message)
                return
            if message["type"] != "http.response.body" or not sse:
                await send(message)
                return
            held.extend(message.get("body", b""))
            more = bool(message.get("more_body", False))
            if mode == "merge" and more:
                return
            data = bytes(held)
            held.clear()
            step = self.piece if mode == "split" else max(1, len(data))
            pieces = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
            for i, p in enumerate(pieces):
                last = i == len(pieces) - 1
                await send({"type": "http.response.body", "body": p, "more_body": more or not last})
                if mode == "split" and not last:
                    await anyio.sleep(0.002)

        await self.app(scope, receive, rechunk)
