"""The relay (control plane) on loopback: real dev-engine -> real instances -> relay, with the
client side done by hand from ``pqe2ee.protocol`` + httpx2.

A small scripted "instance" (real uvicorn, valid ``/e2e/info``) covers the status mapping for
answers the real instance never gives (426, a body broken off mid-way, ...).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx2
import msgspec
import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pqe2ee.errors import LocalProtocolError
from pqe2ee.protocol._codec import b64encode
from pqe2ee.server import relay
from pqe2ee.server.noncestore import MemoryNonceStore, NonceStoreError, api_key_id
from relay_support import (
    KEM,
    KEY_A,
    KEY_B,
    Stack,
    auth,
    chat_body,
    decrypt_stream,
    discover,
    open_blob,
    seal,
    serve_stack,
    wait_until,
)
from servers import run_app

ECHO = relay.chute_id_for("dev-echo")
TOOLS = relay.chute_id_for("dev-tools")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """Two instances (one serving only dev-echo), two API keys, a generous rate limit."""
    with serve_stack(
        2,
        api_keys=(KEY_A, KEY_B),
        instance_models=[None, ["dev-echo"]],
        rate_limit=1000,
    ) as s:
        yield s


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=stack.relay, timeout=20) as c:
        yield c


def invokes(stack: Stack) -> int:
    return sum(c.invokes for c in stack.counters)


# --------------------------------------------------------------------------------------------
# configuration


def test_refuses_to_start_without_keys_unless_no_auth() -> None:
    cfg = relay.RelayConfig(instances=("http://127.0.0.1:9",))
    with pytest.raises(LocalProtocolError, match="--no-auth"):
        relay.create_app(cfg)
    relay.create_app(relay.RelayConfig(instances=("http://127.0.0.1:9",), no_auth=True))


@pytest.mark.parametrize(
    "kw",
    [
        {"instances": ()},
        {"instances": ("ftp://x",)},
        {"instances": ("http://a:1", "http://a:1/")},
        {"api_keys": ("has space",)},
        {"api_keys": ("a,b",)},
        {"api_keys": ("k",), "no_auth": True},
        {"rate_limit": 0},
        {"max_body": -1},
        {"port": 70000},
        {"nonce_store_ttl": 10},
        {"read_timeout": 0},
    ],
)
def test_config_rejects_bad_values(kw: dict[str, Any]) -> None:
    kw.setdefault("instances", ("http://127.0.0.1:9",))
    with pytest.raises(LocalProtocolError):
        relay.RelayConfig(**kw)


def test_api_keys_from_env_and_key_ids() -> None:
    assert relay.api_keys_from_env({"PQE2EE_API_KEYS": " a, b ,,c "}) == ("a", "b", "c")
    assert relay.api_keys_from_env({}) == ()
    kid = api_key_id("secret-key")
    assert "secret" not in kid and len(kid) == 32 and kid == api_key_id("secret-key")


def test_cli_relay_refuses_without_keys_and_has_help(monkeypatch: pytest.MonkeyPatch) -> None:
    from pqe2ee.cli import cli

    monkeypatch.delenv("PQE2EE_API_KEYS", raising=False)
    runner = CliRunner()
    result = runner.invoke(cli, ["relay", "--instance", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "--no-auth" in result.output and "Traceback" not in result.output
    help_text = runner.invoke(cli, ["relay", "--help"]).output
    for option in ("--instance", "--api-key", "--no-auth", "--redis", "--port", "--rate-limit"):
        assert option in help_text
    bad = runner.invoke(cli, ["relay", "--instance", "nope", "--no-auth"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_cli_relay_serves_with_keys_from_env(stack: Stack) -> None:
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PQE2EE_API_KEYS": f"{KEY_B}, cli-key-2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pqe2ee.cli", "relay", "--port", str(port)]
        + [arg for url in stack.instances for arg in ("--instance", url)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                return httpx2.get(base + "/health", timeout=2).status_code == 200
            except httpx2.HTTPError:
                return False

        wait_until(up, timeout=30, what="the relay CLI to start")
        assert (
            httpx2.get(f"{base}/e2e/instances/{ECHO}", headers=auth("cli-key-2")).status_code == 200
        )
        assert httpx2.get(f"{base}/e2e/instances/{ECHO}", headers=auth(KEY_B)).status_code == 200
        assert httpx2.get(f"{base}/e2e/instances/{ECHO}", headers=auth(KEY_A)).status_code == 401
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=20)
    assert "cli-key-2" not in output and KEY_B not in output
    assert "Traceback" not in output


# --------------------------------------------------------------------------------------------
# /v1/models, discovery


def test_models_listing_and_stable_chute_ids(stack: Stack, client: httpx2.Client) -> None:
    first = client.get("/v1/models")  # no auth needed, as on llm.chutes.ai
    assert first.status_code == 200
    doc = first.json()
    assert doc["object"] == "list"
    rows = {row["id"]: row for row in doc["data"]}
    assert set(rows) == {"dev-echo", "dev-tools", "dev-reason"}
    for model, row in rows.items():
        assert row["chute_id"] == str(uuid.uuid5(uuid.NAMESPACE_URL, "pqe2ee:model:" + model))
        assert row["object"] == "model" and row["owned_by"] == "pqe2ee"
        assert row["confidential_compute"] is False
        assert row["input_modalities"] == ["text"] and row["output_modalities"] == ["text"]
        assert isinstance(row["created"], int)
    assert client.get("/v1/models").json() == doc  # stable across calls
    # ... and across relays: a second relay in front of the same instances agrees.
    other = relay.create_app(
        relay.RelayConfig(instances=tuple(stack.instances), api_keys=(KEY_A,), tee=True)
    )
    with run_app(other) as url:
        rows2 = {r["id"]: r for r in httpx2.get(url + "/v1/models").json()["data"]}
    assert {m: r["chute_id"] for m, r in rows2.items()} == {
        m: r["chute_id"] for m, r in rows.items()
    }
    assert all(r["confidential_compute"] is True for r in rows2.values())


def test_discovery_shape_limits_and_random_order() -> None:
    with serve_stack(7) as s, httpx2.Client(base_url=s.relay, timeout=20) as c:
        info = {
            d["instance_id"]: d["e2e_pubkey"]
            for d in (httpx2.get(u + "/e2e/info").json() for u in s.instances)
        }
        assert len(info) == 7
        orders = set()
        all_nonces: set[str] = set()
        for _ in range(10):
            before = time.time()
            resp = c.get(f"/e2e/instances/{ECHO}", headers=auth())
            after = time.time()
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "application/json"
            doc = resp.json()
            assert set(doc) == {"instances", "nonce_expires_in", "nonce_expires_at"}
            assert doc["nonce_expires_in"] == 60
            assert int(before + 60) <= doc["nonce_expires_at"] <= int(after + 60)
            assert len(doc["instances"]) == 5  # max_instances of 7 eligible
            ids = [row["instance_id"] for row in doc["instances"]]
            assert len(set(ids)) == 5
            orders.add(tuple(ids))
            for row in doc["instances"]:
                assert set(row) == {"instance_id", "e2e_pubkey", "nonces", "e2e_v2"}
                assert row["e2e_pubkey"] == info[row["instance_id"]]
                assert len(base64.b64decode(row["e2e_pubkey"], validate=True)) == 1184
                assert len(row["nonces"]) == 10
                for n in row["nonces"]:
                    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", n)
                all_nonces.update(row["nonces"])
        assert len(all_nonces) == 10 * 5 * 10  # every nonce unique
        assert len(orders) > 1  # random sample and order (P(all equal) ~ 1e-30)
        # the 11th discovery within the window is refused, per key
        limited = c.get(f"/e2e/instances/{ECHO}", headers=auth())
        assert limited.status_code == 429
        assert "detail" in limited.json() and "Retry-After" in limited.headers
        metrics = c.get("/metrics").text
        assert "pqe2ee_relay_discovery_rate_limited_total 1.0" in metrics
        assert "pqe2ee_relay_nonces_issued_total 500.0" in metrics


def test_rate_limit_is_per_api_key() -> None:
    with serve_stack(1, api_keys=(KEY_A, KEY_B), rate_limit=2) as s:
        with httpx2.Client(base_url=s.relay, timeout=20) as c:
            codes_a = [
                c.get(f"/e2e/instances/{ECHO}", headers=auth(KEY_A)).status_code for _ in range(3)
            ]
            codes_b = [
                c.get(f"/e2e/instances/{ECHO}", headers=auth(KEY_B)).status_code for _ in range(3)
            ]
    assert codes_a == [200, 200, 429]
    assert codes_b == [200, 200, 429]


def test_discovery_errors(client: httpx2.Client) -> None:
    missing = client.get(f"/e2e/instances/{uuid.uuid4()}", headers=auth())
    assert missing.status_code == 404 and missing.json() == {"detail": "Chute not found"}
    for headers in (
        {},
        auth("wrong-key"),
        {"Authorization": "Basic " + KEY_A},
        {"Authorization": KEY_A},
    ):
        resp = client.get(f"/e2e/instances/{ECHO}", headers=headers)
        assert resp.status_code == 401, headers
        assert resp.json() == {"detail": "Invalid or missing API key"}
    assert client.get("/nope").status_code == 404
    assert client.get("/nope").json() == {"detail": "Not Found"}
    assert client.post(f"/e2e/instances/{ECHO}", headers=auth()).status_code == 405


def test_only_instances_of_the_chute_are_returned(stack: Stack, client: httpx2.Client) -> None:
    echo_ids = {i.instance_id for i in discover(client, ECHO)[0]}
    tools_ids = {i.instance_id for i in discover(client, TOOLS)[0]}
    assert len(echo_ids) == 2  # both instances serve dev-echo
    assert len(tools_ids) == 1 and tools_ids < echo_ids  # only the first serves dev-tools


# --------------------------------------------------------------------------------------------
# invoke: the happy paths


def test_invoke_non_stream_and_stream(stack: Stack, client: httpx2.Client) -> None:
    instances, _ = discover(client, ECHO)
    inst = instances[0]
    plain = seal(inst, inst.nonces[0], ECHO, chat_body("hello relay"))
    resp = client.post("/e2e/invoke", content=plain.blob, headers=plain.headers)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/octet-stream"
    reply = open_blob(plain, resp.content)
    assert reply["choices"][0]["message"]["content"] == "Echo: hello relay"

    streamed = seal(inst, inst.nonces[1], ECHO, chat_body("hello stream", stream=True))
    with client.stream("POST", "/e2e/invoke", content=streamed.blob, headers=streamed.headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text, done = decrypt_stream(streamed, r.iter_raw())
    assert text == "Echo: hello stream" and done


def test_invoke_completions_and_other_model(stack: Stack, client: httpx2.Client) -> None:
    inst = discover(client, TOOLS)[0][0]
    body = json.dumps({"model": "dev-tools", "prompt": "one two", "max_tokens": 5}).encode()
    sealed = seal(inst, inst.nonces[0], TOOLS, body, path="/v1/completions")
    resp = client.post("/e2e/invoke", content=sealed.blob, headers=sealed.headers)
    assert resp.status_code == 200
    assert open_blob(sealed, resp.content)["choices"][0]["text"] == "Echo: one two"


def test_invoke_streams_request_body_without_content_length(client: httpx2.Client) -> None:
    inst = discover(client, ECHO)[0][0]
    sealed = seal(inst, inst.nonces[0], ECHO, chat_body("chunked upload"))
    pieces = [sealed.blob[i : i + 100] for i in range(0, len(sealed.blob), 100)]
    resp = client.post("/e2e/invoke", content=iter(pieces), headers=sealed.headers)
    assert resp.status_code == 200
    assert (
        open_blob(sealed, resp.content)["choices"][0]["message"]["content"]
        == "Echo: chunked upload"
    )


# --------------------------------------------------------------------------------------------
# invoke: nonces


def test_replayed_nonce_is_refused_and_never_reaches_the_instance(
    stack: Stack, client: httpx2.Client
) -> None:
    inst = discover(client, ECHO)[0][0]
    sealed = seal(inst, inst.nonces[0], ECHO, chat_body("once"))
    before = invokes(stack)
    assert (
        client.post("/e2e/invoke", content=sealed.blob, headers=sealed.headers).status_code == 200
    )
    for _ in range(3):
        again = client.post("/e2e/invoke", content=sealed.blob, headers=sealed.headers)
        assert again.status_code == 403
        assert again.json() == {"detail": "Invalid, expired, or already-used nonce"}
    assert invokes(stack) == before + 1


def test_nonce_bound_to_key_chute_and_instance(stack: Stack, client: httpx2.Client) -> None:
    echo = {i.instance_id: i for i in discover(client, ECHO)[0]}
    tools_inst = discover(client, TOOLS)[0][0]
    first = echo[tools_inst.instance_id]  # serves both models
    second = next(i for iid, i in echo.items() if iid != first.instance_id)
    before = invokes(stack)
    attempts = [
        # nonce of (A, echo, first) sent for another chute
        seal(first, first.nonces[0], TOOLS, chat_body("x", model="dev-tools")),
        # ... for another instance of the same chute
        seal(second, first.nonces[1], ECHO, chat_body("x")),
        # ... with another API key
        seal(first, first.nonces[2], ECHO, chat_body("x"), key=KEY_B),
        # a nonce that was never issued
        seal(first, "A" * 32, ECHO, chat_body("x")),
        # a huge one
        seal(first, "A" * 5000, ECHO, chat_body("x")),
    ]
    for sealed in attempts:
        resp = client.post("/e2e/invoke", content=sealed.blob, headers=sealed.headers)
        assert resp.status_code == 403, resp.text
        assert resp.json() == {"detail": "Invalid, expired, or already-used nonce"}
    assert invokes(stack) == before
    # A mismatching attempt burns the nonce (fail closed): the right use afterwards fails too.
    burned = seal(first, first.nonces[1], ECHO, chat_body("x"))
    assert (
        client.post("/e2e/invoke", content=burned.blob, headers=burned.headers).status_code == 403
    )
    # Untouched nonces of the same discovery still work.
    ok = seal(first, first.nonces[3], ECHO, chat_body("still fine"))
    assert client.post("/e2e/invoke", content=ok.blob, headers=ok.headers).status_code == 200


def test_invoke_auth_and_missing_headers(stack: Stack, client: httpx2.Client) -> None:
    inst = discover(client, ECHO)[0][0]
    sealed = seal(inst, inst.nonces[0], ECHO, chat_body("x"))
    before = invokes(stack)
    bad = {**sealed.headers, "Authorization": "Bearer " + KEY_A + "x"}
    resp = client.post("/e2e/invoke", content=sealed.blob, headers=bad)
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    no_auth = {k: v for k, v in sealed.headers.items() if k != "Authorization"}
    assert client.post("/e2e/invoke", content=sealed.blob, headers=no_auth).status_code == 401

    bare = {"Authorization": "Bearer " + KEY_A}
    resp = client.post("/e2e/invoke", content=sealed.blob, headers=bare)
    assert resp.status_code == 422
    assert resp.json() == {
        "detail": [
            {"type": "missing", "loc": ["header", name], "msg": "Field required", "input": None}
            for name in ("x-chute-id", "x-instance-id", "x-e2e-nonce")
        ]
    }
    only_nonce = {k: v for k, v in sealed.headers.items() if k != "X-E2E-Nonce"}
    resp = client.post("/e2e/invoke", content=sealed.blob, headers=only_nonce)
    assert resp.status_code == 422
    assert [e["loc"] for e in resp.json()["detail"]] == [["header", "x-e2e-nonce"]]
    assert invokes(stack) == before
    # the nonce was not touched by any of that
    assert (
        client.post("/e2e/invoke", content=sealed.blob, headers=sealed.headers).status_code == 200
    )


# --------------------------------------------------------------------------------------------
# invoke: instance answers


def test_unknown_path_is_403_from_instance(stack: Stack, client: httpx2.Client) -> None:
    inst = discover(client, ECHO)[0][0]
    sealed = seal(inst, inst.nonces[0], ECHO, chat_body("x"), path="/v1/embeddings")
    resp = client.post("/e2e/invoke", content=sealed.blob, headers=sealed.headers)
    assert resp.status_code == 403
    assert resp.json() == {"detail": "Instance returned status 403"}


def test_tampered_and_truncated_blobs_are_400_and_relay_keeps_serving(
    stack: Stack, client: httpx2.Client
) -> None:
    inst = discover(client, ECHO)[0][0]
    bad_blobs = []
    s0 = seal(inst, inst.nonces[0], ECHO, chat_body("tamper me"))
    flipped = bytearray(s0.blob)
    flipped[len(flipped) // 2] ^= 1
    bad_blobs.append((s0, bytes(flipped)))
    s1 = seal(inst, inst.nonces[1], ECHO, chat_body("truncate me"))
    bad_blobs.append((s1, s1.blob[:-1]))
    s2 = seal(inst, inst.nonces[2], ECHO, chat_body("short"))
    bad_blobs.append((s2, s2.blob[:100]))
    for sealed, blob in bad_blobs:
        resp = client.post("/e2e/invoke", content=blob, headers=sealed.headers)
        assert resp.status_code == 400
        detail = resp.json()["detail"]  # the instance's JSON, nested once (issue 16)
        assert isinstance(detail, dict)
        assert detail["detail"] == "E2E decryption failed"
    s3 = seal(inst, inst.nonces[3], ECHO, chat_body("x"))
    empty = client.post("/e2e/invoke", content=b"", headers=s3.headers)
    assert empty.status_code == 400 and empty.json() == {"detail": "Empty request body"}
    ok = seal(inst, inst.nonces[4], ECHO, chat_body("after the storm"))
    resp = client.post("/e2e/invoke", content=ok.blob, headers=ok.headers)
    assert (
        open_blob(ok, resp.content)["choices"][0]["message"]["content"] == "Echo: after the storm"
    )


def test_stream_header_mismatch_is_400(client: httpx2.Client) -> None:
    inst = discover(client, ECHO)[0][0]
    sealed = seal(inst, inst.nonces[0], ECHO, chat_body("x", stream=True))
    headers = {**sealed.headers, "X-E2E-Stream": "false"}
    resp = client.post("/e2e/invoke", content=sealed.blob, headers=headers)
    assert resp.status_code == 400
    assert "stream" in resp.json()["detail"]["detail"]


def test_sealed_engine_error_passes_through(client: httpx2.Client) -> None:
    inst = discover(client, ECHO)[0][0]
    for i, stream in enumerate((False, True)):
        sealed = seal(inst, inst.nonces[i], ECHO, chat_body("__error_500__", stream=stream))
        resp = client.post("/e2e/invoke", content=sealed.blob, headers=sealed.headers)
        assert resp.status_code == 500
        assert resp.headers["content-type"] == "application/octet-stream"
        err = open_blob(sealed, resp.content)
        assert "Simulated engine failure" in err["message"]


def test_garbage_upload_10mib(stack: Stack, client: httpx2.Client) -> None:
    inst = discover(client, ECHO)[0][0]
    sealed = seal(inst, inst.nonces[0], ECHO, chat_body("x"))
    garbage = bytes(range(256)) * (10 * 1024 * 4)  # 10 MiB
    resp = client.post("/e2e/invoke", content=garbage, headers=sealed.headers)
    assert resp.status_code in (400, 413)
    # ... and the relay still serves
    ok = seal(inst, inst.nonces[1], ECHO, chat_body("still here"))
    assert client.post("/e2e/invoke", content=ok.blob, headers=ok.headers).status_code == 200


def test_relay_body_limit_413_with_and_without_content_length() -> None:
    with serve_stack(1, max_body=64 * 1024) as s, httpx2.Client(base_url=s.relay, timeout=20) as c:
        inst = discover(c, ECHO)[0][0]
        big = b"\0" * (1024 * 1024)
        sealed = seal(inst, inst.nonces[0], ECHO, chat_body("x"))
        resp = c.post("/e2e/invoke", content=big, headers=sealed.headers)
        assert resp.status_code == 413 and "limit" in resp.json()["detail"]
        # refused on Content-Length, before the nonce: it still works
        ok = c.post("/e2e/invoke", content=sealed.blob, headers=sealed.headers)
        assert ok.status_code == 200
        chunked = seal(inst, inst.nonces[1], ECHO, chat_body("x"))
        pieces = (big[i : i + 16384] for i in range(0, len(big), 16384))
        resp = c.post("/e2e/invoke", content=pieces, headers=chunked.headers)
        assert resp.status_code == 413
        assert s.counters[0].invokes in (1, 2)  # the chunked one may have started upstream
        after = seal(inst, inst.nonces[2], ECHO, chat_body("fine"))
        assert c.post("/e2e/invoke", content=after.blob, headers=after.headers).status_code == 200


def test_instance_at_capacity_is_429() -> None:
    with serve_stack(1, instance_kw={"max_concurrency": 1}) as s:
        with httpx2.Client(base_url=s.relay, timeout=20) as c:
            inst = discover(c, ECHO)[0][0]
            slow = seal(inst, inst.nonces[0], ECHO, chat_body("__slow__", stream=True))
            with c.stream("POST", "/e2e/invoke", content=slow.blob, headers=slow.headers) as r:
                assert r.status_code == 200
                busy = seal(inst, inst.nonces[1], ECHO, chat_body("x"))
                resp = c.post("/e2e/invoke", content=busy.blob, headers=busy.headers)
                assert resp.status_code == 429
                assert resp.json() == {"detail": "Instance is at maximum capacity, try again later"}


def test_client_disconnect_mid_stream_cancels_generation() -> None:
    with serve_stack(1) as s, httpx2.Client(base_url=s.relay, timeout=20) as c:
        inst = discover(c, ECHO)[0][0]
        sealed = seal(inst, inst.nonces[0], ECHO, chat_body("__slow__", stream=True))
        with c.stream("POST", "/e2e/invoke", content=sealed.blob, headers=sealed.headers) as r:
            assert r.status_code == 200
            raw = r.iter_raw()  # keep a reference: dropping the iterator closes the response
            got = b""
            while got.count(b'{"e2e":') < 2:
                got += next(raw)
            assert s.stats()["streams_in_flight"] == 1
        # the response is closed here, long before the ~10 s answer could finish
        wait_until(lambda: s.stats()["streams_cancelled"] == 1, what="engine cancel")
        stats = s.stats()
        assert stats["streams_in_flight"] == 0 and stats["streams_completed"] == 0
        wait_until(
            lambda: "pqe2ee_relay_open_responses 0.0" in c.get("/metrics").text,
            what="relay to release the stream",
        )


def test_client_hanging_up_on_a_slow_non_stream_call_cancels_it() -> None:
    """The relay watches for the hang-up while it waits for the instance's answer."""
    records: list[logging.LogRecord] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    inst_log = logging.getLogger("pqe2ee.instance")
    handler, level = Grab(), inst_log.level
    inst_log.addHandler(handler)
    inst_log.setLevel(logging.INFO)
    try:
        with serve_stack(1) as s, httpx2.Client(base_url=s.relay, timeout=20) as c:
            inst = discover(c, ECHO)[0][0]
            sealed = seal(inst, inst.nonces[0], ECHO, chat_body("__slow__"))  # ~10 s answer
            with pytest.raises(httpx2.ReadTimeout):
                c.post(
                    "/e2e/invoke",
                    content=sealed.blob,
                    headers=sealed.headers,
                    timeout=httpx2.Timeout(20, read=0.5),
                )
            wait_until(
                lambda: 'endpoint="invoke",status="499"' in c.get("/metrics").text,
                what="the relay to notice the hang-up",
            )
            wait_until(
                lambda: any("connection_lost" in r.getMessage() for r in records),
                what="the instance to see the cancel",
            )
            assert not any(
                "status=200" in r.getMessage() for r in records if "invoke" in r.getMessage()
            )
    finally:
        inst_log.removeHandler(handler)
        inst_log.setLevel(level)


