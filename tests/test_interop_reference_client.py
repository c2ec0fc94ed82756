"""The published reference client (PyPI ``chutes-e2ee`` 0.1.0) driving the official openai SDK
against our relay -> instance -> dev-engine on loopback.

The client lives in its own venv (``.venv-ref``: pqcrypto<1, openai<3, httpx), so it runs as a
subprocess script; ``make test`` builds that venv. Its api_base points at the relay, which also
serves the ``/v1/models`` listing it resolves model names with.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay_support import KEY_A, Stack, serve_stack

pytestmark = pytest.mark.interop

REF_PYTHON = Path(__file__).resolve().parent.parent / ".venv-ref" / "bin" / "python"

CLIENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys

    import httpx
    import openai
    from chutes_e2ee import AsyncChutesE2EETransport, ChutesE2EETransport

    relay, key = sys.argv[1], sys.argv[2]
    out = {"openai": openai.__version__}
    msgs = lambda text: [{"role": "user", "content": text}]

    def text_of(chunks, kind):
        parts = []
        for chunk in chunks:
            for choice in getattr(chunk, "choices", None) or []:
                parts.append((choice.delta.content if kind == "chat" else choice.text) or "")
        return "".join(parts)

    client = openai.OpenAI(
        api_key=key,
        base_url=relay + "/v1",
        max_retries=0,
        timeout=30,
        http_client=httpx.Client(transport=ChutesE2EETransport(api_key=key, api_base=relay)),
    )
    out["models"] = sorted(m.id for m in client.models.list())
    r = client.chat.completions.create(model="dev-echo", messages=msgs("hello from ref"))
    out["chat"] = r.choices[0].message.content
    out["chat_usage"] = r.usage.completion_tokens
    s = client.chat.completions.create(model="dev-echo", messages=msgs("stream from ref"), stream=True)
    out["chat_stream"] = text_of(s, "chat")
    r = client.completions.create(model="dev-echo", prompt="complete from ref", max_tokens=10)
    out["completion"] = r.choices[0].text
    s = client.completions.create(
        model="dev-echo", prompt="stream complete", max_tokens=10, stream=True
    )
    out["completion_stream"] = text_of(s, "completion")
    client.close()

    async def run_async():
        aclient = openai.AsyncOpenAI(
            api_key=key,
            base_url=relay + "/v1",
            max_retries=0,
            timeout=30,
            http_client=httpx.AsyncClient(
                transport=AsyncChutesE2EETransport(api_key=key, api_base=relay)
            ),
        )
        r = await aclient.chat.completions.create(model="dev-echo", messages=msgs("async ref"))
        out["async_chat"] = r.choices[0].message.content
        s = await aclient.chat.completions.create(
            model="dev-echo", messages=msgs("async stream ref"), stream=True
        )
        out["async_chat_stream"] = text_of([c async for c in s], "chat")
        await aclient.close()

    asyncio.run(run_async())
    print(json.dumps(out))
    """
)


def _ref_available() -> str | None:
    if not REF_PYTHON.exists():
        return f"reference client venv missing ({REF_PYTHON}); `make test` builds it"
    probe = subprocess.run(
        [str(REF_PYTHON), "-c", "import chutes_e2ee, openai, httpx"],
        capture_output=True,
        timeout=60,
    )
    if probe.returncode != 0:
        return "chutes_e2ee / openai / httpx not importable in .venv-ref; `make test` installs them"
    return None


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    reason = _ref_available()
    if reason is not None:
        pytest.skip(reason)
    with serve_stack(2) as s:
        yield s


def run_reference_client(relay_url: str, key: str, tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "ref_client.py"
    script.write_text(CLIENT_SCRIPT)
    proc = subprocess.run(
        [str(REF_PYTHON), str(script), relay_url, key],
        capture_output=True,
        text=True,
        timeout=90,
        env={"PATH": "/usr/bin:/bin", "NO_PROXY": "*", "no_proxy": "*"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_reference_client_with_openai_sdk(stack: Stack, tmp_path: Path) -> None:
    before = sum(c.invokes for c in stack.counters)
    out = run_reference_client(stack.relay, KEY_A, tmp_path)
    assert out["openai"].split(".")[0] in ("1", "2")  # the SDK the reference client supports
    assert out["models"] == ["dev-echo", "dev-reason", "dev-tools"]
    assert out["chat"] == "Echo: hello from ref"
    assert out["chat_usage"] == 4  # "Echo: hello from ref" in words
    assert out["chat_stream"] == "Echo: stream from ref"
    assert out["completion"] == "Echo: complete from ref"
    assert out["completion_stream"] == "Echo: stream complete"
    assert out["async_chat"] == "Echo: async ref"
    assert out["async_chat_stream"] == "Echo: async stream ref"
    # every call went through the relay to an instance, encrypted
    assert sum(c.invokes for c in stack.counters) == before + 6


def test_reference_client_with_a_wrong_key_fails(stack: Stack, tmp_path: Path) -> None:
    script = tmp_path / "bad.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, httpx, openai
            from chutes_e2ee import ChutesE2EETransport
            relay = sys.argv[1]
            t = ChutesE2EETransport(api_key="wrong", api_base=relay)
            c = openai.OpenAI(api_key="wrong", base_url=relay + "/v1", max_retries=0,
                              http_client=httpx.Client(transport=t))
            try:
                c.chat.completions.create(model=sys.argv[2], messages=[{"role": "user", "content": "x"}])
            except Exception as exc:  # openai wraps the transport's HTTPStatusError
                while exc is not None and not isinstance(exc, httpx.HTTPStatusError):
                    exc = exc.__cause__
                print(exc.response.status_code if exc is not None else "no status")
            """
        )
    )
    from pqe2ee.server.relay import chute_id_for

    # a chute id skips the model lookup, so discovery itself answers 401
    proc = subprocess.run(
        [str(REF_PYTHON), str(script), stack.relay, chute_id_for("dev-echo")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout.strip() == "401", proc.stderr[-2000:]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
