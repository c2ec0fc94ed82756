"""The by-hand probes of ``bench_client.py`` (``--keypool``, ``--count N``, ``--instructions N``):
what the key pool's filler-thread decision rests on, Python calls per request (cProfile) and
instructions per request (valgrind) for each client, and a non-stream call's split measured warm
against an in-process mock relay. Deterministic counts, unlike the CPU tables of the main run.
Run through ``bench_client.py``; the plumbing (servers, client processes) is shared with it.
"""

from __future__ import annotations

import functools
import os
import platform
import queue
import resource
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx2
from bench_client import (
    FLOOR,
    KEY,
    MODEL,
    SHORT_PROMPT,
    SPLIT,
    long_prompt,
    stack,
)

import pqe2ee
from pqe2ee.backends import get_kem

__all__ = [
    "count_table",
    "env_report",
    "instructions_table",
    "keypool_table",
    "print_split",
    "split_calls",
]


def split_calls(http: httpx2.Client, call: Callable[[], object], n: int) -> dict[str, list[float]]:
    """Thread CPU of ``n`` non-stream ``call()`` s through ``http``, in sections: the whole call,
    the client's transport, its inner transport (relay send + answer head; for plain: the
    engine's) and, for the floor client, its KEM calls; and the call's system (kernel) time.
    The wrappers (~1 µs each) are set on the instances only while measuring."""
    clock, acc = time.thread_time, {}
    patched: list[tuple[Any, str, Any]] = []

    def timed(obj: Any, attr: str, name: str) -> None:
        fn = getattr(obj, attr, None)
        if fn is None:
            return

        def wrapper(*args: Any) -> Any:
            t = clock()
            try:
                return fn(*args)
            finally:
                acc[name] = acc.get(name, 0.0) + clock() - t

        patched.append((obj, attr, vars(obj).get(attr)))
        setattr(obj, attr, wrapper)

    outer = http._transport
    timed(outer, "handle_request", "transport")
    timed(getattr(outer, "_inner", None), "handle_request", "inner")
    for attr in ("_keygen", "_encaps", "_decaps"):
        timed(outer, attr, "kem")
    rows = []
    usage = functools.partial(resource.getrusage, resource.RUSAGE_THREAD)
    for _ in range(n):
        acc.clear()
        before = usage()
        t = clock()
        call()
        rows.append({"call": clock() - t, **acc})
        after = usage()
        rows[-1]["sys"] = after.ru_stime - before.ru_stime
    for obj, attr, own in patched:  # (an instance's own attribute, or the class's method)
        if own is None:
            delattr(obj, attr)
        else:
            setattr(obj, attr, own)
    return {k: [r[k] for r in rows] for k in rows[0]}


