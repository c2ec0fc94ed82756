"""Our own attested stack on loopback for tests: dev-engine -> instances whose TDX quotes the
test-only signer makes (genuine or debug TDs) -> relay, and the client's ``AttestOptions``
that verify them with the production verifier under the signer's test root."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from attest_signer import TestQuoteSigner
from pqe2ee.attest import GpuMode, Policy
from pqe2ee.attest.gate import AttestMode, AttestOptions
from pqe2ee.server import instance, relay
from pqe2ee.testing import dev_engine
from servers import run_app


@dataclass
class TeeStack:
    signer: TestQuoteSigner
    relay: str
    urls: list[str]  # each instance's base URL, in the order asked for
    ids: list[str]  # each instance's id
    apps: list[Any]  # each instance's ASGI app as served (wrapped)


@contextlib.contextmanager
def serve_tee_stack(
    debug: Sequence[bool] = (False,),
    *,
    api_keys: Sequence[str],
    wrap: Callable[[Any], Any] = lambda app: app,
    **relay_kw: Any,
) -> Iterator[TeeStack]:
    """One instance per ``debug`` flag (True: its quotes say debug TD), one relay over them."""
    signer = TestQuoteSigner()
    with contextlib.ExitStack() as es:
        engine = es.enter_context(run_app(dev_engine.create_app()))
        urls, ids, apps = [], [], []
        for is_debug in debug:

            def quote(rd: bytes, is_debug: bool = is_debug) -> bytes:
                return signer.quote(rd, debug=is_debug)

            app = instance.create_app(
                instance.InstanceConfig(upstream=engine), quote_provider=quote
            )
            ids.append(app.state.instance.instance_id)
            apps.append(wrap(app))
            urls.append(es.enter_context(run_app(apps[-1])))
        config = relay.RelayConfig(
            instances=tuple(urls), api_keys=tuple(api_keys), startup_wait=5.0, **relay_kw
        )
        relay_url = es.enter_context(run_app(relay.create_app(config)))
        yield TeeStack(signer, relay_url, urls, ids, apps)


def signer_options(signer: TestQuoteSigner, **kw: Any) -> AttestOptions:
    """``require`` mode, no GPU checks (our instances have none), the signer's collateral and
    root, offline, the clock at the time the signer's collateral is valid."""
    args: dict[str, Any] = {
        "mode": AttestMode.REQUIRE,
        "policy": Policy(gpu=GpuMode.OFF),
        "collateral": signer.collateral,
        "pcs_url": None,
        "wall_clock": lambda: signer.now,
        "test_intel_root_der": signer.root_der,
    }
    args.update(kw)
    return AttestOptions(**args)
