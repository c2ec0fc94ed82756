"""The instance's engine request is the one ``httpx2.AsyncClient.build_request`` would build
(the instance builds it from a cached URL and merged headers instead: issue 14)."""

from __future__ import annotations

import msgspec
import pytest

from pqe2ee.server.instance import InstanceConfig
from pqe2ee.server.instance.upstream import Engine

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("cookie", [False, True])
@pytest.mark.parametrize("api_key", [None, "engine-secret"])
@pytest.mark.parametrize("path", [CHAT, "/v1/not-served"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.anyio
async def test_engine_request_matches_build_request(
    api_key: str | None, path: str, stream: bool, cookie: bool
) -> None:
    engine = Engine(InstanceConfig(upstream="http://127.0.0.1:9", upstream_api_key=api_key))
    client = engine.client()
    if cookie:
        client.cookies.set("sticky", "1", domain="127.0.0.1")  # a cookie the engine once set
    obj = {"model": "m", "messages": [], "stream": stream}
    raw = msgspec.json.encode(obj)
    try:
        for _ in range(2):  # built fresh, then from the cache
            got = engine.request(path, stream=stream, obj=obj, raw=raw, continuous_usage=True)
            want = client.build_request(
                "POST",
                "http://127.0.0.1:9" + path,
                content=got.content,
                headers={
                    "content-type": "application/json",
                    "accept": "text/event-stream" if stream else "application/json",
                    "accept-encoding": "identity",
                    **({"authorization": f"Bearer {api_key}"} if api_key else {}),
                },
            )
            assert (got.method, got.url, got.headers.raw, got.extensions, got.content) == (
                want.method,
                want.url,
                want.headers.raw,
                want.extensions,
                want.content,
            )
            assert type(got.stream) is type(want.stream)
            assert b"".join(got.stream) == want.content  # type: ignore[arg-type]
            assert got.extensions is not want.extensions
        assert (msgspec.json.decode(got.content)["stream_options"] if stream else got.content) == (
            {"include_usage": True, "continuous_usage_stats": True} if stream else raw
        )
    finally:
        await engine.aclose()
