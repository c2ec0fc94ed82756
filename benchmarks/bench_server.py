"""Server benchmark: encrypted (relay -> instance -> dev-engine) vs plaintext, same topology.

Run by hand (not part of the test suite)::

    .venv/bin/python benchmarks/bench_server.py            # ~2 minutes
    .venv/bin/python benchmarks/bench_server.py --quick    # ~50 s

(``bench_server_calls.py`` counts the Python calls per request of the same servers: what this
script's req/s and CPU times measure, without the machine's noise.)

Every server runs in its own process under uvicorn (one worker each, access logs off):

* encrypted ("ours"):  client --> relay --> instance --> dev-engine
* plaintext:           client --> forward proxy --> forward proxy --> dev-engine
* floor E2EE:          floor client --> forward proxy --> floor instance --> dev-engine

The plaintext baseline is two trivial forwarding proxies (Starlette + uvicorn + httpx2,
streaming both ways, like the relay) rather than the engine alone: that keeps the hop count,
the HTTP stack and the number of processes equal, so the ratio measures what E2EE costs
(KEM + AEAD on both ends, gzip, nonce issue/consume, discovery), not the cost of an extra hop.

The client is one asyncio process with httpx2. Encrypted requests are sealed and opened with
``pqe2ee.protocol`` (fresh ML-KEM-768 response key per request) and take their nonces from
real discovery calls (10 nonces per call, as the real relay hands out), so discovery is part
of the measured cost. Like a real client it refills its nonce pool before it runs dry: at the
transports' low watermark (3 left) one discovery starts beside the requests, which go on with
the nonces left, so a request waits for discovery only if the pool does run dry (counted and
printed). The relay serves each discovery all the same; only the client's waiting in series is
gone. (The transports await that prefetch in the request that finds the pool low; the bench
client starts it as a task: it measures the servers, not the client's scheduling.) The N
clients of a cell are N clients: each has its own nonce pool and discovers for itself, as N
client processes would (one shared pool would make them all wait on one discovery of 10 nonces
at a time); they share the HTTP connection pool. Each cell
runs for a fixed duration after a short warm-up, in slices interleaved across the three paths.

The floor E2EE path measures what the v1 wire itself costs here: the same forward proxy in the
relay's place (it passes ``/e2e/...`` on with the v1 headers), ``_floor_instance.py`` (the
forwarder's skeleton doing only what v1 needs, with pqe2ee's backends; it answers discovery
itself) and a client on ``_floor_client.py``'s primitives (``FloorClient``). Before measuring,
the ours client (pqe2ee.protocol) must read the floor instance's answers and the floor client
the real instance's, or the run stops. Each cell's verdict against the target (E2EE >= 0.8x
plaintext req/s): met; floor-bound (the floor misses it too, or ours is within 5 % of it);
else missed. (Hop 1 is not a floor on the floor path: the forwarder costs more CPU per
request than the relay. Compare hop 2, the instances.)

Memory per open stream: N idle-ish ``__slow__`` streams (one small chunk per 0.2 s) are held
open and the RSS delta of the relay and instance (and of the two plaintext proxies) is divided
by N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from _server_clients import (  # (beside this file; the names tests and the servers use)
    CHAT,
    KEY,
    PROMPT,
    E2EClient,
    FloorClient,
    PlainClient,
    chat_body,
)

# --------------------------------------------------------------------------------------------
# server processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The headers a forwarder passes on to ``/e2e/...`` (the floor path's relay): the v1 request's.
_E2E_HEADERS = (
    "authorization",
    "x-chute-id",
    "x-instance-id",
    "x-e2e-nonce",
    "x-e2e-stream",
    "x-e2e-path",
    "content-type",
)


def _skeleton(routes: Callable[[dict[str, Any]], list[Any]]) -> Any:
    """The servers this script writes: Starlette, ``/health``, one httpx2 client to the next hop
    (``state["client"]`` once started) and the routes ``routes(state)`` gives."""
    import httpx2
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # keep-alive expiry below uvicorn's 5 s, as the relay does, so that a connection the
        # next hop is closing is never reused
        limits = httpx2.Limits(
            max_connections=1000, max_keepalive_connections=256, keepalive_expiry=2.0
        )
        async with httpx2.AsyncClient(timeout=60, limits=limits, trust_env=False) as client:
            state["client"] = client
            yield

    async def health(request: Request) -> Response:
        return Response(b"ok")

    return Starlette(routes=[Route("/health", health), *routes(state)], lifespan=lifespan)


def _proxy_app(upstream: str) -> Any:
    """A trivial streaming forward proxy: the plaintext stand-in for one relay/instance hop, and
    the floor path's relay (``/e2e/...`` with the v1 headers: no key, nonce or instance check)."""
    return _skeleton(lambda state: _forwarding(upstream, state))


