"""``pqe2ee instance`` against a real dev engine on loopback; the client side is pqe2ee.protocol
plus httpx2, posting blobs to /e2e/invoke the way the relay does."""

from __future__ import annotations

import base64
import contextlib
import gzip
import logging
import os
import queue
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import msgspec
import pytest
from click.testing import CliRunner
from starlette.requests import Request

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.backends.base import KEMPrivateKey
from pqe2ee.cli import cli
from pqe2ee.protocol import (
    Done,
    EndOfStream,
    InnerEvent,
    RemoteErrorEvent,
    SealedRequest,
    StreamDecryptor,
    StreamEvent,
    Usage,
    open_response,
    seal_request,
)
from pqe2ee.server.instance import Instance, InstanceConfig, create_app, default_instance_id
from pqe2ee.server.keyfile import (
    KEY_FILE_HEADER,
    KeyFileError,
    decode_seed,
    load_or_create_key,
    read_seed,
    seed_kem,
)
from pqe2ee.testing.dev_engine import create_app as create_engine
from servers import run_app

KEM = get_kem()
AEAD = get_aead()
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PQE2EE_BIN = Path(sys.executable).with_name("pqe2ee")


# --------------------------------------------------------------------------------------------
# fixtures and helpers


@dataclass
class Running:
    url: str
    instance: Instance
    key: KEMPrivateKey


@contextlib.contextmanager
def running_instance(upstream: str, **config: Any) -> Iterator[Running]:
    server_kw = config.pop("_server", {})
    key = KEM.generate()
    app = create_app(InstanceConfig(upstream=upstream, **config), private_key=key)
    with run_app(app, **server_kw) as url:
        yield Running(url, app.state.instance, key)


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    with run_app(create_engine()) as url:
        yield url


@pytest.fixture(scope="module")
def inst(engine: str) -> Iterator[Running]:
    with running_instance(engine) as r:
        yield r


@pytest.fixture(scope="module")
def http() -> Iterator[httpx2.Client]:
    with httpx2.Client(timeout=20) as c:
        yield c


def stats(http: httpx2.Client, engine: str) -> dict[str, int]:
    r = http.get(engine + "/dev/stats")
    r.raise_for_status()
    out: dict[str, int] = r.json()
    return out


def public_key(http: httpx2.Client, inst: Running) -> bytes:
    return base64.b64decode(http.get(inst.url + "/e2e/info").json()["e2e_pubkey"])


def seal(pk: bytes, body: dict[str, Any]) -> SealedRequest:
    return seal_request(body, pk, response_key=KEM.generate(), kem=KEM, aead=AEAD)


def hdrs(path: str = CHAT, stream: bool | str | None = None, **extra: str) -> dict[str, str]:
    h = {"x-e2e-path": path, "content-type": "application/octet-stream", **extra}
    if stream is not None:
        h["x-e2e-stream"] = stream if isinstance(stream, str) else str(stream).lower()
    return h


def chat(text: str, **kw: Any) -> dict[str, Any]:
    return {"model": "dev-echo", "messages": [{"role": "user", "content": text}], **kw}


def decrypt_stream(chunks: Iterator[bytes], key: KEMPrivateKey) -> list[StreamEvent]:
    dec = StreamDecryptor(key, aead=AEAD)
    for chunk in chunks:
        dec.receive_data(chunk)
    dec.receive_eof()
    return dec.events()


def inner_json(events: list[StreamEvent]) -> list[dict[str, Any]]:
    return [msgspec.json.decode(e.data) for e in events if isinstance(e, InnerEvent)]


def stream_text(chunks: list[dict[str, Any]]) -> str:
    out = []
    for c in chunks:
        for choice in c["choices"]:
            out.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
    return "".join(out)