def test_log_canary_never_logs_prompt_key_or_nonce() -> None:
    records: list[logging.LogRecord] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Grab(level=logging.DEBUG)
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access", "pqe2ee", "httpx2", "httpcore"]
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    canary = "CANARY-zebra-4f7a1c"
    try:
        with serve_stack(1) as s, httpx2.Client(base_url=s.relay, timeout=20) as c:
            inst = discover(c, ECHO)[0][0]
            a = seal(inst, inst.nonces[0], ECHO, chat_body(canary))
            assert c.post("/e2e/invoke", content=a.blob, headers=a.headers).status_code == 200
            b = seal(inst, inst.nonces[1], ECHO, chat_body(canary, stream=True))
            with c.stream("POST", "/e2e/invoke", content=b.blob, headers=b.headers) as r:
                assert decrypt_stream(b, r.iter_raw())[0] == "Echo: " + canary
            bad = seal(inst, inst.nonces[2], ECHO, chat_body(canary))
            c.post("/e2e/invoke", content=bad.blob[:-3], headers=bad.headers)
            c.post("/e2e/invoke", content=a.blob, headers=a.headers)  # replay
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
    assert any(r.name.startswith("pqe2ee") for r in records)  # the capture did work
    secrets_ = [canary, KEY_A, inst.nonces[0], inst.nonces[1], inst.nonces[2]]
    for record in records:
        text = record.getMessage() + repr(record.args)
        for secret in secrets_:
            assert secret not in text, (record.name, secret)


