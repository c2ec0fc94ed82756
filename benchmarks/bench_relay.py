"""Relay CPU, A/B: the relay's own CPU per invocation and per discovery, one or more source
trees side by side in front of the same instance and dev engine.

Run by hand (not part of the test suite)::

    .venv/bin/python benchmarks/bench_relay.py                       # this tree only
    .venv/bin/python benchmarks/bench_relay.py --tree old=../old/src --tree new=src

Every relay runs in its own process (uvicorn, as benchmarks/bench_server.py starts it), each
importing ``pqe2ee`` from its own tree; one instance and one dev engine (this tree) serve them
all. The client (bench_server's E2EE client: real discovery with 10 nonces per call, requests
sealed and opened with ``pqe2ee.protocol``) drives the relays in alternating slices, so load
from elsewhere on the machine hits every tree alike. Reported: relay process CPU (user+sys)
per request, the median over the rounds and the spread, for

* ``non-stream`` and ``stream`` invocations (discovery included, as clients do it), and
* ``discovery`` alone (``GET /e2e/instances``: API key, rate limit, 10 nonces issued).

``--forwarder`` adds bench_server's plaintext forward proxy (one hop, in front of the dev engine,
plaintext requests) to the rotation: the relay's target, CPU per request at most the
forwarder's. ``per event`` is (stream - non-stream) / events per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_server as bs

HERE = Path(__file__).resolve()
EVENTS = 28  # stream events per answer to bench_server's prompt


def start_relay(stack: contextlib.ExitStack, tree: str, upstream: str) -> bs.Proc:
    """A relay importing ``pqe2ee`` from source tree ``tree`` (a ``src`` directory), started
    as bench_server starts its servers, and stopped when ``stack`` closes."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(Path(tree).resolve())  # inherited by the server process
    try:
        return stack.enter_context(bs.start("relay", upstream))
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


async def discovery_slice(
    caller: bs.E2EClient, concurrency: int, duration: float, relay: bs.Proc
) -> tuple[int, float]:
    """(discoveries, relay CPU seconds) for ``duration`` seconds of discovery calls."""
    url = f"{caller.relay}/e2e/instances/{caller.chute}"
    headers = {"authorization": f"Bearer {bs.KEY}"}
    done = 0
    stop_at = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            resp = await caller.client.get(url, headers=headers)
            if resp.status_code != 200:
                raise RuntimeError(f"discovery answered {resp.status_code}")
            done += 1

    cpu0 = relay.cpu_seconds()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, relay.cpu_seconds() - cpu0


async def bench(args: argparse.Namespace, trees: list[tuple[str, str]]) -> None:
    import httpx2

    print(bs._versions())
    print(
        f"relay CPU ms per request; {args.rounds} rounds of {args.duration:g} s slices per tree, "
        f"alternating; concurrency {args.concurrency}"
    )
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(bs.start("engine"))
        inst = stack.enter_context(bs.start("instance", engine.url))
        relays = {name: start_relay(stack, tree, inst.url) for name, tree in trees}
        if args.forwarder:
            relays["forwarder"] = stack.enter_context(bs.start("proxy", engine.url))
        limits = httpx2.Limits(max_connections=1000, max_keepalive_connections=1000)
        async with httpx2.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:
            callers: dict[str, bs.E2EClient | bs.PlainClient] = {
                name: bs.PlainClient(r.url, client)
                if name == "forwarder"
                else bs.E2EClient(r.url, client)
                for name, r in relays.items()
            }
            results: dict[tuple[str, str], list[float]] = {}
            names = list(relays)
            for r in range(args.rounds):
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    caller, relay = callers[name], relays[name]
                    for mode in ("non-stream", "stream"):
                        cell = await bs.run_cell(
                            caller,
                            mode == "stream",
                            args.concurrency,
                            args.warmup,
                            args.duration,
                            {"relay": relay},
                        )
                        if cell.errors:
                            raise RuntimeError(f"{name} {mode}: {cell.errors} errors")
                        results.setdefault((name, mode), []).append(cell.cpu_ms("relay"))
                    if isinstance(caller, bs.E2EClient):
                        n, cpu = await discovery_slice(
                            caller, args.concurrency, args.duration, relay
                        )
                        results.setdefault((name, "discovery"), []).append(cpu / max(1, n) * 1000)
                    per_event = results[(name, "stream")][-1] - results[(name, "non-stream")][-1]
                    results.setdefault((name, "per event"), []).append(per_event / EVENTS)
                print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)
    print()
    header = " | ".join(f"{name} ms (min-max)" for name in names)
    pair = len(trees) == 2  # then a column: second tree / first tree
    title = f" {names[1]}/{names[0]} |" if pair else ""
    print(f"| CPU ms per request | {header} |{title}")
    print("|---|" + "---:|" * (len(names) + pair))
    for mode in ("non-stream", "stream", "per event", "discovery"):
        runs = [results.get((name, mode), [math.nan]) for name in names]
        meds = [statistics.median(r) for r in runs]
        cells = " | ".join(
            f"{m:.3f} ({min(r):.3f}-{max(r):.3f})" for m, r in zip(meds, runs, strict=True)
        )
        ratio = f" {meds[1] / meds[0]:.2f} |" if pair else ""
        print(f"| {mode} | {cells} |{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=SRC",
        help="a relay from this src directory (repeat; default: this tree)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=1.5, help="seconds per slice")
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--forwarder", action="store_true", help="measure the plaintext forwarder too"
    )
    args = parser.parse_args()
    trees = [(name, src) for name, _, src in (t.partition("=") for t in args.tree)]
    if not trees:
        trees = [("this", str(HERE.parents[1] / "src"))]
    asyncio.run(bench(args, trees))


if __name__ == "__main__":
    main()