def _forwarding(upstream: str, state: dict[str, Any]) -> list[Any]:
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    async def forward(request: Request) -> Response:
        return await _forward(request, [(b"content-type", b"application/json")])

    async def relay(request: Request) -> Response:
        got = request.headers
        return await _forward(request, [(k, got[k]) for k in _E2E_HEADERS if k in got])

    async def _forward(request: Request, headers: list[tuple[Any, Any]]) -> Response:
        client = state["client"]
        req = client.build_request(
            request.method,
            upstream + request.url.path,
            headers=headers,
            content=await request.body(),
        )
        resp = await client.send(req, stream=True)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()

        return StreamingResponse(
            body(),
            status_code=resp.status_code,
            media_type=resp.headers.get("content-type", "application/octet-stream"),
        )

    return [
        Route("/v1/{rest:path}", forward, methods=["POST"]),
        Route("/e2e/{rest:path}", relay, methods=["GET", "POST"]),
    ]


def _floor_instance_app(upstream: str) -> Any:
    """The floor path's instance: ``_floor_instance.py``'s routes on the forwarders' skeleton."""
    from _floor_instance import routes  # (beside this file)

    continuous = os.environ.get("BENCH_CONTINUOUS_USAGE", "1") == "1"
    return _skeleton(lambda state: routes(upstream, state, continuous_usage=continuous))


def _serve(role: str, port: int, upstream: str) -> None:
    """Run one server process. The relay and the instance run with the settings ``pqe2ee relay``
    / ``pqe2ee instance`` use (their ``server_settings``; logs at warning); the dev engine and
    the plaintext forwarders with uvicorn's defaults (and the same stack and logging)."""
    import logging

    import uvicorn

    logging.basicConfig(level=logging.WARNING)
    pure_python = os.environ.get("PQE2EE_PURE_PYTHON") == "1"
    if role == "instance":
        from pqe2ee.server.instance import InstanceConfig
        from pqe2ee.server.instance import create_app as instance_app
        from pqe2ee.server.instance.app import server_settings as instance_settings

        continuous = os.environ.get("BENCH_CONTINUOUS_USAGE", "1") == "1"
        config = InstanceConfig(
            upstream=upstream, port=port, max_concurrency=1024, continuous_usage=continuous
        )
        settings = instance_settings(config, log_level="warning", pure_python=pure_python)
        uvicorn.run(instance_app(config), **settings)
        return
    if role == "relay":
        from pqe2ee.server.relay import RelayConfig
        from pqe2ee.server.relay import create_app as relay_app
        from pqe2ee.server.relay.app import server_settings as relay_settings

        relay = RelayConfig(instances=(upstream,), api_keys=(KEY,), port=port, rate_limit=10**9)
        settings = relay_settings(relay, log_level="warning", pure_python=pure_python)
        uvicorn.run(relay_app(relay), **settings)
        return
    if role == "engine":
        from pqe2ee.testing.dev_engine import create_app as engine_app

        app = engine_app()
    elif role == "proxy":
        app = _proxy_app(upstream)
    elif role == "floor-instance":
        app = _floor_instance_app(upstream)
    else:
        raise SystemExit(f"unknown role {role}")
    from pqe2ee.server._stack import uvicorn_stack

    stack = uvicorn_stack(pure_python=pure_python)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        backlog=2048,
        **stack,
    )


