"""Issue 16 item 11 on the relay: an oversized *chunked* upload gets the instance's 413 (not a
502 from a reset connection), and an instance's JSON error is nested once in ``detail``."""

from __future__ import annotations

import httpx2

from pqe2ee.protocol.client import classify_v2_hint
from pqe2ee.server import relay
from relay_support import chat_body, discover, seal, serve_stack

ECHO = relay.chute_id_for("dev-echo")


def test_chunked_upload_over_the_instance_limit_is_413() -> None:
    with (
        serve_stack(1, instance_kw={"max_body": 64 * 1024}) as s,
        httpx2.Client(base_url=s.relay, timeout=30) as c,
    ):
        inst = discover(c, ECHO)[0][0]
        big = b"\0" * (4 * 1024 * 1024)  # the relay's own limit is larger: the instance refuses
        for nonce in inst.nonces[:2]:
            sealed = seal(inst, nonce, ECHO, chat_body("x"))
            pieces = (big[j : j + 16384] for j in range(0, len(big), 16384))
            resp = c.post("/e2e/invoke", content=pieces, headers=sealed.headers)
            assert resp.status_code == 413, resp.text
        ok = seal(inst, inst.nonces[2], ECHO, chat_body("still fine"))
        assert c.post("/e2e/invoke", content=ok.blob, headers=ok.headers).status_code == 200


def test_nested_hint_is_still_read() -> None:
    body = b'{"detail":{"detail":"e2e_v2:stale"}}'
    err = classify_v2_hint(400, body)
    assert err is not None and err.code.value == "stale"
