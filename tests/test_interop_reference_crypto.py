"""Interop with the published reference client ``chutes-e2ee`` 0.1.0, run from its own venv.

Two subprocess runs in all (module fixture): the reference builds request blobs for our instance
key; we open them, then seal non-stream responses and streams to the response keys it chose; the
reference opens those with its own ``decrypt_response`` and, for streams, with its transport's
SSE loop ``_iter_sse_from_e2ee`` (which calls ``decrypt_stream_init`` / ``decrypt_stream_chunk``).
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.protocol import StreamEncoder, StreamSealer, open_request, seal_response

ROOT = Path(__file__).resolve().parent.parent
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"
REF_PACKAGE = list((ROOT / ".venv-ref" / "lib").glob("python3*/site-packages/chutes_e2ee"))

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        not REF_PYTHON.exists() or not REF_PACKAGE,
        reason="reference client venv .venv-ref with chutes-e2ee is missing (make test builds it)",
    ),
]

# Runs inside .venv-ref. Reads one JSON job on stdin, writes one JSON answer on stdout.
REF_SCRIPT = r"""
import json, sys
from chutes_e2ee import crypto, transport

job = json.load(sys.stdin)
out = {}
if job["mode"] == "build":
    out["requests"] = []
    for payload in job["payloads"]:
        built = crypto.build_e2ee_request(job["instance_pk"], payload)
        out["requests"].append({"blob": built.blob.hex(), "response_sk": built.response_sk.hex()})
else:
    out["responses"] = [
        crypto.decrypt_response(bytes.fromhex(r["blob"]), bytes.fromhex(r["response_sk"]))
        for r in job["responses"]
    ]
    out["streams"] = []
    real_chunk = transport.decrypt_stream_chunk
    for s in job["streams"]:
        records = []

        def spy(b64, key):
            text = real_chunk(b64, key)
            records.append(text)
            return text

        transport.decrypt_stream_chunk = spy
        data, n = s["sse"].encode(), s["chunk"]
        chunks = iter([data[i : i + n] for i in range(0, len(data), n)])
        sk = bytes.fromhex(s["response_sk"])
        output = b"".join(transport._iter_sse_from_e2ee(chunks, sk))
        out["streams"].append({"records": records, "output": output.decode()})
    transport.decrypt_stream_chunk = real_chunk
