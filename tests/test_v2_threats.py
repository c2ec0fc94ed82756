"""spec/v2.md §11, end to end: every attack v2 claims to stop (✓) goes through on v1 and is
stopped on v2.

Each attack row is driven end to end, parametrised over ``version``: the official ``openai``
SDK through ``pqe2ee.E2EETransport`` (v1: ``prefer_v2=False``; v2: ``min_version=2``) ->
:class:`HostileRelay` -> the real ``pqe2ee relay`` -> two real ``pqe2ee instance`` s (serving
v1 and v2 side by side) -> dev-engine. :class:`HostileRelay` is the relay operator turned
attacker: an ASGI wrapper that carries the client's bytes to the real relay and back and,
when a test arms it, rewrites routing headers (with nonces it mints through its own
discovery), replays a captured blob with a fresh nonce, drops / reorders / duplicates / cuts
outer stream events, rewrites the plaintext usage copy, appends an outer ``data: [DONE]``,
injects plaintext ``e2e_error`` events, replaces answers with forged plaintext errors, or
strips ``e2e_v2`` from discovery. It buffers each answer whole before it edits it (a relay
may).

Every test asserts the security property (the attack is detected - the SDK call fails, with
the typed pqe2ee error where the transport gives one - and the app never gets altered or
partial output as a successful, complete answer). Only that assertion raises
:class:`AttackUndetected`; the v1 cases are ``xfail(strict=True, raises=AttackUndetected)``, so
the suite proves that the attack really goes through on v1 (any other failure, e.g. a
precondition showing the attack was not carried out, fails the test; a v1 that suddenly
"detects" the attack XPASSes, which strict mode fails too), and that v2 stops it.

§11 row -> test (variants):

* relay changes path / stream flag / chute / instance ->
  ``test_relay_changes_path_chute_or_instance`` (path, chute, instance) and
  ``test_relay_flips_the_stream_flag``;
* relay replays a captured request -> ``test_relay_replays_a_captured_request``;
* relay drops / reorders / duplicates / truncates stream records ->
  ``test_relay_drops_reorders_or_truncates_stream_records`` (drop, reorder, truncate) and
  ``test_relay_duplicates_a_stream_record``;
* relay forges usage / ``[DONE]`` / errors shown to the app ->
  ``test_relay_forges_usage_done_or_errors_in_a_stream`` (usage, done, error) and
  ``test_relay_forges_an_error_answer`` (non-stream);
* relay hides model errors -> ``test_relay_hides_model_errors``;
* relay downgrades to v1 -> ``test_relay_downgrades_to_v1`` (its "v1" case is the default
  client, which still accepts v1: ``prefer_v2=True``, no pin yet - a ``prefer_v2=False`` client
  has nothing to be downgraded from).

Variants v1 already stops in this implementation are ordinary (passing) v1 cases, so they are
on record: a flipped ``X-E2E-Stream`` (the instance's ``stream_mismatch`` check) and a
duplicated stream record (the v1 decryptor remembers every record nonce). §11's v1 column
(✗ for the whole row) is the Chutes baseline; ours is stricter there.

Forged error answers: under v2 the engine's answers, errors included, are authenticated and
always arrive in an HTTP 200, so the transport raises any other status to a v2 request as a
typed ``RelayError`` (the relay's own, unauthenticated words) instead of handing it to the SDK
as if it were the engine's error (``test_relay_forges_an_error_answer``).

Two instances hold the *same* v1 and v2 keys under distinct instance ids (replicas of one
deployment sharing a key file): that is what makes re-targeting a v1 request to another
instance possible at all; v2 binds the instance id into the key schedule.

Out of scope (v2 marks them ◐ or ✗, or §11 gives them no v1/v2 difference to test): relay or
network reads the prompt (◐: needs §8.3 attestation), splicing responses across requests (✓
in v1 too: distinct keys), length / timing analysis (◐: padding buckets; counts and timing
remain), instance key stolen later (recorded traffic) or stolen and used actively (✗ full
MitM), quantum attacker later (✓ in both if ML-KEM-768 holds), classical attacker plus an
ML-KEM break (a cryptographic assumption, not an observable on the wire), a hostile instance
key holder (grammar checks: tests/test_v2_protocol.py, spec vectors ``stream_negative``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import openai
import pytest

import pqe2ee
from pqe2ee.backends import get_kem
from pqe2ee.backends.xwing import get_xwing
from pqe2ee.errors import ErrorCode, PQE2EEError, RemoteError
from pqe2ee.protocol.client import classify_v2_hint
from pqe2ee.protocol.v2 import MemoryReplayCache
from pqe2ee.server import instance, relay
from servers import serve_chain

KEY = "pk-threat-model-0123456789"
MODEL = "dev-echo"
OTHER_MODEL = "dev-tools"  # another chute served by the same instances
SDK_BASE = "http://sdk-base-url.invalid/v1"  # never reached: the transport routes everything
TEXT = "one two three four five six"
ANSWER = "Echo: " + TEXT
FORGED = "FORGED by the relay: your account is suspended, see https://evil.invalid"

V2_PREFIX = b"PQE2\x02"
RECORD_PREFIX = {1: b'data: {"e2e":"', 2: b'data: {"e2e_v2":"'}
USAGE_PREFIX = b'data: {"usage":'
OUTER_DONE = b"data: [DONE]\n\n"


class AttackUndetected(AssertionError):
    """The attack went through. Raised only by the security assertions."""


def xfail_v1(reason: str) -> Any:
    return pytest.param(
        1,
        marks=pytest.mark.xfail(strict=True, raises=AttackUndetected, reason="v1: " + reason),
        id="v1",
    )


V2 = pytest.param(2, id="v2")


# =================================================================================================
# The hostile relay
# =================================================================================================

Headers = list[tuple[bytes, bytes]]
StreamEdit = Callable[[int, list[bytes]], list[bytes]]


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return b"".join(chunks)


async def _call(app: Any, scope: Any, method: str, path: str, headers: Headers, body: bytes) -> Any:
    """One request to the wrapped relay app, answered whole: (status, headers, body)."""
    sub = {
        **scope,
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [*_without(headers, b"content-length"), (b"content-length", b"%d" % len(body))],
    }
    finished = anyio.Event()
    sent = False
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def receive() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()  # no disconnect while the answer is still coming
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                finished.set()

    await app(sub, receive, send)
    finished.set()
    return start["status"], list(start.get("headers", [])), b"".join(chunks)


def _without(headers: Headers, name: bytes) -> Headers:
    return [(k, v) for k, v in headers if k.lower() != name]


def _with(headers: Headers, **values: str) -> Headers:
    """``headers`` with each ``x_e2e_path="..."`` style keyword set (underscores: dashes)."""
    for key, value in values.items():
        name = key.replace("_", "-").encode()
        headers = [*_without(headers, name), (name, value.encode())]
    return headers


def _header(headers: Headers, name: bytes) -> str:
    return next((v.decode("latin-1") for k, v in headers if k.lower() == name), "")


async def _answer(send: Any, status: int, headers: Headers, body: bytes) -> None:
    kept = [(k, v) for k, v in headers if k.lower() == b"content-type"]
    kept.append((b"content-length", b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": kept})
    await send({"type": "http.response.body", "body": body, "more_body": False})


@dataclass
class HostileRelay:
    """The relay operator as attacker, in front of the real relay (see the module docstring).

    Arm at most one attack per test; it applies to every invoke until :meth:`reset`. What it
    saw: ``versions`` (wire profile of each invoke), ``statuses`` (the real relay's status for
    each), ``applied`` (how many times the armed attack changed something), ``replays``
    ((status, body) of each replay it sent).
    """

    app: Any
    reroute: str | None = None  # "path" | "stream" | "chute" | "instance"
    replay: bool = False
    stream_edit: StreamEdit | None = None
    forge: str | None = None  # "errors": replace engine errors; "all": replace every answer
    strip_v2: bool = False
    instance_ids: tuple[str, ...] = ()
    versions: list[int] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    replays: list[tuple[int, bytes]] = field(default_factory=list)
    hops: list[tuple[str, str]] = field(default_factory=list)  # (sealed for, delivered to)
    applied: int = 0

    def reset(self) -> None:
        self.reroute = self.stream_edit = self.forge = None
        self.replay = self.strip_v2 = False
        self.versions.clear()
        self.statuses.clear()
        self.replays.clear()
        self.hops.clear()
        self.applied = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/e2e/invoke":
            await self._invoke(dict(scope), receive, send)
            return
        if scope["type"] == "http" and scope["path"].startswith("/e2e/instances/"):
            if self.strip_v2:
                body = await _read_body(receive)
                status, headers, doc = await _call(
                    self.app, dict(scope), "GET", scope["path"], list(scope["headers"]), body
                )
                if status == 200:
                    doc = _strip_offers(doc)
                    self.applied += 1
                await _answer(send, status, headers, doc)
                return
        await self.app(scope, receive, send)

    async def _nonce(self, scope: Any, headers: Headers, chute: str, instance_id: str) -> str:
        """A fresh nonce for ``instance_id`` of ``chute``, from the relay's own discovery."""
        auth = [(b"authorization", _header(headers, b"authorization").encode())]
        status, _, doc = await _call(self.app, scope, "GET", f"/e2e/instances/{chute}", auth, b"")
        assert status == 200, doc
        rows = {row["instance_id"]: row for row in json.loads(doc)["instances"]}
        return str(rows[instance_id]["nonces"][0])

    async def _rerouted(self, scope: Any, headers: Headers) -> Headers:
        chute = _header(headers, b"x-chute-id")
        target = _header(headers, b"x-instance-id")
        if self.reroute == "path":  # the other path the instances serve
            return _with(headers, x_e2e_path="/v1/completions")
        if self.reroute == "stream":  # a non-stream request delivered as a stream
            return _with(headers, x_e2e_stream="true")
        if self.reroute == "chute":  # another chute of the same instance
            chute = relay.chute_id_for(OTHER_MODEL)
        elif self.reroute == "instance":  # the same chute's other instance
            target = next(i for i in self.instance_ids if i != target)
            self.hops.append((_header(headers, b"x-instance-id"), target))
        else:
            raise AssertionError(f"unknown reroute {self.reroute!r}")
        nonce = await self._nonce(scope, headers, chute, target)
        return _with(headers, x_chute_id=chute, x_instance_id=target, x_e2e_nonce=nonce)

    async def _invoke(self, scope: Any, receive: Any, send: Any) -> None:
        blob = await _read_body(receive)
        headers: Headers = list(scope["headers"])
        version = 2 if blob.startswith(V2_PREFIX) else 1
        self.versions.append(version)
        if self.reroute is not None:
            headers = await self._rerouted(scope, headers)
            self.applied += 1
        status, out_headers, body = await _call(
            self.app, scope, "POST", "/e2e/invoke", headers, blob
        )
        self.statuses.append(status)
        if self.replay:  # the same blob again, on a nonce the relay minted for itself
            chute = _header(headers, b"x-chute-id")
            nonce = await self._nonce(scope, headers, chute, _header(headers, b"x-instance-id"))
            again = await _call(
                self.app, scope, "POST", "/e2e/invoke", _with(headers, x_e2e_nonce=nonce), blob
            )
            self.replays.append((again[0], again[2]))
            self.applied += 1
        is_sse = _header(out_headers, b"content-type").startswith("text/event-stream")
        if self.stream_edit is not None and status == 200 and is_sse:
            edited = self.stream_edit(version, _events(body))
            assert b"".join(edited) != body, "the stream edit changed nothing"
            body = b"".join(edited)
            self.applied += 1
        if self.forge == "all" or (self.forge == "errors" and status != 200):
            # an engine error (v1: the instance's status is visible) or any answer, replaced
            # by a plaintext error in the engine's own (vLLM) shape
            status = 400
            out_headers = [(b"content-type", b"application/json")]
            body = json.dumps(
                {"object": "error", "message": FORGED, "type": "BadRequestError", "code": 400}
            ).encode()
            self.applied += 1
        await _answer(send, status, out_headers, body)


