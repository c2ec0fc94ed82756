"""Wire profile v2 through the real servers: dev engine -> ``pqe2ee instance`` -> ``pqe2ee relay``
on loopback, driven by a hand-built v2 client (``pqe2ee.protocol.v2`` + httpx2, see
relay_support). v1 and v2 side by side on one instance, ``--v2-only`` / ``--no-v2``, discovery,
the instance's checks of the context header against what the relay delivers, the ±120 s window,
replays (in memory and through a Redis cache shared by two instance processes), authenticated
engine errors and mid-stream failures, key files and rotation, and a log canary.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import msgspec
import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pqe2ee.cli import cli
from pqe2ee.errors import ErrorCode, PQE2EEError, RemoteError
from pqe2ee.protocol import parse_discovery
from pqe2ee.protocol._codec import b64encode
from pqe2ee.protocol.v2 import E2EPolicy, Negotiator, parse_instance_hint, parse_v2_offer
from pqe2ee.server import instance, relay
from pqe2ee.server.instance.exchange import OPEN_ON_LOOP_MAX
from pqe2ee.server.keyfile import (
    XWING_KEY_FILE_HEADER,
    KeyFileError,
    load_or_create_key,
    load_or_create_xwing_key,
)
from pqe2ee.server.replaycache import RedisReplayCache
from pqe2ee.testing import dev_engine
from relay_support import (
    CHAT,
    KEM,
    KEY_A,
    XWING,
    SealedV2,
    Stack,
    StreamV2,
    auth,
    chat_body,
    discover,
    open_blob,
    open_v2,
    read_stream_v2,
    seal,
    seal_v2,
    serve_stack,
    v2_key,
    wait_until,
)
from servers import run_app
from test_relay_redis import redis_server

ECHO = relay.chute_id_for("dev-echo")
TOOLS = relay.chute_id_for("dev-tools")
COMPLETIONS = "/v1/completions"
W_MS = 120_000


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with serve_stack(2, rate_limit=1000) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=stack.relay, timeout=30) as c:
        yield c


def _rows(client: httpx2.Client, chute: str = ECHO) -> dict[str, Any]:
    instances, _ = discover(client, chute)
    return {i.instance_id: i for i in instances}


def _lease(client: httpx2.Client, chute: str = ECHO, instance_id: str | None = None) -> Any:
    rows = _rows(client, chute)
    return rows[instance_id] if instance_id is not None else next(iter(rows.values()))


def _sealed(
    client: httpx2.Client,
    text: str,
    *,
    stream: bool = False,
    chute: str = ECHO,
    **kw: Any,
) -> SealedV2:
    inst = _lease(client, chute)
    return seal_v2(
        v2_key(inst), inst.instance_id, inst.nonces[0], chute, chat_body(text, stream=stream), **kw
    )


def _post(client: httpx2.Client, s: SealedV2, **headers: str) -> httpx2.Response:
    return client.post("/e2e/invoke", content=s.blob, headers={**s.headers, **headers})


def _stream(client: httpx2.Client, s: SealedV2) -> StreamV2:
    with client.stream("POST", "/e2e/invoke", content=s.blob, headers=s.headers) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return read_stream_v2(s, r.iter_raw())


def _engine_direct(stack: Stack, body: bytes) -> httpx2.Response:
    return httpx2.post(
        stack.engine + CHAT, content=body, headers={"content-type": "application/json"}, timeout=30
    )


def _hint(resp: httpx2.Response) -> ErrorCode | None:
    return parse_instance_hint(resp.content)


# --------------------------------------------------------------------------------------------
# discovery


def test_info_and_discovery_carry_e2e_v2(stack: Stack, client: httpx2.Client) -> None:
    infos = {
        d["instance_id"]: d for d in (httpx2.get(u + "/e2e/info").json() for u in stack.instances)
    }
    now = time.time()
    for info in infos.values():
        assert info["protocols"] == ["v1", "v2"]
        v2 = info["e2e_v2"]
        assert set(v2) == {"v", "kem_id", "kdf_id", "aead_id", "pk", "not_after"}
        assert (v2["v"], v2["kem_id"], v2["kdf_id"], v2["aead_id"]) == (2, 0x647A, 1, 3)
        pk = base64.b64decode(v2["pk"], validate=True)
        assert len(pk) == 1216 and pk[:1184] != base64.b64decode(info["e2e_pubkey"])
        # generated key: current for one lifetime, then previous for one more
        assert now + 3600 < v2["not_after"] <= now + 2 * 3600 + 1
    resp = client.get(f"/e2e/instances/{ECHO}", headers=auth())
    rows = resp.json()["instances"]
    assert {r["instance_id"] for r in rows} == set(infos)
    for row in rows:
        assert set(row) == {"instance_id", "e2e_pubkey", "nonces", "e2e_v2"}
        assert row["e2e_v2"] == infos[row["instance_id"]]["e2e_v2"]
        assert row["e2e_pubkey"] == infos[row["instance_id"]]["e2e_pubkey"]
    # the client side of the contract: every row parses and carries a valid offer
    parsed = parse_discovery(resp.content, now)
    assert parsed.skipped == 0
    decision = Negotiator(E2EPolicy(min_version=2)).decide(ECHO, parsed.instances, now)
    assert decision.version == 2 and len(decision.candidates) == 2


def test_model_chute_id_matches_the_relay() -> None:
    for model in ("dev-echo", "m", "ünïcode/model:7b"):
        assert instance.model_chute_id(model) == relay.chute_id_for(model)


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("padding", [0, 256])
def test_non_stream_round_trip_through_the_relay(
    stack: Stack, client: httpx2.Client, padding: int
) -> None:
    before = stack.stats()["requests"]
    s = _sealed(client, "hello v2", response_padding=padding)
    r = _post(client, s)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    resp = open_v2(s, r.content)
    assert resp.status == 200 and resp.error is None
    assert resp.content_type == "application/json"
    got = json.loads(resp.body)
    want = _engine_direct(stack, chat_body("hello v2")).json()
    assert got["choices"] == want["choices"]
    assert got["choices"][0]["message"]["content"] == "Echo: hello v2"
    assert resp.usage == got["usage"] == want["usage"]
    assert stack.stats()["requests"] == before + 2  # ours and the direct comparison


@pytest.mark.parametrize("padding", [0, 128])
def test_stream_round_trip_through_the_relay(
    stack: Stack, client: httpx2.Client, padding: int
) -> None:
    text = "stream me through v2 please"
    s = _sealed(client, text, stream=True, response_padding=padding)
    out = _stream(client, s)
    assert out.head is not None and out.head.status == 200
    assert out.head.content_type is not None
    assert out.head.content_type.startswith("text/event-stream")  # the engine's own header
    assert out.end is not None and out.end.error is None
    assert out.text() == "Echo: " + text
    # v2 forces include_usage but never continuous_usage_stats: one usage chunk upstream, and
    # it is the authenticated END usage and the single plaintext copy the relay saw
    usage_chunks = [
        json.loads(line[6:])["usage"]
        for line in out.data.split(b"\n")
        if line.startswith(b"data: {") and json.loads(line[6:]).get("usage")
    ]
    assert len(usage_chunks) == 1
    assert out.end.usage == usage_chunks[0] == out.end.usage_copy
    assert out.end.usage_copy_matches is True
    assert out.data.rstrip().endswith(b"data: [DONE]")


def test_v1_and_v2_side_by_side_on_one_instance(stack: Stack, client: httpx2.Client) -> None:
    iid = stack.server(0).instance_id
    for i in range(3):
        inst = _lease(client, ECHO, iid)
        v1 = seal(inst, inst.nonces[0], ECHO, chat_body(f"v1 #{i}"))
        r1 = client.post("/e2e/invoke", content=v1.blob, headers=v1.headers)
        assert r1.status_code == 200
        assert open_blob(v1, r1.content)["choices"][0]["message"]["content"] == f"Echo: v1 #{i}"
        s = seal_v2(v2_key(inst), iid, inst.nonces[1], ECHO, chat_body(f"v2 #{i}"))
        r2 = _post(client, s)
        assert r2.status_code == 200
        assert json.loads(open_v2(s, r2.content).body)["choices"][0]["message"]["content"] == (
            f"Echo: v2 #{i}"
        )
    # v1 streams keep their v1 framing on the same instance
    inst = _lease(client, ECHO, iid)
    v1 = seal(inst, inst.nonces[0], ECHO, chat_body("v1 stream", stream=True))
    with client.stream("POST", "/e2e/invoke", content=v1.blob, headers=v1.headers) as r:
        body = r.read()
    assert b'{"e2e_init":"' in body and b"e2e_v2" not in body


def test_completions_path_and_gzip_off(stack: Stack, client: httpx2.Client) -> None:
    inst = _lease(client)
    body = json.dumps({"model": "dev-echo", "prompt": "plain completion"}).encode()
    s = seal_v2(
        v2_key(inst), inst.instance_id, inst.nonces[0], ECHO, body, path=COMPLETIONS, compress=False
    )
    r = _post(client, s)
    assert r.status_code == 200
    assert json.loads(open_v2(s, r.content).body)["choices"][0]["text"] == "Echo: plain completion"


# --------------------------------------------------------------------------------------------
# the instance checks H against what the relay delivered


def test_replayed_request_is_refused_and_reaches_the_engine_once(
    stack: Stack, client: httpx2.Client
) -> None:
    before = stack.stats()["requests"]
    inst = _lease(client)
    s = seal_v2(v2_key(inst), inst.instance_id, inst.nonces[0], ECHO, chat_body("only once"))
    assert _post(client, s).status_code == 200
    # the relay holds a second valid nonce and lets the same blob through with it (it does not
    # forward X-E2E-Nonce, so only the instance's replay cache can stop this)
    again = _post(client, s, **{"X-E2E-Nonce": inst.nonces[1]})
    assert again.status_code == 409
    assert _hint(again) is ErrorCode.REPLAY
    assert again.json()["detail"] == {"detail": "e2e_v2:replay"}  # nested once (issue 16)
    assert stack.stats()["requests"] == before + 1


def test_request_inflating_past_the_loop_bound_opens_once(
    stack: Stack, client: httpx2.Client
) -> None:
    # The instance's bounded first try on its event loop gives up on this body (it inflates past
    # OPEN_ON_LOOP_MAX) before the replay cache sees it; the worker-thread retry then opens it,
    # and the request id is spent exactly once.
    before = stack.stats()["requests"]
    inst = _lease(client)
    text = "word " * (OPEN_ON_LOOP_MAX // 4)
    s = seal_v2(
        v2_key(inst), inst.instance_id, inst.nonces[0], ECHO, chat_body(text), compress=True
    )
    assert len(s.blob) < OPEN_ON_LOOP_MAX
    r = _post(client, s)
    assert r.status_code == 200, r.content[:200]
    answer = json.loads(open_v2(s, r.content).body)
    assert answer["choices"][0]["message"]["content"].startswith("Echo: word word")
    again = _post(client, s, **{"X-E2E-Nonce": inst.nonces[1]})
    assert again.status_code == 409 and _hint(again) is ErrorCode.REPLAY
    assert stack.stats()["requests"] == before + 1


def _instance_b(stack: Stack) -> str:
    return stack.server(1).instance_id


@pytest.mark.parametrize(
    "case",
    ["path", "stream", "instance_in_h", "chute_header", "chute_in_h", "ts_byte", "redirect"],
)
def test_tampered_context_is_refused(stack: Stack, client: httpx2.Client, case: str) -> None:
    before = stack.stats()["requests"]
    a = stack.server(0).instance_id
    b = _instance_b(stack)
    rows = _rows(client)
    body = chat_body("tamper")
    pk_a, nonce_a = v2_key(rows[a]), rows[a].nonces[0]
    s = seal_v2(pk_a, a, nonce_a, ECHO, body)
    headers: dict[str, str] = {}
    blob = s.blob
    want = ErrorCode.CONTEXT_MISMATCH
    if case == "path":  # sealed for chat, delivered as completions (both allowed paths)
        headers["X-E2E-Path"] = COMPLETIONS
    elif case == "stream":  # sealed non-stream, delivered as a stream
        headers["X-E2E-Stream"] = "true"
    elif case == "instance_in_h":  # sealed to A's key but naming B in H, delivered to A
        s = seal_v2(pk_a, b, nonce_a, ECHO, body)
        blob = s.blob
        headers["X-Instance-Id"] = a
    elif case == "chute_header":  # delivered with another chute of the same instance
        tools = _lease(client, TOOLS, a)
        headers |= {"X-Chute-Id": TOOLS, "X-E2E-Nonce": tools.nonces[0]}
    elif case == "chute_in_h":  # H names a chute this instance does not serve
        s = seal_v2(pk_a, a, nonce_a, str(uuid.uuid4()), body)
        blob = s.blob
        headers["X-Chute-Id"] = ECHO
    elif case == "ts_byte":  # any byte of H is bound into the key schedule
        ts = int.from_bytes(blob[46:54], "big") + 1
        blob = blob[:46] + ts.to_bytes(8, "big") + blob[54:]
        want = ErrorCode.DECRYPT_FAILED
    elif case == "redirect":  # the relay sends A's request to B (with a nonce for B)
        headers |= {"X-Instance-Id": b, "X-E2E-Nonce": rows[b].nonces[0]}
        want = ErrorCode.UNKNOWN_KEY
    r = client.post("/e2e/invoke", content=blob, headers={**s.headers, **headers})
    assert r.status_code == 400, r.text
    assert _hint(r) is want
    assert stack.stats()["requests"] == before


def test_chute_uuid_as_model_reaches_the_engine(stack: Stack, client: httpx2.Client) -> None:
    """Chutes clients may use the chute id as the model: H then names a chute the instance
    serves, and the engine answers (here: an authenticated 404), as with v1."""
    inst = _lease(client)
    body = json.dumps({"model": ECHO, "messages": [{"role": "user", "content": "hi"}]}).encode()
    s = seal_v2(v2_key(inst), inst.instance_id, inst.nonces[0], ECHO, body)
    r = _post(client, s)
    assert r.status_code == 200
    resp = open_v2(s, r.content)
    assert resp.status == 404 and ECHO in resp.body.decode()
    assert resp.error is not None and resp.error.status == 404


def test_forwarded_relay_nonce_is_checked(stack: Stack) -> None:
    """A relay that forwards X-E2E-Nonce gets it compared with H (ours does not forward it)."""
    inst = stack.server(0)
    url = stack.instances[0]
    s = seal_v2(inst.v2.public_key, inst.instance_id, "nonce-one", ECHO, chat_body("n"))  # type: ignore[union-attr]
    r = httpx2.post(url + "/e2e/invoke", content=s.blob, headers={**s.headers, "X-E2E-Nonce": "x"})
    assert (r.status_code, _hint(r)) == (400, ErrorCode.CONTEXT_MISMATCH)
    r = httpx2.post(url + "/e2e/invoke", content=s.blob, headers=s.headers)
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("offset_ms", "status"),
    [(-(W_MS + 1000), 400), (W_MS + 1000, 400), (-(W_MS - 5000), 200), (W_MS - 5000, 200)],
)
def test_timestamp_window(stack: Stack, client: httpx2.Client, offset_ms: int, status: int) -> None:
    s = _sealed(client, "when", now_ms=int(time.time() * 1000) + offset_ms)
    r = _post(client, s)
    assert r.status_code == status
    if status == 400:
        assert _hint(r) is ErrorCode.STALE


def test_oversize_body_hint_through_the_relay() -> None:
    with (
        serve_stack(1, instance_kw={"max_plaintext": 4096}) as s,
        httpx2.Client(base_url=s.relay, timeout=30) as c,
    ):
        before = s.stats()["requests"]
        sealed = _sealed(c, "x" * 20_000)  # gzip makes the blob small; the body is not
        r = _post(c, sealed)
        assert r.status_code == 413
        assert _hint(r) is ErrorCode.OVERSIZE
        assert s.stats()["requests"] == before


# --------------------------------------------------------------------------------------------
# modes


def test_v2_only_refuses_v1_and_serves_v2() -> None:
    with (
        serve_stack(1, instance_kw={"v2_only": True}) as s,
        httpx2.Client(base_url=s.relay, timeout=30) as c,
    ):
        info = httpx2.get(s.instances[0] + "/e2e/info").json()
        assert info["protocols"] == ["v2"] and "e2e_v2" in info
        assert len(base64.b64decode(info["e2e_pubkey"])) == 1184  # rows stay parseable
        before = s.stats()["requests"]
        inst = _lease(c)
        v1 = seal(inst, inst.nonces[0], ECHO, chat_body("old client"))
        direct = httpx2.post(s.instances[0] + "/e2e/invoke", content=v1.blob, headers=v1.headers)
        assert direct.status_code == 426
        assert direct.json()["code"] == "v1_disabled"
        assert "v2" in direct.json()["detail"]
        # through the relay: said as it is (not "key exchange, try another instance")
        via = c.post("/e2e/invoke", content=v1.blob, headers={**v1.headers})
        assert via.status_code == 426 and via.headers["upgrade"] == "pqe2ee-v2"
        assert via.json()["code"] == "v1_disabled" and "v2" in via.json()["detail"]
        assert s.stats()["requests"] == before
        sv2 = seal_v2(v2_key(inst), inst.instance_id, inst.nonces[1], ECHO, chat_body("new"))
        r = _post(c, sv2)
        assert r.status_code == 200
        assert json.loads(open_v2(sv2, r.content).body)["choices"][0]["message"]["content"] == (
            "Echo: new"
        )


def test_no_v2_serves_v1_only() -> None:
    with (
        serve_stack(1, instance_kw={"v2": False}) as s,
        httpx2.Client(base_url=s.relay, timeout=30) as c,
    ):
        info = httpx2.get(s.instances[0] + "/e2e/info").json()
        assert info["protocols"] == ["v1"] and "e2e_v2" not in info
        row = c.get(f"/e2e/instances/{ECHO}", headers=auth()).json()["instances"][0]
        assert set(row) == {"instance_id", "e2e_pubkey", "nonces"}
        inst = _lease(c)
        # a client holding a stale v2 offer is told to rediscover
        sv2 = seal_v2(XWING.generate().public_key, inst.instance_id, inst.nonces[0], ECHO,
                      chat_body("v2?"))  # fmt: skip
        r = _post(c, sv2)
        assert (r.status_code, _hint(r)) == (400, ErrorCode.UNKNOWN_KEY)
        v1 = seal(inst, inst.nonces[1], ECHO, chat_body("v1 fine"))
        assert c.post("/e2e/invoke", content=v1.blob, headers=v1.headers).status_code == 200


def test_config_errors() -> None:
    up = "http://127.0.0.1:9"
    for kw in (
        {"v2": False, "v2_only": True},
        {"v2": False, "redis_url": "redis://x"},
        {"v2": False, "v2_key_file": "/tmp/k"},
        {"key_file": "/tmp/same", "v2_key_file": "/tmp/same"},
        {"v2_key_lifetime": 10},
        {"chute_id": "not-a-uuid"},
        {"instance_id": "not-a-uuid"},
    ):
        with pytest.raises(PQE2EEError):
            instance.InstanceConfig(upstream=up, **kw)
    # a non-UUID instance id is fine without v2; chute ids are lowercased
    instance.InstanceConfig(upstream=up, v2=False, instance_id="legacy-1")
    cid = str(uuid.uuid4()).upper()
    assert instance.InstanceConfig(upstream=up, chute_id=cid).chute_id == cid.lower()


def test_fixed_chute_id(stack: Stack) -> None:
    chute = str(uuid.uuid4())
    cfg = instance.InstanceConfig(upstream=stack.engine, chute_id=chute)
    app = instance.create_app(cfg)
    inst: instance.Instance = app.state.instance
    assert inst.v2 is not None
    with run_app(app) as url:
        for sealed_chute, status in ((chute, 200), (ECHO, 400)):
            s = seal_v2(inst.v2.public_key, inst.instance_id, "n1", sealed_chute, chat_body("c"))
            r = httpx2.post(url + "/e2e/invoke", content=s.blob, headers=s.headers, timeout=30)
            assert r.status_code == status
            if status == 400:
                assert _hint(r) is ErrorCode.CONTEXT_MISMATCH


# --------------------------------------------------------------------------------------------
# keys: rotation, key files, CLI


def test_rotation_keeps_the_previous_key_then_forgets_it(stack: Stack) -> None:
    app = instance.create_app(instance.InstanceConfig(upstream=stack.engine))
    inst: instance.Instance = app.state.instance
    assert inst.rotates_v2 and inst.v2 is not None
    with run_app(app) as url, httpx2.Client(base_url=url, timeout=30) as c:

        def call(pk: bytes) -> httpx2.Response:
            s = seal_v2(pk, inst.instance_id, "n", ECHO, chat_body("rot"))
            return c.post("/e2e/invoke", content=s.blob, headers=s.headers)

        first = parse_v2_offer(c.get("/e2e/info").json(), time.time())
        assert first is not None
        inst.rotate_v2()
        second = parse_v2_offer(c.get("/e2e/info").json(), time.time())
        assert second is not None and second.public_key != first.public_key
        assert second.not_after >= first.not_after
        assert call(first.public_key).status_code == 200  # previous key still opens
        assert call(second.public_key).status_code == 200
        inst.rotate_v2()
        r = call(first.public_key)  # erased now
        assert (r.status_code, _hint(r)) == (400, ErrorCode.UNKNOWN_KEY)
        assert call(second.public_key).status_code == 200


def test_v2_key_file(tmp_path: Path, stack: Stack) -> None:
    path = tmp_path / "v2.key"
    cfg = instance.InstanceConfig(
        upstream=stack.engine, key_file=tmp_path / "v1.key", v2_key_file=path
    )
    first = instance.Instance(cfg)
    assert first.v2_key_source == "created" and not first.rotates_v2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert data.startswith(XWING_KEY_FILE_HEADER + b"\n") and len(data) == 86
    second = instance.Instance(cfg)
    assert second.v2_key_source == "loaded"
    assert second.v2 is not None and first.v2 is not None
    assert second.v2.public_key == first.v2.public_key
    assert second.instance_id == first.instance_id
    # a static key's not_after rolls forward; it is never rotated
    offer = second.v2_offer(now=1000.0)
    assert offer is not None and offer["not_after"] == 1000 + 2 * 3600
    # the two key kinds are never mixed up
    with pytest.raises(KeyFileError, match="X-Wing"):
        load_or_create_xwing_key(tmp_path / "v1.key", XWING)
    with pytest.raises(KeyFileError, match="ML-KEM-768"):
        load_or_create_key(path, KEM)
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="group or others"):
        instance.Instance(cfg)


def test_static_key_refuses_requests_from_before_the_start(tmp_path: Path, stack: Stack) -> None:
    """With a key file and the in-memory cache, a request made before this process started
    may have been admitted by the previous one: refused as stale, never replayable."""
    cfg = instance.InstanceConfig(upstream=stack.engine, v2_key_file=tmp_path / "k")
    app = instance.create_app(cfg)
    inst: instance.Instance = app.state.instance
    assert inst.v2 is not None
    with run_app(app) as url:
        for offset, status in ((-30_000, 400), (5_000, 200)):
            now_ms = int(time.time() * 1000) + offset
            s = seal_v2(inst.v2.public_key, inst.instance_id, "n", ECHO, chat_body("x"),
                        now_ms=now_ms)  # fmt: skip
            r = httpx2.post(url + "/e2e/invoke", content=s.blob, headers=s.headers, timeout=30)
            assert r.status_code == status
            if status == 400:
                assert _hint(r) is ErrorCode.STALE


def test_cli_flags() -> None:
    runner = CliRunner()
    help_text = runner.invoke(cli, ["instance", "--help"]).output
    for flag in ("--v2-only", "--no-v2", "--v2-key-file", "--redis", "--chute-id"):
        assert flag in help_text
    bad = runner.invoke(cli, ["instance", "--upstream", "http://x", "--no-v2", "--v2-only"])
    assert bad.exit_code == 2 and "--v2-only needs v2" in bad.output


# --------------------------------------------------------------------------------------------
# Redis replay cache


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis-v2")) as url:
        yield url


@pytest.mark.redis
def test_redis_cache_shared_by_two_instance_processes(
    redis_url: str, tmp_path: Path, stack: Stack
) -> None:
    """Two workers of one instance (same keys, same id) share the Redis replay cache: of many
    concurrent copies of one request, across both, exactly one is admitted."""
    v1_key = KEM.generate()
    cfg = instance.InstanceConfig(
        upstream=stack.engine, v2_key_file=tmp_path / "shared.key", redis_url=redis_url
    )
    apps = [instance.create_app(cfg, private_key=v1_key) for _ in range(2)]
    insts: list[instance.Instance] = [a.state.instance for a in apps]
    assert insts[0].instance_id == insts[1].instance_id
    assert insts[0].v2 is not None and insts[1].v2 is not None
    assert insts[0].v2.public_key == insts[1].v2.public_key
    with contextlib.ExitStack() as es:
        urls = [es.enter_context(run_app(a)) for a in apps]
        before = stack.stats()["requests"]
        pk = insts[0].v2.public_key
        s = seal_v2(pk, insts[0].instance_id, "n", ECHO, chat_body("exactly once"))

        async def fire() -> list[httpx2.Response]:
            async with httpx2.AsyncClient(timeout=30) as ac:
                return list(
                    await asyncio.gather(
                        *(
                            ac.post(urls[i % 2] + "/e2e/invoke", content=s.blob, headers=s.headers)
                            for i in range(8)
                        )
                    )
                )

        statuses = sorted(r.status_code for r in asyncio.run(fire()))
        assert statuses == [200] + [409] * 7
        assert stack.stats()["requests"] == before + 1
        # a fresh request still goes through either worker
        for url in urls:
            fresh = seal_v2(pk, insts[0].instance_id, "n", ECHO, chat_body("fresh"))
            assert httpx2.post(url + "/e2e/invoke", content=fresh.blob, headers=fresh.headers,
                               timeout=30).status_code == 200  # fmt: skip


def test_replay_cache_down_fails_closed(stack: Stack) -> None:
    cache = RedisReplayCache("redis://127.0.0.1:9/0", timeout=0.5)
    app = instance.create_app(instance.InstanceConfig(upstream=stack.engine), replay_cache=cache)
    inst: instance.Instance = app.state.instance
    assert inst.v2 is not None
    with run_app(app) as url:
        before = stack.stats()["requests"]
        s = seal_v2(inst.v2.public_key, inst.instance_id, "n", ECHO, chat_body("no cache"))
        r = httpx2.post(url + "/e2e/invoke", content=s.blob, headers=s.headers, timeout=30)
        assert r.status_code == 503
        assert r.json()["code"] == "replay_cache_unavailable"
        assert stack.stats()["requests"] == before
    # an instance that owns its Redis cache checks it before serving
    cfg = instance.InstanceConfig(upstream=stack.engine, redis_url="redis://127.0.0.1:9/0")
    with pytest.raises(RuntimeError, match="failed to start"), run_app(instance.create_app(cfg)):
        pass


# --------------------------------------------------------------------------------------------
# engine errors and failures: authenticated, never a clean end


def test_engine_error_is_authenticated_non_stream(stack: Stack, client: httpx2.Client) -> None:
    s = _sealed(client, "__error_500__")
    r = _post(client, s)
    assert r.status_code == 200  # the real status is inside
    resp = open_v2(s, r.content)
    assert resp.status == 500
    assert json.loads(resp.body)["message"].startswith("Simulated engine failure")
    assert resp.error is not None and resp.error.status == 500
    assert "Simulated engine failure" in resp.error.message
    with pytest.raises(RemoteError) as err:
        resp.raise_for_error()
    assert err.value.code is ErrorCode.UPSTREAM_ERROR and err.value.status == 500


def test_engine_error_is_authenticated_stream(stack: Stack, client: httpx2.Client) -> None:
    s = _sealed(client, "__error_500__", stream=True)
    out = _stream(client, s)
    assert out.head is not None and out.head.status == 500
    assert b"Simulated engine failure" in out.data
    assert out.end is not None and out.end.error is not None and out.end.error.status == 500


def test_unreachable_engine_is_an_authenticated_error() -> None:
    app = instance.create_app(instance.InstanceConfig(upstream="http://127.0.0.1:9"))
    inst: instance.Instance = app.state.instance
    assert inst.v2 is not None
    with run_app(app) as url:
        for stream in (False, True):
            s = seal_v2(inst.v2.public_key, inst.instance_id, "n", ECHO,
                        chat_body("anyone?", stream=stream))  # fmt: skip
            r = httpx2.post(url + "/e2e/invoke", content=s.blob, headers=s.headers, timeout=30)
            assert r.status_code == 200
            if stream:
                out = read_stream_v2(s, iter([r.content]))
                assert out.head is not None and out.end is not None and out.data == b""
                status, error = out.head.status, out.end.error
            else:
                resp = open_v2(s, r.content)
                assert resp.body == b""
                status, error = resp.status, resp.error
            assert status == 502
            assert error is not None and error.type == "upstream_error" and error.status == 502


def _breaking_engine() -> Any:
    """An engine that sends one SSE chunk and then drops the connection."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/v1/models":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b'{"data":[{"id":"dev-echo"}]}'})
            return
        while (await receive()).get("more_body"):
            pass
        head = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        chunk = b'data: {"choices":[{"index":0,"delta":{"content":"partial"}}]}\n\n'
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        # returning without the final body message makes uvicorn drop the connection

    return app