# --------------------------------------------------------------------------------------------
# scripted instance: status mapping, instances going away


def scripted_instance(state: dict[str, Any]) -> Starlette:
    """A stand-in that answers ``/e2e/invoke`` as ``X-E2E-Path: /s/<case>`` says."""
    pubkey = b64encode(KEM.generate().public_key).decode()
    state.setdefault("healthy", True)
    state.setdefault("seen", [])

    async def info(request: Request) -> Response:
        if not state["healthy"]:
            return JSONResponse({"detail": "starting"}, status_code=503)
        return JSONResponse(
            {
                "instance_id": state.get("id", "scripted-1"),
                "e2e_pubkey": pubkey,
                "models": ["script-model"],
                "paths": ["/s"],
                "version": "test",
                "protocols": ["v1"],
            }
        )

    async def invoke(request: Request) -> Response:
        body = await request.body()
        state["seen"].append((dict(request.headers), body))
        case = request.headers["x-e2e-path"].removeprefix("/s/")
        if case == "echo":
            return Response(body[::-1], media_type="application/octet-stream")
        if case == "sealed500":
            return Response(b"\x01sealed-error\x02", 500, media_type="application/octet-stream")
        if case == "sealed404":
            return Response(b"\x03", 404, media_type="application/octet-stream")
        if case == "400json":
            return JSONResponse({"detail": "E2E decryption failed"}, status_code=400)
        if case == "400text":
            return Response("nope", 400, media_type="text/plain")
        if case == "400huge":  # a plaintext error longer than the relay quotes
            return JSONResponse({"detail": "e2e_v2:stale " + "x" * (70 * 1024)}, status_code=400)
        if case == "broken":

            async def parts() -> AsyncIterator[bytes]:
                yield b"data: partial\n\n"
                raise RuntimeError("instance died mid-stream")

            return StreamingResponse(parts(), media_type="text/event-stream")
        if case in ("late", "brokenearly"):  # the head at once, the body later or never

            async def after_a_pause() -> AsyncIterator[bytes]:
                await anyio.sleep(0.5)
                if case == "brokenearly":
                    raise RuntimeError("instance died before its body")
                yield b"late body"

            return StreamingResponse(after_a_pause(), media_type="application/octet-stream")
        if not case.isdigit():
            return JSONResponse({"detail": "Path not available via E2E"}, status_code=403)
        status = int(case)
        return JSONResponse({"error": "x", "detail": f"status {status}"}, status_code=status)

    return Starlette(
        routes=[
            Route("/e2e/info", info, methods=["GET"]),
            Route("/e2e/invoke", invoke, methods=["POST"]),
        ]
    )


