"""Vectors-role cases: a sealer/opener that is not an HTTP client, checked with the golden
vectors (spec/vectors/v1.json, v2.json) through a JSON-in/JSON-out contract.

For each case the runner starts ``CMD...`` once, writes one JSON object to its stdin
(``{"op": ..., inputs...}``, byte strings in lower-case hex, texts as JSON strings) and reads
one JSON object from its stdout. Exit codes, as in tinfoil-conformance: 0 accepted (the output
is the answer), 10 rejected (``{"error": "<code>"}``, the code optional), 20 unsupported op,
30 malformed input, anything else an error. Positive vectors must be accepted with the right
output, negative ones rejected (a different error code is noted, not failed). Sealing is
checked the other way round: the adapter seals, pqe2ee opens and compares.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pqe2ee.backends import get_aead, get_kem
from pqe2ee.conformance.model import Case, CaseFailed, CaseMalformed, CaseSkipped, check
from pqe2ee.errors import PQE2EEError
from pqe2ee.protocol import Done, InnerEvent, StreamDecryptor, open_request, open_response

__all__ = ["VectorCase", "default_vectors_dir", "vector_cases"]

ACCEPT, REJECT, UNSUPPORTED, MALFORMED = 0, 10, 20, 30


def default_vectors_dir() -> Path:
    here = Path("spec/vectors")
    return here if here.is_dir() else Path(__file__).resolve().parents[3] / "spec" / "vectors"


@dataclass(frozen=True)
class VectorCase:
    id: str
    section: str
    title: str
    request: dict[str, Any]
    expect: dict[str, Any] | None  # None: the vector must be rejected
    code: str | None = None  # the code pqe2ee raises for a negative vector
    verify: str | None = None  # "seal_request" / "seal_response" / "seal_stream": we open it


Caller = Callable[[VectorCase], tuple[int, Any]]


def _parse(stdout: str) -> Any:
    try:
        return json.loads(stdout) if stdout.strip() else {}
    except ValueError:
        return {"_unparsed": stdout[:120]}


def per_case_caller(cmd: Sequence[str], timeout: float) -> Caller:
    """One adapter process per case (the default contract)."""

    def call(vc: VectorCase) -> tuple[int, Any]:
        try:
            done = subprocess.run(
                list(cmd),
                input=json.dumps(vc.request),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise CaseFailed("the adapter hung: killed after the time limit") from None
        return done.returncode, _parse(done.stdout)

    return call


def batch_caller(cmd: Sequence[str], cases: Sequence[VectorCase], timeout: float) -> Caller:
    """``CMD... --batch``: every request as one JSON line on stdin, one answer line
    ``{"exit": N, "output": {...}}`` per request on stdout, in order (started on first use)."""

    def run_all() -> None:
        lines = "".join(json.dumps(vc.request) + "\n" for vc in cases)
        done = subprocess.run(
            [*cmd, "--batch"],
            input=lines,
            capture_output=True,
            text=True,
            timeout=timeout * max(1, len(cases)) ** 0.5,
            check=False,
        )
        for vc, line in zip(cases, done.stdout.splitlines(), strict=False):
            doc = _parse(line)
            code = doc.get("exit") if isinstance(doc, dict) else None
            if isinstance(code, int) and not isinstance(code, bool):
                answers[vc.id] = (code, doc.get("output", {}))
            else:
                answers[vc.id] = None
        ran.append(True)

    answers: dict[str, tuple[int, Any] | None] = {}
    ran: list[bool] = []

    def call(vc: VectorCase) -> tuple[int, Any]:
        if not ran:
            run_all()
        if vc.id not in answers:
            raise CaseMalformed("no answer line for this case in --batch mode")
        answer = answers[vc.id]
        if answer is None:
            raise CaseMalformed('the --batch answer line is not {"exit": N, "output": {...}}')
        return answer

    return call


def _verify_v2_seal(vc: VectorCase, out: dict[str, Any], seed: bytes) -> None:
    from pqe2ee.backends.xwing import get_xwing
    from pqe2ee.protocol.v2 import MemoryReplayCache, ResponseSecrets, open_response_v2
    from pqe2ee.protocol.v2.request import InstanceV2

    xw, aead, r = get_xwing(), get_aead(), vc.request
    blob = bytes.fromhex(out["blob"] if vc.verify == "v2_seal_request" else out["body"])
    if vc.verify == "v2_seal_request":
        inst = InstanceV2(
            chute_id=r["chute_id"],
            instance_id=r["instance_id"],
            keys=[xw.from_seed(seed)],
            aead=aead,
            replay_cache=MemoryReplayCache(),
        )
        opened = inst.open(blob, path=r["path"], stream=r["stream"], now_ms=r["ts_ms"])
        check(opened.body == r["body"].encode(), "the sealed request opened to another body")
        return
    secrets = ResponseSecrets(bytes.fromhex(r["exporter"]), xw.from_seed(seed), False)
    resp = open_response_v2(blob, secrets, aead=aead)
    check(resp.status == r["status"], f"authenticated status {resp.status}, want {r['status']}")
    check(resp.body == r["body"].encode(), "the sealed response opened to another body")


def _verify_seal(vc: VectorCase, out: dict[str, Any], seed: bytes) -> None:
    kem, aead = get_kem(), get_aead()
    try:
        if vc.verify in ("v2_seal_request", "v2_seal_single"):
            _verify_v2_seal(vc, out, seed)
            return
        key = kem.from_seed(seed)
        if vc.verify == "seal_request":
            opened = open_request(bytes.fromhex(out["blob"]), key, aead=aead)
            want = json.loads(vc.request["plaintext"])
            want.pop("e2e_response_pk")
            check(opened.body == want, "the sealed request opened to another body")
        elif vc.verify == "seal_response":
            plain = open_response(bytes.fromhex(out["blob"]), key, aead=aead)
            check(plain == vc.request["plaintext"].encode(), "the blob opened to other bytes")
        else:
            dec = StreamDecryptor(key, aead=aead)
            dec.receive_data(out["sse"].encode())
            dec.receive_eof()
            got = [
                "[DONE]" if isinstance(e, Done) else e.data
                for e in dec.events()
                if isinstance(e, (Done, InnerEvent))
            ]
            check(got == (vc.expect or {}).get("events"), "the stream opened to other events")
    except PQE2EEError as exc:
        raise CaseFailed(f"pqe2ee cannot open what the adapter sealed: {exc.code.value}") from None
    except (KeyError, ValueError, TypeError):
        raise CaseFailed(
            "the adapter's output lacks its hex 'blob' / 'body' / text 'sse'"
        ) from None


def make_case(vc: VectorCase, call: Caller, seed: bytes | None) -> Case[None]:
    def run(_: None) -> str:
        code, out = call(vc)
        if code == UNSUPPORTED:
            raise CaseSkipped(f"op {vc.request['op']} unsupported (exit 20)")
        if vc.expect is None:
            check(code == REJECT, f"exit {code} for a vector that must be rejected ({vc.code})")
            got = out.get("error") if isinstance(out, dict) else None
            return "" if got in (None, vc.code) else f"rejected as {got}; pqe2ee says {vc.code}"
        check(code == ACCEPT, f"exit {code} for a valid vector: {str(out)[:100]}")
        if isinstance(out, dict) and "_unparsed" in out:
            raise CaseMalformed(f"exit 0, but stdout is not JSON: {out['_unparsed']!r}")
        check(isinstance(out, dict), "the output is not a JSON object")
        if vc.verify is not None:
            assert seed is not None
            _verify_seal(vc, out, seed)
            return "pqe2ee opened it"
        for name, want in vc.expect.items():
            got = out.get(name)
            if name == "plaintext_json":  # any JSON text with these members will do
                try:
                    got = json.loads(out.get("plaintext", ""))
                except (TypeError, ValueError):
                    got = None
            check(got == want, f"{name}: got {str(got)[:60]!r}")
        return ""

    return Case(vc.id, vc.section, vc.id.split(".", 1)[0], vc.title, run)


def _v1_public_key(seed: bytes) -> str:
    return get_kem().from_seed(seed).public_key.hex()


Found = tuple[VectorCase, bytes | None]


def _v1(doc: dict[str, Any]) -> Iterator[Found]:
    for i, v in enumerate(doc["request"]):
        seed = bytes.fromhex(v["instance_seed"])
        opener = {"op": "v1.open_request", "instance_seed": v["instance_seed"], "blob": v["blob"]}
        sealer = {"op": "v1.seal_request", "public_key": v["instance_public_key"]}
        sealer["plaintext"] = v["plaintext"]
        sec, title = "SPEC §5.2, §6.1", v["description"]
        want = {"plaintext_json": v["plaintext_json"]}
        yield VectorCase(f"v1.open_request.{i}", sec, title, opener, want), None
        yield VectorCase(f"v1.seal_request.{i}", sec, "seal: " + title, sealer, {},
                         verify="seal_request"), seed  # fmt: skip
    for i, v in enumerate(doc["response"]):
        seed = bytes.fromhex(v["client_seed"])
        opener = {"op": "v1.open_response", "client_seed": v["client_seed"], "blob": v["blob"]}
        sealer = {"op": "v1.seal_response", "public_key": v["client_public_key"],
                  "plaintext": v["plaintext"]}  # fmt: skip
        sec, title = "SPEC §5.2, §7", v["description"]
        yield VectorCase(f"v1.open_response.{i}", sec, title, opener,
                         {"plaintext": v["plaintext"]}), None  # fmt: skip
        yield VectorCase(f"v1.seal_response.{i}", sec, "seal: " + title, sealer, {},
                         verify="seal_response"), seed  # fmt: skip
    for i, v in enumerate(doc["stream"]):
        seed = bytes.fromhex(v["client_seed"])
        events = {"events": v["events"]}
        opener = {"op": "v1.open_stream", "client_seed": v["client_seed"], "sse": v["sse"]}
        sealer = {"op": "v1.seal_stream", "public_key": _v1_public_key(seed),
                  "plaintext": v["plaintext"]}  # fmt: skip
        yield VectorCase(f"v1.open_stream.{i}", "SPEC §8, §9", v["description"], opener,
                         events), None  # fmt: skip
        yield VectorCase(f"v1.seal_stream.{i}", "SPEC §8", "seal: " + v["description"], sealer,
                         events, verify="seal_stream"), seed  # fmt: skip
    for i, v in enumerate(doc["negative"]):
        req = {"op": "v1.open_stream", "client_seed": v["client_seed"], "sse": v["sse"]}
        yield VectorCase(f"v1.open_stream.negative.{i}", "SPEC §9", v["description"], req, None,
                         v["expected_error"]), None  # fmt: skip


def _v2(doc: dict[str, Any]) -> Iterator[Found]:
    reqs = doc["request"]

    def secrets(i: int) -> dict[str, Any]:
        r = reqs[int(i)]
        return {"exporter": r["exporter"], "response_seed": r["response_seed"],
                "stream": r["stream"]}  # fmt: skip

    for v in reqs:
        yield VectorCase(f"v2.parse_header.{v['name']}", "v2 §3", "a valid H",
                         {"op": "v2.parse_header", "h": v["h"]}, {}), None  # fmt: skip
    for v in doc.get("header_edge", []):  # e.g. the longest valid H
        yield VectorCase(f"v2.parse_header.edge.{v['name']}", "v2 §3", v["name"],
                         {"op": "v2.parse_header", "h": v["h"]}, {}), None  # fmt: skip
    for v in doc["header_negative"]:
        yield VectorCase(f"v2.parse_header.negative.{v['name']}", "v2 §3", v["name"],
                         {"op": "v2.parse_header", "h": v["h"]}, None, v["code"]), None  # fmt: skip
    from pqe2ee.backends.xwing import get_xwing

    xw = get_xwing()
    instance_seed = hashlib.sha256(b"pqe2ee-v2-vector-instance").digest()
    instance_pk = xw.from_seed(instance_seed).public_key.hex()
    for v in reqs:
        route = {k: v[k] for k in ("chute_id", "instance_id", "relay_nonce", "path", "ts_ms")}
        req = {"op": "v2.seal_request", "public_key": instance_pk, "body": v["body"], **route}
        req["stream"] = v["stream"]
        yield VectorCase(f"v2.seal_request.{v['name']}", "v2 §3, §4.1", "seal: " + v["name"],
                         req, {}, verify="v2_seal_request"), instance_seed  # fmt: skip
    for v in reqs:
        view = {"chute_id": v["chute_id"], "instance_id": v["instance_id"],
                "path": v["delivered_path"], "stream": v["stream"], "now_ms": v["ts_ms"]}  # fmt: skip
        req = {"op": "v2.open_request", "instance_seed": v["instance_seed"], "blob": v["blob"],
               "view": view}  # fmt: skip
        yield VectorCase(f"v2.open_request.{v['name']}", "v2 §4.2", v["name"], req,
                         {"body": v["body"]}), None  # fmt: skip
    for v in doc["instance_negative"]:
        r = reqs[int(v["request"])]
        req = {"op": "v2.open_request", "instance_seed": r["instance_seed"], "blob": v["blob"],
               "view": v["view"], "open_twice": bool(v.get("open_twice"))}  # fmt: skip
        want = {"body": r["body"]} if v["code"] is None else None
        kind = "negative" if want is None else "edge"  # e.g. now = ts + W is accepted
        yield VectorCase(f"v2.open_request.{kind}.{v['name']}", "v2 §4.2-4.3", v["name"], req,
                         want, v["code"]), None  # fmt: skip
    for v in doc["response"]:
        if v["kind"] != "single" or v["expect"]["error"] is not None:
            continue
        r = reqs[int(v["request"])]
        seed = bytes.fromhex(r["response_seed"])
        req = {"op": "v2.seal_single", "exporter": r["exporter"], "status": v["expect"]["status"],
               "body": v["expect"]["body"], "response_public_key": xw.from_seed(seed).public_key.hex()}  # fmt: skip
        yield VectorCase(f"v2.seal_single.{v['name']}", "v2 §5.1-5.4", "seal: " + v["name"], req,
                         {}, verify="v2_seal_single"), seed  # fmt: skip
    for v in doc["response"]:
        kind = v["kind"]
        member = "body" if kind == "single" else "wire"
        req = {"op": f"v2.open_{kind}", **secrets(v["request"]), member: v[member]}
        want = (
            {"status": v["expect"]["status"], "body": v["expect"]["body"]}
            if kind == "single"
            else {"data": v["data"]}
        )
        yield VectorCase(f"v2.open_{kind}.{v['name']}", "v2 §5.2-5.5", v["name"], req,
                         want), None  # fmt: skip
    for v in doc.get("stream_edge", []):  # e.g. non-zero unused base64 bits are ignored
        req = {"op": "v2.open_stream", **secrets(v["request"]), "wire": v["wire"]}
        yield VectorCase(f"v2.open_stream.edge.{v['name']}", "v2 §1, §5.3", v["name"], req,
                         {"data": v["data"]}), None  # fmt: skip
    for kind, member, key in (("single", "body", "single_negative"),
                              ("stream", "wire", "stream_negative")):  # fmt: skip
        for v in doc[key]:
            req = {"op": f"v2.open_{kind}", **secrets(v["request"]), member: v[member]}
            yield VectorCase(f"v2.open_{kind}.negative.{v['name']}", "v2 §5.3-5.5", v["name"],
                             req, None, v["code"]), None  # fmt: skip


def vector_cases(
    directory: Path,
    cmd: Sequence[str],
    *,
    timeout: float = 30.0,
    batch: bool = False,
    only: Sequence[str] = (),
    profiles: Sequence[str] = ("v1", "v2"),
    ops: Sequence[object] | None = None,
) -> list[Case[None]]:
    """The cases of both vector files in file order (v1 then v2), filtered by id prefix; with
    ``ops`` (the adapter's declaration) the other ops SKIP without running the adapter."""
    found: list[tuple[VectorCase, bytes | None]] = []
    for name, gen in (("v1.json", _v1), ("v2.json", _v2)):
        doc = json.loads((directory / name).read_text(encoding="utf-8"))
        found += [
            (vc, seed)
            for vc, seed in gen(doc)
            if vc.id.split(".", 1)[0] in profiles
            and (not only or any(vc.id.startswith(o) for o in only))
        ]
    call = (
        batch_caller(cmd, [vc for vc, _ in found], timeout)
        if batch
        else per_case_caller(cmd, timeout)
    )
    if ops is not None:
        declared = set(ops)
        inner = call

        def call(vc: VectorCase) -> tuple[int, Any]:
            if vc.request["op"] not in declared:
                return UNSUPPORTED, {}
            return inner(vc)

    return [make_case(vc, call, seed) for vc, seed in found]
