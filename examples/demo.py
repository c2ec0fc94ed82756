"""The end-to-end journey on one screen (``make demo``).

Starts three real servers on loopback with the ``pqe2ee`` command line — a dev engine (a
deterministic stand-in for vLLM), an instance in front of it, and a relay in front of the
instance — then runs the unchanged openai SDK through ``pqe2ee.E2EETransport``, non-stream and
stream, and shows what crossed the relay: sizes and the first bytes of ciphertext. Then
``pqe2ee proxy`` answers the unchanged Anthropic SDK, and a stream whose ciphertext is changed on
the way is refused. It ends with next steps. It needs the ``[server,proxy,httpx]`` extras and
the openai and anthropic SDKs (``make demo`` installs exactly those), no root and no Redis.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx2
import openai

import pqe2ee
from pqe2ee.backends import get_aead, get_kem

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import demo_core  # noqa: E402

API_KEY = "demo-key-not-secret"
PQE2EE = [sys.executable, "-m", "pqe2ee.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited early (code {proc.returncode}); see its output above")
        try:
            if httpx2.get(url, timeout=1.0).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{name} did not become ready at {url}")


@contextlib.contextmanager
def servers() -> Iterator[str]:
    engine_port, instance_port, relay_port = free_port(), free_port(), free_port()
    env = {**os.environ, "PQE2EE_LOG_LEVEL": "warning"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        specs = [
            ("dev-engine", ["dev-engine", "--port", str(engine_port)], engine_port),
            (
                "instance",
                [
                    "instance",
                    "--upstream",
                    f"http://127.0.0.1:{engine_port}",
                    "--port",
                    str(instance_port),
                ],
                instance_port,
            ),
            (
                "relay",
                [
                    "relay",
                    "--instance",
                    f"http://127.0.0.1:{instance_port}",
                    "--api-key",
                    API_KEY,
                    "--port",
                    str(relay_port),
                ],
                relay_port,
            ),
        ]
        for name, args, port in specs:
            proc = subprocess.Popen([*PQE2EE, *args], env=env, stdout=subprocess.DEVNULL)
            procs.append(proc)
            wait_ready(f"http://127.0.0.1:{port}/health", proc, name)
        print(
            f"dev-engine :{engine_port}  <-  instance :{instance_port}  <-  relay :{relay_port}   (loopback)"
        )
        yield f"http://127.0.0.1:{relay_port}"
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


class Tap(httpx2.BaseTransport):
    """Sits where the relay is and records what it receives and sends back (sizes, first bytes)."""

    def __init__(self, inner: httpx2.BaseTransport) -> None:
        self.inner = inner
        self.seen: list[str] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self.inner.handle_request(request)
        if request.url.path != "/e2e/invoke":
            return response
        body = request.read()
        self.seen.append(
            f"  relay got   POST /e2e/invoke {len(body):6d} B  ciphertext {body[:16].hex()}...  "
            f"(headers: chute, instance, nonce, stream={request.headers['x-e2e-stream']}, "
            f"path={request.headers['x-e2e-path']})"
        )
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_CountingStream(response, self.seen),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.inner.close()


class _CountingStream(httpx2.SyncByteStream):
    def __init__(self, response: httpx2.Response, seen: list[str]) -> None:
        self.response, self.seen, self.total, self.head = response, seen, 0, b""
        self.reported = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.response.stream:  # type: ignore[union-attr]
            self.total += len(chunk)
            if len(self.head) < 48:
                self.head += chunk[: 48 - len(self.head)]
            yield chunk
        self._report()

    def _report(self) -> None:
        if self.reported:
            return
        self.reported = True
        ctype = self.response.headers.get("content-type", "").split(";")[0]
        sse = ctype == "text/event-stream"
        shown = self.head.decode("ascii", "replace") if sse else self.head[:16].hex()
        self.seen.append(
            f"  relay sent  {self.response.status_code} {ctype} {self.total:6d} B  {shown}..."
        )

    def close(self) -> None:
        self._report()
        self.response.close()


def ask(relay: str, *, prefer_v2: bool, stream: bool) -> None:
    """One question through the unchanged openai SDK; prints the answer and the relay's view."""
    usage_seen: list[object] = []
    tap = Tap(httpx2.HTTPTransport())
    transport = pqe2ee.E2EETransport(
        api_key=API_KEY,
        api_base=relay,
        models_base=relay,
        inner=tap,
        on_usage=usage_seen.append,
        prefer_v2=prefer_v2,
    )
    client = openai.OpenAI(
        api_key=API_KEY, base_url=f"{relay}/v1", http_client=httpx2.Client(transport=transport)
    )
    messages = [
        {"role": "user", "content": "What does post-quantum end-to-end encryption protect?"}
    ]
    if stream:
        chunks = client.chat.completions.create(
            model="dev-echo",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        chunks.close()
    else:
        reply = client.chat.completions.create(model="dev-echo", messages=messages)  # type: ignore[arg-type]
        text = reply.choices[0].message.content or ""
    client.close()
    print(f"  answer      {text!r}")
    print("\n".join(tap.seen))
    if stream:
        print(f"  plaintext usage events the relay could read (billing only): {len(usage_seen)}")


class Tamper(httpx2.BaseTransport):
    """Sits where the relay is and changes one character of the sealed stream on its way back."""

    def __init__(self, inner: httpx2.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self.inner.handle_request(request)
        if request.url.path != "/e2e/invoke":
            return response
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_Flipped(response),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.inner.close()


class _Flipped(httpx2.SyncByteStream):
    def __init__(self, response: httpx2.Response) -> None:
        self.response, self.done = response, False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.response.stream:  # type: ignore[union-attr]
            if not self.done and len(chunk) > 80:
                data = bytearray(chunk)
                i = len(data) // 2
                while not chr(data[i]).isalnum():
                    i += 1
                data[i] = ord("A") if data[i] != ord("A") else ord("B")  # still valid base64
                chunk, self.done = bytes(data), True
            yield chunk

    def close(self) -> None:
        self.response.close()


def tampered(relay: str) -> None:
    """A streamed answer whose ciphertext was changed on the way: an error, never text."""
    transport = pqe2ee.E2EETransport(
        api_key=API_KEY, api_base=relay, models_base=relay, inner=Tamper(httpx2.HTTPTransport())
    )
    client = openai.OpenAI(
        api_key=API_KEY, base_url=f"{relay}/v1", http_client=httpx2.Client(transport=transport)
    )
    got = ""
    try:
        chunks = client.chat.completions.create(
            model="dev-echo",
            messages=[{"role": "user", "content": "a long enough question to stream"}],
            stream=True,
        )
        for c in chunks:
            got += (c.choices[0].delta.content or "") if c.choices else ""
        print(f"  NOT REFUSED: {got!r}")  # never printed: the test of this demo checks it
    except openai.APIConnectionError as exc:
        cause = exc.__cause__
        code = getattr(cause, "code", None)
        print(f"  refused     {type(cause).__name__} (code {getattr(code, 'value', code)}),")
        print(f"              after {len(got)} characters of authenticated text")
    finally:
        client.close()


@contextlib.contextmanager
def proxy(relay: str) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "PQE2EE_LOG_LEVEL": "warning", "PQE2EE_PROXY_API_KEY": API_KEY}
    args = ["proxy", "--port", str(port), "--api-base", relay, "--models-base", relay]
    proc = subprocess.Popen([*PQE2EE, *args, "--min-version", "2"], env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", proc, "proxy")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def ask_anthropic(base: str) -> None:
    """The unchanged Anthropic SDK, pointed at pqe2ee proxy as Claude Code would be."""
    client = anthropic.Anthropic(api_key=API_KEY, base_url=base)
    reply = client.messages.create(
        model="dev-echo",
        max_tokens=64,
        messages=[{"role": "user", "content": "Hello from the Anthropic SDK"}],
    )
    text = "".join(getattr(block, "text", "") for block in reply.content)
    print(f"  answer      {text!r}  (stop_reason {reply.stop_reason})")
    client.close()


NEXT_STEPS = """
Next steps
  pqe2ee doctor --api-key cpk_...            check this machine, the relay and your key
  PQE2EE_PROXY_API_KEY=cpk_... pqe2ee proxy  then ANTHROPIC_BASE_URL=http://127.0.0.1:8787 claude
                                             or Codex with a model provider (README "Real clients")
  README.md "Run the whole stack locally"    the four processes of this demo, by hand
  pqe2ee <command> --help                    every option, its environment variable and default
"""


def main() -> None:
    print(
        f"pqe2ee {pqe2ee.__version__}: ML-KEM-768 KEM backend {get_kem().name!r}, AEAD {get_aead().name!r}\n"
    )
    with servers() as relay:
        print("1) openai SDK through pqe2ee.E2EETransport, Chutes v1 wire format, non-stream")
        ask(relay, prefer_v2=False, stream=False)
        print("\n2) the same, streamed (one sealed record per engine line, as the Chutes runtime)")
        ask(relay, prefer_v2=False, stream=True)
        print("\n3) profile v2 (X-Wing hybrid KEM, bound headers, numbered records), streamed")
        ask(relay, prefer_v2=True, stream=True)
        print("\n4) pqe2ee proxy (--min-version 2) answering the unchanged Anthropic SDK")
        with proxy(relay) as base:
            ask_anthropic(base)
        print("\n5) one character of the sealed stream changed between relay and client")
        tampered(relay)

    print("\n6) the core alone, per crypto backend (no network)")
    demo_core.main(show_exchange=False)
    print(NEXT_STEPS)


if __name__ == "__main__":
    main()