SCRIPT = relay.chute_id_for("script-model")


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[str, dict[str, Any]]]:
    state: dict[str, Any] = {}
    with run_app(scripted_instance(state)) as inst_url:
        cfg = relay.RelayConfig(instances=(inst_url,), api_keys=(KEY_A,), rate_limit=1000)
        with run_app(relay.create_app(cfg)) as relay_url:
            yield relay_url, state


def scripted_call(
    relay_url: str, case: str, body: bytes = b"x" * 2000, **headers: str
) -> httpx2.Response:
    with httpx2.Client(base_url=relay_url, timeout=20) as c:
        hdrs = invoke_headers(c, **{"X-E2E-Path": f"/s/{case}"}, **headers)
        return c.post("/e2e/invoke", content=body, headers=hdrs)


def invoke_headers(c: httpx2.Client, **extra: str) -> dict[str, str]:
    """The headers of an invocation of the scripted chute, with a fresh nonce, and ``extra``."""
    row = c.get(f"/e2e/instances/{SCRIPT}", headers=auth()).json()["instances"][0]
    return {
        **auth(),
        "X-Chute-Id": SCRIPT,
        "X-Instance-Id": row["instance_id"],
        "X-E2E-Nonce": row["nonces"][0],
        **extra,
    }


@pytest.mark.parametrize(
    ("case", "status", "detail"),
    [
        ("403", 403, "Instance returned status 403"),
        ("429", 429, "Instance is at maximum capacity, try again later"),
        ("426", 502, "Instance requires key exchange, try a different instance"),
        ("400json", 400, {"detail": "E2E decryption failed"}),  # nested once (issue 16)
        ("400text", 400, "Instance returned status 400"),
        ("400huge", 400, "Instance returned status 400"),  # never a truncated quote
        ("404", 404, "Instance returned status 404"),
        ("503", 503, "Instance returned status 503"),
        ("413", 413, "Instance returned status 413"),
    ],
)
def test_status_mapping(
    scripted: tuple[str, dict[str, Any]], case: str, status: int, detail: Any
) -> None:
    resp = scripted_call(scripted[0], case)
    assert resp.status_code == status
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"detail": detail}


