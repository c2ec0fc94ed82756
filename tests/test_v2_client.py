"""Profile v2 on the client side: the shared engine, every transport and the proxy.

Part 1 drives the engine (its generated blocking twin, and the async one) through a fake port
in front of :class:`FakeRelay`: a relay and its instances in one object, built from the sans-IO
v2 core (``InstanceV2``, ``ResponseSealer``, ``StreamEncoderV2``) and the v1 envelope, with
knobs for what a hostile relay does (strip ``e2e_v2``, answer hints, edit records, alter the
plaintext usage copy). Part 2 runs the official SDKs and every transport against the real
servers: dev-engine -> ``pqe2ee instance`` (v2) -> ``pqe2ee relay`` -> an ASGI wrapper that
counts invokes and plays the hostile relay on the wire.
"""

from __future__ import annotations

import base64
import collections
import email.utils
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.backends.base import KEMPrivateKey
from pqe2ee.backends.xwing import get_xwing
from pqe2ee.errors import (
    ErrorCode,
    LocalProtocolError,
    PQE2EEError,
    RelayError,
    RemoteError,
    RemoteProtocolError,
)
from pqe2ee.protocol import (
    Done,
    InnerEvent,
    StreamEncoder,
    StreamSealer,
    open_request,
    seal_response,
)
from pqe2ee.protocol._codec import b64encode
from pqe2ee.protocol.client import DEFAULT_E2E_PATHS, classify_v2_hint
from pqe2ee.protocol.discovery import Lease
from pqe2ee.protocol.v2 import (
    E2EPolicy,
    InstanceV2,
    MemoryReplayCache,
    Negotiator,
    ResponseSealer,
    StreamEncoderV2,
    UpstreamError,
    instance_error_response,
    parse_header,
    seal_response_v2,
)
from pqe2ee.transports._async._engine import AsyncEngine
from pqe2ee.transports._common import RetriesExhausted, Settings, make_settings
from pqe2ee.transports._sync._engine import Engine, Opened, RelayAnswer, Streaming
from pqe2ee.transports._sync._stream import reraise

XW = get_xwing()
KEM = get_kem()
AEAD = get_aead()
KEY = "pk-v2-client-test-0123456789"
MODEL = "fake-model"
CHUTE = "5f0b7ad3-1c2e-4d5a-9b8c-7e6f5a4b3c2d"
CHAT = "/v1/chat/completions"
RELAY = "http://relay.invalid"
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


# =================================================================================================
# Part 1: the engine against a fake relay (no sockets)
# =================================================================================================


def fake_engine(req: dict[str, Any]) -> tuple[int, str, list[bytes], dict[str, Any] | None]:
    """What an OpenAI-compatible engine answers: (status, content type, body parts, usage).
    A stream's parts are its SSE events, ``data: [DONE]`` last."""
    text = str(req["messages"][-1]["content"])
    if text == "__error_400__":
        body = {"error": {"message": "the engine refused this", "type": "invalid_request_error"}}
        return 400, "application/json", [json.dumps(body).encode()], None
    reply = f"Echo: {text}"
    words = reply.split(" ")
    usage = {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}
    if not req.get("stream"):
        doc = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": req["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}],
            "usage": usage,
        }
        return 200, "application/json", [json.dumps(doc).encode()], usage

    def event(obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": req["model"]}
    parts = [event({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})]
    for i, word in enumerate(words):
        piece = word if i == 0 else " " + word
        parts.append(event({**base, "choices": [{"index": 0, "delta": {"content": piece}}]}))
    parts.append(event({**base, "choices": [], "usage": usage}))
    parts.append(b"data: [DONE]\n\n")
    return 200, "text/event-stream", parts, usage


@dataclass
class FakeInstance:
    instance_id: str
    v1_key: KEMPrivateKey
    v2: InstanceV2 | None

    def offer(self) -> dict[str, Any]:
        assert self.v2 is not None
        return {
            "v": 2,
            "kem_id": 25722,
            "kdf_id": 1,
            "aead_id": 3,
            "pk": b64encode(self.v2.public_key).decode(),
            "not_after": int(time.time()) + 3600,
        }


def _instance(v2: bool) -> FakeInstance:
    inst_id = str(__import__("uuid").uuid4())
    v2_core = None
    if v2:
        v2_core = InstanceV2(
            chute_id=CHUTE,
            instance_id=inst_id,
            keys=[XW.generate()],
            aead=AEAD,
            replay_cache=MemoryReplayCache(),
        )
    return FakeInstance(inst_id, KEM.generate(), v2_core)


Answer = tuple[int, list[tuple[bytes, bytes]], list[bytes]]
StreamEdit = Callable[[list[bytes]], list[bytes]]


@dataclass
class FakeRelay:
    """A relay and its instances, sans-IO, with the knobs of a hostile relay."""

    kinds: tuple[str, ...] = ("v2",)  # one instance per entry: "v2" or "v1"
    nonces: int = 8
    strip_v2: bool = False
    date_offset: float = 0.0
    chunk: int | None = None  # split outer streams into chunks of this size
    stream_edit: StreamEdit | None = None
    single_edit: Callable[[bytes], bytes] | None = None
    end_error: UpstreamError | None = None
    engine_down: bool = False  # the instance answers as when its engine timed out
    expires_at_in: float | None = None  # publish nonce_expires_at = Unix now + this
    wall_clock: Callable[[], float] = time.time  # the relay's Unix clock (Date, nonce_expires_at)
    replies: collections.deque[tuple[int, bytes]] = field(default_factory=collections.deque)
    invokes: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    discoveries: int = 0
    instances: list[FakeInstance] = field(default_factory=list)
    _issued: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.instances = [_instance(kind == "v2") for kind in self.kinds]

    @property
    def v2_invokes(self) -> int:
        return sum(1 for _, blob in self.invokes if blob.startswith(b"PQE2\x02"))

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        if path == "/v1/models":
            return _json(200, {"data": [{"id": MODEL, "chute_id": CHUTE}]})
        if path.startswith("/e2e/instances/"):
            return self._discovery()
        if path.endswith("/evidence"):  # no TEE evidence here: attest="auto" sends unattested
            return _json(404, {"detail": "Not Found"})
        assert path == "/e2e/invoke" and method == "POST"
        self.invokes.append((headers, body))
        nonce, inst_id = headers["X-E2E-Nonce"], headers["X-Instance-Id"]
        if (inst_id, nonce) not in self._issued:
            return _json(403, {"detail": "Invalid, expired, or already-used nonce"})
        self._issued.discard((inst_id, nonce))
        if self.replies:
            status, raw = self.replies.popleft()
            return status, [(b"content-type", b"application/json")], [raw]
        inst = next(i for i in self.instances if i.instance_id == inst_id)
        if body.startswith(b"PQE2\x02"):
            return self._v2(inst, headers, body)
        return self._v1(inst, body)

    def _discovery(self) -> Answer:
        self.discoveries += 1
        rows = []
        for inst in self.instances:
            nonces = [secrets.token_urlsafe(12) for _ in range(self.nonces)]
            self._issued.update((inst.instance_id, n) for n in nonces)
            row: dict[str, Any] = {
                "instance_id": inst.instance_id,
                "e2e_pubkey": b64encode(inst.v1_key.public_key).decode(),
                "nonces": nonces,
            }
            if inst.v2 is not None and not self.strip_v2:
                row["e2e_v2"] = inst.offer()
            rows.append(row)
        doc: dict[str, Any] = {"instances": rows, "nonce_expires_in": 55}
        if self.expires_at_in is not None:
            doc["nonce_expires_at"] = int(self.wall_clock() + self.expires_at_in)
        status, headers, parts = _json(200, doc)
        date = email.utils.formatdate(self.wall_clock() + self.date_offset, usegmt=True)
        return status, [*headers, (b"date", date.encode())], parts

    def _v2(self, inst: FakeInstance, headers: dict[str, str], blob: bytes) -> Answer:
        assert inst.v2 is not None
        try:
            opened = inst.v2.open(
                blob,
                path=headers["X-E2E-Path"],
                stream=headers["X-E2E-Stream"] == "true",
                now_ms=int(time.time() * 1000),
                relay_nonce=headers["X-E2E-Nonce"],
            )
        except PQE2EEError as exc:
            status, raw = instance_error_response(exc)
            return status, [(b"content-type", b"application/json")], [raw]
        sealer = ResponseSealer.for_request(opened, xwing=XW, aead=AEAD)
        status, ctype, parts, usage = fake_engine(opened.json)
        if self.engine_down:  # no engine answer: HEAD 504, no DATA, the reason in END
            failed = UpstreamError("upstream_timeout", "Upstream engine timed out", 504)
            if opened.stream:
                enc = StreamEncoderV2(sealer)
                wire = enc.start(504, None) + enc.finish(error=failed)
                return 200, [(b"content-type", b"text/event-stream")], [wire]
            sealed = seal_response_v2(sealer, status=504, body=b"", content_type=None, error=failed)
            return 200, [(b"content-type", b"application/octet-stream")], [sealed]
        if not opened.stream:
            sealed = seal_response_v2(
                sealer,
                status=status,
                body=b"".join(parts),
                content_type=ctype,
                usage=usage,
                error=self.end_error,
            )
            if self.single_edit is not None:
                sealed = self.single_edit(sealed)
            return 200, [(b"content-type", b"application/octet-stream")], [sealed]
        enc = StreamEncoderV2(sealer)
        wire = enc.start(status, ctype) + b"".join(enc.feed(p) for p in parts)
        wire += enc.finish(error=self.end_error)
        events = [e + b"\n\n" for e in wire.split(b"\n\n")[:-1]]
        if self.stream_edit is not None:
            events = self.stream_edit(events)
        return 200, [(b"content-type", b"text/event-stream")], self._chunks(b"".join(events))

    def _v1(self, inst: FakeInstance, blob: bytes) -> Answer:
        opened = open_request(blob, inst.v1_key, aead=AEAD)
        status, _, parts, _ = fake_engine(opened.body)
        if not opened.stream or status != 200:
            sealed = seal_response(b"".join(parts), opened.response_public_key, kem=KEM, aead=AEAD)
            return status, [(b"content-type", b"application/octet-stream")], [sealed]
        enc = StreamEncoder(StreamSealer(opened.response_public_key, kem=KEM, aead=AEAD))
        wire = enc.start() + b"".join(enc.feed(p) for p in parts) + enc.finish()
        return 200, [(b"content-type", b"text/event-stream")], self._chunks(wire)

    def _chunks(self, wire: bytes) -> list[bytes]:
        if self.chunk is None:
            return [wire]
        return [wire[i : i + self.chunk] for i in range(0, len(wire), self.chunk)]


def _json(status: int, obj: Any) -> Answer:
    return status, [(b"content-type", b"application/json")], [json.dumps(obj).encode()]


class FakeResponse:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], parts: list[bytes]):
        self.status = status
        self.headers = headers
        self._parts = parts
        self.closed = False
        self.is_async = False  # (raw_bytes: one name in both engines)

    def iter_bytes(self) -> Iterator[bytes]:
        yield from self._parts

    async def aiter_bytes(self) -> Any:
        for part in self._parts:
            yield part

    def raw_bytes(self) -> Any:
        return self.aiter_bytes() if self.is_async else self.iter_bytes(), reraise

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


