"""Client CPU per streamed event without sockets: what our stream decryption costs the caller.

Run by hand (not part of the test suite)::

    .venv/bin/python benchmarks/bench_stream.py [--rounds R] [--streams N] [--profile]

bench_client.py measures whole streams over loopback, where the servers' share of the cores and
the socket reads blur the few microseconds per event that are ours. Here the openai SDK (sync,
``httpx2.Client``) reads streams from an inner transport that answers in the same thread:

* ``plain``: the dev-engine's own SSE bytes of a streamed echo (captured once from a real
  ``pqe2ee dev-engine``, continuous usage on), handed over as the engine wrote them;
* ``e2ee``: ``pqe2ee.E2EETransport(inner=...)`` over the v1 wire. Discovery and nonces come from
  a real relay and instance (``pqe2ee`` processes on loopback, 1,000 nonces a discovery); an
  invoke is answered in this thread: the request opened with the instance's key and the same
  engine bytes sealed as ``pqe2ee instance`` seals them (``StreamEncoder``: one record per engine
  line, a plaintext usage event before each line that carries usage). That instance work is
  timed and subtracted.

Two ways the relay's bytes reach the client: ``event`` (one body chunk per engine event, as the
instance writes them - a slow engine) and ``16k`` (the same bytes in 16 KiB reads - a fast
engine whose records pile up in the socket). CPU is ``time.process_time`` per stream, plain and
e2ee alternating; the table shows medians over rounds and the E2EE overhead per SSE event of
the engine's stream (E2EE − plain, paired per round).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai

import pqe2ee
from pqe2ee.backends import get_aead, get_kem
from pqe2ee.protocol import open_request
from pqe2ee.protocol.v1.stream import StreamEncoder, StreamSealer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_client import KEY, LONG_WORDS, MODEL, SHORT_PROMPT, keyed_stack, long_prompt

USAGE = {"include_usage": True, "continuous_usage_stats": True}
CHUNKINGS = ("event", "16k")


class Chunks(httpx2.SyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self._chunks


def _rechunk(chunks: list[bytes], how: str) -> list[bytes]:
    if how == "event":
        return chunks
    data = b"".join(chunks)
    return [data[i : i + 16384] for i in range(0, len(data), 16384)]


class InstanceHere(httpx2.BaseTransport):
    """Invokes answered in this thread (their CPU kept apart); the rest to the real relay."""

    def __init__(self, key: Any, engine: dict[str, list[bytes]]) -> None:
        self._key, self._kem, self._aead = key, get_kem(), get_aead()
        self._relay = httpx2.HTTPTransport()
        self._engine = engine
        self.chunking = "event"
        self.instance_cpu = 0.0

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path != "/e2e/invoke":
            return self._relay.handle_request(request)
        return httpx2.Response(
            200, headers=[("content-type", "text/event-stream")], stream=Chunks(self.seal(request))
        )

    def seal(self, request: httpx2.Request) -> list[bytes]:
        """The outer stream answering ``request`` (read), as the relay would pass it on."""
        blob = request.content
        started = time.thread_time()
        opened = open_request(blob, self._key, aead=self._aead)
        prompt = str(opened.body["messages"][-1]["content"])
        sealer = StreamSealer(opened.response_public_key, kem=self._kem, aead=self._aead)
        encoder = StreamEncoder(sealer)
        out = [encoder.start()]
        for chunk in self._engine[prompt]:
            out.append(encoder.feed(chunk))
        out.append(encoder.finish())
        chunks = _rechunk([c for c in out if c], self.chunking)
        self.instance_cpu += time.thread_time() - started
        return chunks

    def close(self) -> None:
        self._relay.close()


class AsyncChunks(httpx2.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


class AsyncHere(httpx2.AsyncBaseTransport):
    """The async flavour (what the proxy runs): ``here`` answers, the rest to the real relay."""

    def __init__(self, here: InstanceHere | PlainHere) -> None:
        self.here = here
        self._relay = httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if isinstance(self.here, InstanceHere) and request.url.path != "/e2e/invoke":
            return await self._relay.handle_async_request(request)
        await request.aread()
        response = self.here.handle_request(request)
        stream = response.stream
        assert isinstance(stream, Chunks)
        return httpx2.Response(200, headers=response.headers, stream=AsyncChunks(stream._chunks))


class PlainHere(httpx2.BaseTransport):
    def __init__(self, engine: dict[str, list[bytes]]) -> None:
        self._engine = engine
        self.chunking = "event"

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        import msgspec

        prompt = str(msgspec.json.decode(request.read())["messages"][-1]["content"])
        chunks = _rechunk(self._engine[prompt], self.chunking)
        return httpx2.Response(
            200, headers=[("content-type", "text/event-stream")], stream=Chunks(chunks)
        )


def capture(engine_url: str, prompt: str) -> list[bytes]:
    """The dev-engine's streamed answer to ``prompt``, one chunk per SSE event."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": USAGE,
    }
    with (
        httpx2.Client() as c,
        c.stream("POST", engine_url + "/v1/chat/completions", json=body) as r,
    ):
        data = r.read()
    return [event + b"\n\n" for event in data.split(b"\n\n") if event]


def stream_call(client: openai.OpenAI, prompt: str) -> int:
    s = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        stream_options=USAGE,  # type: ignore[arg-type]
    )
    events = 0
    for chunk in s:
        if chunk.choices:
            events += 1
    return events


