"""The server benchmark's E2EE client (benchmarks/bench_server.py ``E2EClient``) stays a correct
v1 client over a real relay and instance, and refills its nonce pool as the transports do: one
discovery starts beside the requests when the pool falls to the low watermark, so no request
waits for it in series. It is a measuring instrument; this keeps it honest."""

from __future__ import annotations

import asyncio
import collections
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from servers import serve_chain

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_server as bench  # noqa: E402


@pytest.fixture(scope="module")
def relay() -> Iterator[str]:
    """A real chain handing out 10 nonces a discovery (as the bench's relay and Chutes do)."""
    with serve_chain(1, api_keys=(bench.KEY,), rate_limit=10_000, nonces_per_instance=10) as chain:
        yield chain.relay


def test_prefetch_at_the_low_watermark_no_request_waits(relay: str) -> None:
    async def run() -> None:
        async with httpx2.AsyncClient(timeout=30, trust_env=False) as client:
            e2e = bench.E2EClient(relay, client)
            assert e2e.low_watermark == 3
            for _ in range(6):
                await e2e.lease()
            assert (e2e.refill, len(e2e.pool), e2e.discoveries) == (None, 4, 1)
            await e2e.lease()  # 10 nonces: the 7th lease leaves 3 and starts a discovery ...
            refill = e2e.refill
            assert refill is not None and len(e2e.pool) == 3
            await refill  # ... which nobody waits for
            assert (e2e.refill, len(e2e.pool), e2e.discoveries) == (None, 13, 2)
            assert e2e.waited == 1  # only the very first lease
            for i in range(20):  # 33 nonces seen in all, none of these calls waits
                await e2e.call(stream=i % 2 == 0)
                if e2e.refill is not None:
                    await e2e.refill
            assert e2e.waited == 1
            assert e2e.discoveries == 4  # discovered again at 3 left after 7, 17, 27 leases

    asyncio.run(run())


class _Counted(bench.E2EClient):
    """Counts the waits on a refill (prefetch() while the pool is empty)."""

    waits = 0

    def prefetch(self) -> asyncio.Task[None]:
        self.waits += not self.pool
        task: asyncio.Task[None] = super().prefetch()
        return task


def test_concurrent_leases_share_one_discovery(relay: str) -> None:
    async def run() -> None:
        async with httpx2.AsyncClient(timeout=30, trust_env=False) as client:
            e2e = _Counted(relay, client)
            leases = await asyncio.gather(*(e2e.lease() for _ in range(25)))
            assert len({nonce for _, nonce in leases}) == 25
            assert e2e.waited == 25  # all found the pool empty ...
            assert e2e.discoveries == 3  # ... and waited on one discovery at a time,
            # One waiter at a time asks for the refill: the 1st, 11th and 21st lease, plus the
            # two leases that took a batch's last nonce (at the watermark). Were all waiters
            # woken at every discovery, each would ask again: 25 + 15 + 5 + 2.
            assert e2e.waits == 5
            if e2e.refill is not None:
                await e2e.refill

    asyncio.run(run())


class _Handover(bench.E2EClient):
    """Asks for the discovery in flight right after one finished, before the loop runs the
    finished task's callbacks (a step scheduled from inside the task runs first)."""

    def __init__(self, relay: str, client: httpx2.AsyncClient) -> None:
        super().__init__(relay, client)
        self.handed: list[bool] = []

    async def _discover(self) -> None:
        await super()._discover()
        this = asyncio.current_task()
        asyncio.get_running_loop().call_soon(lambda: self.handed.append(self.prefetch() is this))


def test_a_finished_discovery_is_never_handed_out_as_in_flight(relay: str) -> None:
    # Awaiting a finished task does not yield: a waiter handed one while the pool stays
    # empty would spin for ever (seen at 64 clients).
    async def run() -> None:
        async with httpx2.AsyncClient(timeout=30, trust_env=False) as client:
            e2e = _Handover(relay, client)
            await e2e.lease()
            assert e2e.handed == [False]  # a new discovery was started instead
            assert e2e.refill is not None
            await e2e.refill

    asyncio.run(run())


def test_a_failed_discovery_reaches_the_waiting_request() -> None:
    async def run() -> None:
        async with httpx2.AsyncClient(timeout=30, trust_env=False) as client:
            e2e = bench.E2EClient("http://127.0.0.1:9", client)  # nothing listens
            with pytest.raises(httpx2.HTTPError):
                await e2e.call(stream=False)
            assert e2e.refill is None and e2e.discoveries == 0

    asyncio.run(run())


def test_each_client_of_a_cell_has_its_own_nonce_pool(relay: str) -> None:
    """N clients are N clients: each discovers for itself (the relay still serves one discovery
    per 10 requests), none waits on another's discovery; the plaintext client has no state."""

    async def run() -> None:
        async with httpx2.AsyncClient(timeout=30, trust_env=False) as client:
            e2e = bench.E2EClient(relay, client)
            cell = await bench.run_cell(e2e, False, 4, warmup=0.05, duration=0.3, procs={})
            assert cell.errors == 0 and cell.requests > 0
            assert sorted(e2e.workers) == [0, 1, 2, 3]
            assert e2e.pool == collections.deque() and e2e.discoveries == 0  # (not used)
            made = [w.discoveries for w in e2e.workers.values()]
            assert all(n >= 1 for n in made) and sum(made) == e2e.total("discoveries")
            assert all(w.waited >= 1 for w in e2e.workers.values())  # (its first lease, at least)
            for w in e2e.workers.values():
                if w.refill is not None:
                    await w.refill
            plain = bench.PlainClient(relay, client)
            assert plain.worker(3) is plain

    asyncio.run(run())