class FakePort:
    network_errors: tuple[type[BaseException], ...] = (ConnectionError,)
    lost_errors: tuple[type[BaseException], ...] = (ConnectionError,)
    timeout_errors: tuple[type[BaseException], ...] = (TimeoutError,)

    def __init__(self, relay: FakeRelay) -> None:
        self.relay = relay
        self.responses: list[FakeResponse] = []

    def _send(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> Any:
        resp = FakeResponse(*self.relay.handle(method, urlsplit(url).path, dict(headers), body))
        resp.is_async = isinstance(self, AsyncFakePort)
        self.responses.append(resp)
        return resp

    def send(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes, *, control: bool
    ) -> FakeResponse:
        return self._send(method, url, headers, body)


class AsyncFakePort(FakePort):
    async def send(  # type: ignore[override]
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes, *, control: bool
    ) -> FakeResponse:
        return self._send(method, url, headers, body)


def settings(**kw: Any) -> Settings:
    args: dict[str, Any] = dict(
        api_key=KEY,
        api_base=RELAY,
        models_base=RELAY,
        backend="auto",
        e2e_paths=DEFAULT_E2E_PATHS,
        strict=False,
        max_attempts=4,
        timeout=5.0,
        on_usage=None,
        limits=None,
        key_pool_size=0,
    )
    args.update(kw)
    return make_settings(**args)


def body(text: str = "hello there", *, stream: bool = False) -> bytes:
    obj: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    if stream:
        # All the usage the fake engine streams is asked for, so the stream passes byte for
        # byte (the usage a caller did not ask for is removed: tests/test_stream_semantics.py).
        obj["stream"] = True
        obj["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return json.dumps(obj).encode()


def run(
    engine: Engine, relay: FakeRelay, text: str = "hello there", *, stream: bool = False
) -> Any:
    return engine.invoke(
        FakePort(relay), path=CHAT, body=body(text, stream=stream), model=MODEL, auth=KEY
    )


def read_stream(outcome: Any) -> tuple[bytes, PQE2EEError | None]:
    """The bytes a stream yielded and the error that ended it (None: a clean end)."""
    assert isinstance(outcome, Streaming), outcome
    got: list[bytes] = []
    try:
        for chunk in outcome.stream:
            got.append(chunk)
    except PQE2EEError as exc:
        return b"".join(got), exc
    return b"".join(got), None


def upstream_stream(text: str = "hello there") -> bytes:
    return b"".join(
        fake_engine({"model": MODEL, "messages": [{"content": text}], "stream": True})[2]
    )


def records(events: list[bytes]) -> list[int]:
    """Indexes of the record events (HEAD, DATA..., END) of an outer v2 stream."""
    return [i for i, e in enumerate(events) if e.startswith(b'data: {"e2e_v2":"')]


def flip(event: bytes) -> bytes:
    raw = bytearray(base64.b64decode(event[len(b'data: {"e2e_v2":"') : -len(b'"}\n\n')]))
    raw[12] ^= 0x01  # inside the ciphertext
    return b'data: {"e2e_v2":"' + base64.b64encode(bytes(raw)) + b'"}\n\n'


# -- clocks ----------------------------------------------------------------------------------------


def test_nonce_expires_at_is_honoured_with_a_monotonic_clock() -> None:
    """SPEC.md: ``nonce_expires_at`` (the server's Unix time) shortens the nonces' expiry. The
    engine's pool runs on a monotonic clock, far from Unix time: no lease may be used past
    ``nonce_expires_at`` (minus the safety margin), however far apart the two clocks are."""
    mono = [1000.0]  # a monotonic clock nowhere near Unix time
    start = float(int(time.time()))

    def wall() -> float:
        return start + (mono[0] - 1000.0)

    relay = FakeRelay(kinds=("v1",), expires_at_in=30.0, wall_clock=wall)  # "55 s", but 30 s
    engine = Engine(settings(prefer_v2=False), clock=lambda: mono[0], wall_clock=wall)
    assert isinstance(run(engine, relay), Opened)
    assert relay.discoveries == 1
    assert engine.state._pool(CHUTE).expires_at == 1030.0  # not 1055
    mono[0] += 26.0  # within the 5 s safety margin of nonce_expires_at
    assert isinstance(run(engine, relay), Opened)
    assert relay.discoveries == 2  # the first discovery's nonces were not used
    assert engine.state._pool(CHUTE).expires_at == 1056.0


def test_nonce_expires_at_in_the_past_is_clock_skew_and_ignored() -> None:
    relay = FakeRelay(kinds=("v1",), expires_at_in=-100.0)
    mono = [7.0]
    engine = Engine(settings(prefer_v2=False), clock=lambda: mono[0])
    assert isinstance(run(engine, relay), Opened)
    assert engine.state._pool(CHUTE).expires_at == pytest.approx(7.0 + 55.0, abs=0.5)


def test_one_engine_shared_by_many_threads() -> None:
    """The protocol state has no locks: the blocking engine, shared by threads (as a sync
    httpx client is), serialises its calls into it. Every request succeeds and no nonce is
    handed out twice, in v1 and v2, with engines sharing one negotiator."""
    relay = FakeRelay(kinds=("v2", "v1"), nonces=200)
    shared = Negotiator()
    engines = [Engine(settings(), negotiator=shared) for _ in range(2)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(engine: Engine) -> None:
        try:
            barrier.wait()
            for _ in range(6):
                assert isinstance(run(engine, relay), Opened)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(engines[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    nonces = [headers["X-E2E-Nonce"] for headers, _ in relay.invokes]
    assert len(nonces) == 48 == len(set(nonces))


# -- the happy paths -------------------------------------------------------------------------------


def test_v2_is_chosen_when_offered_and_the_answer_is_the_engines() -> None:
    relay = FakeRelay()
    engine = Engine(settings())
    outcome = run(engine, relay, "hello there")
    assert isinstance(outcome, Opened)
    assert (outcome.status, outcome.version, outcome.content_type) == (200, 2, "application/json")
    expected = fake_engine({"model": MODEL, "messages": [{"content": "hello there"}]})[2][0]
    assert outcome.body == expected
    headers, blob = relay.invokes[0]
    h = parse_header(blob[: int.from_bytes(blob[5:7], "big")])
    # every routing header is H's value; the relay's nonce and path are bound into the seal
    assert headers["X-Chute-Id"] == h.chute_id == CHUTE
    assert headers["X-Instance-Id"] == h.instance_id == relay.instances[0].instance_id
    assert headers["X-E2E-Nonce"] == h.relay_nonce
    assert headers["X-E2E-Path"] == h.path == CHAT
    assert headers["X-E2E-Stream"] == "false" and not h.stream
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert abs(h.ts_ms - time.time() * 1000) < 60_000
    assert engine.negotiator.pinned(CHUTE, time.time())


def test_v2_stream_yields_the_engines_bytes_and_usage_once() -> None:
    usage: list[Any] = []
    relay = FakeRelay(chunk=37)  # outer lines split anywhere
    engine = Engine(settings(on_usage=usage.append))
    outcome = run(engine, relay, "a b c d", stream=True)
    assert outcome.stream.version == 2
    data, error = read_stream(outcome)
    assert error is None
    assert data == upstream_stream("a b c d")  # byte for byte, [DONE] included
    assert usage == [{"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}]
    assert relay.v2_invokes == 1


def test_v2_stream_events_end_with_the_authenticated_done() -> None:
    relay = FakeRelay()
    outcome = run(Engine(settings()), relay, stream=True)
    events = list(outcome.stream.iter_events())
    assert all(isinstance(e, InnerEvent) for e in events[:-1])
    assert isinstance(events[-1], Done) and events[-1].raw == b"data: [DONE]\n\n"


def test_v2_engine_error_has_the_authenticated_status_stream_or_not() -> None:
    relay = FakeRelay()
    engine = Engine(settings())
    for stream in (False, True):
        outcome = run(engine, relay, "__error_400__", stream=stream)
        assert isinstance(outcome, Opened), stream
        assert (outcome.status, outcome.version) == (400, 2)
        assert json.loads(outcome.body)["error"]["message"] == "the engine refused this"
    assert relay.v2_invokes == 2  # answers, not retried


def test_v2_upstream_failure_in_end_is_an_error_never_an_answer() -> None:
    relay = FakeRelay(end_error=UpstreamError("engine_broke", "the engine's stream broke", 502))
    engine = Engine(settings())
    single = run(engine, relay)
    assert isinstance(single, Opened) and single.status == 502
    assert json.loads(single.body)["error"]["type"] == "engine_broke"
    data, error = read_stream(run(engine, relay, stream=True))
    assert isinstance(error, RemoteError) and error.code is ErrorCode.UPSTREAM_ERROR
    assert error.status == 502 and b"[DONE]" not in data


def test_v2_failure_without_an_engine_answer_becomes_an_error_body() -> None:
    relay = FakeRelay(engine_down=True)
    engine = Engine(settings())
    for stream in (False, True):
        outcome = run(engine, relay, stream=stream)
        assert isinstance(outcome, Opened) and outcome.status == 504, stream
        assert outcome.content_type == "application/json"
        error = json.loads(outcome.body)["error"]
        assert error["message"] == "Upstream engine timed out"
        assert error["type"] == "upstream_timeout" and error["code"] == "upstream_error"


def test_v2_response_keys_are_wiped() -> None:
    relay = FakeRelay()
    engine = Engine(settings())
    made: list[Any] = []
    assert engine.keys_v2 is not None
    take = engine.keys_v2.take

    def spy() -> Any:
        key = take()
        made.append(key)
        return key

    engine.keys_v2.take = spy  # type: ignore[method-assign]
    run(engine, relay)
    read_stream(run(engine, relay, stream=True))
    assert run(engine, relay, "__error_400__", stream=True).status == 400
    assert len(made) == 3 and all(k.seed() is None for k in made)


def test_async_engine_speaks_v2_too() -> None:
    relay = FakeRelay()

    async def main() -> tuple[Any, bytes]:
        engine = AsyncEngine(settings())
        port = AsyncFakePort(relay)
        single = await engine.invoke(port, path=CHAT, body=body("x y"), model=MODEL, auth=KEY)
        streamed = await engine.invoke(
            port, path=CHAT, body=body("x y", stream=True), model=MODEL, auth=KEY
        )
        chunks = [c async for c in streamed.stream]
        return single, b"".join(chunks)

    single, data = anyio.run(main)
    assert single.version == 2 and b"Echo: x y" in single.body
    assert data == upstream_stream("x y")


# -- negotiation -----------------------------------------------------------------------------------


def test_strict_refuses_v1_before_any_invoke() -> None:
    relay = FakeRelay(kinds=("v1", "v1"))
    engine = Engine(settings(min_version=2))
    for _ in range(2):
        with pytest.raises(RemoteProtocolError) as err:
            run(engine, relay)
        assert err.value.code is ErrorCode.DOWNGRADE_REFUSED
    assert relay.invokes == []
    assert relay.discoveries == 1  # no nonce spent: the pool still holds them all


def test_strict_treats_an_invalid_offer_as_absent() -> None:
    relay = FakeRelay()
    real = relay._discovery

    def bad_offer() -> Answer:
        status, headers, parts = real()
        doc = json.loads(parts[0])
        doc["instances"][0]["e2e_v2"]["pk"] = base64.b64encode(b"\xff" * 1216).decode()
        return status, headers, [json.dumps(doc).encode()]

    relay._discovery = bad_offer  # type: ignore[method-assign]
    with pytest.raises(RemoteProtocolError) as err:
        run(Engine(settings(min_version=2)), relay)
    assert err.value.code is ErrorCode.DOWNGRADE_REFUSED and relay.invokes == []


def test_prefer_without_a_pin_falls_back_to_v1_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = FakeRelay(kinds=("v1",))
    engine = Engine(settings())
    with caplog.at_level(logging.WARNING, logger="pqe2ee.transports"):
        for _ in range(3):
            outcome = run(engine, relay)
            assert isinstance(outcome, Opened) and outcome.version == 1
        data, error = read_stream(run(engine, relay, "p q", stream=True))
    assert error is None and data == upstream_stream("p q")
    assert relay.v2_invokes == 0 and len(relay.invokes) == 4
    assert [r.getMessage() for r in caplog.records].count(
        f"chute {CHUTE} offers no v2: using v1 (min_version=2 would refuse)"
    ) == 1
    assert not engine.negotiator.pinned(CHUTE, time.time())


def test_a_pinned_chute_that_loses_v2_is_refused() -> None:
    relay = FakeRelay(nonces=1)  # one nonce per discovery: every request rediscovers
    engine = Engine(settings())
    assert run(engine, relay).version == 2
    relay.strip_v2 = True
    with pytest.raises(RemoteProtocolError) as err:
        run(engine, relay)
    assert err.value.code is ErrorCode.DOWNGRADE_SUSPECTED
    assert len(relay.invokes) == 1 and relay.discoveries == 2  # nothing sent after the strip
    relay.strip_v2 = False  # a later discovery with the offer back: v2 again
    drop_pool(engine)
    assert run(engine, relay).version == 2


def drop_pool(engine: Any) -> None:
    """Forget the chute's nonces (as a refused nonce does): the next request rediscovers."""
    lease = Lease(CHUTE, "-", b"", "-")
    engine.state.report(lease, RelayError("x", code=ErrorCode.NONCE_REJECTED), engine.clock())


def test_prefer_v2_false_speaks_v1_and_never_pins() -> None:
    relay = FakeRelay()
    engine = Engine(settings(prefer_v2=False))
    assert engine.settings.xwing is None and engine.keys_v2 is None
    assert run(engine, relay).version == 1
    assert relay.v2_invokes == 0 and engine.negotiator.pins() == {}


def test_a_mixed_chute_uses_only_its_v2_instances() -> None:
    relay = FakeRelay(kinds=("v1", "v2", "v1"))
    engine = Engine(settings())
    for i in range(6):
        assert run(engine, relay, f"n{i}").version == 2
    v2_id = relay.instances[1].instance_id
    assert {h["X-Instance-Id"] for h, _ in relay.invokes} == {v2_id}


def test_a_shared_negotiator_shares_pins() -> None:
    relay = FakeRelay(nonces=1)
    shared = Negotiator()
    a = Engine(settings(negotiator=shared), negotiator=shared)
    b = Engine(settings(negotiator=shared), negotiator=shared)
    run(a, relay)
    relay.strip_v2 = True
    with pytest.raises(RemoteProtocolError) as err:
        run(b, relay)  # b never saw v2 itself
    assert err.value.code is ErrorCode.DOWNGRADE_SUSPECTED


@pytest.mark.parametrize(
    ("kw", "ok"),
    [
        ({"min_version": 3}, False),
        ({"min_version": True}, False),
        ({"min_version": 2, "prefer_v2": False}, False),
        ({"prefer_v2": "yes"}, False),
        ({"negotiator": Negotiator(E2EPolicy(min_version=1)), "min_version": 2}, False),
        ({"negotiator": Negotiator(E2EPolicy(min_version=2)), "min_version": 2}, True),
        ({"negotiator": Negotiator(E2EPolicy(min_version=2))}, True),  # stricter is kept
        ({"negotiator": Negotiator(E2EPolicy(prefer_v2=True)), "prefer_v2": False}, False),
    ],
)
def test_policy_arguments_are_checked(kw: dict[str, Any], ok: bool) -> None:
    if ok:
        s = settings(**kw)
        assert s.policy == kw["negotiator"].policy
        return
    with pytest.raises(LocalProtocolError) as err:
        settings(**kw)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT


def test_client_state_keeps_a_decision_until_the_next_discovery() -> None:
    from pqe2ee.protocol.client import ClientState

    relay = FakeRelay(kinds=("v1", "v2"))
    state, negotiator, wall = ClientState(), Negotiator(), time.time()
    assert state.negotiate(CHUTE, negotiator, 0.0, wall) is None  # nothing loaded: discover
    state.load_discovery(CHUTE, relay._discovery()[2][0], 0.0, wall)
    first = state.negotiate(CHUTE, negotiator, 1.0, wall)
    assert first is not None and first.version == 2
    assert first.excluded == {relay.instances[0].instance_id}
    assert set(first.offers) == {relay.instances[1].instance_id}
    assert state.negotiate(CHUTE, negotiator, 2.0, wall) is first  # decided once per discovery
    found = state.negotiated_lease(CHUTE, negotiator, 3.0, lambda: wall)
    assert found is not None and found[0].instance_id == relay.instances[1].instance_id
    doc = relay._discovery()[2][0]
    state.load_discovery(CHUTE, doc, 4.0, wall)
    again = state.negotiate(CHUTE, negotiator, 5.0, wall)
    assert again is not None and again is not first and again.generation == first.generation + 1
    # an offer's expiry ends the decision too: rediscover; a discovery that still shows only
    # the expired offer counts as one without v2 - and the chute is pinned
    assert state.negotiate(CHUTE, negotiator, 6.0, again.valid_until) is None
    state.load_discovery(CHUTE, doc, 7.0, wall)
    with pytest.raises(RemoteProtocolError) as err:
        state.negotiate(CHUTE, negotiator, 8.0, again.valid_until)
    assert err.value.code is ErrorCode.DOWNGRADE_SUSPECTED


def test_a_v1_decision_reads_no_clock_per_lease() -> None:
    """A decision that relies on no offer (v1) never expires: leases under it read no Unix
    time. One that relies on v2 offers reads it per lease (their expiry); deciding reads it
    once."""
    from pqe2ee.protocol.client import ClientState
    from pqe2ee.protocol.clocks import Monotonic, UnixTime

    unix = UnixTime(time.time())
    for kinds, per_lease in ((("v1",), 0), (("v2",), 1)):
        relay = FakeRelay(kinds=kinds)
        state, negotiator, reads = ClientState(), Negotiator(), 0

        def wall() -> UnixTime:
            nonlocal reads
            reads += 1
            return unix

        state.load_discovery(CHUTE, relay._discovery()[2][0], Monotonic(0.0), unix)
        found = state.negotiated_lease(CHUTE, negotiator, Monotonic(1.0), wall)
        assert found is not None and found[1].version == int(kinds[0][1])
        assert reads == 1  # the decision
        for i in range(3):
            assert state.negotiated_lease(CHUTE, negotiator, Monotonic(2.0 + i), wall)
        assert reads == 1 + 3 * per_lease, kinds


# -- retries and instance hints --------------------------------------------------------------------


def hint(code: str, status: int = 400) -> tuple[int, bytes]:
    return status, json.dumps({"detail": f"e2e_v2:{code}"}).encode()


def blob_ids(relay: FakeRelay) -> list[tuple[str, bytes]]:
    """(nonce, request_id) of every v2 invoke."""
    out = []
    for headers, blob in relay.invokes:
        h = parse_header(blob[: int.from_bytes(blob[5:7], "big")])
        out.append((headers["X-E2E-Nonce"], h.request_id))
    return out


def test_every_retry_is_a_fresh_seal() -> None:
    relay = FakeRelay(kinds=("v2", "v2"))
    relay.replies.append((429, b'{"detail":"Instance is at maximum capacity"}'))
    engine = Engine(settings())
    assert run(engine, relay).version == 2
    ids = blob_ids(relay)
    assert len(ids) == 2 and ids[0][0] != ids[1][0] and ids[0][1] != ids[1][1]
    assert relay.invokes[0][1] != relay.invokes[1][1]


def test_unknown_key_drops_the_pool_and_retries_once() -> None:
    relay = FakeRelay()
    relay.replies.append(hint("unknown_key"))
    engine = Engine(settings())
    assert run(engine, relay).version == 2
    assert len(relay.invokes) == 2 and relay.discoveries == 2  # rediscovered for the retry
    relay.replies.extend([hint("unknown_key"), hint("unknown_key")])
    with pytest.raises(RelayError) as err:
        run(engine, relay)
    assert err.value.code is ErrorCode.UNKNOWN_KEY and err.value.status == 400
    assert len(relay.invokes) == 4  # once, not more


def test_stale_is_retried_once() -> None:
    relay = FakeRelay()
    relay.replies.append(hint("stale"))
    engine = Engine(settings())
    assert run(engine, relay).version == 2 and len(relay.invokes) == 2
    relay.replies.extend([hint("stale"), hint("stale")])
    with pytest.raises(RelayError) as err:
        run(engine, relay)
    assert err.value.code is ErrorCode.STALE and len(relay.invokes) == 4


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (hint("replay", 409), ErrorCode.REPLAY),
        ((409, b'{"detail":"Instance returned status 409"}'), ErrorCode.REPLAY),
        (hint("context_mismatch"), ErrorCode.CONTEXT_MISMATCH),
        (hint("decrypt_failed"), ErrorCode.DECRYPT_FAILED),
        (hint("bad_header"), ErrorCode.BAD_HEADER),
        (
            (400, b'{"detail":"{\\"detail\\":\\"e2e_v2:malformed_payload\\"}"}'),
            ErrorCode.MALFORMED_PAYLOAD,
        ),
    ],
)
def test_other_hints_are_typed_and_not_retried(reply: tuple[int, bytes], code: ErrorCode) -> None:
    relay = FakeRelay()
    relay.replies.append(reply)
    with pytest.raises(RelayError) as err:
        run(Engine(settings()), relay)
    assert err.value.code is code and err.value.status == reply[0]
    assert len(relay.invokes) == 1


def test_hint_text_is_only_read_for_v2_requests() -> None:
    relay = FakeRelay(kinds=("v1",))
    relay.replies.append(hint("replay", 409))
    outcome = run(Engine(settings()), relay)
    assert isinstance(outcome, RelayAnswer) and outcome.status == 409
    assert outcome.error.code is ErrorCode.RELAY_ERROR
    assert classify_v2_hint(200, b"e2e_v2:replay") is None
    assert classify_v2_hint(400, b'{"detail":"e2e_v2:usage_mismatch"}') is None


def test_retries_exhausted_after_nonces_keep_failing() -> None:
    relay = FakeRelay()
    relay.replies.extend([(403, b'{"detail":"Invalid, expired, or already-used nonce"}')] * 4)
    with pytest.raises(RetriesExhausted) as err:
        run(Engine(settings()), relay)
    assert err.value.last_error.code is ErrorCode.NONCE_REJECTED and len(relay.invokes) == 4
    assert len({rid for _, rid in blob_ids(relay)}) == 4


def test_the_relays_date_corrects_the_clock() -> None:
    relay = FakeRelay(date_offset=3600.0)  # the relay's clock is an hour ahead of ours
    engine = Engine(settings())
    with pytest.raises(RelayError) as err:  # ... and of the fake instance's: stale, twice
        run(engine, relay, "x")
    assert err.value.code is ErrorCode.STALE and len(relay.invokes) == 2
    for _, blob in relay.invokes:
        h = parse_header(blob[: int.from_bytes(blob[5:7], "big")])
        assert abs(h.ts_ms / 1000 - (time.time() + 3600)) < 5
    relay2 = FakeRelay(date_offset=1.0)  # within the slack: no correction
    engine2 = Engine(settings())
    run(engine2, relay2)
    assert engine2.clock_offset == 0.0


# -- stream faults ---------------------------------------------------------------------------------


def _drop(n: int) -> StreamEdit:
    return lambda ev: [e for i, e in enumerate(ev) if i != records(ev)[n]]


def _dup(n: int) -> StreamEdit:
    def edit(ev: list[bytes]) -> list[bytes]:
        i = records(ev)[n]
        return [*ev[: i + 1], ev[i], *ev[i + 1 :]]

    return edit


def _swap(a: int, b: int) -> StreamEdit:
    def edit(ev: list[bytes]) -> list[bytes]:
        r = records(ev)
        ev = list(ev)
        ev[r[a]], ev[r[b]] = ev[r[b]], ev[r[a]]
        return ev

    return edit


def _tamper(n: int) -> StreamEdit:
    def edit(ev: list[bytes]) -> list[bytes]:
        i = records(ev)[n]
        return [*ev[:i], flip(ev[i]), *ev[i + 1 :]]

    return edit


def _cut_before(n: int) -> StreamEdit:
    return lambda ev: ev[: records(ev)[n]]


def _usage_copy(edit: Callable[[dict[str, Any]], dict[str, Any] | None]) -> StreamEdit:
    def apply(ev: list[bytes]) -> list[bytes]:
        out = []
        for e in ev:
            if e.startswith(b'data: {"usage":'):
                new = edit(json.loads(e[6:])["usage"])
                if new is None:
                    continue
                e = b"data: " + json.dumps({"usage": new}).encode() + b"\n\n"
            out.append(e)
        return out

    return apply


STREAM_FAULTS: list[tuple[str, StreamEdit, ErrorCode]] = [
    ("drop a DATA record", _drop(3), ErrorCode.RECORD_OUT_OF_ORDER),
    ("duplicate a record", _dup(2), ErrorCode.DUPLICATE_RECORD),
    ("reorder two records", _swap(2, 3), ErrorCode.RECORD_OUT_OF_ORDER),
    ("tamper with a record", _tamper(2), ErrorCode.RECORD_AUTH_FAILED),
    ("cut before END", _cut_before(-1), ErrorCode.STREAM_TRUNCATED),
    (
        "cut after [DONE], before END",
        lambda ev: ev[: records(ev)[-1] - 1],
        ErrorCode.STREAM_TRUNCATED,
    ),
    ("cut after HEAD", _cut_before(1), ErrorCode.STREAM_TRUNCATED),
    ("drop END", _drop(-1), ErrorCode.STREAM_TRUNCATED),
    ("record after END", lambda ev: [*ev, ev[records(ev)[2]]], ErrorCode.DATA_AFTER_END),
    (
        "usage copy altered",
        _usage_copy(lambda u: {**u, "completion_tokens": 1}),
        ErrorCode.USAGE_MISMATCH,
    ),
    (
        "relay error event",
        lambda ev: [*ev[:4], b'data: {"e2e_error":{"code":"x"}}\n\n'],
        ErrorCode.RELAY_ERROR,
    ),
]


@pytest.mark.parametrize(("what", "edit", "code"), STREAM_FAULTS, ids=[f[0] for f in STREAM_FAULTS])
def test_stream_faults_are_typed_and_never_complete(
    what: str, edit: StreamEdit, code: ErrorCode
) -> None:
    usage: list[Any] = []
    relay = FakeRelay(stream_edit=edit, chunk=61)
    engine = Engine(settings(on_usage=usage.append))
    outcome = run(engine, relay, "one two three four five", stream=True)
    data, error = read_stream(outcome)
    assert error is not None and error.code is code, (what, error)
    full = upstream_stream("one two three four five")
    if code is ErrorCode.DATA_AFTER_END:  # END had vouched for the answer: complete, then this
        assert data == full and len(usage) == 1
    else:
        assert b"[DONE]" not in data  # the inner [DONE] is held back until END authenticated
        assert full.startswith(data)  # nothing invented
        assert usage == []
    assert outcome.stream._closed


def test_a_fault_before_head_fails_while_the_stream_is_read() -> None:
    """As in v1, a 200 stream fails as it is read (the HTTP library's transport error in the
    adapters), whichever record is broken - even HEAD."""
    relay = FakeRelay(stream_edit=_tamper(0))
    data, error = read_stream(run(Engine(settings()), relay, stream=True))
    assert data == b"" and error is not None and error.code is ErrorCode.RECORD_AUTH_FAILED


def test_faults_surface_after_the_events_before_them_however_chunked() -> None:
    whole = FakeRelay(stream_edit=_drop(4))  # every event in one chunk
    data, error = read_stream(run(Engine(settings()), whole, "a b c d e", stream=True))
    assert error is not None and error.code is ErrorCode.RECORD_OUT_OF_ORDER
    split = FakeRelay(stream_edit=_drop(4), chunk=7)
    data7, error7 = read_stream(run(Engine(settings()), split, "a b c d e", stream=True))
    assert error7 is not None and error7.code is ErrorCode.RECORD_OUT_OF_ORDER
    assert data == data7 and data.count(b"\n\n") == 3  # role chunk + "Echo:" + " a"


def test_a_missing_usage_copy_is_fine_and_usage_is_the_authenticated_one() -> None:
    usage: list[Any] = []
    relay = FakeRelay(stream_edit=_usage_copy(lambda u: None))
    data, error = read_stream(run(Engine(settings(on_usage=usage.append)), relay, stream=True))
    assert error is None and data.endswith(b"data: [DONE]\n\n")
    assert [{k: u[k] for k in USAGE_FIELDS} for u in usage] == [
        {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    ]


def test_tampered_single_response_is_typed() -> None:
    def edit(blob: bytes) -> bytes:
        return blob[:-3] + bytes([blob[-3] ^ 1]) + blob[-2:]

    relay = FakeRelay(single_edit=edit)
    with pytest.raises(PQE2EEError) as err:
        run(Engine(settings()), relay)
    assert err.value.code is ErrorCode.RECORD_AUTH_FAILED


# =================================================================================================
# Part 2: the SDKs and every transport against the real servers
# =================================================================================================


@dataclass
class HostileRelay:
    """ASGI wrapper in front of the real relay: counts invokes with their wire profile and
    instance, and - when a test arms it - strips ``e2e_v2`` from discovery, edits the outer
    events of the next stream answers, or replays the previous invoke's body."""

    app: Any
    strip_v2: bool = False
    replay_next: bool = False
    invokes: list[tuple[str, int]] = field(default_factory=list)  # (instance id, version)
    discoveries: int = 0
    stream_edits: collections.deque[StreamEdit] = field(default_factory=collections.deque)
    _last_body: bytes = b""

    def reset(self) -> None:
        self.strip_v2 = self.replay_next = False
        self.invokes.clear()
        self.stream_edits.clear()
        self.discoveries = 0

    def versions(self) -> list[int]:
        return [v for _, v in self.invokes]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/e2e/instances/"):
            self.discoveries += 1
            if self.strip_v2:
                send = _Rewriter(send, _strip_offers)
        elif scope["type"] == "http" and path == "/e2e/invoke":
            scope, receive = await self._invoke(scope, receive)
            if self.stream_edits:
                send = _Rewriter(send, _events_edit(self.stream_edits.popleft()), sse=True)
        await self.app(scope, receive, send)

    async def _invoke(self, scope: Any, receive: Any) -> tuple[Any, Any]:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        blob = b"".join(chunks)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if self.replay_next and self._last_body:
            self.replay_next = False
            blob = self._last_body
            kept = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*kept, (b"content-length", str(len(blob)).encode())]}
        else:
            self._last_body = blob
        self.invokes.append((headers.get("x-instance-id", ""), 2 if blob[:5] == b"PQE2\x02" else 1))
        sent = False

        async def replay_receive() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": blob, "more_body": False}
            return await receive()

        return scope, replay_receive


def _strip_offers(body: bytes) -> bytes:
    doc = json.loads(body)
    for row in doc.get("instances", []):
        row.pop("e2e_v2", None)
    return json.dumps(doc).encode()


def _events_edit(edit: StreamEdit) -> Callable[[bytes], bytes]:
    def apply(body: bytes) -> bytes:
        events = [e + b"\n\n" for e in body.split(b"\n\n") if e]
        return b"".join(edit(events))

    return apply


class _Rewriter:
    """Buffers an answer and rewrites its body (only SSE answers with ``sse=True``)."""

    def __init__(self, send: Any, rewrite: Callable[[bytes], bytes], *, sse: bool = False):
        self._send = send
        self._rewrite = rewrite
        self._sse = sse
        self._start: dict[str, Any] | None = None
        self._buf = bytearray()

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            ctype = dict(message.get("headers", [])).get(b"content-type", b"")
            if message["status"] == 200 and (
                not self._sse or ctype.startswith(b"text/event-stream")
            ):
                self._start = message
                return
        if self._start is None or message["type"] != "http.response.body":
            await self._send(message)
            return
        self._buf += message.get("body", b"")
        if message.get("more_body", False):
            return
        body = self._rewrite(bytes(self._buf))
        headers = [(k, v) for k, v in self._start["headers"] if k.lower() != b"content-length"]
        if not self._sse:
            headers.append((b"content-length", str(len(body)).encode()))
        await self._send({**self._start, "headers": headers})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})


@dataclass
class RealStack:
    engine: str
    relay: str  # the hostile wrapper's URL
    hostile: HostileRelay
    v2_instance: str  # instance id of the instance serving v2 (the other serves v1 only)
    v1_instance: str
    proxy_strict: str  # pqe2ee proxy --min-version 2
    proxy: str  # pqe2ee proxy (defaults)


@pytest.fixture(scope="module")
def real() -> Iterator[RealStack]:
    from pqe2ee.proxy.app import ProxyConfig
    from pqe2ee.proxy.app import create_app as proxy_app
    from servers import run_app, serve_chain

    with serve_chain(
        2,
        api_keys=(KEY,),
        instance_kw=[{}, {"v2": False}],
        wrap_relay=HostileRelay,
        rate_limit=100_000,
        nonces_per_instance=50,
    ) as chain:

        def proxy(**kw: Any) -> str:
            cfg = ProxyConfig(api_base=chain.relay, models_base=chain.relay, api_key=KEY, **kw)
            return chain.exits.enter_context(run_app(proxy_app(cfg)))

        v2_app, v1_app = chain.instance_apps
        yield RealStack(
            engine=chain.engine,
            relay=chain.relay,
            hostile=chain.relay_app,
            v2_instance=v2_app.state.instance.instance_id,
            v1_instance=v1_app.state.instance.instance_id,
            proxy_strict=proxy(min_version=2),
            proxy=proxy(),
        )


@pytest.fixture
def stack(real: RealStack) -> Iterator[RealStack]:
    real.hostile.reset()
    yield real
    real.hostile.reset()


SDK_BASE = "http://sdk-base-url.invalid/v1"  # never reached: the transport routes everything
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def oai(stack: RealStack, flavour: str = "httpx2", **kw: Any) -> Any:
    import httpx
    import httpx2
    import openai

    import pqe2ee.transports.httpx as tx_httpx
    import pqe2ee.transports.httpx2 as tx_httpx2

    lib, mod = (httpx2, tx_httpx2) if flavour == "httpx2" else (httpx, tx_httpx)
    transport = mod.E2EETransport(api_key=KEY, api_base=stack.relay, models_base=stack.relay, **kw)
    return openai.OpenAI(
        api_key=KEY, base_url=SDK_BASE, http_client=lib.Client(transport=transport), max_retries=0
    )


def aoai(stack: RealStack, **kw: Any) -> Any:
    import httpx2
    import openai

    import pqe2ee

    transport = pqe2ee.AsyncE2EETransport(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, **kw
    )
    return openai.AsyncOpenAI(
        api_key=KEY,
        base_url=SDK_BASE,
        http_client=httpx2.AsyncClient(transport=transport),
        max_retries=0,
    )


def engine_direct(stack: RealStack, body: dict[str, Any]) -> bytes:
    import httpx2

    resp = httpx2.post(stack.engine + CHAT, json=body, timeout=10)
    assert resp.status_code == 200
    return without_created(resp.content)


def without_created(data: bytes) -> bytes:
    import re

    return re.sub(rb'"created":\d+', b'"created":0', data)


def stream_text(chunks: Any) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("flavour", ["httpx2", "httpx"])
def test_openai_sync_speaks_v2(stack: RealStack, flavour: str) -> None:
    with oai(stack, flavour, min_version=2) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="dev-echo", messages=user("hello v2")
        )
        assert raw.parse().choices[0].message.content == "Echo: hello v2"
        direct = engine_direct(stack, {"model": "dev-echo", "messages": user("hello v2")})
        assert without_created(raw.http_response.content) == direct  # the engine's bytes
        stream = client.chat.completions.create(
            model="dev-echo",
            messages=user("stream me in v2"),
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert stream_text(chunks) == "Echo: stream me in v2"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
        tooled = client.chat.completions.create(
            model="dev-tools", messages=user("weather in Oslo?"), tools=TOOLS
        )
        call = tooled.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and "Oslo" in call.function.arguments
    assert stack.hostile.versions() == [2, 2, 2]
    assert {i for i, _ in stack.hostile.invokes} == {stack.v2_instance}


@pytest.mark.anyio
async def test_openai_async_speaks_v2_with_usage_and_tools(stack: RealStack) -> None:
    usage: list[Any] = []
    async with aoai(stack, on_usage=usage.append) as client:
        reply = await client.chat.completions.create(model="dev-echo", messages=user("async v2"))
        assert reply.choices[0].message.content == "Echo: async v2"
        stream = await client.chat.completions.create(
            model="dev-tools", messages=user("weather in Bergen?"), tools=TOOLS, stream=True
        )
        name, args = "", ""
        async for chunk in stream:
            for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                name += tc.function.name or ""
                args += tc.function.arguments or ""
        assert name == "get_weather" and "Bergen" in args
    assert stack.hostile.versions() == [2, 2]
    assert len(usage) == 1 and usage[0]["completion_tokens"] > 0  # the verified copy, once


def test_engine_errors_are_the_sdks_usual_errors_in_v2(stack: RealStack) -> None:
    import openai

    with oai(stack, min_version=2) as client:
        with pytest.raises(openai.InternalServerError) as err500:
            client.chat.completions.create(model="dev-echo", messages=user("__error_500__"))
        assert err500.value.status_code == 500
        assert "Simulated engine failure" in err500.value.message
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as err400:
                client.chat.completions.create(
                    model="dev-echo", messages=user("x"), n=2, stream=stream
                )
            assert "only supports n=1" in err400.value.message
    assert stack.hostile.versions() == [2, 2, 2]  # authenticated answers, never retried


def test_anthropic_sdk_through_the_strict_proxy(stack: RealStack) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=stack.proxy_strict, api_key=KEY, max_retries=0)
    msg = client.messages.create(model="dev-echo", max_tokens=64, messages=user("hello claude"))
    assert msg.content[0].text == "Echo: hello claude"  # type: ignore[union-attr]
    with client.messages.stream(
        model="dev-echo", max_tokens=64, messages=user("stream claude v2")
    ) as stream:
        assert "".join(stream.text_stream) == "Echo: stream claude v2"
        assert stream.get_final_message().stop_reason == "end_turn"
    assert stack.hostile.versions() == [2, 2]
    # The relay now hides v2: the strict proxy refuses, and sends nothing.
    stack.hostile.strip_v2 = True
    strict = anthropic.Anthropic(base_url=stack.proxy_strict, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as err:
        # a model the proxy has not discovered yet: a fresh discovery, stripped
        strict.messages.create(model="dev-reason", max_tokens=64, messages=user("x"))
    assert err.value.status_code == 502 and "downgrade_refused" in err.value.message
    assert stack.hostile.versions() == [2, 2]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # pinned: aiohttp is asyncio only
async def test_aiohttp_session_speaks_v2(stack: RealStack) -> None:
    from pqe2ee.transports.aiohttp import E2EEClientSession

    async with E2EEClientSession(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, min_version=2
    ) as session:
        body = {"model": "dev-echo", "messages": user("aiohttp v2")}
        async with session.post(CHAT, json=body) as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            assert (await resp.json())["choices"][0]["message"]["content"] == "Echo: aiohttp v2"
        async with session.post(CHAT, json={**body, "stream": True}) as resp:
            raw = await resp.read()
        assert raw.endswith(b"data: [DONE]\n\n") and b"aiohttp" in raw
        async with session.post(CHAT, json={**body, "n": 2}) as resp:
            assert resp.status == 400 and "only supports n=1" in await resp.text()
    assert stack.hostile.versions() == [2, 2, 2]


@pytest.mark.anyio
async def test_anyio_client_speaks_v2(stack: RealStack) -> None:
    from pqe2ee.transports.anyio import E2EEClient

    async with E2EEClient(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, min_version=2
    ) as client:
        reply = await client.chat(model="dev-echo", messages=user("anyio v2"))
        assert reply["choices"][0]["message"]["content"] == "Echo: anyio v2"
        async with client.stream_chat(model="dev-echo", messages=user("anyio stream")) as events:
            text = "".join(
                [
                    c["choices"][0]["delta"].get("content") or ""
                    async for c in events
                    if c["choices"]
                ]
            )
            assert events.done
        assert text == "Echo: anyio stream"
        with pytest.raises(RemoteError) as err:
            await client.chat(model="dev-echo", messages=user("__error_500__"))
        assert err.value.code is ErrorCode.UPSTREAM_ERROR and err.value.status == 500
    assert stack.hostile.versions() == [2, 2, 2]


# -- a relay that hides v2 -------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # pinned: aiohttp is asyncio only
async def test_strict_clients_refuse_a_stripped_relay_without_sending(stack: RealStack) -> None:
    from pqe2ee.transports.aiohttp import E2EEClientSession
    from pqe2ee.transports.anyio import E2EEClient

    stack.hostile.strip_v2 = True
    kw = {"api_key": KEY, "api_base": stack.relay, "models_base": stack.relay, "min_version": 2}
    with oai(stack, min_version=2) as client:
        with pytest.raises(RemoteProtocolError) as err:
            client.chat.completions.create(model="dev-echo", messages=user("x"))
        assert err.value.code is ErrorCode.DOWNGRADE_REFUSED
    async with aoai(stack, min_version=2) as aclient:
        with pytest.raises(RemoteProtocolError) as err:
            await aclient.chat.completions.create(model="dev-echo", messages=user("x"), stream=True)
        assert err.value.code is ErrorCode.DOWNGRADE_REFUSED
    async with E2EEClientSession(**kw) as session:
        with pytest.raises(RemoteProtocolError) as err:
            await session.post(CHAT, json={"model": "dev-echo", "messages": user("x")})
        assert err.value.code is ErrorCode.DOWNGRADE_REFUSED
    async with E2EEClient(**kw) as anyio_client:
        with pytest.raises(RemoteProtocolError) as err:
            await anyio_client.chat(model="dev-echo", messages=user("x"))
        assert err.value.code is ErrorCode.DOWNGRADE_REFUSED
    assert stack.hostile.discoveries == 4
    assert stack.hostile.invokes == []  # not one nonce spent, not one v1 byte sent


def test_prefer_clients_with_a_pin_refuse_and_without_fall_back(stack: RealStack) -> None:
    pins = Negotiator()
    with oai(stack, negotiator=pins) as client:
        client.chat.completions.create(model="dev-echo", messages=user("pin me"))
    assert pins.pinned(relay_chute("dev-echo"), time.time())
    stack.hostile.strip_v2 = True
    with oai(stack, negotiator=pins) as pinned:  # a fresh pool: it discovers, stripped
        with pytest.raises(RemoteProtocolError) as err:
            pinned.chat.completions.create(model="dev-echo", messages=user("x"))
        assert err.value.code is ErrorCode.DOWNGRADE_SUSPECTED
    with oai(stack) as fresh:  # never saw v2: prefer mode falls back to v1 (and warns)
        reply = fresh.chat.completions.create(model="dev-echo", messages=user("v1 then"))
        assert reply.choices[0].message.content == "Echo: v1 then"
    assert stack.hostile.versions() == [2, 1]


def test_prefer_v2_false_speaks_v1(stack: RealStack) -> None:
    with oai(stack, prefer_v2=False) as client:
        for i in range(4):
            client.chat.completions.create(model="dev-echo", messages=user(f"v1 {i}"))
    assert stack.hostile.versions() == [1, 1, 1, 1]
    assert len({i for i, _ in stack.hostile.invokes}) == 2  # both instances speak v1


def relay_chute(model: str) -> str:
    from pqe2ee.server.relay import chute_id_for

    return chute_id_for(model)


# -- a relay that edits v2 streams, alters usage, replays ------------------------------------------


E2E_STREAM_FAULTS: list[tuple[str, StreamEdit, ErrorCode]] = [
    ("drop", _drop(3), ErrorCode.RECORD_OUT_OF_ORDER),
    ("duplicate", _dup(2), ErrorCode.DUPLICATE_RECORD),
    ("reorder", _swap(2, 4), ErrorCode.RECORD_OUT_OF_ORDER),
    ("truncate", lambda ev: ev[: records(ev)[-1] - 1], ErrorCode.STREAM_TRUNCATED),
    ("tamper", _tamper(3), ErrorCode.RECORD_AUTH_FAILED),
    ("usage copy", _usage_copy(lambda u: {**u, "prompt_tokens": 1}), ErrorCode.USAGE_MISMATCH),
]


@pytest.mark.parametrize(
    ("what", "edit", "code"), E2E_STREAM_FAULTS, ids=[f[0] for f in E2E_STREAM_FAULTS]
)
def test_v2_stream_faults_through_the_sdk(
    stack: RealStack, what: str, edit: StreamEdit, code: ErrorCode
) -> None:
    import openai

    import pqe2ee.transports.httpx2 as tx_httpx2

    usage: list[Any] = []
    text = "alpha beta gamma delta epsilon zeta"
    with oai(stack, on_usage=usage.append) as client:
        stack.hostile.stream_edits.append(edit)
        stream = client.chat.completions.create(
            model="dev-echo",
            messages=user(text),
            stream=True,
            stream_options={"include_usage": True},
        )
        got: list[str] = []
        with pytest.raises(openai.APIConnectionError) as err:
            for chunk in stream:
                got.extend(c.delta.content or "" for c in chunk.choices)
        cause = err.value.__cause__
        assert isinstance(cause, tx_httpx2.E2EEStreamError) and cause.code is code, cause
        if code not in (ErrorCode.STREAM_TRUNCATED, ErrorCode.USAGE_MISMATCH):
            assert "".join(got) != "Echo: " + text  # (the cut after [DONE] has all the text)
        assert usage == []  # no usage reported for a broken answer
        # the transport stays usable
        reply = client.chat.completions.create(model="dev-echo", messages=user("after"))
        assert reply.choices[0].message.content == "Echo: after"
    assert stack.hostile.versions() == [2, 2]


def test_usage_copy_altered_by_the_relay_is_reported(stack: RealStack) -> None:
    """The relay bills from its plaintext copy: a copy that differs from the authenticated usage
    fails the stream with usage_mismatch (spec/v2.md §5.6 default), through every reader."""
    import httpx2

    import pqe2ee

    stack.hostile.stream_edits.append(_usage_copy(lambda u: {**u, "completion_tokens": 999}))
    body = {"model": "dev-echo", "messages": user("count me"), "stream": True}
    transport = pqe2ee.E2EETransport(api_key=KEY, api_base=stack.relay, models_base=stack.relay)
    with (
        httpx2.Client(transport=transport) as http,
        http.stream("POST", SDK_BASE + "/chat/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        with pytest.raises(pqe2ee.RemoteProtocolError) as err:
            resp.read()
    assert err.value.code is ErrorCode.USAGE_MISMATCH
    assert isinstance(err.value, httpx2.TransportError)


def test_a_replay_by_the_relay_is_refused_by_the_instance(stack: RealStack) -> None:
    with oai(stack, min_version=2) as client:
        client.chat.completions.create(model="dev-echo", messages=user("only once"))
        stack.hostile.replay_next = True  # the next invoke carries the previous blob
        with pytest.raises(RelayError) as err:
            client.chat.completions.create(model="dev-echo", messages=user("only once"))
        assert err.value.code is ErrorCode.REPLAY and err.value.status == 409
        reply = client.chat.completions.create(model="dev-echo", messages=user("fresh"))
        assert reply.choices[0].message.content == "Echo: fresh"
    assert stack.hostile.versions() == [2, 2, 2]  # the replay was not retried


# -- the proxy's command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, (1, True)),
        (["--min-version", "2"], {}, (2, True)),
        (["--no-prefer-v2"], {}, (1, False)),
        ([], {"PQE2EE_MIN_VERSION": "2"}, (2, True)),
        ([], {"PQE2EE_NO_PREFER_V2": "1"}, (1, False)),
    ],
)
def test_proxy_cli_policy_flags(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], expected: Any
) -> None:
    from click.testing import CliRunner

    import pqe2ee.proxy.app as proxy_mod
    from pqe2ee.cli import cli

    seen: list[Any] = []
    monkeypatch.setattr(proxy_mod, "serve", lambda config, log_level, **kw: seen.append(config))
    result = CliRunner().invoke(cli, ["proxy", *args], env=env)
    assert result.exit_code == 0, result.output
    assert (seen[0].min_version, seen[0].prefer_v2) == expected


def test_proxy_cli_refuses_contradicting_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import pqe2ee.proxy.app as proxy_mod
    from pqe2ee.cli import cli

    monkeypatch.setattr(proxy_mod, "serve", lambda config, log_level, **kw: None)
    result = CliRunner().invoke(cli, ["proxy", "--min-version", "2", "--no-prefer-v2"])
    assert result.exit_code == 2 and "min_version=2" in result.output
    help_text = CliRunner().invoke(cli, ["proxy", "--help"]).output
    assert "--min-version" in help_text and "own" in help_text


def test_proxy_config_keeps_the_policy_out_of_transport_options() -> None:
    from pqe2ee.proxy.app import ProxyConfig

    with pytest.raises(LocalProtocolError):
        ProxyConfig(transport_options={"min_version": 2})
    with pytest.raises(LocalProtocolError):
        ProxyConfig(min_version=3)
