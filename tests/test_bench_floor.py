"""The benchmark's floor client (benchmarks/_floor_client.py) stays a correct v1 client: the
openai SDK gets the right answers through it over a real relay and instance, non-stream and
streamed, its requests are sealed (no prompt on the relay's wire), it discovers again when its
nonces run out, and its KEM functions agree with pqe2ee's. It is a measuring instrument for
``bench_client.py``; this keeps it from silently rotting."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx2
import openai
import pytest

from pqe2ee.backends import available, get_kem
from servers import serve_chain

KEY = "pk-bench-floor-3c4d5e"
ROOT = Path(__file__).resolve().parent.parent


def _load_floor() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_floor_client", ROOT / "benchmarks" / "_floor_client.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_floor_client", module)
    spec.loader.exec_module(module)
    return module


floor = _load_floor()


class _Recorder:
    """The relay app, recording each HTTP request's path and body (as read so far)."""

    def __init__(self) -> None:
        self.app: Any = None
        self.seen: list[tuple[str, bytes]] = []

    def wrap(self, app: Any) -> _Recorder:
        self.app = app
        return self

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        at, path = len(self.seen), scope["path"]
        self.seen.append((path, b""))

        async def recorded() -> Any:
            message = await receive()
            self.seen[at] = (path, self.seen[at][1] + message.get("body", b""))
            return message

        await self.app(scope, recorded, send)


@pytest.fixture(scope="module")
def relay() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """A real chain whose relay records what it is sent; 3 nonces a discovery."""
    recorder = _Recorder()
    chain_kw = {"rate_limit": 10_000, "nonces_per_instance": 3}
    with serve_chain(1, api_keys=(KEY,), wrap_relay=recorder.wrap, **chain_kw) as chain:
        yield chain.relay, recorder.seen


def _sdk(url: str) -> openai.OpenAI:
    transport = floor.FloorTransport(KEY, url)
    return openai.OpenAI(
        base_url=url + "/v1",
        api_key=KEY,
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def test_non_stream_answers_through_the_relay(relay: tuple[str, list[tuple[str, bytes]]]) -> None:
    url, seen = relay
    with _sdk(url) as sdk:
        seen.clear()
        for i in range(4):  # 3 nonces a discovery: the first and the fourth call discover
            prompt = f"floor call {i}"
            reply = sdk.chat.completions.create(
                model="dev-echo", messages=[{"role": "user", "content": prompt}]
            )
            assert reply.choices[0].message.content == "Echo: " + prompt
    invokes = [body for path, body in seen if path == "/e2e/invoke"]
    assert len(invokes) == 4
    assert all(b"floor call" not in body and len(body) > 1116 for body in invokes)
    assert sum(path.startswith("/e2e/instances/") for path, _ in seen) == 2


def test_streams_answer_through_the_relay(relay: tuple[str, list[tuple[str, bytes]]]) -> None:
    url, _ = relay
    prompt = " ".join(f"word{i}" for i in range(200))
    with _sdk(url) as sdk:
        for usage in (None, {"include_usage": True, "continuous_usage_stats": True}):
            chunks = list(
                sdk.chat.completions.create(
                    model="dev-echo",
                    messages=[{"role": "user", "content": prompt}],
                    stream=True,
                    **({} if usage is None else {"stream_options": usage}),  # type: ignore[arg-type]
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "Echo: " + prompt
            assert len(chunks) > 200


@pytest.mark.parametrize("backend", ["pyca", "liboqs"])
def test_kem_functions_agree_with_pqe2ee(backend: str) -> None:
    if backend not in available():
        pytest.skip(f"{backend} is not available here")
    keygen, encaps, decaps = floor._pyca() if backend == "pyca" else floor._liboqs()
    pk, sk = keygen()
    ours = get_kem("pyca")
    ct, ss = ours.encapsulate(pk)  # pqe2ee to the floor's key
    assert decaps(sk, ct) == ss
    theirs = ours.generate()
    ct, ss = encaps(theirs.public_key)  # the floor to a pqe2ee key
    assert theirs.decapsulate(ct) == ss
