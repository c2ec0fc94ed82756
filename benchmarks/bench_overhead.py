"""Client CPU overhead per non-stream request without sockets: where our client's time goes.

Run by hand (not part of the test suite)::

    .venv/bin/python benchmarks/bench_overhead.py [--calls N] [--rounds R]

bench_client.py measures the whole client over loopback, where socket work and the machine's
load blur the few tens of microseconds that are ours. Here the openai SDK (sync,
``httpx2.Client``) talks to an inner transport that answers in the same thread:

* ``plain``: a canned chat completion (``httpx2.MockTransport``);
* ``e2ee``: ``pqe2ee.E2EETransport(inner=...)``. Discovery and nonces come from a real relay and
  instance (``pqe2ee`` processes on loopback, the instance's key in a key file this script
  made; 1,000 nonces a discovery, so one call in 1,000 goes out); an invoke is answered in this
  thread by opening the request with that key and sealing the same canned completion
  (``open_request`` + ``seal_response``), and the CPU of that instance work is measured around
  it and subtracted.

CPU is ``time.process_time`` (every thread: a key pool filler counts) per call, plain and e2ee
rounds alternating; the table takes each client's best round (other load on a shared machine
only ever adds) and shows the difference of the medians too. "floor" is the client's own KEM work for one request with
that backend, timed in the same run: response keygen + encapsulation + decapsulation.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import openai

import pqe2ee
from pqe2ee.backends import available, get_aead, get_kem
from pqe2ee.protocol import open_request, seal_response

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_client import KEY, keyed_stack

MESSAGES = [{"role": "user", "content": "Say hello to the benchmark."}]
ANSWER = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"dev-echo",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello, benchmark."},'
    b'"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":6,"completion_tokens":3,"total_tokens":9}}'
)


class InstanceHere(httpx2.BaseTransport):
    """Invokes answered in this thread (their CPU kept apart); the rest to the real relay."""

    def __init__(self, key: Any, kem: Any) -> None:
        self._key, self._kem, self._aead = key, kem, get_aead()
        self._relay = httpx2.HTTPTransport()
        self.instance_cpu = 0.0

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path != "/e2e/invoke":
            return self._relay.handle_request(request)
        blob = request.read()
        started = time.thread_time()
        opened = open_request(blob, self._key, aead=self._aead)
        sealed = seal_response(ANSWER, opened.response_public_key, kem=self._kem, aead=self._aead)
        self.instance_cpu += time.thread_time() - started
        return httpx2.Response(
            200, headers=[("content-type", "application/octet-stream")], content=sealed
        )

    def close(self) -> None:
        self._relay.close()


def _plain_answer(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, headers=[("content-type", "application/json")], content=ANSWER)


def _per_call(call: Callable[[], object], n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        call()
    return (time.process_time() - started) / n


def _floor(kem: Any, n: int = 300) -> float:
    pk = kem.generate().public_key
    costs = []
    for _ in range(n):
        t0 = time.perf_counter()
        key = kem.generate()
        ct, _ = kem.encapsulate(pk)
        key.decapsulate(ct)
        costs.append(time.perf_counter() - t0)
        key.wipe()
    return statistics.median(costs)


def bench(
    backend: str, urls: tuple[str, Any], args: argparse.Namespace
) -> tuple[float, float, float, float, float]:
    relay_url, instance_key = urls
    kem = get_kem(backend)
    inner = InstanceHere(instance_key, get_kem())
    transport = pqe2ee.E2EETransport(
        inner=inner,
        api_key=KEY,
        api_base=relay_url,
        models_base=relay_url,
        backend=backend,
        prefer_v2=False,
    )
    with contextlib.ExitStack() as es:
        e2ee = es.enter_context(
            openai.OpenAI(
                api_key=KEY,
                base_url=relay_url + "/v1",
                max_retries=0,
                http_client=httpx2.Client(transport=transport),
            )
        )
        plain = es.enter_context(
            openai.OpenAI(
                api_key=KEY,
                base_url="http://plain.invalid/v1",
                max_retries=0,
                http_client=httpx2.Client(transport=httpx2.MockTransport(_plain_answer)),
            )
        )

        def ask(client: openai.OpenAI) -> Callable[[], object]:
            return lambda: client.chat.completions.create(model="dev-echo", messages=MESSAGES)

        for _ in range(50):  # warm up: discovery, key pool decision, caches
            ask(e2ee)()
            ask(plain)()
        plains, e2ees = [], []
        for r in range(args.rounds):
            order = [(plain, plains), (e2ee, e2ees)]
            for client, out in order if r % 2 == 0 else order[::-1]:
                before = inner.instance_cpu
                cost = _per_call(ask(client), args.calls)
                out.append(cost - (inner.instance_cpu - before) / args.calls)
    floor = _floor(kem)
    best = min(plains), min(e2ees)
    return (*best, best[1] - best[0], statistics.median(e2ees) - statistics.median(plains), floor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100, help="calls per round")
    ap.add_argument("--rounds", type=int, default=15, help="alternating rounds per client")
    ap.add_argument("--backend", action="append", help="only this KEM backend (repeatable)")
    args = ap.parse_args()
    print(
        f"pqe2ee {pqe2ee.__version__} | Python {platform.python_version()} | openai "
        f"{openai.__version__} | httpx2 {httpx2.__version__} | {platform.machine()}; "
        f"{args.rounds} rounds x {args.calls} calls, best round; µs per non-stream call; load "
        f"average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other load inflates all)"
    )
    with contextlib.ExitStack() as es:
        _, relay_url, instance_key = es.enter_context(keyed_stack())
        print(
            "\n| backend | plain client | E2EE client | overhead (medians' difference) "
            "| KEM floor (keygen + encaps + decaps) | overhead - floor |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for backend in args.backend or available():
            p, e, over, over_median, floor = bench(backend, (relay_url, instance_key), args)
            print(
                f"| {backend} | {p * 1e6:.0f} | {e * 1e6:.0f} | {over * 1e6:.0f} "
                f"({over_median * 1e6:.0f}) | {floor * 1e6:.0f} | {(over - floor) * 1e6:.0f} |"
            )
    print("\ntarget (issue 14): overhead <= floor + 60 µs with the auto backend")


if __name__ == "__main__":
    main()
