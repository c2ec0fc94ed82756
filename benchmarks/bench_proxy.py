"""Proxy overhead: what ``pqe2ee proxy`` adds over using the E2EE transport directly.

Run by hand (not part of the test suite)::

    .venv/bin/python benchmarks/bench_proxy.py            # ~1 minute
    .venv/bin/python benchmarks/bench_proxy.py --quick    # ~20 s

Servers, each its own process started with the ``pqe2ee`` command line (access logs off)::

    bare:   driver (AsyncE2EETransport)          --> relay --> instance --> dev-engine
    floor:  driver (plain HTTP) --> forwarder (AsyncE2EETransport) --> relay --> ...
    proxy:  driver (plain HTTP) --> pqe2ee proxy (AsyncE2EETransport) --> relay --> ...

The *floor* is the least any proxy can cost in this stack: a ten-line Starlette forwarder
(body in, ``aiter_raw`` out through the same transport, no checks, no errors, no metrics, no
cancellation), run in its own process by this script. "proxy - floor" is what ``pqe2ee proxy``'s
own logic costs on top of the extra HTTP hop.

The driver is one asyncio process with httpx2. At each concurrency C (1, 16, 64) it runs
rounds of C simultaneous streamed chat calls, rotating bare, floor and proxy rounds (and which
goes first) so drift hits all alike, and records per call the time to the first body byte and
to the end of the stream. "Added" is proxy minus bare at the same percentile. A ``messages`` row
runs the same prompt through ``POST /v1/messages`` (Anthropic translation) against bare chat.

The dev engine is a test stand-in: the numbers are protocol and proxy overhead, not inference.
With few CPU cores every process competes for them; at high concurrency the added latency is
then mostly the proxy's share of the CPU (it decrypts what the bare driver decrypts itself).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2

import pqe2ee
from pqe2ee.backends import get_aead, get_kem
from pqe2ee.transports.httpx2 import AsyncE2EETransport

KEY = "bench-proxy-key-0123456789"
MODEL = "dev-echo"
PROMPT = " ".join(f"word{i}" for i in range(24))  # ~28 stream events
CHAT = "/v1/chat/completions"
CHAT_BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": PROMPT}],
    "stream": True,
}
MESSAGES_BODY = {
    "model": MODEL,
    "max_tokens": 256,
    "messages": [{"role": "user", "content": PROMPT}],
    "stream": True,
}


# --------------------------------------------------------------------------------------------
# server processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}")
        with contextlib.suppress(httpx2.HTTPError):
            if httpx2.get(url + "/health", timeout=1).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: not ready after {limit}s")
        time.sleep(0.05)


def _floor_app(relay: str) -> Any:
    """The minimal forwarder: the same transport, nothing else."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    state: dict[str, httpx2.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        limits = httpx2.Limits(max_connections=512, max_keepalive_connections=64)
        transport = AsyncE2EETransport(
            api_key=KEY,
            api_base=relay,
            models_base=relay,
            inner=httpx2.AsyncHTTPTransport(limits=limits),
        )
        async with httpx2.AsyncClient(transport=transport, base_url=relay, timeout=60) as client:
            state["client"] = client
            yield

    async def chat(request: Request) -> Response:
        client = state["client"]
        headers = {"content-type": "application/json"}
        req = client.build_request("POST", CHAT, content=await request.body(), headers=headers)
        resp = await client.send(req, stream=True)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()

        return StreamingResponse(body(), media_type="text/event-stream")

    async def health(request: Request) -> Response:
        return Response(b"ok")

    routes = [Route(CHAT, chat, methods=["POST"]), Route("/health", health)]
    return Starlette(routes=routes, lifespan=lifespan)


@contextlib.contextmanager
def _server(*args: str) -> Iterator[str]:
    port = _free_port()
    if args[0] == "floor":
        cmd = [sys.executable, __file__, "--serve-floor", str(port), args[1]]
    else:
        cmd = [sys.executable, "-m", "pqe2ee.cli", *args, "--host", "127.0.0.1"]
        cmd += ["--port", str(port)]
    env = {**os.environ, "PQE2EE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def stack() -> Iterator[tuple[str, str, str]]:
    """(relay, floor, proxy) URLs with instance and dev engine behind them."""
    with contextlib.ExitStack() as es:
        engine = es.enter_context(_server("dev-engine"))
        inst = es.enter_context(
            _server("instance", "--upstream", engine, "--max-concurrency", "1024")
        )
        relay = es.enter_context(
            _server(
                "relay",
                "--instance",
                inst,
                "--api-key",
                KEY,
                "--rate-limit",
                "100000",
                "--nonces-per-instance",
                "1000",
            )
        )
        floor = es.enter_context(_server("floor", relay))
        proxy = es.enter_context(
            _server("proxy", "--api-base", relay, "--models-base", relay, "--api-key", KEY)
        )
        yield relay, floor, proxy


# --------------------------------------------------------------------------------------------
# measuring


@dataclass
class Samples:
    first: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)


Call = Callable[[], Awaitable[tuple[float, float]]]


