"""Wire profile v2 against v1, same run: client CPU per request, bytes on the wire, and stream
overhead per record with and without padding.

Run by hand (not part of the test suite)::

    .venv/bin/python benchmarks/bench_v2.py [--rounds N] [--records M] [--transport-rounds K]

The last section goes through the real transport (``pqe2ee.E2EETransport`` over httpx2, as the
openai SDK uses it) to a dev-engine -> ``pqe2ee instance`` -> ``pqe2ee relay`` stack served in
this process: per request, the client thread's CPU time (``time.thread_time``: the servers run
in other threads) and the wall time, v1 (``prefer_v2=False``) and v2 (``min_version=2``)
alternating request by request on the same stack.

Client CPU per request = everything the client does for one non-stream exchange:

* v1: fresh ML-KEM-768 response key + ``seal_request`` (encaps, HKDF, gzip, AEAD), then
  ``open_response`` (decaps, HKDF, AEAD, gunzip);
* v2: ``seal_request_v2`` (fresh X-Wing response key, H, X-Wing encaps, HPKE key schedule, gzip,
  Padmé, AEAD, Export), then ``open_response_v2`` (X-Wing decaps, response key schedule, three
  records: HEAD, DATA, END).

Target (issue 7): v2 client CPU within 1.3x of v1. Each number is the lowest of 5 medians of
``--rounds / 5`` runs (a shared 2-vCPU VM is noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cryptography
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

import pqe2ee
from pqe2ee.backends import get_aead, get_kem
from pqe2ee.backends.xwing import get_xwing
from pqe2ee.protocol import (
    StreamDecryptor,
    StreamEncoder,
    StreamSealer,
    open_response,
    seal_request,
    seal_response,
)
from pqe2ee.protocol.v2 import (
    InstanceV2,
    MemoryReplayCache,
    ResponseSealer,
    ResponseSecrets,
    StreamDecryptorV2,
    StreamEncoderV2,
    open_response_v2,
    seal_request_v2,
    seal_response_v2,
)

AEAD = get_aead("pyca")
CHUTE = "5f0b7ad3-1c2e-4d5a-9b8c-7e6f5a4b3c2d"
INST = "0e9d8c7b-6a59-4837-a625-140f3e2d1c0b"
PATH = "/v1/chat/completions"
NOW = 1_767_225_600_000


def chat_body(content_bytes: int) -> bytes:
    text = (
        "the of and to in is that for it as with was model token stream encrypted lattice "
        * (content_bytes // 80 + 1)
    )[:content_bytes]
    return json.dumps(
        {"model": "dev-echo", "messages": [{"role": "user", "content": text}], "max_tokens": 64}
    ).encode()


COMPLETION = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1767225600,
        "model": "dev-echo",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! " * 50},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 64, "total_tokens": 84},
    }
).encode()
USAGE = {"prompt_tokens": 20, "completion_tokens": 64, "total_tokens": 84}
# a 202-byte vLLM chunk line (the design's example size)
CHUNK = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1767225600,'
    b'"model":"dev-echo","choices":[{"index":0,"delta":{"content":" world"},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
)


def timed(
    prepare: Callable[[], Any], run: Callable[[Any], Any], rounds: int, repeats: int = 5
) -> float:
    """Microseconds of ``run(prepare())`` (``prepare`` not timed): the lowest of ``repeats``
    medians of ``rounds // repeats`` runs each, which filters the noise of a shared VM."""
    run(prepare())  # warm up
    per = max(1, rounds // repeats)
    medians = []
    for _ in range(repeats):
        times = []
        for _ in range(per):
            arg = prepare()
            t = time.perf_counter_ns()
            run(arg)
            times.append(time.perf_counter_ns() - t)
        medians.append(statistics.median(times))
    return min(medians) / 1000


def median_us(fn: Callable[[], Any], rounds: int) -> float:
    return timed(lambda: None, lambda _: fn(), rounds)


@dataclass
class Result:
    total_us: float  # response keygen + seal + open
    pooled_us: float  # seal + open, response key pre-generated (as the transports' KeyPool does)
    request_bytes: int
    response_bytes: int


# -- v1 ------------------------------------------------------------------------------------------


def v1_client(kem_name: str, body: bytes, rounds: int) -> Result:
    kem = get_kem(kem_name)
    inst_key = kem.from_seed(hashlib.sha512(b"bench-v1").digest())
    response_key = kem.generate()
    sealed = seal_request(body, inst_key.public_key, response_key=response_key, kem=kem, aead=AEAD)
    resp_blob = seal_response(COMPLETION, response_key.public_key, kem=kem, aead=AEAD)

    def exchange(rk: Any) -> None:
        seal_request(body, inst_key.public_key, response_key=rk, kem=kem, aead=AEAD)
        open_response(resp_blob, response_key, aead=AEAD)  # same size and work as rk's reply

    total = timed(lambda: None, lambda _: exchange(kem.generate()), rounds)
    pooled = timed(kem.generate, exchange, rounds)
    return Result(total, pooled, len(sealed.blob), len(resp_blob))


# -- v2 ------------------------------------------------------------------------------------------


def v2_setup(xw_name: str, body: bytes, pad: str = "padme") -> tuple[Any, Any, bytes, bytes, bytes]:
    xw = get_xwing(xw_name)
    inst_key = xw.from_seed(hashlib.sha256(b"bench-v2").digest())
    inst = InstanceV2(
        chute_id=CHUTE,
        instance_id=INST,
        keys=[inst_key],
        aead=AEAD,
        replay_cache=MemoryReplayCache(),
    )
    seed = os.urandom(32)
    sealed = seal_request_v2(
        body,
        inst_key.public_key,
        chute_id=CHUTE,
        instance_id=INST,
        relay_nonce="n" * 32,
        path=PATH,
        now_ms=NOW,
        xwing=xw,
        aead=AEAD,
        pad=pad,  # type: ignore[arg-type]
        response_key=xw.from_seed(seed),
    )
    opened = inst.open(sealed.blob, path=PATH, stream=False, now_ms=NOW)
    resp = seal_response_v2(
        ResponseSealer.for_request(opened, xwing=xw, aead=AEAD),
        status=200,
        body=COMPLETION,
        usage=USAGE,
    )
    return xw, inst_key, seed, sealed, resp


def v2_client(xw_name: str, body: bytes, rounds: int, pad: str = "padme") -> Result:
    xw, inst_key, seed, sealed, resp = v2_setup(xw_name, body, pad)

    def exchange(arg: tuple[Any, Any]) -> None:
        rk, reply_key = arg
        seal_request_v2(
            body,
            inst_key.public_key,
            chute_id=CHUTE,
            instance_id=INST,
            relay_nonce="n" * 32,
            path=PATH,
            now_ms=NOW,
            xwing=xw,
            aead=AEAD,
            pad=pad,  # type: ignore[arg-type]
            response_key=rk,
        )
        # the reply was sealed to `seed`; a key object for it is made outside the timing (the
        # decryptor wipes the key it opens with). Same work as opening rk's own reply.
        open_response_v2(
            resp, ResponseSecrets(sealed.secrets.exporter, reply_key, False), aead=AEAD
        )

    total = timed(lambda: (None, xw.from_seed(seed)), exchange, rounds)
    pooled = timed(lambda: (xw.generate(), xw.from_seed(seed)), exchange, rounds)
    return Result(total, pooled, len(sealed.blob), len(resp))


# -- streams -------------------------------------------------------------------------------------


def v1_stream(records: int) -> tuple[float, int, int]:
    kem = get_kem("pyca")
    rk = kem.generate()
    enc = StreamEncoder(StreamSealer(rk.public_key, kem=kem, aead=AEAD), emit_usage=False)
    init = enc.start()
    body = b"".join(enc.feed(CHUNK) for _ in range(records))
    per_chunk = len(body) // records

    def run() -> None:
        dec = StreamDecryptor(kem.from_seed(seed), aead=AEAD)
        dec.receive_data(init + body)
        dec.events()

    seed = rk.seed()
    assert seed is not None
    # the v1 key object is wiped by the decryptor too: rebuild it (and time the rebuild alone)
    t_total = median_us(run, 15)
    t_key = median_us(lambda: kem.from_seed(seed), 15)
    return (t_total - t_key) / records, len(init), per_chunk


def v2_stream(records: int, padding: int) -> tuple[float, int, int]:
    xw = get_xwing("pyca")
    inst_key = xw.from_seed(hashlib.sha256(b"bench-v2").digest())
    sealed = seal_request_v2(
        b'{"model":"m","stream":true}',
        inst_key.public_key,
        chute_id=CHUTE,
        instance_id=INST,
        relay_nonce="n",
        path=PATH,
        now_ms=NOW,
        xwing=xw,
        aead=AEAD,
        response_padding=padding,
    )
    seed = sealed.secrets.key.seed()
    assert seed is not None
    opened = InstanceV2(
        chute_id=CHUTE,
        instance_id=INST,
        keys=[inst_key],
        aead=AEAD,
        replay_cache=MemoryReplayCache(),
    ).open(sealed.blob, path=PATH, stream=True, now_ms=NOW)
    enc = StreamEncoderV2(ResponseSealer.for_request(opened, xwing=xw, aead=AEAD))
    init = enc.start()
    body = b"".join(enc.feed(CHUNK) for _ in range(records))
    tail = enc.finish()
    per_chunk = len(body) // records

    def run() -> None:
        dec = StreamDecryptorV2(
            ResponseSecrets(sealed.secrets.exporter, xw.from_seed(seed), True), aead=AEAD
        )
        dec.receive_data(init + body + tail)
        dec.receive_eof()
        dec.events()

    t_total = median_us(run, 15)
    t_key = median_us(lambda: xw.from_seed(seed), 15)
    return (t_total - t_key) / records, len(init), per_chunk


# -- through the transport -------------------------------------------------------------------------


@contextlib.contextmanager
def _stack() -> Iterator[str]:
    """dev-engine -> instance (v1 and v2) -> relay, in this process; yields the relay's URL."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from pqe2ee.server import instance, relay
    from pqe2ee.testing import dev_engine
    from servers import run_app  # the test suite's loopback server helper

    with contextlib.ExitStack() as es:
        engine = es.enter_context(run_app(dev_engine.create_app()))
        inst = es.enter_context(
            run_app(instance.create_app(instance.InstanceConfig(upstream=engine)))
        )
        config = relay.RelayConfig(
            instances=(inst,),
            api_keys=(TRANSPORT_KEY,),
            startup_wait=5.0,
            rate_limit=100_000,
            nonces_per_instance=200,
        )
        yield es.enter_context(run_app(relay.create_app(config)))


TRANSPORT_KEY = "pk-bench-v2-transport-0123456789"


def transport_rows(rounds: int) -> list[tuple[str, float, float, float, float]]:
    """(case, v1 CPU us, v2 CPU us, v1 wall ms, v2 wall ms): medians over ``rounds``."""
    import httpx2

    from pqe2ee import E2EETransport

    words = " ".join(f"w{i}" for i in range(40))
    cases = [
        ("non-stream, 40-word answer", {"stream": False}),
        ("stream, 42 chunks", {"stream": True}),
    ]
    out = []
    with _stack() as relay_url:
        clients = {
            v: httpx2.Client(
                transport=E2EETransport(
                    api_key=TRANSPORT_KEY,
                    api_base=relay_url,
                    models_base=relay_url,
                    **({"prefer_v2": False} if v == 1 else {"min_version": 2}),
                )
            )
            for v in (1, 2)
        }
        try:
            for label, extra in cases:
                body = {
                    "model": "dev-echo",
                    "messages": [{"role": "user", "content": words}],
                    **extra,
                }
                cpu: dict[int, list[float]] = {1: [], 2: []}
                wall: dict[int, list[float]] = {1: [], 2: []}
                for i in range(rounds + 10):
                    for v in (1, 2) if i % 2 else (2, 1):
                        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
                        resp = clients[v].post("http://sdk.invalid" + PATH, json=body)
                        assert resp.status_code == 200 and b"w39" in resp.content, resp.text
                        if i >= 10:  # warm-up done
                            cpu[v].append((time.thread_time_ns() - c0) / 1000)
                            wall[v].append((time.perf_counter_ns() - w0) / 1e6)
                out.append(
                    (
                        label,
                        statistics.median(cpu[1]),
                        statistics.median(cpu[2]),
                        statistics.median(wall[1]),
                        statistics.median(wall[2]),
                    )
                )
        finally:
            for client in clients.values():
                client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--transport-rounds", type=int, default=200)
    args = parser.parse_args()
    print(
        f"pqe2ee {pqe2ee.__version__ if hasattr(pqe2ee, '__version__') else '?'}, "
        f"cryptography {cryptography.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}; lowest of 5 medians of {args.rounds // 5} rounds\n"
    )

    print("## Client CPU per non-stream request, microseconds\n")
    print("total = response keygen + seal + open; pooled = seal + open with the response key")
    print("pre-generated off the request path (the transports' KeyPool does this for v1)\n")
    print(
        "| body | v1 pyca | v1 pycryptodome | v2 pyca | v2 pycryptodome | v2/v1 (pyca) | v2 pyca / best v1 |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for size in (219, 4096, 65536):
        body = chat_body(max(0, size - 80))
        r1a = v1_client("pyca", body, args.rounds)
        r1b = v1_client("pycryptodome", body, args.rounds)
        r2a = v2_client("pyca", body, args.rounds)
        r2b = v2_client("pycryptodome", body, args.rounds)
        r2n = v2_client("pyca", body, 5, pad="none")
        rows[len(body)] = (r1a, r2n, r2a)
        for label, attr in (("total", "total_us"), ("pooled", "pooled_us")):
            a, b, c, d = (getattr(r, attr) for r in (r1a, r1b, r2a, r2b))
            print(
                f"| {len(body)} B {label} | {a:.0f} | {b:.0f} | {c:.0f} | {d:.0f} | "
                f"{c / a:.2f}x | {c / min(a, b):.2f}x |"
            )

    print("\n## Bytes on the wire, non-stream\n")
    print(
        "| body | v1 request | v2 request (no pad) | v2 request (Padmé) | v1 response | v2 response |"
    )
    print("|---|---|---|---|---|---|")
    for n, (r1, r2n, r2) in rows.items():
        print(
            f"| {n} B | {r1.request_bytes} | {r2n.request_bytes} | {r2.request_bytes} | "
            f"{r1.response_bytes} | {r2.response_bytes} |"
        )

    print("\n## Primitive costs here (pyca), microseconds\n")
    xk = x25519.X25519PrivateKey.generate()
    xp = x25519.X25519PrivateKey.generate().public_key()
    mk = mlkem.MLKEM768PrivateKey.generate()
    mp = mk.public_key()
    _, mct = mp.encapsulate()
    for name, fn in [
        ("X25519 keygen", x25519.X25519PrivateKey.generate),
        ("X25519 exchange", lambda: xk.exchange(xp)),
        ("ML-KEM-768 keygen", mlkem.MLKEM768PrivateKey.generate),
        ("ML-KEM-768 encaps", mp.encapsulate),
        ("ML-KEM-768 decaps", lambda: mk.decapsulate(mct)),
    ]:
        print(f"| {name} | {median_us(fn, args.rounds):.1f} |")

    print(f"\n## Streams: one {len(CHUNK)}-byte vLLM chunk per event, {args.records} chunks\n")
    print(
        "| profile | init (+ HEAD for v2) events, B | bytes per chunk on the wire | overhead per chunk | client CPU per chunk (us) |"
    )
    print("|---|---|---|---|---|")
    t, init, per = v1_stream(args.records)
    print(f"| v1 (2 records: line + blank line) | {init} | {per} | {per - len(CHUNK)} | {t:.1f} |")
    for padding in (0, 128, 256):
        t, init, per = v2_stream(args.records, padding)
        label = "v2, no padding" if not padding else f"v2, buckets of {padding}"
        print(f"| {label} | {init} | {per} | {per - len(CHUNK)} | {t:.1f} |")

    if args.transport_rounds > 0:
        print(
            f"\n## Through the transport (httpx2 E2EETransport, loopback stack), "
            f"median of {args.transport_rounds}\n"
        )
        print(
            "| request | v1 client CPU (us) | v2 client CPU (us) | v2/v1 | v1 wall (ms) | v2 wall (ms) |"
        )
        print("|---|---|---|---|---|---|")
        for label, c1, c2, w1, w2 in transport_rows(args.transport_rounds):
            print(f"| {label} | {c1:.0f} | {c2:.0f} | {c2 / c1:.2f}x | {w1:.2f} | {w2:.2f} |")


if __name__ == "__main__":
    main()