def wait_until(pred: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --------------------------------------------------------------------------------------------
# discovery document


def test_health_and_info(http: httpx2.Client, inst: Running) -> None:
    assert http.get(inst.url + "/health").json() == {"status": "ok"}
    info = http.get(inst.url + "/e2e/info").json()
    pk = base64.b64decode(info["e2e_pubkey"], validate=True)
    assert pk == inst.key.public_key and len(pk) == 1184
    assert info["instance_id"] == default_instance_id(pk)
    assert uuid.UUID(info["instance_id"]).version == 4
    assert info["models"] == ["dev-echo", "dev-tools", "dev-reason"]
    assert info["paths"] == [CHAT, COMPLETIONS]
    assert info["version"].startswith("pqe2ee/")
    assert info["protocols"] == ["v1", "v2"]  # v2 is served next to v1 by default


# --------------------------------------------------------------------------------------------
# non-stream


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, chat("hello encrypted world")),
        (COMPLETIONS, {"model": "dev-echo", "prompt": "complete me please", "max_tokens": 8}),
    ],
)
def test_nonstream_decrypts_to_engine_json(
    http: httpx2.Client, engine: str, inst: Running, path: str, body: dict[str, Any]
) -> None:
    sealed = seal(public_key(http, inst), body)
    r = http.post(inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(path, False))
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    got = msgspec.json.decode(open_response(r.content, sealed.response_key, aead=AEAD))
    direct = http.post(engine + path, json=body).json()
    got.pop("created")
    direct.pop("created")
    assert got == direct
    text = got["choices"][0].get("message", {}).get("content") or got["choices"][0]["text"]
    assert text.startswith("Echo: ")