def test_sealed_errors_and_bodies_pass_through_unchanged(
    scripted: tuple[str, dict[str, Any]],
) -> None:
    relay_url, state = scripted
    resp = scripted_call(relay_url, "sealed500")
    assert (resp.status_code, resp.content) == (500, b"\x01sealed-error\x02")
    assert resp.headers["content-type"] == "application/octet-stream"
    resp = scripted_call(relay_url, "sealed404")
    assert (resp.status_code, resp.content) == (404, b"\x03")
    body = bytes(range(256)) * 300
    resp = scripted_call(relay_url, "echo", body, **{"X-E2E-Stream": "TRUE"})
    assert resp.status_code == 200 and resp.content == body[::-1]
    headers, seen_body = state["seen"][-1]
    assert seen_body == body
    assert headers["x-e2e-path"] == "/s/echo"
    assert headers["x-e2e-stream"] == "true"
    assert headers["x-chute-id"] == SCRIPT
    assert headers["x-instance-id"] == "scripted-1"
    assert "authorization" not in headers and "x-e2e-nonce" not in headers


def test_defaults_for_path_and_stream_headers(scripted: tuple[str, dict[str, Any]]) -> None:
    relay_url, state = scripted
    with httpx2.Client(base_url=relay_url, timeout=20) as c:
        resp = c.post("/e2e/invoke", content=b"abc", headers=invoke_headers(c))
    assert resp.status_code == 403
    headers, _ = state["seen"][-1]
    assert headers["x-e2e-path"] == "/" and headers["x-e2e-stream"] == "false"


