"""The vectors adapter for pqe2ee itself (``python -m pqe2ee.conformance.vectors_adapter``).

Implements the JSON-in/JSON-out contract of docs/conformance.md ("Role: vectors") with
:mod:`pqe2ee.protocol`: one JSON object on stdin, one on stdout; exit 0 accepted, 10 rejected
(``{"error": "<code>"}``), 20 unsupported op, 30 malformed input. With ``--batch``: one
request per stdin line, one ``{"exit": N, "output": {...}}`` line out per request.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["main"]


def _ops() -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    from pqe2ee import protocol as v1  # the package exports the v1 API
    from pqe2ee.backends import get_aead, get_kem
    from pqe2ee.backends.xwing import get_xwing
    from pqe2ee.errors import ErrorCode, RemoteError
    from pqe2ee.protocol._events import Done, InnerEvent
    from pqe2ee.protocol.v2 import (
        Data,
        InstanceV2,
        MemoryReplayCache,
        ResponseSealer,
        ResponseSecrets,
        StreamDecryptorV2,
        open_response_v2,
        parse_header,
        seal_request_v2,
        seal_response_v2,
    )

    kem, aead = get_kem(), get_aead()

    def h(x: str) -> bytes:
        return bytes.fromhex(x)

    def v1_open_request(r: dict[str, Any]) -> dict[str, Any]:
        opened = v1.open_request(h(r["blob"]), kem.from_seed(h(r["instance_seed"])), aead=aead)
        pk = base64.b64encode(opened.response_public_key).decode()
        return {"plaintext": json.dumps({**opened.body, v1.RESPONSE_PK_FIELD: pk})}

    def v1_open_response(r: dict[str, Any]) -> dict[str, Any]:
        key = kem.from_seed(h(r["client_seed"]))
        return {"plaintext": v1.open_response(h(r["blob"]), key, aead=aead).decode()}

    def v1_open_stream(r: dict[str, Any]) -> dict[str, Any]:
        dec = v1.StreamDecryptor(kem.from_seed(h(r["client_seed"])), aead=aead)
        dec.receive_data(r["sse"].encode())
        dec.receive_eof()
        events: list[str] = []
        for e in dec.events():
            if isinstance(e, v1.RemoteErrorEvent):
                raise RemoteError("the stream reported e2e_error", code=ErrorCode.REMOTE_ERROR)
            if isinstance(e, InnerEvent):
                events.append(e.data)
            elif isinstance(e, Done):
                events.append("[DONE]")
        return {"events": events}

    def v1_seal_request(r: dict[str, Any]) -> dict[str, Any]:
        body = json.loads(r["plaintext"])
        body.pop("e2e_response_pk")
        sealed = v1.seal_request(
            body, h(r["public_key"]), response_key=kem.generate(), kem=kem, aead=aead
        )
        return {"blob": sealed.blob.hex()}

    def v1_seal_response(r: dict[str, Any]) -> dict[str, Any]:
        return {
            "blob": v1.seal_response(
                r["plaintext"].encode(), h(r["public_key"]), kem=kem, aead=aead
            ).hex()
        }

    def v1_seal_stream(r: dict[str, Any]) -> dict[str, Any]:
        enc = v1.StreamEncoder(v1.StreamSealer(h(r["public_key"]), kem=kem, aead=aead))
        out = [enc.start(), enc.feed(r["plaintext"].encode()), enc.finish()]
        return {"sse": b"".join(out).decode()}

    def v2_secrets(r: dict[str, Any]) -> ResponseSecrets:
        key = get_xwing().from_seed(h(r["response_seed"]))
        return ResponseSecrets(h(r["exporter"]), key, bool(r["stream"]))

    def v2_open_request(r: dict[str, Any]) -> dict[str, Any]:
        view = r["view"]
        inst = InstanceV2(
            chute_id=view["chute_id"],
            instance_id=view["instance_id"],
            keys=[get_xwing().from_seed(h(r["instance_seed"]))],
            aead=aead,
            replay_cache=MemoryReplayCache(),
        )
        for _ in range(2 if r.get("open_twice") else 1):
            opened = inst.open(
                h(r["blob"]),
                path=view["path"],
                stream=bool(view["stream"]),
                now_ms=int(view["now_ms"]),
                relay_nonce=view.get("relay_nonce"),
            )
        return {"body": opened.body.decode()}

    def v2_seal_request(r: dict[str, Any]) -> dict[str, Any]:
        sealed = seal_request_v2(
            r["body"].encode(),
            h(r["public_key"]),
            chute_id=r["chute_id"],
            instance_id=r["instance_id"],
            relay_nonce=r["relay_nonce"],
            path=r["path"],
            now_ms=int(r["ts_ms"]),
            xwing=get_xwing(),
            aead=aead,
        )
        return {"blob": sealed.blob.hex()}

    def v2_seal_single(r: dict[str, Any]) -> dict[str, Any]:
        sealer = ResponseSealer(
            h(r["exporter"]),
            h(r["response_public_key"]),
            stream=False,
            xwing=get_xwing(),
            aead=aead,
        )
        body = seal_response_v2(sealer, status=int(r["status"]), body=r["body"].encode())
        return {"body": body.hex()}

    def v2_parse_header(r: dict[str, Any]) -> dict[str, Any]:
        parse_header(h(r["h"]))
        return {}

    def v2_open_single(r: dict[str, Any]) -> dict[str, Any]:
        resp = open_response_v2(h(r["body"]), v2_secrets(r), aead=aead)
        return {"status": resp.status, "body": resp.body.decode()}

    def v2_open_stream(r: dict[str, Any]) -> dict[str, Any]:
        dec = StreamDecryptorV2(v2_secrets(r), aead=aead)
        dec.receive_data(r["wire"].encode())
        dec.receive_eof()
        data = b"".join(e.data for e in dec.events() if isinstance(e, Data))
        return {"data": data.decode()}

    return {
        "v1.open_request": v1_open_request,
        "v1.open_response": v1_open_response,
        "v1.open_stream": v1_open_stream,
        "v1.seal_request": v1_seal_request,
        "v1.seal_response": v1_seal_response,
        "v1.seal_stream": v1_seal_stream,
        "v2.open_request": v2_open_request,
        "v2.seal_request": v2_seal_request,
        "v2.seal_single": v2_seal_single,
        "v2.parse_header": v2_parse_header,
        "v2.open_single": v2_open_single,
        "v2.open_stream": v2_open_stream,
    }


def answer(
    request: Any, ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]
) -> tuple[int, Any]:
    """``(exit code, output)`` for one request, per the contract."""
    from pqe2ee.errors import PQE2EEError

    op = ops.get(str(request.get("op"))) if isinstance(request, dict) else None
    if op is None:
        return (20, {}) if isinstance(request, dict) else (30, {})
    try:
        return 0, op(request)
    except PQE2EEError as exc:
        return 10, {"error": exc.code.value}
    except (KeyError, ValueError, TypeError):
        return 30, {}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    ops = _ops()
    if args == ["--capabilities"]:
        sys.stdout.write(json.dumps({"ops": sorted(ops)}) + "\n")
        return 0
    if args == ["--batch"]:
        for line in sys.stdin:
            try:
                request = json.loads(line)
            except ValueError:
                request = None
            code, out = answer(request, ops)
            sys.stdout.write(json.dumps({"exit": code, "output": out}) + "\n")
        return 0
    try:
        request = json.loads(sys.stdin.read())
    except ValueError:
        return 30
    code, out = answer(request, ops)
    sys.stdout.write(json.dumps(out))
    return code


if __name__ == "__main__":
    sys.exit(main())
