"""Server-role cases: a relay (and the instances behind it) checked against SPEC.md and
spec/v2.md, live, on the wire.

Each case is data (:class:`~pqe2ee.conformance.model.Case`) with the section it checks. Two
kinds: *client* cases drive the target with pqe2ee's own client (discovery, nonce handling and
decryption as a real caller meets them), *wire* cases build the bytes themselves through
:class:`~pqe2ee.conformance.probe.ServerProbe` to send what a correct client never would (a
spent nonce, a flipped bit, a header that contradicts the sealed body) and check the answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec

from pqe2ee.conformance.model import Case, CaseFailed, CaseSkipped, check
from pqe2ee.conformance.probe import Invoke, ServerProbe, chat_body
from pqe2ee.errors import PQE2EEError
from pqe2ee.protocol import (
    BLOB_OVERHEAD,
    Done,
    InnerEvent,
    LineSplitter,
    StreamDecryptor,
    open_response,
)
from pqe2ee.protocol.v2 import End, StreamDecryptorV2, open_response_v2

__all__ = ["SERVER_CASES", "server_capabilities"]

PROMPT = "conformance probe: say something"
_OUTER_MEMBERS = {"e2e_init", "e2e", "usage", "e2e_error"}


def _typed(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)``; a pqe2ee error (the target's bytes broke a rule) becomes a FAIL."""
    try:
        return fn(*args)
    except PQE2EEError as exc:
        raise CaseFailed(f"{what}: {exc.code.value}: {exc.message}") from None


def _chat_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError:
        raise CaseFailed(f"{what}: the decrypted body is not JSON") from None
    check(
        isinstance(obj, dict) and isinstance(obj.get("choices"), list),
        f"{what}: the decrypted body is not a chat completion object",
    )
    return dict(obj)


def _detail(body: bytes) -> str:
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body[:120].decode("utf-8", "replace")
    return json.dumps(obj)[:160]


# -- discovery ------------------------------------------------------------------------------


def models_listing(p: ServerProbe) -> str:
    return f"{p.model} -> chute {p.chute_id}"


def discovery_document(p: ServerProbe) -> str:
    insts = p.discover()
    doc = p.last_discovery or {}
    check(
        isinstance(doc.get("nonce_expires_in"), (int, float)),
        "nonce_expires_in is missing or not a number",
    )
    nonces = [n for i in insts for n in i.nonces]
    check(len(set(nonces)) == len(nonces), "the same nonce is listed twice")
    return f"{len(insts)} instance(s), {len(nonces)} nonce(s)"


# -- v1 through a real client ---------------------------------------------------------------


def _our_client(p: ServerProbe, *, v2: bool) -> Any:
    import httpx2

    from pqe2ee.transports.httpx2 import E2EETransport

    transport = E2EETransport(
        api_key=p.api_key or "",
        api_base=p.base_url,
        models_base=p.models_base or p.base_url,
        prefer_v2=v2,
        min_version=2 if v2 else 1,
        max_attempts=1,
        strict=True,
    )
    return httpx2.Client(transport=transport, base_url=p.base_url + "/v1", timeout=p.timeout)


def _client_call(p: ServerProbe, *, stream: bool, v2: bool) -> str:
    body = json.loads(chat_body(PROMPT, p.model, stream=stream))
    if v2 and not p.has_v2():
        raise CaseSkipped("no instance offers v2")
    with _our_client(p, v2=v2) as client:
        try:
            if not stream:
                r = client.post("/chat/completions", json=body)
                check(r.status_code == 200, f"status {r.status_code}: {_detail(r.content)}")
                obj = _chat_object(r.content, "answer")
                return str(obj["choices"][0].get("message", {}).get("content", ""))[:60]
            text: list[str] = []
            with client.stream("POST", "/chat/completions", json=body) as r:
                check(r.status_code == 200, f"status {r.status_code}")
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        for ch in json.loads(line[6:]).get("choices", []):
                            text.append((ch.get("delta") or {}).get("content") or "")
            return "".join(text)[:60]
        except PQE2EEError as exc:
            raise CaseFailed(f"{exc.code.value}: {exc.message}") from None
        except Exception as exc:  # httpx2 wraps our stream errors in its TransportError
            raise CaseFailed(f"{type(exc).__name__}: {exc}") from None


# -- v1 on the wire -------------------------------------------------------------------------