def test_mid_stream_engine_failure_ends_with_an_authenticated_error() -> None:
    with contextlib.ExitStack() as es:
        broken = es.enter_context(run_app(_breaking_engine(), log_level="critical"))
        app = instance.create_app(instance.InstanceConfig(upstream=broken))
        inst: instance.Instance = app.state.instance
        url = es.enter_context(run_app(app))
        cfg = relay.RelayConfig(instances=(url,), api_keys=(KEY_A,))
        relay_url = es.enter_context(run_app(relay.create_app(cfg)))
        with httpx2.Client(base_url=relay_url, timeout=30) as c:
            s = _sealed(c, "break", stream=True)
            out = _stream(c, s)
        wait_until(lambda: inst.inflight == 0, what="the slot to be released")
    assert out.head is not None and out.head.status == 200
    assert out.text() == "partial"
    assert out.end is not None and out.end.error is not None  # authenticated, not clean
    assert out.end.error.type == "upstream_error" and out.end.error.status == 502


def test_client_disconnect_cancels_the_engine(stack: Stack, client: httpx2.Client) -> None:
    before = stack.stats()
    s = _sealed(client, "__slow__", stream=True)
    seen = b""
    with client.stream("POST", "/e2e/invoke", content=s.blob, headers=s.headers) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            seen += chunk
            if seen.count(b'{"e2e_v2":"') >= 2:  # HEAD and a first DATA record
                break
    wait_until(
        lambda: stack.stats()["streams_cancelled"] > before["streams_cancelled"],
        what="the engine stream to be cancelled",
    )
    wait_until(lambda: stack.server(0).inflight + stack.server(1).inflight == 0, what="slots")