def http_call(client: httpx2.Client, prompt: str) -> int:
    """The same stream read with httpx2 alone (no SDK): the bytes as the transport hands them."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": USAGE,
    }
    chunks = 0
    with client.stream("POST", "/chat/completions", json=body) as r:
        for _ in r.iter_bytes():
            chunks += 1
    return chunks


def async_call(client: httpx2.AsyncClient, prompt: str) -> int:
    """http_call with an httpx2.AsyncClient, run to completion on asyncio."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": USAGE,
    }

    async def run() -> int:
        chunks = 0
        async with client.stream("POST", "/chat/completions", json=body) as r:
            async for _ in r.aiter_bytes():
                chunks += 1
        return chunks

    return LOOP.run_until_complete(run())


LOOP = asyncio.new_event_loop()


def _per_call(call: Callable[[], object], n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        call()
    return (time.process_time() - started) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9, help="alternating rounds")
    ap.add_argument("--streams", type=int, default=4, help="long streams per round")
    ap.add_argument(
        "--sdk",
        choices=("openai", "httpx2", "httpx2-async"),
        default="openai",
        help="who reads the stream (httpx2-async: AsyncE2EETransport on asyncio, as the proxy)",
    )
    ap.add_argument("--profile", metavar="FILE", help="cProfile the e2ee long streams into FILE")
    args = ap.parse_args()
    print(
        f"pqe2ee {pqe2ee.__version__} from {Path(pqe2ee.__file__).parent} | Python "
        f"{platform.python_version()} | openai {openai.__version__} | httpx2 "
        f"{httpx2.__version__}; load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    with contextlib.ExitStack() as es:
        engine_url, relay_url, instance_key = es.enter_context(keyed_stack())
        prompts = {"short": SHORT_PROMPT, "long": long_prompt()}
        engine = {p: capture(engine_url, p) for p in prompts.values()}
        inner = InstanceHere(instance_key, engine)
        plain_inner = PlainHere(engine)
        transport = pqe2ee.E2EETransport(
            inner=inner, api_key=KEY, api_base=relay_url, models_base=relay_url, prefer_v2=False
        )
        e2ee: Any = es.enter_context(
            openai.OpenAI(
                api_key=KEY,
                base_url=relay_url + "/v1",
                max_retries=0,
                http_client=httpx2.Client(transport=transport),
            )
        )
        plain: Any = es.enter_context(
            openai.OpenAI(
                api_key=KEY,
                base_url="http://plain.invalid/v1",
                max_retries=0,
                http_client=httpx2.Client(transport=plain_inner),
            )
        )
        events = {k: stream_call(plain, p) for k, p in prompts.items()}
        assert events["long"] >= LONG_WORDS
        call: Callable[[Any, str], int] = stream_call
        if args.sdk == "httpx2":
            call = http_call
            e2ee = es.enter_context(httpx2.Client(transport=transport, base_url=relay_url + "/v1"))
            plain = es.enter_context(
                httpx2.Client(transport=plain_inner, base_url="http://plain.invalid/v1")
            )
        elif args.sdk == "httpx2-async":
            call = async_call
            e2ee = httpx2.AsyncClient(
                transport=pqe2ee.AsyncE2EETransport(
                    inner=AsyncHere(inner),
                    api_key=KEY,
                    api_base=relay_url,
                    models_base=relay_url,
                    prefer_v2=False,
                ),
                base_url=relay_url + "/v1",
            )
            plain = httpx2.AsyncClient(
                transport=AsyncHere(plain_inner), base_url="http://plain.invalid/v1"
            )
        for _ in range(10):
            call(e2ee, prompts["short"])
            call(e2ee, prompts["long"])
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            for how in CHUNKINGS:
                inner.chunking = how
                prof.runcall(lambda: [call(e2ee, prompts["long"]) for _ in range(5)])
            prof.dump_stats(args.profile)
            print(f"profile written to {args.profile}")
            return
        results: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for how in CHUNKINGS:
                inner.chunking = plain_inner.chunking = how
                for kind, n in (("short", 4 * args.streams), ("long", args.streams)):
                    order = [("plain", plain), ("e2ee", e2ee)]
                    costs = {}
                    for name, client in order if r % 2 == 0 else order[::-1]:
                        before = inner.instance_cpu
                        cost = _per_call(lambda c=client, p=prompts[kind]: call(c, p), n)
                        costs[name] = cost - (inner.instance_cpu - before) / n
                    results.setdefault((how, kind), []).append(costs["e2ee"] - costs["plain"])
                    results.setdefault((how, kind + "-plain"), []).append(costs["plain"])
        print(
            "\n| reads | stream | SSE events | plain client µs per stream | E2EE overhead "
            "µs per stream | **µs per event** |"
        )
        print("|---|---|---:|---:|---:|---:|")
        for how in CHUNKINGS:
            for kind in ("short", "long"):
                over = statistics.median(results[(how, kind)]) * 1e6
                base = statistics.median(results[(how, kind + "-plain")]) * 1e6
                n_ev = len(engine[prompts[kind]])
                print(
                    f"| {how} | {kind} | {n_ev} | {base:.0f} | {over:.0f} | **{over / n_ev:.2f}** |"
                )


if __name__ == "__main__":
    main()