def v1_blob(p: ServerProbe) -> str:
    inv = p.seal_v1(chat_body(PROMPT, p.model))
    r = p.post(inv)
    check(r.status_code == 200, f"status {r.status_code}: {_detail(r.content)}")
    ctype = r.headers.get("content-type", "")
    check(ctype.startswith("application/octet-stream"), f"content-type {ctype!r}")
    check(len(r.content) >= BLOB_OVERHEAD, f"blob of {len(r.content)} bytes")
    key = inv.v1_key
    assert key is not None
    plain = _typed("response blob", lambda: open_response(r.content, key, aead=p.aead))
    _chat_object(plain, "response")
    return f"{len(r.content)}-byte blob opens with e2e-resp-v1"


def v1_stream(p: ServerProbe) -> str:
    inv = p.seal_v1(chat_body(PROMPT, p.model, stream=True))
    assert inv.v1_key is not None
    dec = StreamDecryptor(inv.v1_key, aead=p.aead)
    lines = LineSplitter(1 << 20)
    events = 0
    done = False
    first: tuple[int, str] | None = None
    for status, ctype, chunk in p.stream(inv):
        if first is None:
            first = (status, ctype)
            check(status == 200, f"status {status}")
            check(ctype.startswith("text/event-stream"), f"content-type {ctype!r}")
        for line in lines.feed(chunk):
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            check(line.startswith(b"data: "), f"outer line without 'data: ': {line[:40]!r}")
            payload = line[6:]
            if payload == b"[DONE]":
                continue
            obj = _typed("outer event", msgspec.json.decode, payload)
            check(
                isinstance(obj, dict) and len(obj) == 1 and set(obj) <= _OUTER_MEMBERS,
                f"outer event members {sorted(obj) if isinstance(obj, dict) else obj!r}",
            )
            events += 1
        _typed("stream", dec.receive_data, chunk)
        for ev in dec.events():
            if isinstance(ev, Done):
                done = True
            elif isinstance(ev, InnerEvent):
                pass
    _typed("stream end", dec.receive_eof)
    for ev in dec.events():
        done = done or isinstance(ev, Done)
    check(done, "the inner stream never sent [DONE]")
    return f"{events} outer events, records open with e2e-stream-v1"


def _nonce_refused(p: ServerProbe, inv: Invoke, what: str) -> str:
    r = p.post(inv)
    refused = r.status_code == 403 and b"nonce" in r.content.lower()
    check(refused, f"{what} answered {r.status_code} {_detail(r.content)}")
    return "403 nonce"


def nonce_single_use(p: ServerProbe) -> str:
    inv = p.seal_v1(chat_body(PROMPT, p.model))
    first = p.post(inv)
    check(first.status_code == 200, f"first use answered {first.status_code}")
    again = p.seal_v1(chat_body(PROMPT, p.model), lease=(inv.instance, inv.nonce))
    return _nonce_refused(p, again, "a spent nonce")


def nonce_other_instance(p: ServerProbe) -> str:
    inst, nonce = p.lease()
    other = [i for i in p.instances() if i.instance_id != inst.instance_id]
    if not other:
        raise CaseSkipped("only one instance is listed")
    inv = p.seal_v1(chat_body(PROMPT, p.model), lease=(other[0], nonce))
    return _nonce_refused(p, inv, "a nonce of another instance")


def stream_mismatch(p: ServerProbe) -> str:
    inv = p.seal_v1(chat_body(PROMPT, p.model, stream=True))
    r = p.post(inv, X_E2E_Stream="false")
    check(r.status_code != 200, "header false / body stream true answered 200")
    check(
        r.status_code == 400 and b"stream_mismatch" in r.content,
        f"answered {r.status_code} {_detail(r.content)} (pqe2ee: 400 stream_mismatch)",
    )
    return "400 stream_mismatch"


def tampered_request(p: ServerProbe) -> str:
    inv = p.seal_v1(chat_body(PROMPT, p.model))
    blob = bytearray(inv.blob)
    blob[BLOB_OVERHEAD - 16 + 3] ^= 0x01  # inside the AEAD ciphertext
    inv.blob = bytes(blob)
    r = p.post(inv)
    check(r.status_code == 400, f"a tampered blob answered {r.status_code} (want 400)")
    return _detail(r.content)[:60]


