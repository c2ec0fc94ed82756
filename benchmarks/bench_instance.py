"""Instance overhead on loopback: the same calls straight to the dev engine and through
``pqe2ee instance`` (client seals, instance opens, forwards, seals; client opens).

Run: .venv/bin/python benchmarks/bench_instance.py [--rounds N] [--hop-requests N]
Prints versions, backend, CPU and two tables:

1. median ms per call, direct vs through the instance (servers in this process, as the tests
   run them), and the ratio;
2. the CPU one hop costs per request: the instance vs the plaintext forwarder of
   bench_server.py, each in its own process in front of a dev engine in another, driven
   straight (no relay) by 16 concurrent clients; the two alternate in slices and each
   process's user+sys time is divided by the requests it served. This is the instance's part
   of bench_server's E2EE/plaintext ratio, without the relay's and the client's noise.

The dev engine is a test stand-in, so the numbers are the *protocol* overhead, not inference.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2

import pqe2ee
from pqe2ee.backends import get_aead, get_kem
from pqe2ee.protocol import StreamDecryptor, open_response, seal_request
from pqe2ee.server.instance import InstanceConfig, create_app
from pqe2ee.testing.dev_engine import create_app as create_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import run_app


def median_ms(fn: Callable[[], Any], rounds: int) -> float:
    for _ in range(max(3, rounds // 10)):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _bench_server() -> Any:
    """benchmarks/bench_server.py as a module: its server processes and forwarder."""
    path = Path(__file__).resolve().parent / "bench_server.py"
    spec = importlib.util.spec_from_file_location("bench_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_server"] = module
    spec.loader.exec_module(module)
    return module


async def _hop_slice(
    http: httpx2.AsyncClient, url: str, pk: bytes | None, stream: bool, n: int, concurrency: int
) -> int:
    """``n`` requests (``concurrency`` at a time) to the instance (``pk`` given) or the
    forwarder; each answer is checked. Returns how many were sent."""
    kem, aead = get_kem(), get_aead()
    prompt = " ".join(f"word{i}" for i in range(24))  # bench_server's prompt: ~28 events
    body = json.dumps(
        {"model": "dev-echo", "messages": [{"role": "user", "content": prompt}], "stream": stream}
    ).encode()

    async def one() -> None:
        if pk is None:
            headers = {"content-type": "application/json"}
            r = await http.post(url + "/v1/chat/completions", content=body, headers=headers)
            assert r.status_code == 200 and (not stream or r.content.rstrip().endswith(b"[DONE]"))
            return
        s = seal_request(body, pk, response_key=kem.generate(), kem=kem, aead=aead)
        h = {"x-e2e-path": "/v1/chat/completions", "x-e2e-stream": str(stream).lower()}
        r = await http.post(url + "/e2e/invoke", content=s.blob, headers=h)
        assert r.status_code == 200
        if stream:
            d = StreamDecryptor(s.response_key, aead=aead, decode_usage=False)
            d.receive_data(r.content)
            d.receive_eof()
            assert d.complete
        else:
            open_response(r.content, s.response_key, aead=aead)

    async def worker(k: int) -> None:
        for _ in range(k):
            await one()

    per = max(1, n // concurrency)
    await asyncio.gather(*[worker(per) for _ in range(concurrency)])
    return per * concurrency


async def _hop_table(requests: int, rounds: int) -> None:
    bs = _bench_server()
    print(
        f"\nCPU per request of one hop, ms (user+sys of the hop's process / requests; "
        f"16 clients, {rounds} alternating slices of {requests // rounds} requests each, "
        f"every server on {bs._stack_name()}):\n"
    )
    print(
        "| request | plaintext forwarder | instance | instance - forwarder | engine (fwd / inst) |"
    )
    print("|---|---:|---:|---:|---:|")
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(bs.start("engine"))
        inst = stack.enter_context(bs.start("instance", engine.url))
        fwd = stack.enter_context(bs.start("proxy", engine.url))
        limits = httpx2.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx2.AsyncClient(timeout=60, limits=limits, trust_env=False) as http:
            info = (await http.get(inst.url + "/e2e/info")).json()
            pk = base64.b64decode(info["e2e_pubkey"])
            for stream in (False, True):
                cpu = {"fwd": 0.0, "inst": 0.0, "eng fwd": 0.0, "eng inst": 0.0}
                done = {"fwd": 0, "inst": 0}
                for target in ("fwd", "inst"):  # warm-up
                    url, key = (fwd.url, None) if target == "fwd" else (inst.url, pk)
                    await _hop_slice(http, url, key, stream, 160, 16)
                for r in range(rounds):
                    order = ("fwd", "inst") if r % 2 == 0 else ("inst", "fwd")
                    for target in order:
                        proc = fwd if target == "fwd" else inst
                        url, key = (fwd.url, None) if target == "fwd" else (inst.url, pk)
                        c0, e0 = proc.cpu_seconds(), engine.cpu_seconds()
                        done[target] += await _hop_slice(
                            http, url, key, stream, requests // rounds, 16
                        )
                        cpu[target] += proc.cpu_seconds() - c0
                        cpu["eng " + target] += engine.cpu_seconds() - e0
                ms = {k: v * 1000 / done[k.split()[-1]] for k, v in cpu.items()}
                print(
                    f"| {'stream (28 events)' if stream else 'non-stream'} | {ms['fwd']:.3f} "
                    f"| {ms['inst']:.3f} | {ms['inst'] - ms['fwd']:+.3f} "
                    f"| {ms['eng fwd']:.3f} / {ms['eng inst']:.3f} |"
                )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument(
        "--hop-requests", type=int, default=3200, help="requests per path for the hop table"
    )
    ap.add_argument("--hop-slices", type=int, default=4, help="alternating slices per path")
    ap.add_argument("--hop-only", action="store_true", help="only the CPU-per-hop table")
    args = ap.parse_args()
    rounds = args.rounds
    os.environ.setdefault("BENCH_CONTINUOUS_USAGE", "1")  # the instance as bench_server runs it
    if args.hop_only:
        asyncio.run(_hop_table(args.hop_requests, args.hop_slices))
        return
    kem, aead = get_kem(), get_aead()
    print(
        f"pqe2ee {pqe2ee.__version__}  python {platform.python_version()}  KEM {kem.name}  "
        f"AEAD {aead.name}  cpu {cpu()}"
    )
    cases = {
        "chat 1 KiB prompt": ("x " * 512, False),
        "chat 100 KiB context": (("y" * 99 + " ") * 1024, False),
        "stream 1,000 chunks": (" ".join(["w"] * 1000), True),
    }
    with (
        run_app(create_engine()) as engine,
        run_app(create_app(InstanceConfig(upstream=engine))) as inst,
        httpx2.Client(timeout=60) as http,
    ):
        pk = __import__("base64").b64decode(http.get(inst + "/e2e/info").json()["e2e_pubkey"])
        print(f"{'operation':24} | {'direct ms':>9} | {'instance ms':>11} | ratio")
        for name, (text, stream) in cases.items():
            body: dict[str, Any] = {
                "model": "dev-echo",
                "messages": [{"role": "user", "content": text}],
                "max_tokens": 2000,
                "stream": stream,
            }
            if stream:  # what the instance forces, so both sides stream the same bytes
                body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}

            def direct(body: dict[str, Any] = body) -> None:
                r = http.post(engine + "/v1/chat/completions", json=body)
                assert r.status_code == 200

            def via(body: dict[str, Any] = body, stream: bool = stream) -> None:
                s = seal_request(body, pk, response_key=kem.generate(), kem=kem, aead=aead)
                h = {"x-e2e-path": "/v1/chat/completions", "x-e2e-stream": str(stream).lower()}
                r = http.post(inst + "/e2e/invoke", content=s.blob, headers=h)
                assert r.status_code == 200
                if stream:
                    d = StreamDecryptor(s.response_key, aead=aead)
                    d.receive_data(r.content)
                    d.receive_eof()
                    assert d.complete
                else:
                    open_response(r.content, s.response_key, aead=aead)

            a, b = median_ms(direct, rounds), median_ms(via, rounds)
            print(f"{name:24} | {a:9.2f} | {b:11.2f} | {b / a:5.2f}x")
    asyncio.run(_hop_table(args.hop_requests, args.hop_slices))


if __name__ == "__main__":
    main()