# --------------------------------------------------------------------------------------------
# relay: offers it reads, hints it passes, a stripping relay


def _info_app(doc: dict[str, Any]) -> Starlette:
    async def info(request: Request) -> Response:
        return JSONResponse(doc)

    return Starlette(routes=[Route("/e2e/info", info)])


@pytest.mark.parametrize(
    ("protocols", "offer", "listed", "has_v2"),
    [
        (["v1", "v2"], "good", True, True),
        (["v1", "v2"], "short", True, False),  # invalid offer dropped, v1 still served
        (["v1", "v2"], "expired", True, False),
        (["v1"], "good", True, False),  # not announced in protocols: not copied
        (["v2"], "good", True, True),
        (["v2"], "short", False, False),  # v2-only without a valid offer: unavailable
        (["v2"], None, False, False),
    ],
)
def test_relay_checks_offers(
    protocols: list[str], offer: str | None, listed: bool, has_v2: bool
) -> None:
    now = int(time.time())
    pk = XWING.generate().public_key
    offers = {
        "good": {"v": 2, "kem_id": 25722, "kdf_id": 1, "aead_id": 3,
                 "pk": b64encode(pk).decode(), "not_after": now + 7200},
        "short": {"v": 2, "kem_id": 25722, "kdf_id": 1, "aead_id": 3,
                  "pk": b64encode(pk[:-1]).decode(), "not_after": now + 7200},
        "expired": {"v": 2, "kem_id": 25722, "kdf_id": 1, "aead_id": 3,
                    "pk": b64encode(pk).decode(), "not_after": now - 3600},
    }  # fmt: skip
    doc: dict[str, Any] = {
        "instance_id": str(uuid.uuid4()),
        "e2e_pubkey": b64encode(KEM.generate().public_key).decode(),
        "models": ["offer-model"],
        "protocols": protocols,
    }
    if offer is not None:
        doc["e2e_v2"] = offers[offer]
    with run_app(_info_app(doc)) as inst_url:
        cfg = relay.RelayConfig(instances=(inst_url,), api_keys=(KEY_A,), startup_wait=0.1)
        with run_app(relay.create_app(cfg)) as relay_url:
            r = httpx2.get(
                f"{relay_url}/e2e/instances/{relay.chute_id_for('offer-model')}", headers=auth()
            )
    if not listed:
        assert r.status_code == 404
        return
    assert r.status_code == 200
    (row,) = r.json()["instances"]
    assert ("e2e_v2" in row) is has_v2
    if has_v2:
        assert row["e2e_v2"] == offers["good"]