def _strip_offers(doc: bytes) -> bytes:
    obj = json.loads(doc)
    for row in obj.get("instances", []):
        row.pop("e2e_v2", None)
    return json.dumps(obj).encode()


def _events(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n"), body[-100:]
    return [e + b"\n\n" for e in body.split(b"\n\n")[:-1]]


# -- stream edits, the same attack on both wire profiles -----------------------------------------


@dataclass
class Framed:
    """An outer stream cut into ``head`` (v1: the init; v2: init and HEAD), ``units`` (one per
    engine SSE event: v1 its line record and blank-line record, after the plaintext usage
    event the instance puts in front of a line carrying usage; v2 one DATA record) and ``tail`` (v2: the usage copy and END)."""

    head: list[bytes]
    units: list[list[bytes]]
    tail: list[bytes]

    @classmethod
    def parse(cls, version: int, events: list[bytes]) -> Framed:
        prefix = RECORD_PREFIX[version]
        if version == 1:
            units: list[list[bytes]] = []
            unit: list[bytes] = []
            for event in events[1:]:
                unit.append(event)
                if sum(e.startswith(prefix) for e in unit) == 2:
                    units.append(unit)
                    unit = []
            assert unit == [], unit  # one record per line: every engine event is two records
            return cls(events[:1], units, [])
        records = [i for i, e in enumerate(events) if e.startswith(prefix)]
        head, data = records[0], records[1:-1]  # HEAD, DATA..., END
        assert data and data == list(range(head + 1, head + 1 + len(data))), records
        return cls(events[: head + 1], [[events[i]] for i in data], events[data[-1] + 1 :])

    def join(self) -> list[bytes]:
        return [*self.head, *(e for unit in self.units for e in unit), *self.tail]


def units_edit(edit: Callable[[Framed], None]) -> StreamEdit:
    def apply(version: int, events: list[bytes]) -> list[bytes]:
        framed = Framed.parse(version, events)
        # v1 always has 11 units here (role, "Echo:", six words, finish, usage, [DONE]); v2 one
        # DATA record per engine chunk, 11 unless the instance read chunks together
        assert len(framed.units) >= 3, len(framed.units)
        edit(framed)
        return framed.join()

    return apply


def _drop(f: Framed) -> None:
    del f.units[min(3, len(f.units) - 2)]  # "two" (never the unit holding [DONE])


def _reorder(f: Framed) -> None:
    i = min(3, len(f.units) - 2)
    f.units[i], f.units[i + 1] = f.units[i + 1], f.units[i]  # "two" <-> "three"


def _duplicate(f: Framed) -> None:
    i = min(3, len(f.units) - 1)
    f.units.insert(i + 1, f.units[i])


def _drop_last_content(f: Framed) -> None:
    del f.units[max(0, len(f.units) - 4)]  # "six"; the finish, usage and [DONE] events stay


def _forge_end(f: Framed) -> None:
    """End the answer after "one": the end marker the client accepts is moved up (v1: the
    sealed inner [DONE]; v2: the DATA holding it and END), plus an outer ``data: [DONE]``."""
    f.units = [*f.units[: min(3, len(f.units) - 2)], f.units[-1]]
    f.tail = [*f.tail, OUTER_DONE]


def _forge_usage(version: int, events: list[bytes]) -> list[bytes]:
    out = []
    for event in events:
        if event.startswith(USAGE_PREFIX):
            usage = json.loads(event[6:])["usage"]
            usage["completion_tokens"] += 1000
            usage["total_tokens"] += 1000
            event = b"data: " + json.dumps({"usage": usage}).encode() + b"\n\n"
        out.append(event)
    return out


def _inject_error(version: int, events: list[bytes]) -> list[bytes]:
    framed = Framed.parse(version, events)
    error = {"code": "upstream_error", "message": FORGED}
    injected = b"data: " + json.dumps({"e2e_error": error}).encode() + b"\n\n"
    return [*framed.head, *(e for unit in framed.units[:3] for e in unit), injected]


# =================================================================================================
# The stack and the client
# =================================================================================================


class InstanceSpy:
    """Wraps an instance app; records the routing headers of every invoke that reaches it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.invokes: list[dict[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/e2e/invoke":
            headers = dict(scope["headers"])
            self.invokes.append(
                {k: headers.get(k.encode(), b"").decode() for k in ("x-chute-id", "x-e2e-path")}
            )
        await self.app(scope, receive, send)


@dataclass
class Stack:
    engine: str
    relay: str  # the hostile relay's URL
    hostile: HostileRelay
    spies: dict[str, InstanceSpy]  # by instance id

    def engine_requests(self) -> int:
        return int(httpx2.get(self.engine + "/dev/stats", timeout=10).json()["requests"])

    def reached(self) -> dict[str, list[dict[str, str]]]:
        return {iid: list(spy.invokes) for iid, spy in self.spies.items() if spy.invokes}

    def clear(self) -> None:
        self.hostile.reset()
        for spy in self.spies.values():
            spy.invokes.clear()


@pytest.fixture(scope="module")
def served() -> Iterator[Stack]:
    kem_key = get_kem().generate()
    xwing_key = get_xwing().generate()
    ids = (str(uuid.uuid4()), str(uuid.uuid4()))

    def make_instance(config: instance.InstanceConfig) -> Any:
        # Both instances hold the same v1 and v2 keys.
        return instance.create_app(
            config, private_key=kem_key, v2_key=xwing_key, replay_cache=MemoryReplayCache()
        )

    with serve_chain(
        2,
        api_keys=(KEY,),
        instance_kw=[{"instance_id": iid} for iid in ids],
        make_instance=make_instance,
        wrap_instance=InstanceSpy,
        wrap_relay=lambda app: HostileRelay(app, instance_ids=ids),
        rate_limit=100_000,
        nonces_per_instance=4,
    ) as chain:
        spies = dict(zip(ids, chain.instance_apps, strict=True))
        yield Stack(chain.engine, chain.relay, chain.relay_app, spies)


@pytest.fixture
def stack(served: Stack) -> Iterator[Stack]:
    served.clear()
    yield served
    served.clear()


def sdk(stack: Stack, version: int, **kw: Any) -> openai.OpenAI:
    policy: dict[str, Any] = {"prefer_v2": False} if version == 1 else {"min_version": 2}
    transport = pqe2ee.E2EETransport(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, **policy, **kw
    )
    return openai.OpenAI(
        api_key=KEY,
        base_url=SDK_BASE,
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def typed(exc: BaseException | None) -> PQE2EEError | None:
    """The pqe2ee error behind what the SDK raised (openai wraps stream errors)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, PQE2EEError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


@dataclass
class StreamOutcome:
    text: str = ""
    usage: list[Any] = field(default_factory=list)  # what on_usage reported
    error: BaseException | None = None

    @property
    def code(self) -> ErrorCode | None:
        err = typed(self.error)
        return None if err is None else err.code


def stream_chat(stack: Stack, version: int) -> StreamOutcome:
    out = StreamOutcome()
    with sdk(stack, version, on_usage=out.usage.append) as client:
        try:
            stream = client.chat.completions.create(
                model=MODEL,
                messages=user(TEXT),
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                out.text += "".join(c.delta.content or "" for c in chunk.choices)
        except (openai.OpenAIError, PQE2EEError) as exc:
            out.error = exc
    assert stack.hostile.versions == [version]  # one invoke, in the profile under test
    return out


def expect_stream_detected(out: StreamOutcome, what: str) -> ErrorCode:
    """The security property of a stream: it fails with a typed pqe2ee error, and what the app
    got before that is a prefix of the engine's answer (nothing altered, nothing invented)."""
    if out.error is None:
        assert out.text != ANSWER or out.usage, "the attack changed nothing the app sees"
        raise AttackUndetected(f"{what}: the app got {out.text!r} as a complete answer")
    assert isinstance(out.error, openai.APIConnectionError), repr(out.error)
    assert out.code is not None, repr(out.error)
    assert ANSWER.startswith(out.text), out.text
    return out.code


# =================================================================================================
# The threat table
# =================================================================================================


@pytest.mark.parametrize(
    "version",
    [
        xfail_v1(
            "X-E2E-Path / X-Chute-Id / X-Instance-Id are not bound to the sealed request: the "
            "instance runs it on the path, for the chute, on the instance the relay chose"
        ),
        V2,
    ],
)
@pytest.mark.parametrize(
    "variant",
    [
        "path",  # chat request delivered to /v1/completions (both served)
        "chute",  # delivered as another chute the same instance serves
        "instance",  # delivered to the chute's other instance (same keys)
    ],
)
def test_relay_changes_path_chute_or_instance(stack: Stack, variant: str, version: int) -> None:
    """Relay changes path / chute / instance: the request must not run where the client did
    not send it. (Stream flag: see the next test.)"""
    stack.hostile.reroute = variant
    before = stack.engine_requests()
    answer: dict[str, Any] | None = None
    error: BaseException | None = None
    with sdk(stack, version) as client:
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=user("route me"), extra_body={"prompt": "route me"}
            )
            answer = json.loads(raw.http_response.content)
        except (openai.OpenAIError, PQE2EEError) as exc:
            error = exc
    assert stack.hostile.versions == [version] and stack.hostile.applied == 1
    ran = stack.engine_requests() - before
    if error is None or ran:
        # the attack went through; show its effect (plain asserts: a setup failure is no xfail)
        assert answer is not None and ran == 1, (answer, ran)
        reached = stack.reached()
        seen = next(iter(reached.values()))
        if variant == "path":
            assert seen == [
                {"x-chute-id": relay.chute_id_for(MODEL), "x-e2e-path": "/v1/completions"}
            ]
            assert answer["object"] == "text_completion"  # to a chat request: another endpoint
        elif variant == "chute":
            assert seen[0]["x-chute-id"] == relay.chute_id_for(OTHER_MODEL)
            assert answer["choices"][0]["message"]["content"] == "Echo: route me"
        else:
            ((sealed_for, ran_on),) = stack.hostile.hops
            assert sealed_for != ran_on and list(reached) == [ran_on]
            assert answer["choices"][0]["message"]["content"] == "Echo: route me"
        raise AttackUndetected(f"re-routed ({variant}) and run: the app got a 200 answer")
    err = typed(error)
    assert isinstance(err, pqe2ee.RelayError) and err.code is ErrorCode.CONTEXT_MISMATCH, error
    assert stack.hostile.statuses == [400]


@pytest.mark.parametrize("version", [pytest.param(1, id="v1"), V2])
def test_relay_flips_the_stream_flag(stack: Stack, version: int) -> None:
    """Relay changes the stream flag. v1 is caught too in this implementation (the instance
    compares ``X-E2E-Stream`` with the decrypted body: ``stream_mismatch``); v2 binds it in H
    (``context_mismatch``). Either way the engine never runs it and the SDK raises."""
    stack.hostile.reroute = "stream"
    before = stack.engine_requests()
    with sdk(stack, version) as client:
        try:
            client.chat.completions.create(model=MODEL, messages=user("flip me"))
        except (openai.OpenAIError, PQE2EEError) as exc:
            error: BaseException | None = exc
        else:
            error = None
    assert stack.hostile.versions == [version] and stack.hostile.applied == 1
    if error is None or stack.engine_requests() != before:
        raise AttackUndetected("a flipped stream flag went through")
    if version == 1:  # the instance's plaintext refusal, passed on as the relay's 400
        assert isinstance(error, openai.BadRequestError), error
        assert "stream_mismatch" in error.response.text
    else:
        err = typed(error)
        assert isinstance(err, pqe2ee.RelayError) and err.code is ErrorCode.CONTEXT_MISMATCH


@pytest.mark.parametrize(
    "version",
    [
        xfail_v1(
            "only the relay's single-use nonce stands in the way, and the relay mints nonces: "
            "the instance decrypts and runs the same blob again"
        ),
        V2,
    ],
)
def test_relay_replays_a_captured_request(stack: Stack, version: int) -> None:
    """Relay replays a captured request past its own nonce check (a nonce it issued to itself
    through discovery): the engine must run it once."""
    stack.hostile.replay = True
    before = stack.engine_requests()
    with sdk(stack, version) as client:
        reply = client.chat.completions.create(model=MODEL, messages=user("pay once"))
    assert reply.choices[0].message.content == "Echo: pay once"
    assert stack.hostile.versions == [version] and len(stack.hostile.replays) == 1
    status, body = stack.hostile.replays[0]
    ran = stack.engine_requests() - before
    if ran != 1:
        assert ran == 2 and status == 200, (ran, status)
        raise AttackUndetected(f"the engine ran the request {ran} times (replay answered {status})")
    err = classify_v2_hint(status, body)  # what a client would make of the replay's answer
    assert status == 409 and err is not None and err.code is ErrorCode.REPLAY, (status, body)


@pytest.mark.parametrize(
    "version",
    [
        xfail_v1(
            "records carry random nonces and no sequence number: removing or swapping whole "
            "events (a line record and its blank-line record), or dropping the final content "
            "event while keeping the sealed [DONE], leaves a stream the decryptor accepts"
        ),
        V2,
    ],
)
@pytest.mark.parametrize(
    ("variant", "edit", "code"),
    [
        pytest.param("drop", _drop, ErrorCode.RECORD_OUT_OF_ORDER, id="drop"),
        pytest.param("reorder", _reorder, ErrorCode.RECORD_OUT_OF_ORDER, id="reorder"),
        pytest.param("truncate", _drop_last_content, ErrorCode.RECORD_OUT_OF_ORDER, id="truncate"),
    ],
)
def test_relay_drops_reorders_or_truncates_stream_records(
    stack: Stack, variant: str, edit: Callable[[Framed], None], code: ErrorCode, version: int
) -> None:
    """Relay drops / reorders / truncates stream records (truncation here drops the final
    content event and keeps the end: a plain cut before [DONE] is caught by v1 as well)."""
    stack.hostile.stream_edit = units_edit(edit)
    out = stream_chat(stack, version)
    assert stack.hostile.applied == 1
    assert expect_stream_detected(out, variant) is code
    assert out.usage == []  # v2 reports usage only once END vouched for the answer


@pytest.mark.parametrize("version", [pytest.param(1, id="v1"), V2])
def test_relay_duplicates_a_stream_record(stack: Stack, version: int) -> None:
    """Relay duplicates a stream record. v1 catches it too in this implementation: its
    decryptor remembers every record nonce (there is no duplicate that v1 cannot see)."""
    stack.hostile.stream_edit = units_edit(_duplicate)
    out = stream_chat(stack, version)
    assert stack.hostile.applied == 1
    assert expect_stream_detected(out, "duplicate") is ErrorCode.DUPLICATE_RECORD


@pytest.mark.parametrize(
    "version",
    [
        xfail_v1(
            "the plaintext usage events are unauthenticated and go to on_usage as they are; "
            "the end of the answer is wherever the sealed [DONE] record is put; an e2e_error "
            "event is unauthenticated yet surfaces as a RemoteError (remote_error), i.e. as "
            "the instance's failure, in the relay's words"
        ),
        V2,
    ],
)
@pytest.mark.parametrize(
    ("variant", "edit", "code"),
    [
        pytest.param("usage", _forge_usage, ErrorCode.USAGE_MISMATCH, id="usage"),
        pytest.param("done", units_edit(_forge_end), ErrorCode.RECORD_OUT_OF_ORDER, id="done"),
        pytest.param("error", _inject_error, ErrorCode.RELAY_ERROR, id="error"),
    ],
)
def test_relay_forges_usage_done_or_errors_in_a_stream(
    stack: Stack, variant: str, edit: StreamEdit, code: ErrorCode, version: int
) -> None:
    """Relay forges usage / [DONE] / errors shown to the app, in a stream: a forged usage
    never reaches on_usage, a forged end never completes the answer, a forged error is never
    shown as the far side's (v2: ``relay_error``, not a RemoteError)."""
    stack.hostile.stream_edit = edit
    out = stream_chat(stack, version)
    assert stack.hostile.applied == 1
    forged_usage = [u for u in out.usage if u["completion_tokens"] >= 1000]
    if forged_usage:
        raise AttackUndetected(f"on_usage reported the relay's numbers: {forged_usage[-1]}")
    err = typed(out.error)
    if isinstance(err, RemoteError) and err.code is not ErrorCode.RELAY_ERROR:
        assert FORGED in json.dumps(err.detail), err.detail
        raise AttackUndetected(f"the relay's error was shown as the far side's: {err!r}")
    assert expect_stream_detected(out, variant) is code
    assert out.usage == []


@pytest.mark.parametrize(
    "version",
    [
        xfail_v1(
            "a relay's plaintext error and the engine's error reach the SDK the same way (an "
            "HTTP error status with a JSON body)"
        ),
        pytest.param(2, id="v2"),
    ],
)
def test_relay_forges_an_error_answer(stack: Stack, version: int) -> None:
    """Relay forges an error shown to the app, non-stream: it replaces the answer with a
    plaintext error in the engine's own shape. The app must be able to tell that error from
    the engine's: a typed pqe2ee error, not the SDK's status error carrying the relay's text."""
    stack.hostile.forge = "all"
    error: BaseException | None = None
    with sdk(stack, version) as client:
        try:
            client.chat.completions.create(model=MODEL, messages=user("hello"))
        except (openai.OpenAIError, PQE2EEError) as exc:
            error = exc
    assert stack.hostile.versions == [version] and stack.hostile.applied == 1
    err = typed(error)
    if err is None:
        assert isinstance(error, openai.BadRequestError) and FORGED in str(error), error
        raise AttackUndetected(f"the relay's error was shown as the engine's: {error}")
    assert isinstance(err, pqe2ee.RelayError) and err.code is ErrorCode.RELAY_ERROR


@pytest.mark.parametrize(
    "version",
    [
        xfail_v1(
            "the instance answers an engine error with the engine's status, so the relay sees "
            "which answers are errors and swaps them for its own plaintext error; the app "
            "cannot tell it from the engine's"
        ),
        V2,
    ],
)
def test_relay_hides_model_errors(stack: Stack, version: int) -> None:
    """Relay hides model errors (4xx/5xx bodies): it replaces every engine error it can see
    with a forged one. The app must get the engine's own error."""
    stack.hostile.forge = "errors"
    with sdk(stack, version) as client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=user("two answers"), n=2)
    assert stack.hostile.versions == [version]
    message = str(caught.value)
    if "only supports n=1" not in message:
        assert FORGED in message and stack.hostile.applied == 1
        raise AttackUndetected(f"the engine's error was replaced: {message}")
    assert FORGED not in message
    # v2: the instance answered 200; the engine's status travelled inside the records
    assert stack.hostile.statuses == [200] and stack.hostile.applied == 0


