"""When every instance of a chute is cooling down after a 429 (busy), the client waits for the
cool-down instead of discovering: a discovery brings the same instances back, still cooling,
and under load each waiting request spent one, so a burst of 429s emptied the discovery budget
and the client refused every call for a minute (found by benchmarks/bench_redis_streams.py:
271 of 500 streams failed, then 3,500 more with ``discovery_rate_limited``)."""

from __future__ import annotations

import time

import httpx2
import pytest

import pqe2ee
from faults import Fault, FaultyStack
from pqe2ee.protocol.client import BUSY_COOLDOWN
from transport_support import KEY, messages

pytestmark = pytest.mark.anyio


async def test_all_instances_busy_waits_for_the_cooldown_without_discovering(
    stack: FaultyStack,
) -> None:
    transport = pqe2ee.AsyncE2EETransport(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, attest="off"
    )
    body = {"model": "dev-echo", "messages": messages("busy")}
    async with httpx2.AsyncClient(transport=transport, timeout=30) as http:
        assert (await http.post("http://sdk.invalid/v1/chat/completions", json=body)).is_success
        discoveries = stack.faults.discoveries
        stack.faults.inject(Fault.BUSY_429, times=2)  # both instances answer busy once
        started = time.monotonic()
        resp = await http.post("http://sdk.invalid/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text  # before: 503 retries_exhausted
    assert resp.json()["choices"][0]["message"]["content"] == "Echo: busy"
    assert stack.faults.injected == [Fault.BUSY_429, Fault.BUSY_429]
    assert stack.faults.discoveries == discoveries  # before: one more per waiting request
    assert time.monotonic() - started >= BUSY_COOLDOWN - 1.0  # it waited out the cool-down
