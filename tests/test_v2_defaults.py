"""Issue 16 item 12: v2 defaults that do not leak. A client compresses nothing unless asked
and asks for padded responses; the instance gzips a single response only when the request was
compressed. Wire rules and golden vectors are unchanged (scripts/gen_vectors_v2.py --check)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from pqe2ee.server import instance, relay
from pqe2ee.testing import dev_engine
from relay_support import chat_body, seal_v2
from servers import run_app
from test_v2_protocol import T0, new_instance, seal

ECHO = relay.chute_id_for("dev-echo")


def test_client_defaults_no_compression_and_padded_responses() -> None:
    sealed = seal(chat_body("hello"))
    opened = new_instance().open(sealed.blob, path="/v1/chat/completions", stream=False, now_ms=T0)
    assert not opened.compressed
    assert opened.header.response_padding == 256
    asked = seal(chat_body("hello"), compress=True, response_padding=0)
    opened = new_instance().open(asked.blob, path="/v1/chat/completions", stream=False, now_ms=T0)
    assert opened.compressed and opened.header.response_padding == 0


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, Any]]:
    with run_app(dev_engine.create_app()) as engine:
        app = instance.create_app(instance.InstanceConfig(upstream=engine))
        with run_app(app) as url:
            yield url, app.state.instance


def test_instance_compresses_a_response_only_when_asked(served: tuple[str, Any]) -> None:
    url, inst = served
    text = "the same words again " * 2000  # the echo repeats it: gzip would shrink it ~100x
    sizes = {}
    for compress in (False, True):
        s = seal_v2(
            inst.v2.public_key,
            inst.instance_id,
            "n",
            ECHO,
            chat_body(text),
            compress=compress,
            response_padding=0,
        )
        r = httpx2.post(url + "/e2e/invoke", content=s.blob, headers=s.headers, timeout=30)
        assert r.status_code == 200, r.text
        sizes[compress] = len(r.content)
    assert sizes[False] > len(text) > 10 * sizes[True], sizes
