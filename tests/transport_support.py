"""Helpers shared by the aiohttp and anyio transport tests (the servers come from faults.py)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import httpx2

import pqe2ee
from faults import Fault, FaultyStack
from pqe2ee.errors import ErrorCode

KEY = "pk-transport-test-0123456789"
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

#: (fault, at, the code the caller must see)
STREAM_FAULTS = [
    (Fault.TRUNCATE, 3, ErrorCode.STREAM_TRUNCATED),
    (Fault.DUPLICATE, 1, ErrorCode.DUPLICATE_RECORD),
    (Fault.TAMPER, 2, ErrorCode.DECRYPT_FAILED),
    (Fault.BAD_BASE64, 0, ErrorCode.MALFORMED_EVENT),
    (Fault.RESET, 4, ErrorCode.CONNECTION_LOST),
    (Fault.REMOTE_ERROR, 3, ErrorCode.REMOTE_ERROR),
]

#: (fault, discoveries after one retried request)
RETRYABLE_FAULTS = [
    (Fault.NONCE_403, 2),
    (Fault.GONE_410, 1),
    (Fault.BUSY_429, 1),
    (Fault.KEY_502, 1),
]

#: Requests every client must answer identically: (path, body without "stream").
SAME_ANSWER_CASES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"model": "dev-echo", "messages": [{"role": "user", "content": "x"}]}),
    ("/v1/completions", {"model": "dev-echo", "prompt": "complete this please"}),
    (
        "/v1/chat/completions",
        {
            "model": "dev-tools",
            "messages": [{"role": "user", "content": "weather in Oslo?"}],
            "tools": TOOLS,
        },
    ),
    (
        "/v1/chat/completions",
        {"model": "dev-reason", "messages": [{"role": "user", "content": "think about it"}]},
    ),
]


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def without_created(data: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b'"created":0', data)


def normalise(obj: Any) -> Any:
    """A decoded answer with its ``created`` timestamps zeroed."""
    return json.loads(without_created(json.dumps(obj, separators=(",", ":")).encode()))


def sse_objects(raw: bytes) -> list[Any]:
    """The JSON objects of an SSE byte stream that ends with ``data: [DONE]``."""
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]", raw[-200:]
    out = []
    for event in events[:-2]:
        assert event.startswith(b"data: "), event[:100]
        out.append(json.loads(event[6:]))
    return out


def chat_text(chunks: list[Any]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def delta_field(chunks: list[Any], field: str) -> str:
    return "".join(c["choices"][0]["delta"].get(field) or "" for c in chunks if c["choices"])


def tool_call(chunks: list[Any]) -> tuple[str, str]:
    name, args = "", ""
    for chunk in chunks:
        for tc in chunk["choices"][0]["delta"].get("tool_calls") or [] if chunk["choices"] else []:
            fn = tc.get("function") or {}
            name += fn.get("name") or ""
            args += fn.get("arguments") or ""
    return name, args


def engine_direct(stack: FaultyStack, path: str, body: dict[str, Any]) -> bytes:
    resp = httpx2.post(stack.engine + path, json=body, timeout=10)
    assert resp.status_code == 200
    return resp.content


async def httpx2_answer(stack: FaultyStack, path: str, body: dict[str, Any]) -> bytes:
    """The decrypted answer the httpx2 transport gives for the same request (raw bytes)."""
    transport = pqe2ee.AsyncE2EETransport(
        api_key=KEY, api_base=stack.relay, models_base=stack.relay
    )
    async with httpx2.AsyncClient(transport=transport) as http:
        resp = await http.post("http://sdk.invalid" + path, json=body)
        assert resp.status_code == 200
        return resp.content


def wait_until(pred: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def cancelled_since_now(stack: FaultyStack) -> Callable[[], bool]:
    before = stack.engine_stats()["streams_cancelled"]
    return lambda: stack.engine_stats()["streams_cancelled"] > before


class SpyKEM:
    """Wraps the real KEM; remembers every key it made."""

    def __init__(self, kem: Any) -> None:
        self.kem = kem
        self.keys: list[Any] = []
        self.name = kem.name

    def generate(self) -> Any:
        key = self.kem.generate()
        self.keys.append(key)
        return key


def spy_on_keys(client: Any) -> SpyKEM:
    """Make ``client`` draw its response keys from a spy (a pool of size 0: all inline)."""
    from pqe2ee.backends import get_kem
    from pqe2ee.transports._keypool import KeyPool

    spy = SpyKEM(get_kem())
    client.keys.close()
    client.keys = KeyPool(spy, size=0)  # type: ignore[arg-type]
    return spy


def wiped(key: Any) -> bool:
    try:
        key.decapsulate(b"\x00" * 1088)
    except pqe2ee.LocalProtocolError:
        return True
    return False


def dead_url() -> str:
    """A loopback URL nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