class _StripV2:
    """A relay that strips ``e2e_v2`` from discovery (simulated in front of the real one)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/e2e/instances/"):
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        body = bytearray()

        async def capture(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            doc = msgspec.json.decode(bytes(body))
            for row in doc.get("instances", []):
                row.pop("e2e_v2", None)
            out = msgspec.json.encode(doc)
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(out)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": out})

        await self.app(scope, receive, capture)


def test_stripping_relay_is_caught_by_a_pinned_client(stack: Stack) -> None:
    """The servers offer v2; a relay stripping the offer downgrades nothing silently: a client
    that saw the offer before (pinned) refuses, v1 still works for a v1 client."""
    now = time.time()
    negotiator = Negotiator(E2EPolicy())
    honest = httpx2.get(f"{stack.relay}/e2e/instances/{ECHO}", headers=auth(), timeout=30)
    assert negotiator.decide(ECHO, parse_discovery(honest.content, now).instances, now).version == 2
    strip_cfg = relay.RelayConfig(instances=tuple(stack.instances), api_keys=(KEY_A,))
    with (
        run_app(_StripV2(relay.create_app(strip_cfg))) as bad,
        httpx2.Client(base_url=bad, timeout=30) as c,
    ):
        stripped = c.get(f"/e2e/instances/{ECHO}", headers=auth())
        instances = parse_discovery(stripped.content, now).instances
        assert instances and all("e2e_v2" not in i.extra for i in instances)
        with pytest.raises(PQE2EEError) as err:
            negotiator.decide(ECHO, instances, now)
        assert err.value.code is ErrorCode.DOWNGRADE_SUSPECTED
        v1 = seal(instances[0], instances[0].nonces[0], ECHO, chat_body("legacy"))
        assert c.post("/e2e/invoke", content=v1.blob, headers=v1.headers).status_code == 200


# --------------------------------------------------------------------------------------------
# logs


LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx2", "httpcore2", "pqe2ee")


def test_log_canary(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = "CANARY-" + uuid.uuid4().hex
    for name in LOGGERS:
        caplog.set_level(1, logger=name)
    for name in ("uvicorn", "uvicorn.access"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    server_kw: dict[str, Any] = {"log_config": None, "log_level": "trace"}
    secrets: list[str] = [canary]
    with contextlib.ExitStack() as es:
        engine = es.enter_context(run_app(dev_engine.create_app(), **server_kw))
        key = XWING.generate()
        seed = key.seed()
        assert seed is not None
        secrets += [b64encode(key.public_key).decode(), seed.hex(), b64encode(seed).decode()]
        app = instance.create_app(instance.InstanceConfig(upstream=engine), v2_key=key)
        inst: instance.Instance = app.state.instance
        url = es.enter_context(run_app(app, **server_kw))
        cfg = relay.RelayConfig(instances=(url,), api_keys=(KEY_A,))
        relay_url = es.enter_context(run_app(relay.create_app(cfg), **server_kw))
        c = es.enter_context(httpx2.Client(base_url=relay_url, timeout=30))
        s = _sealed(c, canary)
        r = _post(c, s)
        assert canary in open_v2(s, r.content).body.decode()
        assert canary in _stream(c, _sealed(c, canary, stream=True)).text()
        stale = _sealed(c, canary, now_ms=int(time.time() * 1000) - 10 * W_MS)
        assert _post(c, stale).status_code == 400
        assert _post(c, s).status_code == 403  # nonce already used
        inst.rotate_v2()
    records = caplog.records
    lines = [r.getMessage() for r in records if r.name == "pqe2ee.instance"]
    assert any("proto=v2" in m and "status=200" in m for m in lines)
    assert any("proto=v2" in m and "code=stale" in m for m in lines)
    assert any(r.name.startswith("uvicorn") for r in records)
    text = caplog.text + "\n".join(r.getMessage() + repr(r.args) for r in records)
    for secret in secrets:
        assert secret not in text