json.dump(out, sys.stdout)
"""


def _run_reference(job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [str(REF_PYTHON), "-c", REF_SCRIPT],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


# -- inputs ---------------------------------------------------------------------------------------

LONG = "Ωmega ✓ " + " ".join(f"token{i} Grüße 🦀" for i in range(7000))  # ~120 KiB of UTF-8

PAYLOADS: dict[str, dict[str, Any]] = {
    "small": {"model": "dev-echo", "messages": [{"role": "user", "content": "Hello"}]},
    "unicode": {
        "model": "dev-echo",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {"role": "user", "content": "你好，世界 — مرحبا — 👩‍💻 — e\u0301 — \x00\u2028"}
        ],
    },
    "100k": {"model": "dev-echo", "messages": [{"role": "user", "content": LONG}]},
}

RESPONSES: dict[str, bytes] = {
    "small": msgspec.json.encode(
        {"id": "c1", "object": "chat.completion", "choices": [{"message": {"content": "ok"}}]}
    ),
    "unicode": msgspec.json.encode(
        {"choices": [{"message": {"content": "Grüß dich 👋 — 你好 — \u2028"}}], "usage": {"n": 1}}
    ),
    "100k": msgspec.json.encode({"choices": [{"message": {"content": LONG}}]}),
}


def _chunk(delta: str, usage: int | None) -> bytes:
    obj: dict[str, Any] = {
        "object": "chat.completion.chunk",
        "choices": [{"delta": {"content": delta}}],
    }
    if usage is not None:
        obj["usage"] = {"prompt_tokens": 3, "completion_tokens": usage, "total_tokens": 3 + usage}
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


# Engine SSE bodies: vLLM-like, with continuous usage (so plaintext usage events are interleaved),
# blank lines that become records of their own, unicode, and one ~120 KiB line.
ENGINE_STREAMS: dict[str, bytes] = {
    "unicode": b"".join(
        [_chunk(w, i) for i, w in enumerate(["Grüß", " dich", " 👋", " 你好", ""])]
        + [b": keep-alive\n\n", b"data: [DONE]\n\n"]
    ),
    "100k": _chunk(LONG, 1) + _chunk("!", None) + b"data: [DONE]\n\n",
}


def _lines(data: bytes) -> list[bytes]:
    return re.findall(rb"[^\n]*\n|[^\n]+$", data)


@pytest.fixture(scope="module")
def exchange() -> dict[str, Any]:
    """Both directions, in two reference runs; returns everything the tests look at."""
    kem, aead = get_kem(), get_aead()
    instance = kem.generate()
    built = _run_reference(
        {
            "mode": "build",
            "instance_pk": base64.b64encode(instance.public_key).decode(),
            "payloads": list(PAYLOADS.values()),
        }
    )["requests"]
    opened = {
        name: open_request(bytes.fromhex(b["blob"]), instance, aead=aead)
        for name, b in zip(PAYLOADS, built, strict=True)
    }
    sk = {name: b["response_sk"] for name, b in zip(PAYLOADS, built, strict=True)}

    responses = [
        {
            "blob": seal_response(
                RESPONSES[name], opened[name].response_public_key, kem=kem, aead=aead
            ).hex(),
            "response_sk": sk[name],
        }
        for name in RESPONSES
    ]
    streams = []
    for name, engine in ENGINE_STREAMS.items():
        sealer = StreamSealer(opened[name].response_public_key, kem=kem, aead=aead)
        encoder = StreamEncoder(sealer)
        parts = [encoder.start()]
        for i in range(0, len(engine), 1000):  # the engine's bytes arrive in arbitrary pieces
            parts.append(encoder.feed(engine[i : i + 1000]))
        parts.append(encoder.finish())
        # the network may split the outer stream anywhere, too
        streams.append({"sse": b"".join(parts).decode(), "response_sk": sk[name], "chunk": 777})
    opened_back = _run_reference({"mode": "open", "responses": responses, "streams": streams})
    return {
        "built": built,
        "opened": opened,
        "responses": dict(zip(RESPONSES, opened_back["responses"], strict=True)),
        "streams": dict(zip(ENGINE_STREAMS, opened_back["streams"], strict=True)),
        "sse": {name: s["sse"] for name, s in zip(ENGINE_STREAMS, streams, strict=True)},
    }


# -- (a) reference request -> our instance ---------------------------------------------------------


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_reference_request_opens_with_our_core(exchange: dict[str, Any], name: str) -> None:
    opened = exchange["opened"][name]
    assert opened.body == PAYLOADS[name]
    assert json.loads(opened.json) == PAYLOADS[name]
    assert opened.stream is bool(PAYLOADS[name].get("stream"))


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_response_key_in_request_is_the_references_key(exchange: dict[str, Any], name: str) -> None:
    # pqcrypto's secret key is FIPS 203's expanded dk; ek sits at dk[1152:2336] (SPEC section 4).
    dk = bytes.fromhex(exchange["built"][list(PAYLOADS).index(name)]["response_sk"])
    assert len(dk) == 2400
    assert exchange["opened"][name].response_public_key == dk[1152:2336]


# -- (b) our non-stream response -> reference ------------------------------------------------------


@pytest.mark.parametrize("name", list(RESPONSES))
def test_our_response_opens_with_reference(exchange: dict[str, Any], name: str) -> None:
    assert exchange["responses"][name] == json.loads(RESPONSES[name])


# -- (c) our stream -> reference transport ---------------------------------------------------------


@pytest.mark.parametrize("name", list(ENGINE_STREAMS))
def test_our_stream_decrypts_with_reference(exchange: dict[str, Any], name: str) -> None:
    got = exchange["streams"][name]
    engine = ENGINE_STREAMS[name]
    # one record per engine line, blank lines included, in order
    assert got["records"] == [line.decode() for line in _lines(engine)]
    assert "".join(got["records"]) == engine.decode()
    assert "\n" in got["records"]


@pytest.mark.parametrize("name", list(ENGINE_STREAMS))
def test_reference_sse_output_matches_our_outer_stream(exchange: dict[str, Any], name: str) -> None:
    """Its SSE loop yields each plaintext usage line and each record, both framed with a blank
    line; rebuilding that from our outer events and our records must give the same text."""
    records = iter(_lines(ENGINE_STREAMS[name]))
    expected = []
    for line in exchange["sse"][name].split("\n"):
        if line.startswith('data: {"usage"'):
            expected.append(line + "\n\n")
        elif line.startswith('data: {"e2e"'):
            expected.append(next(records).decode() + "\n\n")
    assert next(records, None) is None
    assert exchange["streams"][name]["output"] == "".join(expected)
    # a plaintext usage event went ahead of every engine line that carried usage
    with_usage = sum(1 for line in _lines(ENGINE_STREAMS[name]) if b'"usage"' in line)
    assert with_usage >= 1
    assert sum(1 for e in expected if e.startswith('data: {"usage"')) == with_usage