def short_blob(p: ServerProbe) -> str:
    inv = p.seal_v1(chat_body(PROMPT, p.model))
    inv.blob = inv.blob[: BLOB_OVERHEAD - 1]
    r = p.post(inv)
    check(r.status_code == 400, f"a {BLOB_OVERHEAD - 1}-byte blob answered {r.status_code}")
    return "400"


def path_allowlist(p: ServerProbe) -> str:
    inv = p.seal_v1(chat_body(PROMPT, p.model), path="/v1/embeddings")
    r = p.post(inv)
    check(
        r.status_code == 403 and b"nonce" not in r.content.lower(),
        f"X-E2E-Path /v1/embeddings answered {r.status_code} {_detail(r.content)}",
    )
    return "403"


def missing_header(p: ServerProbe) -> str:
    inv = p.seal_v1(chat_body(PROMPT, p.model))
    r = p.post(inv, X_Chute_Id=None)
    check(r.status_code == 422, f"no X-Chute-Id answered {r.status_code} (want 422)")
    return "422"


def error_shape(p: ServerProbe) -> str:
    inv = p.seal_v1(chat_body(PROMPT, p.model))
    r = p.post(inv, X_E2E_Nonce="never-issued-conformance-nonce-000")
    check(r.status_code == 403, f"an unknown nonce answered {r.status_code}")
    ctype = r.headers.get("content-type", "")
    check(ctype.startswith("application/json"), f"error content-type {ctype!r}")
    try:
        obj = msgspec.json.decode(r.content)
    except msgspec.DecodeError:
        raise CaseFailed("the error body is not JSON") from None
    check(isinstance(obj, dict) and "detail" in obj, f"error body {_detail(r.content)}")
    return "JSON {detail}"


# -- v2 -------------------------------------------------------------------------------------


def v2_offer(p: ServerProbe) -> str:
    insts = p.discover()
    offers = [i for i in insts if "e2e_v2" in i.extra]
    if not offers:
        raise CaseSkipped("no discovery row carries e2e_v2")
    for inst in offers:
        check(p.offer(inst) is not None, f"instance {inst.instance_id}: e2e_v2 is not valid")
    return f"{len(offers)} valid offer(s)"


def v2_single(p: ServerProbe) -> str:
    inv = p.seal_v2(chat_body(PROMPT, p.model))
    r = p.post(inv)
    check(r.status_code == 200, f"status {r.status_code}: {_detail(r.content)}")
    assert inv.v2 is not None
    secrets = inv.v2.secrets
    resp = _typed("v2 response", lambda: open_response_v2(r.content, secrets, aead=p.aead))
    check(resp.status == 200, f"authenticated status {resp.status}")
    _chat_object(resp.body, "v2 response")
    return "END authenticated"


def v2_stream(p: ServerProbe) -> str:
    inv = p.seal_v2(chat_body(PROMPT, p.model, stream=True))
    assert inv.v2 is not None
    dec = StreamDecryptorV2(inv.v2.secrets, aead=p.aead)
    end: End | None = None
    for status, _ctype, chunk in p.stream(inv):
        check(status == 200, f"status {status}")
        _typed("v2 stream", dec.receive_data, chunk)
        for ev in dec.events():
            end = ev if isinstance(ev, End) else end
    _typed("v2 stream end", dec.receive_eof)
    for ev in dec.events():
        end = ev if isinstance(ev, End) else end
    check(end is not None and dec.complete, "no authenticated END")
    assert end is not None
    return f"{end.records} records"


def v2_replay(p: ServerProbe) -> str:
    inv = p.seal_v2(chat_body(PROMPT, p.model))
    first = p.post(inv)
    check(first.status_code == 200, f"first use answered {first.status_code}")
    _inst, fresh = p.lease(v2=True)
    r = p.post(inv, X_E2E_Nonce=fresh)  # the same sealed bytes under a fresh relay nonce
    check(r.status_code != 200, "a replayed v2 request was answered 200")
    return f"refused with {r.status_code}"


def v2_route_binding(p: ServerProbe) -> str:
    inv = p.seal_v2(chat_body(PROMPT, p.model))
    r = p.post(inv, X_E2E_Path="/v1/completions")
    check(r.status_code != 200, "X-E2E-Path contradicting H was answered 200")
    return f"refused with {r.status_code}"


def _case(
    id: str, section: str, profile: str, title: str, fn: Callable[[ServerProbe], Any]
) -> Case[ServerProbe]:
    return Case(id, section, profile, title, fn)


