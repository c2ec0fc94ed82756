"""Issue 16 item 7: a short nonce-store blip at the relay (its discovery answers 503) does not
spend the client's discovery budget (10 per minute by default): once the relay answers again, the next
call goes through within the back-off (seconds), not a minute later."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx2
import pytest

from pqe2ee.protocol.client import ClientLimits, ClientState
from pqe2ee.server import instance, relay
from pqe2ee.server.noncestore import MemoryNonceStore, NonceStoreError
from pqe2ee.testing import dev_engine
from pqe2ee.transports import httpx2 as tx_httpx2
from servers import run_app

KEY = "blip-key"


class BlinkingStore(MemoryNonceStore):
    """An in-memory nonce store that fails (as Redis down would) while ``down``."""

    down = False

    async def hit(self, key: str, window: float, limit: int) -> bool:
        if self.down:
            raise NonceStoreError("redis: ConnectionError")
        return await super().hit(key, window, limit)

    async def _put(self, binding: bytes, nonces: Sequence[str], ttl: float) -> None:
        if self.down:
            raise NonceStoreError("redis: ConnectionError")
        await super()._put(binding, nonces, ttl)


def chat(client: httpx2.Client, text: str) -> Any:
    body = {"model": "dev-echo", "messages": [{"role": "user", "content": text}]}
    return client.post("http://e2e/v1/chat/completions", json=body)


def test_relay_blip_does_not_burn_the_discovery_budget() -> None:
    store = BlinkingStore()
    with (
        run_app(dev_engine.create_app()) as engine,
        run_app(instance.create_app(instance.InstanceConfig(upstream=engine))) as inst,
    ):
        cfg = relay.RelayConfig(instances=(inst,), api_keys=(KEY,), startup_wait=5.0)
        with run_app(relay.create_app(cfg, nonce_store=store)) as relay_url:
            transport = tx_httpx2.E2EETransport(
                api_key=KEY, api_base=relay_url, models_base=relay_url, timeout=8.0,
                max_attempts=1, limits=ClientLimits(discovery_per_window=3),
            )  # fmt: skip
            with httpx2.Client(transport=transport, timeout=30) as client:
                store.down = True
                failures = 0
                for i in range(5):  # more discoveries than the budget (here 3 per minute)
                    # an HTTP answer since issue 12 (the SDKs raise their own error class)
                    blip = chat(client, f"during the blip {i}")
                    assert blip.status_code == 503, blip.text
                    assert blip.json()["error"]["code"] == "no_instances", blip.text
                    failures += 1
                store.down = False
                r = chat(client, "after the blip")  # before the fix: discovery_rate_limited
                assert r.status_code == 200, r.text
                assert failures == 5


def test_backoff_grows_and_resets() -> None:
    state = ClientState()
    t = 100.0
    assert state.try_record_discovery(t) == 0.0
    state.discovery_failed(t, t)  # type: ignore[arg-type]
    assert state.discovery_wait(t) == pytest.approx(0.25)
    assert state.try_record_discovery(t + 0.3) == 0.0  # type: ignore[arg-type]
    state.discovery_failed(t + 0.3, t + 0.3)  # type: ignore[arg-type]
    assert state.discovery_wait(t + 0.3) == pytest.approx(0.5)  # type: ignore[arg-type]
    # neither failed discovery counts: the full budget is left
    for i in range(state.limits.discovery_per_window):
        assert state.try_record_discovery(t + 1 + i * 0.001) == 0.0  # type: ignore[arg-type]
