"""Instance overhead on loopback: the same calls straight to the dev engine and through
``pqe2ee instance`` (client seals, instance opens, forwards, seals; client opens).

Run: .venv/bin/python benchmarks/bench_instance.py [--rounds N]
Prints versions, backend, CPU and a table: median ms per call and the ratio to the direct call.
The dev engine is a test stand-in, so the numbers are the *protocol* overhead, not inference.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    rounds = ap.parse_args().rounds
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


if __name__ == "__main__":
    main()
