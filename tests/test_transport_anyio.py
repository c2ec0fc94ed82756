"""``pqe2ee.transports.anyio`` end to end: dev-engine -> two real instances -> the real relay
behind :class:`faults.FaultyRelay`, driven by :class:`E2EEClient` (h11 over anyio sockets),
plus raw loopback servers for the HTTP/1.1 edge cases (TLS, stalls, endless headers)."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

import pqe2ee
from faults import Fault, FaultyStack
from pqe2ee.errors import ErrorCode
from pqe2ee.server import relay
from pqe2ee.transports.anyio import (
    E2EEClient,
    E2EEConnectionError,
    E2EETimeoutError,
    EventStream,
    RetriesExhausted,
)
from servers import run_app
from transport_support import (
    KEY,
    RETRYABLE_FAULTS,
    SAME_ANSWER_CASES,
    STREAM_FAULTS,
    TOOLS,
    cancelled_since_now,
    chat_text,
    dead_url,
    delta_field,
    engine_direct,
    httpx2_answer,
    messages,
    normalise,
    spy_on_keys,
    sse_objects,
    tool_call,
    wait_until,
    wiped,
    without_created,
)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(stack: FaultyStack) -> AsyncIterator[E2EEClient]:
    async with E2EEClient(api_key=KEY, api_base=stack.relay, models_base=stack.relay) as c:
        yield c


async def collect(events: EventStream) -> list[dict[str, Any]]:
    async with events:
        return [chunk async for chunk in events]


# -- chat and completions -------------------------------------------------------------------------


async def test_chat(client: E2EEClient, stack: FaultyStack) -> None:
    reply = await client.chat(model="dev-echo", messages=messages("hello there"))
    assert reply["choices"][0]["message"]["content"] == "Echo: hello there"
    assert reply["usage"]["completion_tokens"] == 3
    assert stack.faults.invokes == 1


async def test_chat_is_the_engines_answer(client: E2EEClient, stack: FaultyStack) -> None:
    body = {"model": "dev-echo", "messages": messages("exact answer please")}
    reply = await client.chat(**body)
    direct = engine_direct(stack, "/v1/chat/completions", body)
    assert normalise(reply) == json.loads(without_created(direct))


async def test_stream_chat_and_usage(stack: FaultyStack) -> None:
    usage: list[Any] = []
    async with E2EEClient(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, on_usage=usage.append
    ) as client:
        events = client.stream_chat(
            model="dev-echo",
            messages=messages("one two three"),
            stream_options={"include_usage": True},
        )
        chunks = await collect(events)
    assert events.done
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chat_text(chunks) == "Echo: one two three"
    in_stream = [c["usage"] for c in chunks if c.get("usage")]
    # include_usage only: the stream holds the totals chunk alone (as the OpenAI API gives it),
    # whatever usage the instance streamed; on_usage got every plaintext usage event
    assert len(in_stream) == 1 and len(usage) >= 1
    assert usage[-1]["completion_tokens"] == in_stream[-1]["completion_tokens"] == 4


async def test_completions(client: E2EEClient) -> None:
    reply = await client.completions(model="dev-echo", prompt="say hi")
    assert reply["choices"][0]["text"] == "Echo: say hi"
    chunks = await collect(client.stream_completions(model="dev-echo", prompt="more words"))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Echo: more words"
    generic = await collect(client.stream("/v1/completions", {"model": "dev-echo", "prompt": "g"}))
    assert "".join(c["choices"][0]["text"] for c in generic if c["choices"]) == "Echo: g"


async def test_tool_calls(client: E2EEClient) -> None:
    reply = await client.chat(
        model="dev-tools", messages=messages("weather in Paris?"), tools=TOOLS
    )
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    chunks = await collect(
        client.stream_chat(model="dev-tools", messages=messages("weather in Lisbon?"), tools=TOOLS)
    )
    name, args = tool_call(chunks)
    assert name == "get_weather" and json.loads(args) == {"city": "Lisbon"}


async def test_reasoning(client: E2EEClient) -> None:
    reply = await client.chat(model="dev-reason", messages=messages("why is the sky blue"))
    message = reply["choices"][0]["message"]
    assert message["reasoning_content"] == "Thinking about: why is the sky blue"
    assert message["content"] == "Echo: why is the sky blue"
    chunks = await collect(client.stream_chat(model="dev-reason", messages=messages("think hard")))
    assert delta_field(chunks, "reasoning_content") == "Thinking about: think hard"
    assert chat_text(chunks) == "Echo: think hard"


@pytest.mark.parametrize(("path", "body"), SAME_ANSWER_CASES)
async def test_same_answers_as_httpx(
    client: E2EEClient, stack: FaultyStack, path: str, body: dict[str, Any]
) -> None:
    ours = await client.request(path, body)
    assert normalise(ours) == normalise(json.loads(await httpx2_answer(stack, path, body)))
    ours_stream = await collect(client.stream(path, body))
    theirs = sse_objects(await httpx2_answer(stack, path, {**body, "stream": True}))
    assert normalise(ours_stream) == normalise(theirs)


# -- errors before the answer ---------------------------------------------------------------------


async def test_sealed_engine_errors_are_remote_errors(
    client: E2EEClient, stack: FaultyStack
) -> None:
    with pytest.raises(pqe2ee.RemoteError) as err500:
        await client.chat(model="dev-echo", messages=messages("__error_500__"))
    assert err500.value.code is ErrorCode.UPSTREAM_ERROR and err500.value.status == 500
    assert "Simulated engine failure" in json.dumps(err500.value.detail)
    assert "Simulated" not in str(err500.value)  # the engine's text stays in detail
    with pytest.raises(pqe2ee.RemoteError) as err400:
        await client.chat(model="dev-echo", messages=messages("x"), n=2)
    assert err400.value.status == 400
    with pytest.raises(pqe2ee.RemoteError) as err400s:
        await collect(client.stream_chat(model="dev-echo", messages=messages("x"), n=2))
    assert err400s.value.status == 400 and "only supports n=1" in json.dumps(err400s.value.detail)
    assert stack.faults.invokes == 3


async def test_unknown_model(client: E2EEClient, stack: FaultyStack) -> None:
    with pytest.raises(pqe2ee.RelayError) as err:
        await client.chat(model="no-such-model", messages=messages("x"))
    assert err.value.code is ErrorCode.MODEL_NOT_FOUND
    assert stack.faults.invokes == 0


async def test_wrong_api_key_is_a_typed_error(stack: FaultyStack) -> None:
    async with E2EEClient(api_key="pk-wrong", api_base=stack.relay, models_base=stack.relay) as c:
        with pytest.raises(pqe2ee.RelayError) as err:
            await c.chat(model="dev-echo", messages=messages("x"))
    assert err.value.code is ErrorCode.DISCOVERY_FAILED and err.value.status == 401


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda c: c.chat(model="dev-echo", messages=[], stream=True), ErrorCode.INVALID_ARGUMENT),
        (lambda c: c.chat(messages=messages("no model")), ErrorCode.INVALID_BODY),
        (lambda c: c.chat(model="", messages=[]), ErrorCode.INVALID_BODY),
        (lambda c: c.chat(model="dev-echo", bad=object()), ErrorCode.INVALID_BODY),
        (lambda c: c.request("/v1/embeddings", {"model": "m"}), ErrorCode.INVALID_ARGUMENT),
        (lambda c: c.stream("/v1/models", {"model": "m"}), ErrorCode.INVALID_ARGUMENT),
    ],
)
async def test_local_misuse_is_refused_before_any_io(
    client: E2EEClient,
    stack: FaultyStack,
    call: Callable[[E2EEClient], Awaitable[Any]],
    code: ErrorCode,
) -> None:
    with pytest.raises(pqe2ee.LocalProtocolError) as err:
        result = call(client)
        if not isinstance(result, EventStream):
            await result
    assert err.value.code is code
    assert stack.faults.model_listings == stack.faults.invokes == 0


async def test_closed_client_refuses(stack: FaultyStack) -> None:
    client = E2EEClient(api_key=KEY, api_base=stack.relay, models_base=stack.relay)
    await client.aclose()
    await client.aclose()  # idempotent
    assert client.closed and client.keys.closed
    with pytest.raises(pqe2ee.LocalProtocolError):
        await client.chat(model="dev-echo", messages=messages("x"))


# -- relay faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "discoveries"), RETRYABLE_FAULTS)
async def test_retryable_relay_answers_are_retried(
    client: E2EEClient, stack: FaultyStack, fault: Fault, discoveries: int
) -> None:
    stack.faults.inject(fault)
    reply = await client.chat(model="dev-echo", messages=messages("retry me"))
    assert reply["choices"][0]["message"]["content"] == "Echo: retry me"
    assert stack.faults.injected == [fault]
    assert stack.faults.invokes == 2
    assert stack.faults.discoveries == discoveries
    first, second = stack.faults.instance_ids
    if fault is not Fault.NONCE_403:
        assert second != first


async def test_retried_stream(client: E2EEClient, stack: FaultyStack) -> None:
    stack.faults.inject(Fault.BUSY_429)
    chunks = await collect(client.stream_chat(model="dev-echo", messages=messages("again")))
    assert chat_text(chunks) == "Echo: again"
    assert stack.faults.invokes == 2


async def test_retries_exhausted(stack: FaultyStack) -> None:
    async with E2EEClient(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay, max_attempts=3
    ) as client:
        stack.faults.inject(Fault.NONCE_403, times=3)
        with pytest.raises(RetriesExhausted) as err:
            await client.chat(model="dev-echo", messages=messages("x"))
    assert err.value.last_error.code is ErrorCode.NONCE_REJECTED
    assert err.value.attempts == 3 == stack.faults.invokes


async def test_path_forbidden_is_not_retried(client: E2EEClient, stack: FaultyStack) -> None:
    stack.faults.inject(Fault.PATH_403)
    with pytest.raises(pqe2ee.RelayError) as err:
        await client.chat(model="dev-echo", messages=messages("x"))
    assert err.value.code is ErrorCode.PATH_FORBIDDEN and err.value.status == 403
    assert stack.faults.invokes == 1


async def test_tampered_blob_is_a_decrypt_error(client: E2EEClient, stack: FaultyStack) -> None:
    stack.faults.inject(Fault.TAMPER_BLOB)
    with pytest.raises(pqe2ee.DecryptError) as err:
        await client.chat(model="dev-echo", messages=messages("secret"))
    assert "secret" not in str(err.value)


# -- broken streams -------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "at", "code"), STREAM_FAULTS)
async def test_broken_stream_raises(
    client: E2EEClient, stack: FaultyStack, fault: Fault, at: int, code: ErrorCode
) -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta"
    stack.faults.inject(fault, at=at)
    events = client.stream_chat(model="dev-echo", messages=messages(text))
    got: list[dict[str, Any]] = []
    with pytest.raises(pqe2ee.PQE2EEError) as err:
        async for chunk in events:
            got.append(chunk)
    assert err.value.code is code
    assert not events.done
    assert chat_text(got) != "Echo: " + text
    assert text.split()[-1] not in str(err.value)
    if code is ErrorCode.CONNECTION_LOST:
        assert isinstance(err.value, pqe2ee.StreamError)
        assert isinstance(err.value.__cause__, E2EEConnectionError)
    # the failure is sticky (a failed stream never looks finished); the client stays usable
    with pytest.raises(type(err.value)):
        await events.__anext__()
    reply = await client.chat(model="dev-echo", messages=messages("after"))
    assert reply["choices"][0]["message"]["content"] == "Echo: after"


# -- concurrency, closing, keys -------------------------------------------------------------------


async def test_sixty_four_concurrent_streams(client: E2EEClient, stack: FaultyStack) -> None:
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        chunks = await collect(
            client.stream_chat(model="dev-echo", messages=messages(f"stream number {i}"))
        )
        results[i] = chat_text(chunks)

    async with anyio.create_task_group() as tg:
        for i in range(64):
            tg.start_soon(one, i)
    assert results == {i: f"Echo: stream number {i}" for i in range(64)}
    assert stack.faults.invokes == 64
    assert stack.faults.max_parallel_discoveries == 1
    assert 4 <= stack.faults.discoveries <= 10


async def test_closing_a_stream_early_cancels_the_generation(
    client: E2EEClient, stack: FaultyStack
) -> None:
    cancelled = cancelled_since_now(stack)
    async with client.stream_chat(model="dev-echo", messages=messages("__slow__")) as events:
        n = 0
        async for _ in events:
            n += 1
            if n == 3:
                break
    assert not events.done
    await anyio.to_thread.run_sync(wait_until, cancelled, "the engine to see the cancel")


async def test_every_key_is_fresh_and_wiped(client: E2EEClient, stack: FaultyStack) -> None:
    spy = spy_on_keys(client)
    await client.chat(model="dev-echo", messages=messages("a"))
    await collect(client.stream_chat(model="dev-echo", messages=messages("b")))
    with pytest.raises(pqe2ee.RemoteError):
        await client.chat(model="dev-echo", messages=messages("__error_500__"))
    stack.faults.inject(Fault.TRUNCATE, at=2)
    with pytest.raises(pqe2ee.StreamError):
        await collect(client.stream_chat(model="dev-echo", messages=messages("c d e f")))
    stack.faults.inject(Fault.NONCE_403)
    await client.chat(model="dev-echo", messages=messages("g"))
    assert len(spy.keys) == 6  # one per invoke, retries included
    assert len({k.public_key for k in spy.keys}) == 6
    assert all(wiped(k) for k in spy.keys)


# -- the HTTP/1.1 layer: TLS, connection failures, bounds ------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (cert file, key file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pqe2ee test relay")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture(scope="module")
def tls_relay(
    faulty_stack: FaultyStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """A second real relay over the same instances, served over TLS: (https URL, CA file)."""
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    config = relay.RelayConfig(
        instances=tuple(faulty_stack.instances),
        api_keys=(KEY,),
        startup_wait=5.0,
        rate_limit=100_000,
    )
    with run_app(relay.create_app(config), ssl_certfile=str(cert), ssl_keyfile=str(key)) as url:
        yield url.replace("http://", "https://"), cert


async def test_https_relay(tls_relay: tuple[str, Path]) -> None:
    url, ca = tls_relay
    ctx = ssl.create_default_context(cafile=str(ca))
    async with E2EEClient(api_key=KEY, api_base=url, models_base=url, ssl_context=ctx) as client:
        reply = await client.chat(model="dev-echo", messages=messages("over tls"))
        assert reply["choices"][0]["message"]["content"] == "Echo: over tls"
        chunks = await collect(client.stream_chat(model="dev-echo", messages=messages("tls too")))
        assert chat_text(chunks) == "Echo: tls too"


async def test_https_relay_with_an_untrusted_certificate(tls_relay: tuple[str, Path]) -> None:
    url, _ = tls_relay
    async with E2EEClient(api_key=KEY, api_base=url, models_base=url) as client:
        with pytest.raises(E2EEConnectionError) as err:
            await client.chat(model="dev-echo", messages=messages("x"))
    assert isinstance(err.value, OSError)
    assert isinstance(err.value.__cause__, ssl.SSLCertVerificationError)


async def test_connection_refused() -> None:
    dead = dead_url()
    async with E2EEClient(api_key=KEY, api_base=dead, models_base=dead) as client:
        with pytest.raises(E2EEConnectionError) as err:
            await client.chat(model="dev-echo", messages=messages("x"))
    assert err.value.code is ErrorCode.CONNECTION_LOST
    assert isinstance(err.value.__cause__, OSError)


async def _serving(
    handler: Callable[[anyio.abc.SocketStream], Awaitable[None]],
    test: Callable[[str], Awaitable[None]],
) -> None:
    """Run ``test(url)`` against a raw loopback server answering with ``handler``. The client
    may hang up mid-answer (that is what these tests provoke): the server shrugs it off."""

    async def serve(conn: anyio.abc.SocketStream) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await handler(conn)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    url = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        try:
            await test(url)
        finally:
            tg.cancel_scope.cancel()


async def test_a_silent_relay_times_out() -> None:
    async def silent(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            await anyio.sleep_forever()

    async def test(url: str) -> None:
        async with E2EEClient(api_key=KEY, api_base=url, models_base=url, timeout=0.3) as c:
            with pytest.raises(E2EETimeoutError) as err:
                await c.chat(model="dev-echo", messages=messages("x"))
        assert isinstance(err.value, TimeoutError) and isinstance(err.value, pqe2ee.PQE2EEError)

    await _serving(silent, test)


async def test_an_endless_response_head_is_refused() -> None:
    async def endless(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            await conn.receive()
            await conn.send(b"HTTP/1.1 200 OK\r\n")
            for _ in range(10_000):  # ~ 1 MB of headers, never a blank line
                await conn.send(b"X-Filler: " + b"a" * 90 + b"\r\n")

    async def test(url: str) -> None:
        async with E2EEClient(
            api_key=KEY, api_base=url, models_base=url, max_header_size=8 * 1024
        ) as client:
            with pytest.raises(E2EEConnectionError) as err:
                await client.chat(model="dev-echo", messages=messages("x"))
        assert "framing" in str(err.value)

    await _serving(endless, test)


async def test_an_oversized_listing_is_refused() -> None:
    async def huge(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            await conn.receive()
            await conn.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"a" * 65536
            for _ in range(300):  # 19 MB, past the 16 MiB bound on listings
                await conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    async def test(url: str) -> None:
        async with E2EEClient(api_key=KEY, api_base=url, models_base=url) as client:
            with pytest.raises(pqe2ee.LimitExceeded):
                await client.chat(model="dev-echo", messages=messages("x"))

    await _serving(huge, test)


def test_no_http_library_is_imported() -> None:
    code = (
        "import sys, pqe2ee.transports.anyio\n"
        "bad = sorted(m for m in ('httpx', 'httpx2', 'aiohttp') if m in sys.modules)\n"
        "print(bad)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert proc.stdout.strip() == "[]"


async def test_each_body_read_waits_at_most_read_timeout(anyio_backend: str) -> None:
    """``read_timeout`` bounds every read of a body from its own start (on asyncio one timer
    serves all the reads of a body): a body trickling faster than it is read whole, however
    long it lasts; once the relay falls silent, the read ends after ``read_timeout``."""
    from pqe2ee.transports import anyio as e2ee_anyio

    async def trickle(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            await conn.receive()
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(8):  # 0.8 s in all, far past read_timeout
                await anyio.sleep(0.1)
                await conn.send(b"1\r\nx\r\n")
            await anyio.sleep_forever()

    async def test(url: str) -> None:
        port = e2ee_anyio._Port(
            timeout=5.0, read_timeout=0.4, ssl_context=None, max_header_size=64 * 1024
        )
        response = await port.send("GET", url + "/", [], b"", control=False)
        got = b""
        with pytest.raises(E2EETimeoutError, match=r"within 0\.4s"):
            async for chunk in response.aiter_bytes():
                got += chunk
                silent_since = anyio.current_time()
        assert got == b"x" * 8
        assert 0.4 <= anyio.current_time() - silent_since < 3.0
        timer = response._timer
        await response.aclose()
        if anyio_backend == "asyncio":
            assert timer is not None and timer._handle is None  # one timer, stopped
        else:
            assert timer is None  # trio: a cancel scope per read

    await _serving(trickle, test)