@pytest.mark.parametrize(
    "version",
    [
        xfail_v1(
            "a client that accepts v1 (here the default: prefer v2, no pin yet) cannot tell a "
            "relay that strips e2e_v2 from one that never had it, and falls back to v1"
        ),
        V2,
    ],
)
def test_relay_downgrades_to_v1(stack: Stack, version: int) -> None:
    """Relay downgrades to v1 by stripping ``e2e_v2`` from discovery: a client set to
    ``min_version=2`` refuses before any invoke (no nonce spent, no v1 byte sent)."""
    stack.hostile.strip_v2 = True
    policy: dict[str, Any] = {} if version == 1 else {"min_version": 2}
    transport = pqe2ee.E2EETransport(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, **policy
    )
    answer: str | None = None
    error: PQE2EEError | None = None
    with openai.OpenAI(
        api_key=KEY,
        base_url=SDK_BASE,
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    ) as client:
        try:
            reply = client.chat.completions.create(model=MODEL, messages=user("downgrade me"))
            answer = reply.choices[0].message.content
        except PQE2EEError as exc:
            error = exc
    assert stack.hostile.applied >= 1  # discovery was stripped
    if stack.hostile.versions:
        assert error is None and answer == "Echo: downgrade me", error
        raise AttackUndetected(f"sent as v{stack.hostile.versions}: downgraded")
    assert isinstance(error, pqe2ee.RemoteProtocolError), error
    assert error.code is ErrorCode.DOWNGRADE_REFUSED