def print_split(split: dict[tuple[str, str], list[float]], kem_us: float | None) -> None:
    """The table of :func:`split_calls` sections per client (medians, µs)."""
    us = 1e6

    def med(kind: str, name: str) -> float:
        values = split.get((kind, name))
        if not values:
            return 0.0
        # (kernel time is sampled at clock ticks: its mean, not a median of 0s and ticks)
        return (statistics.fmean if name == "sys" else statistics.median)(values) * us

    print(
        "\n| client | whole call | of it in the kernel (mean) | SDK outside transport | transport "
        "| inner (send + head) | floor's KEM | transport's own rest |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in SPLIT:
        call, transport = med(kind, "call"), med(kind, "transport")
        inner = med(kind, "inner") if (kind, "inner") in split else transport
        kem = med(kind, "kem")
        kem_cell = ""
        if kind == FLOOR:
            kem_cell = f"{kem:.0f}" + ("" if kem_us is None else f" (warm {kem_us:.0f})")
        print(
            f"| {kind} | {call:.0f} | {med(kind, 'sys'):.0f} | {call - transport:.0f} "
            f"| {transport:.0f} | {inner:.0f} | {kem_cell} | {transport - inner - kem:.0f} |"
        )


def _median_us(fn: Any, n: int = 300, gap: float = 0.0) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(n):
        if gap:
            time.sleep(gap)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


class _Handoff:
    """Another thread makes an object on request: the round trip a filler thread costs."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.asked = False
        self.made: object | None = None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self.cond:
            while True:
                while not self.asked:
                    self.cond.wait()
                self.asked, self.made = False, object()
                self.cond.notify_all()

    def ask(self) -> object:
        with self.cond:
            self.asked, self.made = True, None
            self.cond.notify_all()
            while self.made is None:
                self.cond.wait()
            return self.made


def keypool_table() -> None:
    from pqe2ee.backends import available
    from pqe2ee.backends.xwing import available_xwing, get_xwing
    from pqe2ee.transports._keypool import HANDOFF_COST, KeyPool, XWingKeyPool

    requests: queue.SimpleQueue[object] = queue.SimpleQueue()
    answers: queue.SimpleQueue[object] = queue.SimpleQueue()

    def serve() -> None:
        while True:
            requests.get()
            answers.put(object())

    threading.Thread(target=serve, daemon=True).start()
    handoff = _Handoff()
    print(f"Python {platform.python_version()} | {platform.machine()} × {os.cpu_count()} CPUs")
    print(
        f"hand-off round trip: Condition {_median_us(handoff.ask):.1f} µs, SimpleQueue "
        f"{_median_us(lambda: (requests.put(None), answers.get())):.1f} µs; the pool's "
        f"threshold HANDOFF_COST = {HANDOFF_COST * 1e6:.0f} µs"
    )
    print(
        "\n| key | backend | keygen µs | take() no filler µs | take() filler, 2 ms apart µs "
        "| filler by default |"
    )
    print("|---|---|---|---|---|---|")
    gens: list[tuple[str, str, Any, Any]] = [
        ("ML-KEM-768", n, get_kem(n), KeyPool) for n in available()
    ] + [("X-Wing", n, get_xwing(n), XWingKeyPool) for n in available_xwing()]
    for label, name, kem, pool_cls in gens:
        keygen = _median_us(kem.generate)
        bare = pool_cls(kem, 4, filler=False)
        inline = _median_us(bare.take)
        filled = pool_cls(kem, 4, filler=True)
        spaced = _median_us(filled.take, n=200, gap=0.002)
        auto = pool_cls(kem, 4)
        for _ in range(4):
            auto.take()
        for pool in (bare, filled, auto):
            pool.close()
        print(f"| {label} | {name} | {keygen:.1f} | {inline:.1f} | {spaced:.1f} | {auto.filler} |")


def instructions_table(n: int) -> None:
    """Instructions (valgrind) per non-stream call and per streamed event of the long stream,
    for every client: deterministic, unlike CPU time (one worker run each, ``n`` calls then
    ``n // 20`` long streams, bounded by snapshots, socket reads one piece at a time as the
    servers wrote them: see ``_cachegrind``)."""
    from _cachegrind import LONG_NONCES, run_steps  # (beside this file)
    from bench_client import _CLI_CODE

    _CLI_CODE[:] = [LONG_NONCES]

    streams = max(1, n // 20)
    order = ("ours-plain", FLOOR, "ours-e2ee", "ref-plain", "ref-e2ee")
    per: dict[str, tuple[float, float]] = {}
    with stack() as (engine, relay):
        for kind in order:
            _, calls, longs = run_steps(
                kind,
                engine,
                relay,
                [("paced", 0), ("nonstream", n), ("stream", streams)],
                sim=False,
            )
            per[kind] = (calls.costs["Ir"] / n, longs.costs["Ir"] / longs.events)
            print(
                f"  {kind}: {per[kind][0]:,.0f} per call, {per[kind][1]:,.0f} per event", flush=True
            )
    print(
        f"\nInstructions (valgrind cachegrind I refs, PYTHONHASHSEED=0) per non-stream call "
        f"({n} calls) and per streamed event ({streams} long streams), client process only"
    )
    print(
        "\n| client | per non-stream call | over its plain | per streamed event | over its plain |"
    )
    print("|---|---:|---:|---:|---:|")
    over: dict[str, tuple[float, float]] = {}
    for kind in order:
        plain = per["ref-plain" if kind.startswith("ref") else "ours-plain"]
        call, event = per[kind]
        over[kind] = (call - plain[0], event - plain[1])
        print(
            f"| {kind} | {call:,.0f} | {over[kind][0]:+,.0f} | {event:,.0f} "
            f"| {over[kind][1]:+,.1f} |"
        )
    print()
    for i, what in enumerate(("non-stream call", "streamed event")):
        f, o, r = over[FLOOR][i], over["ours-e2ee"][i], over["ref-e2ee"][i]
        print(
            f"instructions over plain per {what}: reference / floor = {r / f:.2f}×, "
            f"reference / ours = {r / o:.2f}×, ours − floor = {o - f:+,.0f} ({o / f:.2f}× the floor)"
        )


def _where(path: str, name: str) -> str:
    """A function's short label: the path from its package (or the stdlib's module) on."""
    for mark in ("site-packages/", "/src/", "/benchmarks/", "/lib/python3."):
        if mark in path:
            path = path.split(mark, 1)[1]
            path = path.split("/", 1)[1] if mark == "/lib/python3." else path
            break
    return f"{path}:{name}" if path != "~" else name


PerFunction = dict[str, float]


def _python_calls(client: Any, prompt: str, n: int) -> tuple[PerFunction, PerFunction]:
    """cProfile's calls of each function per non-stream call (``n`` calls) and per streamed
    event (``n // 10`` streams of ``prompt``), after a warm-up."""
    import cProfile
    import pstats

    usage = {"include_usage": True, "continuous_usage_stats": True}

    def call() -> int:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": SHORT_PROMPT}]
        )
        assert r.choices[0].message.content == "Echo: " + SHORT_PROMPT
        return 1

    def stream() -> int:
        s = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options=usage,
        )
        text = [c.choices[0].delta.content or "" for c in s if c.choices]
        assert "".join(text) == "Echo: " + prompt
        return len(text)

    for _ in range(5):
        call()
        stream()
    counts: list[PerFunction] = []
    for fn, reps in ((call, n), (stream, max(1, n // 10))):
        prof = cProfile.Profile()
        prof.enable()
        units = sum(fn() for _ in range(reps))
        prof.disable()
        per: PerFunction = {}
        for (path, _, name), row in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
            key = _where(path, name)
            per[key] = per.get(key, 0.0) + row[1] / units
        counts.append(per)
    return counts[0], counts[1]


def count_table(n: int) -> None:
    """Python function calls (cProfile) per non-stream call and per streamed event of the long
    stream, for ours-plain, the floor client and ours (v1), in this process: deterministic,
    unlike CPU time."""
    import openai
    from _floor_client import FloorTransport  # (beside this file)

    with stack() as (engine, relay):
        transports: dict[str, Any] = {
            "ours-plain": None,
            "floor-e2ee": FloorTransport(KEY, relay),
            "ours-e2ee": pqe2ee.E2EETransport(
                api_key=KEY, api_base=relay, models_base=relay, prefer_v2=False
            ),
        }
        print(f"openai {openai.__version__}; {n} calls and {max(1, n // 10)} long streams each")
        print(
            "\n| client | Python calls per non-stream call | over plain "
            "| per streamed event | over plain |"
        )
        print("|---|---:|---:|---:|---:|")
        base: tuple[float, float] | None = None
        per: dict[str, tuple[PerFunction, PerFunction]] = {}
        for kind, transport in transports.items():
            with openai.OpenAI(
                api_key=KEY,
                base_url=(engine if transport is None else relay) + "/v1",
                max_retries=0,
                http_client=httpx2.Client(transport=transport, timeout=60),
            ) as client:
                per[kind] = _python_calls(client, long_prompt(), n)
            call, event = (sum(d.values()) for d in per[kind])
            base = base or (call, event)
            print(
                f"| {kind} | {call:,.0f} | {call - base[0]:+,.0f} "
                f"| {event:.1f} | {event - base[1]:+.1f} |"
            )
        for i, unit in enumerate(("non-stream call", "streamed event")):
            print(
                f"\nPython calls per {unit}: the 30 functions ours calls most more often than "
                "the floor (E2EE − plain: ours-e2ee − floor-e2ee)"
            )
            print("\n| function | ours | floor | plain | ours − floor |\n|---|---:|---:|---:|---:|")
            o, f, p = (per[k][i] for k in ("ours-e2ee", "floor-e2ee", "ours-plain"))
            for key in sorted(o.keys() | f.keys(), key=lambda k: f.get(k, 0) - o.get(k, 0))[:30]:
                a, b, c = o.get(key, 0), f.get(key, 0), p.get(key, 0)
                print(f"| {key} | {a:.2f} | {b:.2f} | {c:.2f} | {a - b:+.2f} |")
        engine_json = httpx2.post(
            engine + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": SHORT_PROMPT}]},
        ).content
    warm_table(engine_json, n)


def _mock_relay(engine_json: bytes) -> httpx2.MockTransport:
    """A relay + instance in this process (no sockets): model listing, discovery (10,000
    nonces), and invoke answered with ``engine_json`` sealed to the request's response key."""
    import base64

    from pqe2ee.backends import get_aead
    from pqe2ee.protocol.v1.envelope import open_request, seal_response

    kem, aead = get_kem("auto"), get_aead("auto")
    key = kem.generate()
    chute = "5f0c4a8e-1b2d-4c3e-9f00-0123456789ab"
    models = {"data": [{"id": MODEL, "chute_id": chute}]}
    found = {
        "instances": [
            {
                "instance_id": "i-0",
                "e2e_pubkey": base64.b64encode(key.public_key).decode(),
                "nonces": [f"n{i:031d}" for i in range(10_000)],
            }
        ],
        "nonce_expires_in": 3600,
        "nonce_expires_at": int(time.time()) + 3600,
    }
    blob_headers = {"content-type": "application/octet-stream"}

    def handle(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if path == "/e2e/invoke":
            opened = open_request(request.read(), key, aead=aead)
            blob = seal_response(engine_json, opened.response_public_key, kem=kem, aead=aead)
            return httpx2.Response(200, headers=blob_headers, content=blob)
        if path == "/v1/models":
            return httpx2.Response(200, json=models)
        if path == f"/e2e/instances/{chute}":
            return httpx2.Response(200, json=found)
        return httpx2.Response(404, json={"detail": "not here"})

    return httpx2.MockTransport(handle)


def warm_table(engine_json: bytes, n: int) -> None:
    """The split of :func:`split_calls` with the relay (or engine) replaced by an in-process
    mock: what each client's own code costs warm, without sockets or servers sharing the cores
    (the mock's own CPU is its 'inner' section, left out of the transport's rest)."""
    import openai
    from _floor_client import FloorTransport  # (beside this file)

    relay = "http://relay.mock"
    plain = httpx2.MockTransport(
        lambda _: httpx2.Response(
            200, headers={"content-type": "application/json"}, content=engine_json
        )
    )
    transports: dict[str, Any] = {
        "ours-plain": plain,
        "floor-e2ee": FloorTransport(KEY, relay, inner=_mock_relay(engine_json)),
        "ours-e2ee": pqe2ee.E2EETransport(
            api_key=KEY,
            api_base=relay,
            models_base=relay,
            prefer_v2=False,
            inner=_mock_relay(engine_json),
        ),
    }
    https = {k: httpx2.Client(transport=t, timeout=60) for k, t in transports.items()}
    sdks = {
        k: openai.OpenAI(api_key=KEY, base_url=relay + "/v1", max_retries=0, http_client=h)
        for k, h in https.items()
    }

    def caller(sdk: Any) -> Callable[[], object]:
        def call() -> None:
            r = sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": SHORT_PROMPT}]
            )
            assert r.choices[0].message.content == "Echo: " + SHORT_PROMPT

        return call

    calls = {k: caller(sdk) for k, sdk in sdks.items()}
    split: dict[tuple[str, str], list[float]] = {}
    for rnd in range(6):  # alternated; the first round is a warm-up
        for kind in transports:
            out = split_calls(https[kind], calls[kind], max(10, n // 5))
            for name, values in out.items():
                if rnd:
                    split.setdefault((kind, name), []).extend(values)
    print(
        "\nWarm, in this process, the relay (or engine) a mock (no sockets, no servers): "
        "thread CPU per non-stream call, µs, medians"
    )
    print_split(split, None)


def _rank(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    for r, i in enumerate(order):
        ranks[i] = float(r)
    return ranks


def _rho(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (NaN when either side is constant)."""
    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return statistics.correlation(_rank(a), _rank(b))


def env_report(res: Any, kinds: tuple[str, ...]) -> None:
    """Is the paced swing the environment? Per client and request: the client thread's
    context switches and CPU migrations per call, the box's steal, and how the per-round E2EE
    overhead follows the other processes' CPU in those rounds (Spearman's rank correlation)."""
    from bench_client import OPS, paired_overhead

    print(
        "\nEnvironment per round (medians): the client thread's voluntary / involuntary "
        "switches and CPU migrations per call; steal and other processes' CPU (s) per round"
    )
    print(
        "\n| client | request | vol. sw | invol. sw | migrations | steal s | others' CPU s "
        "| ρ(CPU per call, others' CPU) | ρ(CPU per call, invol. sw) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for op in OPS:
        for kind in kinds:
            s = res.get(kind, op)
            cols = list(zip(*s.env, strict=True))
            cells = [f"{statistics.median(c):.2f}" for c in cols]
            cells += [f"{_rho(s.slice_cpu, list(cols[i])):+.2f}" for i in (4, 1)]
            print(f"| {kind} | {op} | " + " | ".join(cells) + " |")
    print(
        "\nSpearman ρ over rounds, E2EE overhead per call vs the other processes' CPU (E2EE + "
        "plain slices) and vs the E2EE slice's involuntary switches per call:"
    )
    for op in OPS:
        cells = []
        for sdk in ("floor", "ours", "ref"):
            if f"{sdk}-e2ee" not in kinds:
                continue
            over = paired_overhead(res, sdk, op)
            e2ee = res.get(f"{sdk}-e2ee", op).env
            plain = res.get(f"{'ours' if sdk == 'floor' else sdk}-plain", op).env
            others = [a[4] + b[4] for a, b in zip(e2ee, plain, strict=True)]
            invol = [a[1] for a in e2ee]
            cells.append(f"{sdk} {_rho(over, others):+.2f} / {_rho(over, invol):+.2f}")
        print(f"  {op}: " + ", ".join(cells))