SERVER_CASES: tuple[Case[ServerProbe], ...] = (
    _case(
        "discovery.models",
        "SPEC §10.1",
        "any",
        "/v1/models maps the model to a chute_id",
        models_listing,
    ),
    _case(
        "discovery.document",
        "SPEC §10.2",
        "any",
        "discovery lists instances, keys and unique nonces",
        discovery_document,
    ),
    _case(
        "v1.client.single",
        "SPEC §7",
        "v1",
        "pqe2ee's client gets a decrypted non-stream answer",
        lambda p: _client_call(p, stream=False, v2=False),
    ),
    _case(
        "v1.client.stream",
        "SPEC §8-9",
        "v1",
        "pqe2ee's client gets a complete decrypted stream",
        lambda p: _client_call(p, stream=True, v2=False),
    ),
    _case(
        "v1.wire.blob",
        "SPEC §5.2, §7",
        "v1",
        "non-stream answer: 200 octet-stream blob opening with e2e-resp-v1",
        v1_blob,
    ),
    _case(
        "v1.wire.stream",
        "SPEC §8.1, §9",
        "v1",
        "stream: one-member data: events, records open with e2e-stream-v1, inner [DONE]",
        v1_stream,
    ),
    _case(
        "v1.nonce.single_use",
        "SPEC §10.3",
        "v1",
        "a spent nonce is refused: 403 mentioning nonce",
        nonce_single_use,
    ),
    _case(
        "v1.nonce.other_instance",
        "SPEC §10.3",
        "v1",
        "a nonce is good only for its own instance",
        nonce_other_instance,
    ),
    _case(
        "v1.stream_mismatch",
        "SPEC §6.2, §12.3",
        "v1",
        "X-E2E-Stream contradicting the body is refused (400 stream_mismatch)",
        stream_mismatch,
    ),
    _case(
        "v1.tampered_blob",
        "SPEC §5.2, §11",
        "v1",
        "a request blob with one flipped bit is refused with 400",
        tampered_request,
    ),
    _case(
        "v1.short_blob",
        "SPEC §5.2",
        "v1",
        "a request blob shorter than 1116 bytes is refused with 400",
        short_blob,
    ),
    _case(
        "v1.path_allowlist",
        "SPEC §6.3, §11",
        "v1",
        "a path the instance does not serve is 403 without 'nonce'",
        path_allowlist,
    ),
    _case("v1.missing_header", "SPEC §6.3", "v1", "a missing X-Chute-Id is 422", missing_header),
    _case(
        "v1.error_shape",
        "SPEC §11",
        "v1",
        "relay errors are JSON objects with 'detail'",
        error_shape,
    ),
    _case("v2.offer", "v2 §8.1", "v2", "every e2e_v2 offer in discovery is valid", v2_offer),
    _case(
        "v2.client.single",
        "v2 §5.4",
        "v2",
        "pqe2ee's client (min_version=2) gets a decrypted answer",
        lambda p: _client_call(p, stream=False, v2=True),
    ),
    _case(
        "v2.client.stream",
        "v2 §5.5",
        "v2",
        "pqe2ee's client (min_version=2) gets a complete stream",
        lambda p: _client_call(p, stream=True, v2=True),
    ),
    _case(
        "v2.wire.single",
        "v2 §5.4",
        "v2",
        "a single response opens and its END authenticates",
        v2_single,
    ),
    _case(
        "v2.wire.stream",
        "v2 §5.2-5.3, §5.5",
        "v2",
        "a stream follows the record grammar up to an authenticated END",
        v2_stream,
    ),
    _case(
        "v2.replay",
        "v2 §4.3",
        "v2",
        "the same sealed request under a fresh relay nonce is refused",
        v2_replay,
    ),
    _case(
        "v2.route_binding",
        "v2 §4.2",
        "v2",
        "an X-E2E-Path that contradicts H is refused",
        v2_route_binding,
    ),
)


def server_capabilities(p: ServerProbe) -> dict[str, Any]:
    """What the target declares through discovery (profiles offered, instance count)."""
    try:
        insts = p.discover()
    except (CaseFailed, CaseSkipped) as exc:
        return {"discovery": str(exc)}
    v2 = sum(1 for i in insts if p.offer(i) is not None)
    return {"instances": len(insts), "v1": True, "v2_offers": v2, "streaming": True}
