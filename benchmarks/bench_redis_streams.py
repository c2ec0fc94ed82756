"""500 concurrent encrypted streams through the relay on a real redis-server (issue 16 item 4,
end to end): dev-engine -> instance(s) -> relay keeping its nonces in Redis, driven by our
httpx2 client (``AsyncE2EETransport``), every stream decrypted and checked.

Run by hand (not part of the test suite; needs ``redis-server`` on PATH)::

    PYTHONPATH=src:tests .venv/bin/python benchmarks/bench_redis_streams.py [--streams 500]
        [--waves 3] [--instances 2] [--profile 1|2]

The servers run in a child process (uvicorn in threads, as the tests run them), the client in
this one, so the two do not share a GIL. Each wave starts ``--streams`` streamed chat calls at
once; each prompt is unique and the decrypted reply must be exactly the dev-engine's echo of it,
so a lost, duplicated or corrupted token counts as a mismatch. Printed: per wave, calls ok,
errors by code, mismatches, wall time, latency percentiles, the server process's RSS, and the
relay's store metrics (pool waits, 503s) after the run.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import anyio
import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

KEY = "pk-bench-redis-streams-0123456789"
#: The first few client errors, shown after the table.
FIRST_ERRORS: list[str] = []


def _serve(
    conn: Connection, redis_url: str, instances: int, nonces: int, v2: bool, concurrency: int
) -> None:
    """Child process: the whole server chain on loopback, until the parent says stop."""
    from servers import serve_chain

    with serve_chain(
        instances,
        api_keys=(KEY,),
        instance_kw={"v2": v2, "max_concurrency": concurrency},
        redis_url=redis_url,
        rate_limit=100_000,
        nonces_per_instance=nonces,
    ) as chain:
        conn.send((chain.relay, os.getpid()))
        conn.recv()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_stream(http: httpx2.AsyncClient, i: int, wave: int) -> tuple[str, float]:
    """``("ok" | "mismatch" | <error code or type>, seconds)`` for one streamed call."""
    import msgspec

    prompt = f"wave {wave} stream {i} " + "token " * 8
    body = {"model": "dev-echo", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    started = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                if len(FIRST_ERRORS) < 3:
                    FIRST_ERRORS.append(f"{resp.status_code} {resp.text[:200]}")
                return f"http_{resp.status_code}", time.perf_counter() - started
            text: list[str] = []
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                chunk = msgspec.json.decode(data)
                for choice in chunk.get("choices") or []:
                    text.append((choice.get("delta") or {}).get("content") or "")
    except Exception as exc:
        if len(FIRST_ERRORS) < 3:
            request = getattr(exc, "_request", None)
            FIRST_ERRORS.append(
                f"{exc!r} ({request.method} {request.url})" if request else repr(exc)
            )
        code = getattr(exc, "code", None)
        return (str(code.value) if code is not None else type(exc).__name__), (
            time.perf_counter() - started
        )
    ok = done and "".join(text) == f"Echo: {prompt}"
    return ("ok" if ok else "mismatch"), time.perf_counter() - started


async def wave(
    http: httpx2.AsyncClient, streams: int, n: int
) -> tuple[list[tuple[str, float]], float]:
    results: list[tuple[str, float]] = []

    async def run(i: int) -> None:
        results.append(await one_stream(http, i, n))

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(streams):
            tg.start_soon(run, i)
    return results, time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def drive(relay: str, pid: int, args: argparse.Namespace) -> None:
    from pqe2ee import AsyncE2EETransport
    from pqe2ee.protocol.client import ClientLimits
    from pqe2ee.transports._common import KEEPALIVE_EXPIRY

    keepalive = KEEPALIVE_EXPIRY if args.keepalive is None else args.keepalive
    limits = httpx2.Limits(max_connections=args.streams * 2, keepalive_expiry=keepalive)
    inner = httpx2.AsyncHTTPTransport(limits=limits)
    transport = AsyncE2EETransport(
        api_key=KEY,
        api_base=relay,
        models_base=relay,
        inner=inner,
        min_version=args.profile,
        prefer_v2=args.profile == 2,
        limits=ClientLimits(discovery_per_window=args.discoveries),
        attest="off",  # the dev stack serves no TEE evidence
    )
    print(
        f"{args.streams} concurrent streams x {args.waves} waves; {args.instances} instance(s), "
        f"{args.nonces} nonces per instance per discovery, instance max_concurrency "
        f"{args.concurrency}, profile v{args.profile}; "
        f"client discovery limit {args.discoveries}/min, keep-alive expiry "
        f"{limits.keepalive_expiry:g} s, {args.pause:g} s between waves"
    )
    print()
    print("| wave | ok | errors | mismatches | wall s | p50 s | p95 s | max s | server RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    totals: collections.Counter[str] = collections.Counter()
    async with httpx2.AsyncClient(transport=transport, base_url=relay, timeout=120) as http:
        for n in range(1, args.waves + 1):
            if n > 1 and args.pause:
                await anyio.sleep(args.pause)
            results, wall = await wave(http, args.streams, n)
            counts = collections.Counter(kind for kind, _ in results)
            totals.update(counts)
            times = [t for _, t in results]
            errors = {k: v for k, v in counts.items() if k not in ("ok", "mismatch")}
            print(
                f"| {n} | {counts['ok']} | {sum(errors.values())}"
                f"{' ' + str(dict(errors)) if errors else ''} | {counts['mismatch']} | "
                f"{wall:.1f} | {pct(times, 50):.2f} | {pct(times, 95):.2f} | {max(times):.2f} | "
                f"{rss_mib(pid):.0f} |"
            )
        metrics = (await http.get(relay + "/metrics")).text
    print()
    print(f"total: {dict(totals)}")
    for line in FIRST_ERRORS:
        print("error:", line)
    for line in metrics.splitlines():
        name = line.split(" ", 1)[0]
        if name.startswith(("pqe2ee_relay_store_", "pqe2ee_relay_nonces_")) and name.endswith(
            ("_total", "_count", "_sum")
        ):
            print("relay metric:", line)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=500)
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--nonces", type=int, default=100, help="nonces per instance per discovery")
    ap.add_argument("--discoveries", type=int, default=100, help="client discoveries per minute")
    ap.add_argument(
        "--concurrency", type=int, default=64, help="each instance's max_concurrency (429 past it)"
    )
    ap.add_argument("--pause", type=float, default=0.0, help="seconds between waves")
    ap.add_argument(
        "--keepalive",
        type=float,
        default=None,
        help="client keepalive_expiry [default: the transports' own, 2 s]",
    )
    ap.add_argument("--profile", type=int, choices=(1, 2), default=1)
    args = ap.parse_args()

    from test_relay_redis import redis_server

    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp)) as url:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_serve,
            args=(child, url, args.instances, args.nonces, args.profile == 2, args.concurrency),
        )
        proc.start()
        try:
            relay, pid = parent.recv()
            anyio.run(drive, relay, pid, args)
        finally:
            parent.send("stop")
            proc.join(30)
            if proc.is_alive():
                proc.kill()


if __name__ == "__main__":
    main()