# --------------------------------------------------------------------------------------------
# streams


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_stream_decrypts_with_usage_events_first(
    http: httpx2.Client, engine: str, inst: Running, path: str
) -> None:
    body: dict[str, Any] = (
        chat("stream these words please")
        if path == CHAT
        else {"model": "dev-echo", "prompt": "a b c"}
    )
    # The client asks for no usage; the instance forces it (as the Chutes runtime does).
    body |= {"stream": True, "stream_options": {"include_usage": False}}
    sealed = seal(public_key(http, inst), body)
    with http.stream(
        "POST", inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(path, "True")
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw: list[bytes] = list(r.iter_raw())
    outer = b"".join(raw)
    assert outer.startswith(b'data: {"e2e_init":"')
    events = decrypt_stream(iter(raw), sealed.response_key)
    assert isinstance(events[-2], Done)
    assert events[-1] == EndOfStream(complete=True)

    chunks = inner_json(events)
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    direct = http.post(engine + path, json=plain).json()
    expected = (
        direct["choices"][0].get("message", {}).get("content") or direct["choices"][0]["text"]
    )
    assert stream_text(chunks) == expected

    # continuous usage: every inner chunk carries usage, and each one is announced by a
    # plaintext usage event right before it.
    with_usage = 0
    for i, ev in enumerate(events):
        if isinstance(ev, InnerEvent):
            usage = msgspec.json.decode(ev.data).get("usage")
            assert usage is not None
            prev = events[i - 1]
            assert isinstance(prev, Usage) and prev.usage == usage
            with_usage += 1
    assert with_usage == len(chunks) >= 3
    assert chunks[-1]["choices"] == []
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert chunks[-1]["usage"][k] == direct["usage"][k]


def test_stream_without_continuous_usage(http: httpx2.Client, engine: str) -> None:
    with running_instance(engine, continuous_usage=False) as inst:
        sealed = seal(public_key(http, inst), chat("only totals please", stream=True))
        r = http.post(inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(CHAT, True))
        assert r.status_code == 200
        events = decrypt_stream(iter([r.content]), sealed.response_key)
    usages = [e for e in events if isinstance(e, Usage)]
    chunks = inner_json(events)
    assert len(usages) == 1
    assert [c["usage"] for c in chunks if c.get("usage")] == [usages[0].usage]
    assert events[-1] == EndOfStream(complete=True)


def test_stream_flag_mismatch_is_refused(http: httpx2.Client, engine: str, inst: Running) -> None:
    pk = public_key(http, inst)
    before = stats(http, engine)["requests"]
    cases = [(chat("x", stream=True), None), (chat("x", stream=True), False), (chat("x"), True)]
    for body, header in cases:
        r = http.post(
            inst.url + "/e2e/invoke", content=seal(pk, body).blob, headers=hdrs(CHAT, header)
        )
        assert r.status_code == 400
        assert r.json() == {
            "detail": "X-E2E-Stream does not match the request body's stream flag",
            "code": "stream_mismatch",
        }
    assert stats(http, engine)["requests"] == before


# --------------------------------------------------------------------------------------------
# refusals


def test_path_not_allowed_never_reaches_engine(
    http: httpx2.Client, engine: str, inst: Running
) -> None:
    before = stats(http, engine)["requests"]
    good = seal(public_key(http, inst), chat("embed me"))
    for path in ("/v1/embeddings", "/", "/v1/chat/completions/", "/v1/chat/completions?x=1"):
        r = http.post(inst.url + "/e2e/invoke", content=good.blob, headers=hdrs(path, False))
        assert r.status_code == 403
        assert r.json()["detail"] == "Path not available via E2E"
    # refused before decryption: garbage gets the same 403, not a 400
    r = http.post(inst.url + "/e2e/invoke", content=b"garbage", headers=hdrs("/admin", False))
    assert r.status_code == 403
    r = http.post(inst.url + "/e2e/invoke", content=good.blob, headers={"x-e2e-stream": "false"})
    assert r.status_code == 403  # no X-E2E-Path means "/", as on the real network
    assert stats(http, engine)["requests"] == before


def test_tampered_and_truncated_blobs(http: httpx2.Client, engine: str, inst: Running) -> None:
    pk = public_key(http, inst)
    before = stats(http, engine)["requests"]
    blob = seal(pk, chat("secret prompt")).blob

    def flip(b: bytes, i: int) -> bytes:
        return b[:i] + bytes([b[i] ^ 1]) + b[i + 1 :]

    cases = {
        "tag": (flip(blob, len(blob) - 1), "decrypt_failed"),
        "ciphertext": (flip(blob, 1100 + 3), "decrypt_failed"),
        "kem": (flip(blob, 10), "decrypt_failed"),
        "nonce": (flip(blob, 1090), "decrypt_failed"),
        "truncated": (blob[:-1], "decrypt_failed"),
        "short": (blob[:500], "malformed_blob"),
        "empty": (b"", "malformed_blob"),
    }
    for name, (bad, code) in cases.items():
        r = http.post(inst.url + "/e2e/invoke", content=bad, headers=hdrs(CHAT, False))
        assert r.status_code == 400, name
        assert r.json() == {"detail": "E2E decryption failed", "code": code}, name
    assert stats(http, engine)["requests"] == before
    # the server keeps serving
    good = seal(pk, chat("after the storm"))
    r = http.post(inst.url + "/e2e/invoke", content=good.blob, headers=hdrs(CHAT, False))
    assert r.status_code == 200
    reply = msgspec.json.decode(open_response(r.content, good.response_key, aead=AEAD))
    assert reply["choices"][0]["message"]["content"] == "Echo: after the storm"


def test_bad_response_key_is_refused_before_the_engine(
    http: httpx2.Client, engine: str, inst: Running
) -> None:
    pk = public_key(http, inst)
    before = stats(http, engine)["requests"]

    class BadKey(KEMPrivateKey):
        public_key = b"\xff" * 1184  # every coefficient >= q: fails the FIPS 203 check

        def decapsulate(self, ciphertext: bytes) -> bytes:
            raise AssertionError

    sealed = seal_request(chat("x"), pk, response_key=BadKey(), kem=KEM, aead=AEAD)
    r = http.post(inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(CHAT, False))
    assert r.status_code == 400
    assert r.json() == {"detail": "E2E decryption failed", "code": "invalid_key"}
    assert stats(http, engine)["requests"] == before


def test_instance_id_header(http: httpx2.Client, inst: Running) -> None:
    pk = public_key(http, inst)
    other = str(uuid.uuid4())
    r = http.post(
        inst.url + "/e2e/invoke",
        content=seal(pk, chat("x")).blob,
        headers=hdrs(CHAT, False, **{"x-instance-id": other}),
    )
    assert r.status_code == 400
    assert r.json()["code"] == "instance_mismatch"
    r = http.post(
        inst.url + "/e2e/invoke",
        content=seal(pk, chat("x")).blob,
        headers=hdrs(CHAT, False, **{"x-instance-id": inst.instance.instance_id.upper()}),
    )
    assert r.status_code == 200


def test_oversize_body(http: httpx2.Client, engine: str) -> None:
    with running_instance(engine, max_body=1 << 20) as inst:
        with httpx2.Client(timeout=20) as c:
            # Declared length over the limit: 413 before any body is read.
            before = stats(http, engine)["requests"]
            r = c.post(inst.url + "/e2e/invoke", content=os.urandom(10 << 20), headers=hdrs())
            assert r.status_code == 413
            assert r.json() == {"detail": "Request body exceeds 1048576 bytes", "code": "oversize"}
            assert stats(http, engine)["requests"] == before
            # The connection stays usable and the instance keeps serving.
            sealed = seal(inst.key.public_key, chat("small"))
            r = c.post(inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(CHAT, False))
            assert r.status_code == 200

        # Chunked upload (no length): reading stops at the limit and the connection is closed,
        # so the sender is cut off long before it has pushed 200 MiB.
        sent = 0

        def body() -> Iterator[bytes]:
            nonlocal sent
            block = b"\0" * (64 << 10)
            for _ in range(3200):
                sent += len(block)
                yield block

        with httpx2.Client(timeout=20) as c:
            try:
                r = c.post(inst.url + "/e2e/invoke", content=body(), headers=hdrs())
            except httpx2.TransportError:
                pass  # the reset can beat the 413 to the client; both mean "refused"
            else:
                assert r.status_code == 413
        assert sent < 64 << 20
        assert inst.instance.inflight == 0
    assert stats(http, engine)["requests"] == before + 1  # only the small request got through


def test_concurrency_limit(http: httpx2.Client, engine: str) -> None:
    with running_instance(engine, max_concurrency=1) as inst:
        slow = seal(inst.key.public_key, chat("__slow__", stream=True))
        with http.stream(
            "POST", inst.url + "/e2e/invoke", content=slow.blob, headers=hdrs(CHAT, True)
        ) as r:
            assert r.status_code == 200
            chunks = r.iter_raw()  # keep a reference: a dropped iterator closes the response
            next(chunks)
            assert inst.instance.inflight == 1
            busy = http.post(
                inst.url + "/e2e/invoke",
                content=seal(inst.key.public_key, chat("x")).blob,
                headers=hdrs(CHAT, False),
            )
            assert busy.status_code == 429
            assert busy.json() == {
                "error": "RateLimitExceeded",
                "detail": "Instance is at maximum capacity",
            }
        wait_until(lambda: inst.instance.inflight == 0, "the slot to be released")
        sealed = seal(inst.key.public_key, chat("x"))
        r = http.post(inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(CHAT, False))
        assert r.status_code == 200


# --------------------------------------------------------------------------------------------
# engine failures


@pytest.mark.parametrize("stream", [False, True])
def test_engine_error_is_sealed_with_its_status(
    http: httpx2.Client, engine: str, inst: Running, stream: bool
) -> None:
    body = chat("__error_500__", stream=stream)
    sealed = seal(public_key(http, inst), body)
    r = http.post(inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(CHAT, stream))
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/octet-stream"
    got = msgspec.json.decode(open_response(r.content, sealed.response_key, aead=AEAD))
    direct = http.post(engine + CHAT, json=body)
    assert direct.status_code == 500
    assert got == direct.json()
    assert got["object"] == "error"
    assert inst.instance.inflight == 0


def test_engine_unknown_model_is_sealed_404(http: httpx2.Client, inst: Running) -> None:
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    sealed = seal(public_key(http, inst), body)
    r = http.post(inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(CHAT, False))
    assert r.status_code == 404
    got = msgspec.json.decode(open_response(r.content, sealed.response_key, aead=AEAD))
    assert got["type"] == "NotFoundError"


def test_upstream_down(http: httpx2.Client) -> None:
    with running_instance(f"http://127.0.0.1:{free_port()}") as inst:
        info = http.get(inst.url + "/e2e/info").json()
        assert info["models"] == []
        sealed = seal(inst.key.public_key, chat("anyone there?"))
        r = http.post(inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(CHAT, False))
        assert r.status_code == 502
        assert r.json() == {"detail": "Upstream engine unreachable", "code": "upstream_error"}
        sealed = seal(inst.key.public_key, chat("anyone there?", stream=True))
        r = http.post(inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(CHAT, True))
        assert r.status_code == 502
        assert inst.instance.inflight == 0


def _switchable_models() -> tuple[Callable[..., Any], dict[str, bool]]:
    """An engine whose /v1/models answers 503 until ``state["up"]`` is set."""
    state = {"up": False}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        up = state["up"]
        body = b'{"object":"list","data":[{"id":"late-model"}]}' if up else b"{}"
        await send({"type": "http.response.start", "status": 200 if up else 503, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app, state


def test_models_refresh_after_engine_comes_up(http: httpx2.Client) -> None:
    app, state = _switchable_models()
    with run_app(app, lifespan="off") as engine, running_instance(engine) as inst:
        assert http.get(inst.url + "/e2e/info").json()["models"] == []
        state["up"] = True
        wait_until(
            lambda: http.get(inst.url + "/e2e/info").json()["models"] == ["late-model"],
            "the model list to refresh",
        )
        state["up"] = False  # a later failure keeps the last good list
        inst.instance._models_checked = None
        assert http.get(inst.url + "/e2e/info").json()["models"] == ["late-model"]


def _breaking_engine() -> Callable[..., Any]:
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
            await send({"type": "http.response.body", "body": b'{"data":[{"id":"m"}]}'})
            return
        while (await receive()).get("more_body"):
            pass
        head = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        chunk = b'data: {"choices":[{"index":0,"delta":{"content":"partial"}}]}\n\n'
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        # returning without the final body message makes uvicorn drop the connection

    return app


def _gzip_engine() -> Callable[..., Any]:
    """An engine that answers with ``Content-Encoding: gzip`` (though asked for identity)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/v1/models":
            body, ctype = b'{"data":[{"id":"m"}]}', b"application/json"
        else:
            request = msgspec.json.decode(await Request(scope, receive).body())
            if request.get("stream"):
                body = b'data: {"choices":[{"index":0,"delta":{"content":"zipped"}}]}\n\n'
                body, ctype = body + b"data: [DONE]\n\n", b"text/event-stream"
            else:
                body, ctype = b'{"choices":[{"message":{"content":"zipped"}}]}', b"application/json"
        head = [(b"content-type", ctype), (b"content-encoding", b"gzip")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": gzip.compress(body)})

    return app


def test_content_coded_engine_answers_are_decoded(http: httpx2.Client) -> None:
    """The engine body is read raw unless it has a content coding: then it is decoded before
    it is sealed (non-stream and stream)."""
    with run_app(_gzip_engine(), lifespan="off") as zipped, running_instance(zipped) as inst:
        sealed = seal(inst.key.public_key, chat("x"))
        r = http.post(inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(CHAT, False))
        assert r.status_code == 200
        answer = msgspec.json.decode(open_response(r.content, sealed.response_key, aead=AEAD))
        assert answer == {"choices": [{"message": {"content": "zipped"}}]}
        sealed = seal(inst.key.public_key, chat("x", stream=True))
        r = http.post(inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(CHAT, True))
        assert r.status_code == 200
        events = decrypt_stream(iter([r.content]), sealed.response_key)
        assert stream_text(inner_json(events)) == "zipped"


def test_engine_breaks_mid_stream(http: httpx2.Client) -> None:
    with (
        run_app(_breaking_engine(), log_level="critical") as broken,
        running_instance(broken) as inst,
    ):
        sealed = seal(inst.key.public_key, chat("x", stream=True))
        dec = StreamDecryptor(sealed.response_key, aead=AEAD)
        events: list[StreamEvent] = []
        with (
            pytest.raises(httpx2.RemoteProtocolError),
            http.stream(
                "POST", inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(CHAT, True)
            ) as r,
        ):
            assert r.status_code == 200
            for chunk in r.iter_raw():
                dec.receive_data(chunk)
                events += dec.events()
        wait_until(lambda: inst.instance.inflight == 0, "the slot to be released")
    assert stream_text(inner_json(events)) == "partial"
    assert isinstance(events[-1], RemoteErrorEvent)
    assert events[-1].error["code"] == "upstream_error"
    assert not any(isinstance(e, Done | EndOfStream) for e in events)
    assert not dec.complete


def test_client_disconnect_cancels_engine_stream(
    http: httpx2.Client, engine: str, inst: Running
) -> None:
    before = stats(http, engine)
    sealed = seal(public_key(http, inst), chat("__slow__", stream=True))
    seen = b""
    with http.stream(
        "POST", inst.url + "/e2e/invoke", content=sealed.blob, headers=hdrs(CHAT, True)
    ) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            seen += chunk
            if b'{"e2e":"' in seen:
                break
    # leaving the block closed the connection mid-stream
    wait_until(
        lambda: stats(http, engine)["streams_cancelled"] > before["streams_cancelled"],
        "the engine to see the stream cancelled",
    )
    after = stats(http, engine)
    assert after["streams_completed"] == before["streams_completed"]
    wait_until(lambda: inst.instance.inflight == 0, "the slot to be released")


# --------------------------------------------------------------------------------------------
# key file


def test_key_file_created_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "instance.key"
    key, created = load_or_create_key(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(KEY_FILE_HEADER + b"\n")
    assert len(path.read_bytes()) == len(KEY_FILE_HEADER) + 1 + 128 + 1
    again, created = load_or_create_key(path)
    assert not created
    assert again.public_key == key.public_key
    assert [p.name for p in tmp_path.iterdir()] == ["instance.key"]  # no temp file left

    # through the instance: same key and instance id on every start
    a = Instance(InstanceConfig(upstream="http://127.0.0.1:9", key_file=path))
    b = Instance(InstanceConfig(upstream="http://127.0.0.1:9", key_file=str(path)))
    assert a.public_key == b.public_key == key.public_key
    assert a.instance_id == b.instance_id == default_instance_id(key.public_key)
    assert a.key_source == b.key_source == "loaded"


def test_key_file_format_errors(tmp_path: Path) -> None:
    seed = bytes(range(64))
    good = KEY_FILE_HEADER + b"\n" + seed.hex().encode() + b"\n"
    assert decode_seed(good) == seed
    for bad in (
        b"",
        seed,  # raw bytes without the header
        seed.hex().encode(),
        KEY_FILE_HEADER + b"\n" + seed.hex().encode()[:-2] + b"\n",
        KEY_FILE_HEADER + b"\n" + b"zz" * 64 + b"\n",
        b"other-header\n" + seed.hex().encode() + b"\n",
    ):
        with pytest.raises(KeyFileError) as info:
            decode_seed(bad)
        assert seed.hex() not in str(info.value)
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * 10_000)
    huge.chmod(0o600)
    with pytest.raises(KeyFileError, match="too large"):
        read_seed(huge)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        read_seed(fifo)  # refused without blocking on the open
    with pytest.raises(KeyFileError, match="cannot create"):
        load_or_create_key(tmp_path / "missing-dir" / "k")


def test_key_file_symlink_to_private_file_is_followed_only_when_allowed(tmp_path: Path) -> None:
    key, _ = load_or_create_key(tmp_path / "real.key")
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "real.key")
    with pytest.raises(KeyFileError, match="is a symbolic link"):
        load_or_create_key(link)  # issue 16: refused unless a flag says so
    again, created = load_or_create_key(link, allow_symlink=True)
    assert not created and again.public_key == key.public_key


def test_cli_refuses_world_readable_key_file(tmp_path: Path) -> None:
    path = tmp_path / "instance.key"
    load_or_create_key(path)
    path.chmod(0o644)
    proc = subprocess.run(
        [str(PQE2EE_BIN), "instance", "--upstream", "http://127.0.0.1:9", "--key-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "accessible by group or others (mode 0644)" in proc.stderr
    assert f"chmod 600 {path}" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("kind", ["directory", "garbage", "group-writable"])
def test_cli_refuses_bad_key_files(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "k"
    if kind == "directory":
        path.mkdir()
        expected = "not a regular file"
    elif kind == "garbage":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"hello\n")
        os.close(fd)
        expected = "not a pqe2ee ML-KEM-768 seed file"
    else:
        load_or_create_key(path)
        path.chmod(0o620)
        expected = "mode 0620"
    result = CliRunner().invoke(
        cli, ["instance", "--upstream", "http://127.0.0.1:9", "--key-file", str(path)]
    )
    assert result.exit_code == 2
    assert expected in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_rejects_bad_options() -> None:
    result = CliRunner().invoke(cli, ["instance", "--upstream", "ftp://x"])
    assert result.exit_code == 2
    assert "'ftp://x' is not an http:// or https:// URL" in result.stderr
    result = CliRunner().invoke(cli, ["instance", "--upstream", "http://x", "--backend", "nope"])
    assert result.exit_code == 2
    assert "unknown backend 'nope'" in result.stderr
    result = CliRunner().invoke(cli, ["instance", "--help"])
    assert result.exit_code == 0
    assert "--key-file" in result.output and "OpenAI-compatible engine" in result.output


def test_cli_serves_with_key_file(tmp_path: Path, http: httpx2.Client, engine: str) -> None:
    """The real binary: creates the key file, serves /e2e/info with that key, answers a call."""
    path = tmp_path / "instance.key"
    proc = subprocess.Popen(
        [str(PQE2EE_BIN), "instance", "--port", "0", "--key-file", str(path)],
        env={**os.environ, "PQE2EE_UPSTREAM": engine},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None
    stderr = proc.stderr

    def pump() -> None:
        for line in stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 30
        while url is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if "Uvicorn running on " in line:
                url = line.split("Uvicorn running on ")[1].split()[0]
        info = http.get(url + "/e2e/info").json()
        seed_key = seed_kem("auto").from_seed(read_seed(path))
        assert base64.b64decode(info["e2e_pubkey"]) == seed_key.public_key
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        sealed = seal(seed_key.public_key, chat("via the binary"))
        r = http.post(url + "/e2e/invoke", content=sealed.blob, headers=hdrs(CHAT, False))
        assert r.status_code == 200
        reply = msgspec.json.decode(open_response(r.content, sealed.response_key, aead=AEAD))
        assert reply["choices"][0]["message"]["content"] == "Echo: via the binary"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------
# logs


LOGGERS = (
    "",
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "uvicorn.asgi",
    "httpx2",
    "httpcore2",
    "httpx",
    "httpcore",
    "pqe2ee",
)


def test_prompts_and_keys_never_reach_logs(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = "CANARY-" + uuid.uuid4().hex
    for name in LOGGERS:
        caplog.set_level(1, logger=name)
    for name in ("uvicorn", "uvicorn.access"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    server_kw: dict[str, Any] = {"log_config": None, "log_level": "trace"}
    with (
        run_app(create_engine(), **server_kw) as engine,
        running_instance(engine, _server=server_kw, upstream_api_key="KEY-" + canary) as inst,
        httpx2.Client(timeout=20) as http,
    ):
        pk = inst.key.public_key
        response_keys = []

        def call(body: dict[str, Any], path: str = CHAT, mangle: bool = False) -> int:
            sealed = seal(pk, body)
            response_keys.append(sealed.response_key)
            blob = sealed.blob[:-1] if mangle else sealed.blob
            r = http.post(inst.url + "/e2e/invoke", content=blob, headers=hdrs(path, sealed.stream))
            return r.status_code

        assert call(chat(canary)) == 200
        assert call(chat(canary, stream=True)) == 200
        assert call({"model": "dev-echo", "prompt": canary, "stream": True}, COMPLETIONS) == 200
        assert call(chat(canary), mangle=True) == 400
        assert call(chat(canary), path="/v1/embeddings") == 403
        assert call({"model": canary, "messages": []}) in (400, 404)
        assert call({"model": "dev-echo", "messages": canary}) == 400
        http.get(inst.url + "/e2e/info")

    text = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    # the logs were really captured, including our per-request lines
    assert any(
        r.name == "pqe2ee.instance" and "/e2e/invoke" in r.getMessage() for r in caplog.records
    )
    assert any(r.name.startswith("uvicorn") for r in caplog.records)
    assert any(r.name.startswith("httpcore2") for r in caplog.records)
    assert canary not in text
    secrets = [inst.key.seed(), *(k.seed() for k in response_keys)]
    for secret in secrets:
        if secret is not None:
            assert secret.hex() not in text
            assert base64.b64encode(secret).decode() not in text


# --------------------------------------------------------------------------------------------
# the published reference client (chutes-e2ee 0.1.0) against this instance

REF_PYTHON = Path(__file__).resolve().parents[1] / ".venv-ref" / "bin" / "python"
REF_SCRIPT = r"""
import json, sys
import httpx
from chutes_e2ee.crypto import (
    build_e2ee_request, decrypt_response, decrypt_stream_chunk, decrypt_stream_init,
)
url, pk_b64, text = sys.argv[1:4]
msgs = [{"role": "user", "content": text}]
out = {}
req = build_e2ee_request(pk_b64, {"model": "dev-echo", "messages": msgs})
h = {"X-E2E-Path": "/v1/chat/completions", "Content-Type": "application/octet-stream"}
r = httpx.post(url + "/e2e/invoke", content=req.blob, headers={**h, "X-E2E-Stream": "false"},
               timeout=20)
out["status"] = r.status_code
out["reply"] = decrypt_response(r.content, req.response_sk)
req = build_e2ee_request(pk_b64, {"model": "dev-echo", "messages": msgs, "stream": True})
key, inner, usage = None, [], 0
with httpx.stream("POST", url + "/e2e/invoke", content=req.blob,
                  headers={**h, "X-E2E-Stream": "true"}, timeout=20) as r:
    out["stream_status"] = r.status_code
    for line in r.iter_lines():
        if not line.startswith("data: "):
            continue
        obj = json.loads(line[6:])
        if "e2e_init" in obj:
            key = decrypt_stream_init(req.response_sk, obj["e2e_init"])
        elif "e2e" in obj:
            inner.append(decrypt_stream_chunk(obj["e2e"], key))
        elif "usage" in obj:
            usage += 1
out["inner"] = "".join(inner)
out["usage_events"] = usage
print(json.dumps(out))
"""


@pytest.mark.interop
@pytest.mark.skipif(not REF_PYTHON.exists(), reason="needs the reference client's venv")
def test_reference_client_talks_to_instance(http: httpx2.Client, inst: Running) -> None:
    pk_b64 = http.get(inst.url + "/e2e/info").json()["e2e_pubkey"]
    proc = subprocess.run(
        [str(REF_PYTHON), "-c", REF_SCRIPT, inst.url, pk_b64, "hello from the reference"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = msgspec.json.decode(proc.stdout)
    assert out["status"] == 200
    assert out["reply"]["choices"][0]["message"]["content"] == "Echo: hello from the reference"
    assert out["stream_status"] == 200
    payloads = [
        line[6:]
        for line in out["inner"].split("\n")
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    assert out["inner"].endswith("data: [DONE]\n\n")
    text = stream_text([msgspec.json.decode(p) for p in payloads])
    assert text == "Echo: hello from the reference"
    assert out["usage_events"] == len(payloads)  # continuous usage: one per chunk