def test_instance_breaking_mid_body_is_not_a_clean_end(
    scripted: tuple[str, dict[str, Any]],
) -> None:
    with pytest.raises(httpx2.RemoteProtocolError):
        scripted_call(scripted[0], "broken")
    assert scripted_call(scripted[0], "403").status_code == 403  # still serving


def test_head_goes_out_with_the_first_body_chunk(scripted: tuple[str, dict[str, Any]]) -> None:
    """The relay holds the instance's head until the body's first chunk is there (one wake-up
    of the client, not two), and still sends it when the body breaks off before any byte:
    the client then sees the instance's status and a body that is not cleanly ended."""
    relay_url, _ = scripted
    with httpx2.Client(base_url=relay_url, timeout=20) as c:
        hdrs = invoke_headers(c, **{"X-E2E-Path": "/s/late"})
        started = time.monotonic()
        with c.stream("POST", "/e2e/invoke", content=b"x", headers=hdrs) as resp:
            head_after = time.monotonic() - started
            assert resp.status_code == 200 and resp.read() == b"late body"
    assert head_after >= 0.4  # the instance's body came 0.5 s after its head
    with pytest.raises(httpx2.RemoteProtocolError):
        scripted_call(relay_url, "brokenearly")
    assert scripted_call(relay_url, "403").status_code == 403  # still serving