@dataclass
class Proc:
    role: str
    url: str
    popen: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        """CPU time used so far, all threads: nanoseconds from ``schedstat`` where the kernel has
        it (the clock ticks of ``stat`` are 10 ms: coarse for a one-second slice at one client)."""
        try:
            ns = 0
            for task in os.listdir(f"/proc/{self.popen.pid}/task"):
                with open(f"/proc/{self.popen.pid}/task/{task}/schedstat") as f:
                    ns += int(f.read().split()[0])
            return ns / 1e9
        except (OSError, ValueError, IndexError):
            with open(f"/proc/{self.popen.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.popen.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def start(role: str, upstream: str = "") -> Iterator[Proc]:
    import httpx2

    port = _free_port()
    popen = subprocess.Popen(
        [sys.executable, __file__, "--serve", role, str(port), upstream],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if popen.poll() is not None:
                raise RuntimeError(f"{role} exited with {popen.returncode}")
            try:
                if httpx2.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{role} did not start")
            time.sleep(0.05)
        yield Proc(role, url, popen)
    finally:
        popen.terminate()
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(10)


@dataclass
class Cell:
    requests: int
    seconds: float
    latencies: list[float]
    errors: int
    cpu: dict[str, float]  # process role -> CPU seconds used while measuring

    def add(self, other: Cell) -> None:
        self.requests += other.requests
        self.seconds += other.seconds
        self.latencies.extend(other.latencies)
        self.errors += other.errors
        for k, v in other.cpu.items():
            self.cpu[k] = self.cpu.get(k, 0.0) + v

    def cpu_ms(self, role: str) -> float:
        return self.cpu.get(role, 0.0) / max(1, self.requests) * 1000.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000.0


def _cpu(procs: dict[str, Proc]) -> dict[str, float]:
    out = {role: p.cpu_seconds() for role, p in procs.items()}
    out["client"] = time.process_time()
    return out


async def run_cell(
    caller: PlainClient | E2EClient,
    stream: bool,
    concurrency: int,
    warmup: float,
    duration: float,
    procs: dict[str, Proc],
) -> Cell:
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop_at = time.perf_counter() + warmup + duration

    async def worker(i: int) -> None:
        nonlocal errors
        me = caller.worker(i)  # (E2EE: client i's own nonce pool)
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await me.call(stream)
            except Exception as exc:
                errors += 1
                if errors <= 3:
                    print(f"  error: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
                continue
            if measuring:
                latencies.append(time.perf_counter() - t0)

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    await asyncio.sleep(warmup)
    measuring = True
    started = time.perf_counter()
    cpu0 = _cpu(procs)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    cpu1 = _cpu(procs)
    return Cell(len(latencies), elapsed, latencies, errors, {k: cpu1[k] - cpu0[k] for k in cpu0})


async def hold_streams(caller: PlainClient | E2EClient, n: int) -> Any:
    """Open ``n`` __slow__ streams, read each one's first bytes, and keep them open."""
    from pqe2ee.protocol import seal_request

    opened: list[Any] = []
    ready = asyncio.Event()
    release = asyncio.Event()
    count = 0

    async def one() -> None:
        nonlocal count
        body = chat_body(True, "__slow__")
        if isinstance(caller, FloorClient):
            (instance_id, instance_pk), nonce = await caller.lease()
            content, _ = caller.crypto.seal(body, instance_pk)
            url, headers = caller.relay + "/e2e/invoke", caller.headers(instance_id, nonce, True)
        elif isinstance(caller, E2EClient):
            inst, nonce = await caller.lease()
            sealed = seal_request(
                body,
                inst.public_key,
                response_key=caller.kem.generate(),
                kem=caller.kem,
                aead=caller.aead,
            )
            url, content = caller.relay + "/e2e/invoke", sealed.blob
            headers = caller.headers(inst.instance_id, nonce, True)
        else:
            url, content, headers = caller.base + CHAT, body, {"content-type": "application/json"}
        async with caller.client.stream("POST", url, content=content, headers=headers) as resp:
            raw = resp.aiter_raw()
            await raw.__anext__()
            opened.append(resp)
            count += 1
            if count == n:
                ready.set()
            await release.wait()

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await asyncio.wait_for(ready.wait(), 60)
    return release, tasks


# --------------------------------------------------------------------------------------------
# main


def _versions() -> str:
    import httpx2
    import starlette
    import uvicorn

    from pqe2ee.backends import get_aead, get_kem

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"Python {platform.python_version()}, CPU {cpu} x {os.cpu_count()}, "
        f"backend KEM {get_kem().name} / AEAD {get_aead().name}, uvicorn {uvicorn.__version__}, "
        f"starlette {starlette.__version__}, httpx2 {httpx2.__version__}, every server on "
        f"{_stack_name()}"
    )


def _stack_name() -> str:
    from pqe2ee.server._stack import uvicorn_stack

    stack = uvicorn_stack(pure_python=os.environ.get("PQE2EE_PURE_PYTHON") == "1")
    http = stack["http"] if isinstance(stack["http"], str) else "httptools"
    return f"{stack['loop']} + {http} (PQE2EE_PURE_PYTHON=1: asyncio + h11)"


#: Issue 14's target: E2EE servers >= this x the plaintext forwarders' req/s, in every cell.
TARGET = 0.8
#: A cell whose ours / floor is at least this is within reach of the floor: "floor-bound".
NEAR_FLOOR = 0.95
PATHS = ("plaintext", "ours", "floor")


def verdict(plain: Cell, ours: Cell, floor: Cell) -> str:
    """met (ours >= TARGET x plaintext); floor-bound (the floor misses too, or ours is within
    NEAR_FLOOR of it); else missed."""
    if ours.rps >= TARGET * plain.rps:
        return "met"
    if floor.rps < TARGET * plain.rps or ours.rps >= NEAR_FLOOR * floor.rps:
        return "floor-bound"
    return "missed"


async def self_check(client: Any, ours_relay: str, floor_relay: str) -> None:
    """Fail loudly unless the floor speaks v1: pqe2ee.protocol (the ours client: strict record
    and usage checks, the inner [DONE]) opens the floor instance's answers, and the floor client
    reads the real instance's."""
    for stream in (False, True):
        await E2EClient(floor_relay, client).call(stream)
        await FloorClient(ours_relay, client).call(stream)


async def measure(
    args: argparse.Namespace, runs: list[tuple[PlainClient | E2EClient, dict[str, Proc]]]
) -> list[tuple[bool, int, list[Cell]]]:
    """Every cell: the paths' short slices interleaved (load from elsewhere on the machine hits
    all alike), the order rotated each round (the first run is penalised on this box); the
    slices of one path are added up."""
    rows = []
    for stream in (False, True):
        for c in (1, 16, 64):
            cells = [Cell(0, 0.0, [], 0, {}) for _ in runs]
            for r in range(args.rounds):
                for i in range(len(runs)):
                    at = (i + r) % len(runs)
                    caller, procs = runs[at]
                    part = await run_cell(
                        caller, stream, c, args.warmup, args.duration / args.rounds, procs
                    )
                    cells[at].add(part)
            rows.append((stream, c, cells))
            rates = ", ".join(
                f"{name} {cell.rps:.0f}" for name, cell in zip(PATHS, cells, strict=True)
            )
            print(f"  {_mode(stream)} c={c}: {rates} req/s", file=sys.stderr)
    return rows


def _mode(stream: bool) -> str:
    return "stream" if stream else "non-stream"


def report(rows: list[tuple[bool, int, list[Cell]]]) -> None:
    print(
        "\n| mode | clients | plaintext req/s | ours req/s | floor req/s | ours ÷ plain "
        "| floor ÷ plain | ours ÷ floor | p50 ms plain / ours / floor | p99 ms plain / ours / floor "
        "| errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for stream, c, (p, e, f) in rows:
        print(
            f"| {_mode(stream)} | {c} | {p.rps:.0f} | {e.rps:.0f} | {f.rps:.0f} "
            f"| {e.rps / p.rps:.2f}x | {f.rps / p.rps:.2f}x | {e.rps / f.rps:.2f}x "
            f"| {p.pct(0.5):.1f} / {e.pct(0.5):.1f} / {f.pct(0.5):.1f} "
            f"| {p.pct(0.99):.1f} / {e.pct(0.99):.1f} / {f.pct(0.99):.1f} "
            f"| {p.errors + e.errors + f.errors} |"
        )
    print(
        f"\nTarget ours >= {TARGET}x plaintext: met; floor-bound = the floor misses it too, or "
        f"ours is within {1 - NEAR_FLOOR:.0%} of the floor; else missed."
    )
    for stream, c, (p, e, f) in rows:
        print(
            f"  {_mode(stream)} c={c}: {verdict(p, e, f)} (ours {e.rps / p.rps:.2f}x, "
            f"floor {f.rps / p.rps:.2f}x, ours/floor {e.rps / f.rps:.2f})"
        )
    print(
        "\nCPU per request (ms; each process's user+sys time over the measured slices,"
        " divided by the requests completed; robust to other load on the machine; at one client"
        " every step is in series, so 'all' bounds the round trip from below):\n"
    )
    print(
        "| mode | clients | path | client | hop 1 (proxy / relay / forwarder) "
        "| hop 2 (proxy / instance / floor instance) | engine | servers total | all |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for stream, c, cells in rows:
        for label, cell in zip(PATHS, cells, strict=True):
            servers = sum(cell.cpu_ms(k) for k in ("hop1", "hop2", "engine"))
            print(
                f"| {_mode(stream)} | {c} | {label} "
                f"| {cell.cpu_ms('client'):.2f} | {cell.cpu_ms('hop1'):.2f} "
                f"| {cell.cpu_ms('hop2'):.2f} | {cell.cpu_ms('engine'):.2f} "
                f"| {servers:.2f} | {servers + cell.cpu_ms('client'):.2f} |"
            )


async def bench(args: argparse.Namespace) -> None:
    import httpx2

    print(_versions())
    continuous = os.environ.get("BENCH_CONTINUOUS_USAGE", "1") == "1"
    print(f"instance continuous_usage_stats: {'on (as Chutes)' if continuous else 'off'}")
    print(
        f"measure {args.duration:g} s per cell and path, in {args.rounds} interleaved slices "
        f"(each after {args.warmup:g} s warm-up); prompt {len(PROMPT.split())} words"
    )
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(start("engine"))
        inst = stack.enter_context(start("instance", engine.url))
        relay = stack.enter_context(start("relay", inst.url))
        proxy2 = stack.enter_context(start("proxy", engine.url))
        proxy1 = stack.enter_context(start("proxy", proxy2.url))
        floor_inst = stack.enter_context(start("floor-instance", engine.url))
        forwarder = stack.enter_context(start("proxy", floor_inst.url))
        limits = httpx2.Limits(max_connections=1000, max_keepalive_connections=1000)
        async with httpx2.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:
            await self_check(client, relay.url, forwarder.url)
            plain = PlainClient(proxy1.url, client)
            e2e = E2EClient(relay.url, client)
            floor = FloorClient(forwarder.url, client)
            rows = await measure(
                args,
                [
                    (plain, {"hop1": proxy1, "hop2": proxy2, "engine": engine}),
                    (e2e, {"hop1": relay, "hop2": inst, "engine": engine}),
                    (floor, {"hop1": forwarder, "hop2": floor_inst, "engine": engine}),
                ],
            )
            report(rows)
            print(
                f"\n(E2EE clients made {e2e.total('discoveries')} discovery calls (floor "
                f"{floor.total('discoveries')}), 10 nonces each; {e2e.total('waited')} requests "
                f"waited for one (floor {floor.total('waited')}))"
            )

            # memory per open stream
            n = args.streams
            await asyncio.sleep(0.5)
            mem_rows = []
            for label, caller, procs in (
                ("E2EE", e2e, [relay, inst]),
                ("plaintext", plain, [proxy1, proxy2]),
                ("floor E2EE", floor, [forwarder, floor_inst]),
            ):
                before = [p.rss_kib() for p in procs]
                release, tasks = await hold_streams(caller, n)
                await asyncio.sleep(0.3)
                during = [p.rss_kib() for p in procs]
                release.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                for p, b, d in zip(procs, before, during, strict=True):
                    mem_rows.append((label, p.role, b, d, (d - b) / n))
                await asyncio.sleep(0.5)
            print(f"\nMemory with {n} open __slow__ streams (RSS, KiB):\n")
            print("| path | process | before | with streams | per stream |")
            print("|---|---|---:|---:|---:|")
            for label, role, b, d, per in mem_rows:
                print(f"| {label} | {role} | {b} | {d} | {per:.1f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        args = sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else ""
        if os.environ.get("BENCH_PROFILE"):  # (bench_server_calls.py)
            from bench_server_calls import profiled

            profiled(lambda: _serve(*args), os.environ["BENCH_PROFILE"])
        else:
            _serve(*args)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.5, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=0.3, help="seconds of warm-up per slice")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved slices per cell")
    parser.add_argument("--streams", type=int, default=200, help="open streams for the RSS test")
    parser.add_argument("--quick", action="store_true", help="1 s cells, 100 streams")
    parser.add_argument(
        "--no-continuous-usage",
        action="store_true",
        help="instance without continuous_usage_stats (one plaintext usage event per stream "
        "instead of one per chunk; the Chutes runtime forces them on)",
    )
    args = parser.parse_args()
    os.environ["BENCH_CONTINUOUS_USAGE"] = "0" if args.no_continuous_usage else "1"
    if args.quick:
        args.duration, args.warmup, args.rounds, args.streams = 1.0, 0.2, 3, 100
    started = time.perf_counter()
    asyncio.run(bench(args))
    print(f"\ntotal {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