def _timed_stream(client: httpx2.AsyncClient, path: str, body: object) -> Call:
    async def call() -> tuple[float, float]:
        t0 = time.perf_counter()
        first = 0.0
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"{path} answered {resp.status_code}: {await resp.aread()!r}")
            async for chunk in resp.aiter_bytes():
                if not first and chunk:
                    first = time.perf_counter() - t0
            total = time.perf_counter() - t0
        return first, total

    return call


async def _round(call: Call, concurrency: int, into: Samples) -> None:
    results = await asyncio.gather(*(call() for _ in range(concurrency)))
    for first, total in results:
        into.first.append(first)
        into.total.append(total)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


@dataclass
class Row:
    dialect: str
    concurrency: int
    calls: int
    bare: Samples
    floor: Samples
    proxy: Samples


async def measure(relay: str, floor: str, proxy: str, levels: list[tuple[int, int]]) -> list[Row]:
    limits = httpx2.Limits(max_connections=512, max_keepalive_connections=256)
    bare_transport = AsyncE2EETransport(
        api_key=KEY,
        api_base=relay,
        models_base=relay,
        inner=httpx2.AsyncHTTPTransport(limits=limits),
    )
    timeout = httpx2.Timeout(60)
    plain = {"timeout": timeout, "limits": limits, "headers": {"x-api-key": KEY}}
    async with (
        httpx2.AsyncClient(transport=bare_transport, base_url=relay, timeout=timeout) as bare,
        httpx2.AsyncClient(base_url=floor, **plain) as via_floor,  # type: ignore[arg-type]
        httpx2.AsyncClient(base_url=proxy, **plain) as via_proxy,  # type: ignore[arg-type]
    ):
        calls = {
            "bare": _timed_stream(bare, CHAT, CHAT_BODY),
            "floor": _timed_stream(via_floor, CHAT, CHAT_BODY),
            "chat": _timed_stream(via_proxy, CHAT, CHAT_BODY),
            "messages": _timed_stream(via_proxy, "/v1/messages", MESSAGES_BODY),
        }
        # Warm-up: connections, model listing, discovery, nonce pools.
        for call in calls.values():
            for _ in range(3):
                await _round(call, 16, Samples())
        out = []
        for dialect in ("chat", "messages"):
            for concurrency, rounds in levels:
                if dialect == "messages" and concurrency != 1:
                    continue
                row = Row(
                    dialect, concurrency, rounds * concurrency, Samples(), Samples(), Samples()
                )
                order = [("bare", row.bare), ("floor", row.floor), (dialect, row.proxy)]
                for i in range(rounds):
                    for name, into in order[i % 3 :] + order[: i % 3]:
                        await _round(calls[name], concurrency, into)
                out.append(row)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--serve-floor", nargs=2, metavar=("PORT", "RELAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        import uvicorn

        port, relay = args.serve_floor
        uvicorn.run(_floor_app(relay), port=int(port), log_level="warning", access_log=False)
        return
    scale = 4 if args.quick else 1
    levels = [(1, 300 // scale), (16, 30 // scale), (64, 9 // scale)]

    kem, aead = get_kem("auto"), get_aead("auto")
    print(
        f"pqe2ee {pqe2ee.__version__} | Python {platform.python_version()} | "
        f"httpx2 {httpx2.__version__} | KEM {kem.name} | AEAD {aead.name} | "
        f"{platform.machine()} x {os.cpu_count()} CPUs | {platform.platform(terse=True)}"
    )
    print(f"stream: {len(PROMPT.split()) + 1}-word echo (~28 SSE events), model {MODEL}")
    with stack() as (relay, floor, proxy):
        rows = asyncio.run(measure(relay, floor, proxy, levels))
    print()
    print(
        "| via proxy | streams at once | calls | metric | bare p50 | floor p50 | proxy p50 "
        "| **added p50** | added p99 | proxy - floor p50 |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        for metric, b, f, p in (
            ("first byte", row.bare.first, row.floor.first, row.proxy.first),
            ("whole stream", row.bare.total, row.floor.total, row.proxy.total),
        ):
            b50, f50, p50 = _pct(b, 0.5), _pct(f, 0.5), _pct(p, 0.5)
            added99 = _pct(p, 0.99) - _pct(b, 0.99)
            print(
                f"| {row.dialect} | {row.concurrency} | {row.calls} | {metric} | {b50:.2f} "
                f"| {f50:.2f} | {p50:.2f} | **{p50 - b50:+.2f}** | {added99:+.2f} "
                f"| {p50 - f50:+.2f} |"
            )
    print("\nAll times in ms. added = proxy - bare; floor = minimal forwarder, same transport.")
    single = next(r for r in rows if r.dialect == "chat" and r.concurrency == 1)
    added = (
        statistics.median(single.proxy.total) * 1000 - statistics.median(single.bare.total) * 1000
    )
    verdict = "meets" if added <= 1.0 else "misses"
    print(f"chat, 1 stream: {added:+.2f} ms added at p50 ({verdict} the <= 1 ms target)")


if __name__ == "__main__":
    main()