def test_instance_down_at_start_then_up_then_gone() -> None:
    state: dict[str, Any] = {"healthy": False}
    with run_app(scripted_instance(state)) as inst_url:
        cfg = relay.RelayConfig(
            instances=(inst_url,),
            api_keys=(KEY_A,),
            startup_wait=0,
            probe_interval=0.05,
            refresh_interval=0.05,
            gone_for=0.05,
            rate_limit=100_000,
        )
        with (
            run_app(relay.create_app(cfg)) as relay_url,
            httpx2.Client(base_url=relay_url, timeout=20) as c,
        ):
            assert c.get("/health").json()["status"] == "degraded"
            assert c.get(f"/e2e/instances/{SCRIPT}", headers=auth()).status_code == 404
            state["healthy"] = True
            wait_until(lambda: c.get("/health").json()["status"] == "ok", what="instance up")
            row = c.get(f"/e2e/instances/{SCRIPT}", headers=auth()).json()["instances"][0]
            # a restart with a new identity retires the old id: its nonces now get 410
            state["id"] = "scripted-2"
            wait_until(
                lambda: any(
                    r["instance_id"] == "scripted-2"
                    for r in c.get(f"/e2e/instances/{SCRIPT}", headers=auth()).json()["instances"]
                ),
                what="new instance id",
            )
            hdrs = {
                **auth(),
                "X-Chute-Id": SCRIPT,
                "X-Instance-Id": row["instance_id"],
                "X-E2E-Nonce": row["nonces"][0],
                "X-E2E-Path": "/s/echo",
            }
            resp = c.post("/e2e/invoke", content=b"abc", headers=hdrs)
            assert resp.status_code == 410
            assert resp.json() == {"detail": "Instance is no longer active"}


