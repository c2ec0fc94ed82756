"""Python calls per request in every process of ``bench_server.py``'s three paths, one client.

Run by hand (not part of the test suite)::

    .venv/bin/python benchmarks/bench_server_calls.py          # 200 requests per path and mode
    .venv/bin/python benchmarks/bench_server_calls.py -n 50 --top 15

bench_server's req/s and CPU times move with the machine's other load; this count does not. The
same servers (plaintext forwarders, relay and instance, forwarder and floor instance, one
dev-engine) run under cProfile; each process writes its counts on SIGUSR1. For each path and
mode: 20 warm-up requests, a snapshot, ``-n`` requests in series, a snapshot; the difference
over ``-n`` is the process's calls per request (function and builtin calls, as cProfile counts
them; discovery, one per 10 requests, included). The client is this process, profiled around
the same requests. ``--top K`` lists, per mode, the K functions that the instance calls more
often than the floor instance does (per request), the instance's own extra work.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import itertools
import os
import pstats
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import bench_server as bench  # (beside this file)

WARMUP = 20


def profiled(serve: Callable[[], None], directory: str) -> None:
    """Run ``serve`` under cProfile; on each SIGUSR1 the counts so far go to
    ``directory/<pid>.<k>`` (k = 0, 1, ...) and their total to ``<pid>.<k>.total``."""
    profile = cProfile.Profile()
    taken = itertools.count()

    def snapshot(signum: int, frame: Any) -> None:
        profile.disable()
        path = os.path.join(directory, f"{os.getpid()}.{next(taken)}")
        profile.dump_stats(path + ".tmp")
        with open(path + ".total", "w") as f:
            f.write(str(total_calls(profile)))
        os.replace(path + ".tmp", path)
        profile.enable()

    signal.signal(signal.SIGUSR1, snapshot)
    profile.enable()
    serve()


def total_calls(profile: cProfile.Profile) -> int:
    """All calls ``profile`` counted. Not ``pstats.Stats.total_calls``: pstats keys functions by
    (file, line, name), so the generated methods of dataclasses (every ``__eq__`` or
    ``__init__`` is ``<string>:2``) collide there and all but one's counts are lost."""
    return sum(entry.callcount for entry in profile.getstats())


def _snapshot(directory: str, procs: list[bench.Proc], taken: dict[int, int]) -> dict[int, Any]:
    """The next snapshot of each process (``taken``: how many each has written): its stats,
    read once written."""
    for p in procs:
        p.popen.send_signal(signal.SIGUSR1)
    out = {}
    for p in procs:
        pid = p.popen.pid
        path = os.path.join(directory, f"{pid}.{taken.get(pid, 0)}")
        taken[pid] = taken.get(pid, 0) + 1
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{p.role} wrote no snapshot")
            time.sleep(0.02)
        with open(path + ".total") as f:
            out[pid] = (int(f.read()), pstats.Stats(path))
    return out


def _per_function(before: Any, after: Any, n: int) -> dict[str, float]:
    """Calls per request of each function between two snapshots (by pstats' keys: the
    generated dataclass methods share a row there, see :func:`total_calls`)."""
    old = {f: v[1] for f, v in before.stats.items()}  # (file, line, name) -> total calls
    out: dict[str, float] = collections.defaultdict(float)
    for f, v in after.stats.items():  # (functions of one name in files of one name: added up)
        if v[1] != old.get(f, 0):
            out[f"{os.path.basename(f[0])}:{f[2]}"] += (v[1] - old.get(f, 0)) / n
    return out


async def run(args: argparse.Namespace, directory: str) -> None:
    import httpx2

    n = args.n
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(bench.start("engine"))
        inst = stack.enter_context(bench.start("instance", engine.url))
        relay = stack.enter_context(bench.start("relay", inst.url))
        proxy2 = stack.enter_context(bench.start("proxy", engine.url))
        proxy1 = stack.enter_context(bench.start("proxy", proxy2.url))
        floor_inst = stack.enter_context(bench.start("floor-instance", engine.url))
        forwarder = stack.enter_context(bench.start("proxy", floor_inst.url))
        taken: dict[int, int] = {}
        async with httpx2.AsyncClient(timeout=120, trust_env=False) as client:
            paths: list[tuple[str, Any, list[bench.Proc]]] = [
                ("plaintext", bench.PlainClient(proxy1.url, client), [proxy1, proxy2, engine]),
                ("ours", bench.E2EClient(relay.url, client), [relay, inst, engine]),
                (
                    "floor",
                    bench.FloorClient(forwarder.url, client),
                    [forwarder, floor_inst, engine],
                ),
            ]
            rows = []
            extra: dict[bool, dict[str, float]] = {}
            for stream in (False, True):
                hop2: dict[str, dict[str, float]] = {}
                for label, caller, procs in paths:
                    for _ in range(WARMUP):
                        await caller.call(stream)
                    before = _snapshot(directory, procs, taken)
                    profile = cProfile.Profile()
                    profile.enable()
                    for _ in range(n):
                        await caller.call(stream)
                    profile.disable()
                    after = _snapshot(directory, procs, taken)
                    counts = [total_calls(profile) / n] + [
                        (after[p.popen.pid][0] - before[p.popen.pid][0]) / n for p in procs
                    ]
                    rows.append((stream, label, counts))
                    hop2[label] = _per_function(
                        before[procs[1].popen.pid][1], after[procs[1].popen.pid][1], n
                    )
                    print(f"  {bench._mode(stream)} {label}: {counts}", file=sys.stderr)
                floor = hop2["floor"]
                extra[stream] = {f: c - floor.get(f, 0.0) for f, c in hop2["ours"].items()}
    print(f"\nPython calls per request (cProfile), {n} requests in series per path and mode:\n")
    print("| mode | path | client | hop 1 | hop 2 | engine | servers | all |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for stream, label, (cl, h1, h2, en) in rows:
        servers = h1 + h2 + en
        print(
            f"| {bench._mode(stream)} | {label} | {cl:.0f} | {h1:.0f} | {h2:.0f} | {en:.0f} "
            f"| {servers:.0f} | {servers + cl:.0f} |"
        )
    print("\n(hop 1: proxy / relay / forwarder; hop 2: proxy / instance / floor instance)")
    for stream, diff in extra.items() if args.top else ():
        print(f"\n{bench._mode(stream)}: the instance's calls per request above the floor's:\n")
        for name, count in sorted(diff.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {count:8.1f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="requests per path and mode")
    parser.add_argument("--top", type=int, default=0, help="list the instance's top extra calls")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        os.environ["BENCH_PROFILE"] = directory  # (the servers inherit it)
        asyncio.run(run(args, directory))


if __name__ == "__main__":
    main()
