"""Fuzz targets: one per parser that reads bytes a peer controls (issue 16).

Each target is a function ``one(data: bytes) -> None`` that feeds ``data`` to one parser. The
contract it checks: a typed :class:`~pqe2ee.errors.PQE2EEError` (or, for the proxy's
translators, their typed refusal) is fine; any other exception is a crash; a decryptor that
reports success must have been given bytes the golden vectors produced (it opens nothing it
was not sealed for: with fixed keys, random bytes never authenticate). Seeds come from the
golden vectors (spec/vectors/v1.json, v2.json): :func:`seeds` - the saved corpus under
fuzz/corpus/<target>/ starts from them (``python fuzz/run.py --write-seeds``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from pqe2ee.errors import PQE2EEError

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
CORPUS = Path(__file__).resolve().parent / "corpus"
NOW_MS = 1_767_225_600_000


@cache
def _v(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


def _h(s: str) -> bytes:
    return bytes.fromhex(s)


# -- the targets -------------------------------------------------------------------------------


def t_json(data: bytes) -> None:
    import msgspec

    from pqe2ee._json import json_decode

    try:
        json_decode(data)
    except msgspec.DecodeError:
        pass


def t_gunzip(data: bytes) -> None:
    from pqe2ee.protocol._codec import gunzip_bounded

    try:
        gunzip_bounded(data, limit=1 << 20, what="fuzz")
    except PQE2EEError:
        pass


def t_sse(data: bytes) -> None:
    from pqe2ee.protocol.sse import SSEParser

    parser = SSEParser(max_event=1 << 16)
    try:
        for i in range(0, len(data), 7):
            parser.feed(data[i : i + 7])
    except PQE2EEError:
        pass


def t_discovery(data: bytes) -> None:
    from pqe2ee.protocol.discovery import parse_discovery, parse_models
    from pqe2ee.protocol.v2.negotiation import parse_v2_offer
    from pqe2ee.server.relay.registry import parse_info

    for fn in (
        lambda: parse_discovery(data, 0.0),
        lambda: parse_models(data),
        lambda: parse_info(data, 0.0),
    ):
        try:
            fn()
        except PQE2EEError:
            pass
    try:
        import msgspec

        from pqe2ee._json import json_decode

        doc = json_decode(data)
    except msgspec.DecodeError:
        return
    if isinstance(doc, dict):
        try:
            parse_v2_offer(doc, 0.0)
        except PQE2EEError:
            pass


def t_v2_header(data: bytes) -> None:
    from pqe2ee.protocol.v2.header import parse_header

    try:
        parse_header(data)
    except PQE2EEError:
        pass


@cache
def _v1_key() -> Any:
    from pqe2ee.backends import get_kem

    return get_kem("pyca")


def _opens(dec: Any, data: bytes) -> bool:
    """Feed a whole stream to a decryptor: True if it took it as complete, False on a typed
    refusal (anything else propagates: a crash)."""
    try:
        dec.receive_data(data)
        dec.receive_eof()
        dec.events()
    except PQE2EEError:
        return False
    return bool(dec.complete)


def t_v1_stream(data: bytes) -> None:
    from pqe2ee.backends import get_aead
    from pqe2ee.protocol import StreamDecryptor

    case = _v("v1.json")["stream"][0]
    dec = StreamDecryptor(_v1_key().from_seed(_h(case["client_seed"])), aead=get_aead("pyca"))
    if not _opens(dec, data):
        return
    assert data.startswith(case["sse"].encode()[:100]), "a stream opened from fuzz bytes"


def t_v1_request(data: bytes) -> None:
    from pqe2ee.backends import get_aead
    from pqe2ee.protocol import open_request

    case = _v("v1.json")["request"][0]
    key = _v1_key().from_seed(_h(case["instance_seed"]))
    try:
        open_request(data, key, aead=get_aead("pyca"), max_plaintext=1 << 20)
    except PQE2EEError:
        return
    assert data == _h(case["blob"]), "a request opened from fuzz bytes"


@cache
def _xw() -> Any:
    from pqe2ee.backends.xwing import get_xwing

    return get_xwing()


def _v2_request(i: int) -> dict[str, Any]:
    req: dict[str, Any] = _v("v2.json")["request"][i]
    return req


def _secrets(req: dict[str, Any]) -> Any:
    from pqe2ee.protocol.v2 import ResponseSecrets

    return ResponseSecrets(
        _h(req["exporter"]), _xw().from_seed(_h(req["response_seed"])), bool(req["stream"])
    )


def t_v2_instance(data: bytes) -> None:
    from pqe2ee.backends import get_aead
    from pqe2ee.protocol.v2 import InstanceV2, MemoryReplayCache

    req = _v2_request(0)
    inst = InstanceV2(
        chute_id=req["chute_id"],
        instance_id=req["instance_id"],
        keys=[_xw().from_seed(_h(req["instance_seed"]))],
        aead=get_aead("pyca"),
        replay_cache=MemoryReplayCache(),
    )
    try:
        inst.open(data, path=req["delivered_path"], stream=req["stream"], now_ms=req["ts_ms"])
    except PQE2EEError:
        return
    assert data == _h(req["blob"]), "a v2 request opened from fuzz bytes"


def _stream_request() -> int:
    return next(i for i, r in enumerate(_v("v2.json")["request"]) if r["stream"])


def t_v2_stream(data: bytes) -> None:
    from pqe2ee.backends import get_aead
    from pqe2ee.protocol.v2 import StreamDecryptorV2

    dec = StreamDecryptorV2(_secrets(_v2_request(_stream_request())), aead=get_aead("pyca"))
    _opens(dec, data)


def t_v2_single(data: bytes) -> None:
    from pqe2ee.backends import get_aead
    from pqe2ee.protocol.v2 import open_response_v2

    try:
        open_response_v2(data, _secrets(_v2_request(0)), aead=get_aead("pyca"), max_body=1 << 20)
    except PQE2EEError:
        return


def t_proxy_translate(data: bytes) -> None:
    import msgspec

    from pqe2ee._json import json_decode
    from pqe2ee.proxy.translate.anthropic import messages_to_chat
    from pqe2ee.proxy.translate.errors import TranslationError
    from pqe2ee.proxy.translate.responses import parse_responses_request, responses_to_chat

    try:
        doc = json_decode(data)
    except msgspec.DecodeError:
        return
    if not isinstance(doc, dict):
        return  # the routes refuse non-objects before translating (400 invalid_json)
    for fn in (
        lambda: parse_responses_request(doc),
        lambda: responses_to_chat(doc),
        lambda: messages_to_chat(doc),
    ):
        try:
            fn()
        except (TranslationError, PQE2EEError):
            pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "json": t_json,
    "gunzip": t_gunzip,
    "sse": t_sse,
    "discovery": t_discovery,
    "v2_header": t_v2_header,
    "v1_stream": t_v1_stream,
    "v1_request": t_v1_request,
    "v2_instance": t_v2_instance,
    "v2_stream": t_v2_stream,
    "v2_single": t_v2_single,
    "proxy_translate": t_proxy_translate,
}


# -- seeds from the golden vectors -------------------------------------------------------------


def seeds(target: str) -> Iterator[bytes]:
    v1, v2 = _v("v1.json"), _v("v2.json")
    if target in ("json", "proxy_translate"):
        for r in v2["request"]:
            yield r["body"].encode()
        for r in v1["request"]:
            yield r["plaintext"].encode()
        yield b'{"model":"m","input":"hi","tools":[{"type":"function","name":"f"}]}'
        yield b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
    elif target == "gunzip":
        import zlib

        for r in v1["request"]:
            yield zlib.compress(r["plaintext"].encode(), 6, wbits=31)
    elif target in ("sse", "v1_stream"):
        for s in v1["stream"]:
            yield s["sse"].encode()
        for n in v1["negative"]:
            yield n["sse"].encode()
    elif target == "v2_stream":
        for n in v2["stream_negative"]:
            yield n["wire"].encode()
    elif target == "v2_single":
        for r in v2["response"]:
            if r["kind"] == "single":
                yield _h(r["body"])
    elif target == "v2_header":
        for c in v2["header"]:
            yield _h(c["h"])
        for c in v2["header_negative"]:
            yield _h(c["h"])
    elif target == "v1_request":
        yield _h(v1["request"][0]["blob"])
    elif target == "v2_instance":
        yield _h(v2["request"][0]["blob"])
        for c in v2["instance_negative"]:
            yield _h(c["blob"])
    elif target == "discovery":
        yield b'{"data":[{"id":"m","chute_id":"c"}]}'
        yield (
            b'{"instances":[{"instance_id":"i","e2e_pubkey":"AAAA","nonces":["n"],'
            b'"e2e_v2":{"version":2,"pk":"AAAA","pk_hash":"00","expires_at":1}}],'
            b'"nonce_expires_in":60}'
        )
        yield b'{"instance_id":"i","e2e_pubkey":"AAAA","models":["m"]}'


def corpus_files(target: str) -> list[Path]:
    return sorted((CORPUS / target).glob("*"))