def test_unreachable_instance_is_410_and_dropped() -> None:
    state: dict[str, Any] = {}
    server = run_app(scripted_instance(state))
    inst_url = server.__enter__()
    cfg = relay.RelayConfig(
        instances=(inst_url,), api_keys=(KEY_A,), probe_interval=60, refresh_interval=60
    )
    with (
        run_app(relay.create_app(cfg)) as relay_url,
        httpx2.Client(base_url=relay_url, timeout=20) as c,
    ):
        row = c.get(f"/e2e/instances/{SCRIPT}", headers=auth()).json()["instances"][0]
        server.__exit__(None, None, None)  # the instance goes away
        hdrs = {
            **auth(),
            "X-Chute-Id": SCRIPT,
            "X-Instance-Id": row["instance_id"],
            "X-E2E-Path": "/s/echo",
        }
        resp = c.post(
            "/e2e/invoke", content=b"abc", headers={**hdrs, "X-E2E-Nonce": row["nonces"][0]}
        )
        assert resp.status_code == 410
        assert resp.json() == {"detail": "Instance is no longer active"}
        resp = c.post(
            "/e2e/invoke", content=b"abc", headers={**hdrs, "X-E2E-Nonce": row["nonces"][1]}
        )
        assert resp.status_code == 410  # marked gone: not even tried
        missing = c.get(f"/e2e/instances/{SCRIPT}", headers=auth())
        assert missing.status_code == 404
        assert missing.json() == {"detail": "No E2E-capable instances available"}
        assert c.get("/health").json() == {
            "status": "degraded",
            "instances": {"available": 0, "configured": 1},
        }


# --------------------------------------------------------------------------------------------
# metrics, health


def test_health_and_metrics_carry_no_ids(stack: Stack, client: httpx2.Client) -> None:
    assert client.get("/health").json() == {
        "status": "ok",
        "instances": {"available": 2, "configured": 2},
    }
    instances, _ = discover(client, ECHO)
    sealed = seal(instances[0], instances[0].nonces[0], ECHO, chat_body("m"))
    assert (
        client.post("/e2e/invoke", content=sealed.blob, headers=sealed.headers).status_code == 200
    )
    client.post("/e2e/invoke", content=sealed.blob, headers=sealed.headers)  # 403
    text = client.get("/metrics").text
    assert 'pqe2ee_relay_requests_total{endpoint="invoke",status="200"}' in text
    assert 'pqe2ee_relay_requests_total{endpoint="invoke",status="403"}' in text
    assert 'pqe2ee_relay_requests_total{endpoint="instances",status="200"}' in text
    assert "pqe2ee_relay_invoke_seconds_bucket" in text
    assert re.search(r"pqe2ee_relay_request_bytes_total [1-9]", text)
    assert re.search(r"pqe2ee_relay_response_bytes_total [1-9]", text)
    for secret in (
        KEY_A,
        api_key_id(KEY_A),
        ECHO,
        instances[0].instance_id,
        instances[0].nonces[0],
    ):
        assert secret not in text


# --------------------------------------------------------------------------------------------
# memory nonce store


async def _memory_store_checks() -> None:
    now = [1000.0]
    store = MemoryNonceStore(max_entries=5, clock=lambda: now[0])
    await store.issue("k", "c", "i", ["n1", "n2"], ttl=75)
    assert await store.consume("n1", "k", "c", "i")
    assert not await store.consume("n1", "k", "c", "i")  # single use
    assert not await store.consume("n2", "k", "c", "other")  # wrong binding ...
    assert not await store.consume("n2", "k", "c", "i")  # ... burned it
    await store.issue("k", "c", "i", ["n3"], ttl=75)
    now[0] += 76
    assert not await store.consume("n3", "k", "c", "i")  # expired
    await store.issue("k", "c", "i", ["a", "b", "c", "d", "e"], ttl=75)
    with pytest.raises(NonceStoreError):
        await store.issue("k", "c", "i", ["f"], ttl=75)  # full: refuse to grow
    now[0] += 76
    await store.issue("k", "c", "i", ["f"], ttl=75)  # expired ones are purged
    assert len(store) == 1
    assert not await store.consume("f", "k|x", "c", "i")
    # rate limit: fixed window
    assert [await store.hit("r", 60, 2) for _ in range(3)] == [True, True, False]
    now[0] += 61
    assert await store.hit("r", 60, 2)


def test_memory_store() -> None:
    import anyio

    anyio.run(_memory_store_checks)


def test_invalid_json_from_info_is_unavailable() -> None:
    async def info(request: Request) -> Response:
        return Response(
            msgspec.json.encode({"instance_id": "x", "e2e_pubkey": "AAAA", "models": ["m"]})
        )

    app = Starlette(routes=[Route("/e2e/info", info)])
    with run_app(app) as url:
        cfg = relay.RelayConfig(instances=(url,), api_keys=(KEY_A,), startup_wait=0)
        with run_app(relay.create_app(cfg)) as relay_url:
            assert httpx2.get(relay_url + "/health").json()["instances"]["available"] == 0
            assert httpx2.get(relay_url + "/v1/models").json()["data"] == []
