"""Gzip bombs against a real instance (issue 16 item 6): /health latency while 8 sealed
requests, each a ~70 KB blob that inflates past the instance's 64 MiB max_plaintext, are
refused at once - next to /health latency with no load, in the same run.

Run by hand (not part of the test suite)::

    PYTHONPATH=src:tests .venv/bin/python benchmarks/bench_bombs.py [--rounds 5]

The instance (dev-engine upstream) runs in this process on loopback (uvicorn in a thread, as
the tests run it); the bombs go from 8 client threads, /health from one more, polled every
5 ms for as long as bombs are in flight.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.protocol import seal_request
from pqe2ee.server.instance import InstanceConfig, create_app
from pqe2ee.testing.dev_engine import create_app as create_engine
from servers import run_app

KEM, AEAD = get_kem(), get_aead()
HDRS = {"x-e2e-path": "/v1/chat/completions", "x-e2e-stream": "false"}


def bomb(pk: bytes) -> bytes:
    body = {"model": "dev-echo", "messages": [], "pad": "a" * (65 << 20)}
    return seal_request(
        body, pk, response_key=KEM.generate(), kem=KEM, aead=AEAD, compresslevel=9
    ).blob


def health_ms(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx2.Client(timeout=60) as http:
        while not stop.is_set():
            t = time.perf_counter()
            http.get(url + "/health").raise_for_status()
            out.append((time.perf_counter() - t) * 1000)
            time.sleep(0.005)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bombs", type=int, default=8)
    args = ap.parse_args()
    with (
        run_app(create_engine()) as engine,
        run_app(
            create_app(InstanceConfig(upstream=engine), private_key=(key := KEM.generate()))
        ) as inst,
    ):
        blob = bomb(key.public_key)
        idle: list[float] = []
        stop = threading.Event()
        t = threading.Thread(target=health_ms, args=(inst, stop, idle))
        t.start()
        time.sleep(1.0)
        stop.set()
        t.join()
        loaded: list[float] = []
        refuse_ms: list[float] = []
        for _ in range(args.rounds):
            stop = threading.Event()
            poller = threading.Thread(target=health_ms, args=(inst, stop, loaded))
            poller.start()

            def one() -> None:
                with httpx2.Client(timeout=60) as http:
                    t0 = time.perf_counter()
                    r = http.post(inst + "/e2e/invoke", content=blob, headers=HDRS)
                    refuse_ms.append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == 400, r.text

            threads = [threading.Thread(target=one) for _ in range(args.bombs)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            stop.set()
            poller.join()
    print(f"blob {len(blob)} bytes, inflating past 64 MiB; {args.bombs} at once x {args.rounds}")
    print(f"{'':28}{'median ms':>10}{'max ms':>10}{'n':>6}")
    for name, xs in (
        ("/health idle", idle),
        ("/health under bombs", loaded),
        ("bomb refusal", refuse_ms),
    ):
        print(f"{name:28}{statistics.median(xs):>10.1f}{max(xs):>10.1f}{len(xs):>6}")


if __name__ == "__main__":
    main()
