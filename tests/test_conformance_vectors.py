"""``pqe2ee conformance vectors``: pqe2ee's own sealer/opener passes every golden vector both
ways (it opens the vectors; pqe2ee opens what it seals); broken sealers/openers of ours are
caught; the real CLI gives the documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pqe2ee.conformance.model import EXIT_MALFORMED, EXIT_OK, EXIT_UNSUPPORTED, Status
from pqe2ee.conformance.runner import run_vectors

ROOT = Path(__file__).resolve().parent.parent
OURS = [sys.executable, "-m", "pqe2ee.conformance.vectors_adapter"]
BROKEN = [sys.executable, str(ROOT / "tests" / "broken_vectors_adapter.py")]
VECTORS = ROOT / "spec" / "vectors"


def test_our_sealer_opener_passes_every_vector() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pqe2ee.cli", "conformance", "vectors", "--json", "--batch",
         "--vectors", str(VECTORS), "--", *OURS],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    doc = json.loads(done.stdout)
    assert done.returncode == EXIT_OK, [r for r in doc["results"] if r["status"] != "PASS"]
    ids = [r["id"] for r in doc["results"]]
    v1 = json.loads((VECTORS / "v1.json").read_text())
    v2 = json.loads((VECTORS / "v2.json").read_text())
    assert sum(i.startswith("v1.open_stream.negative.") for i in ids) == len(v1["negative"])
    assert sum(i.startswith("v2.open_stream.negative.") for i in ids) == len(v2["stream_negative"])
    assert sum(i.startswith("v2.parse_header.negative.") for i in ids) == len(v2["header_negative"])
    assert sum(
        i.startswith(("v2.open_request.negative.", "v2.open_request.edge.")) for i in ids
    ) == len(v2["instance_negative"])
    # the spec clarifications' vectors: the longest valid H, non-canonical base64 bits
    assert sum(i.startswith("v2.parse_header.edge.") for i in ids) == len(v2["header_edge"]) == 1
    assert sum(i.startswith("v2.open_stream.edge.") for i in ids) == len(v2["stream_edge"]) == 1
    assert "v2.parse_header.negative.hdr_len 2707 (the longest valid H plus one byte)" in ids
    ops = {".".join(i.split(".")[:2]) for i in ids}
    assert ops >= {"v1.seal_request", "v1.seal_response", "v1.seal_stream", "v2.seal_request"}
    assert "v2.seal_single" in ops


def test_one_process_per_case_gives_the_same_verdicts() -> None:
    only = ["v1.open_stream.negative.1", "v1.seal_response", "v2.open_single.single-ok"]
    per_case = run_vectors(OURS, vectors=VECTORS, only=only)
    batch = run_vectors(OURS, vectors=VECTORS, only=only, batch=True)
    assert [(r.id, r.status) for r in per_case.results] == [(r.id, r.status) for r in batch.results]
    assert len(per_case.results) >= 4 and per_case.exit_code == EXIT_OK


def _statuses(fault: str, **kw: object) -> dict[str, Status]:
    report = run_vectors([*BROKEN, fault], vectors=VECTORS, **kw)  # type: ignore[arg-type]
    assert report.error is None
    return {r.id: r.status for r in report.results}


def test_an_opener_that_accepts_everything_fails_every_negative_vector() -> None:
    only = [
        "v1.open_stream",
        "v2.open_single",
        "v2.open_request.negative.re",
        "v2.open_request.edge",
    ]
    statuses = _statuses("lenient", only=only)
    assert "v2.open_request.negative.replayed request_id (second open of the same blob)" in statuses
    negatives = {k: s for k, s in statuses.items() if ".negative." in k}
    assert negatives and set(negatives.values()) == {Status.FAIL}
    assert {s for k, s in statuses.items() if k not in negatives} == {Status.PASS}


def test_a_sealer_with_a_flipped_bit_is_caught() -> None:
    statuses = _statuses("bad-seal", only=["v1.seal_re", "v2.seal_request"])
    assert sum(k.startswith("v2.") for k in statuses) == 5
    assert statuses and set(statuses.values()) == {Status.FAIL}


def test_an_opener_without_v2_is_unsupported_under_v2() -> None:
    report = run_vectors([*BROKEN, "v1-only"], vectors=VECTORS, profile="v2", only=["v2.open_s"])
    assert {r.status for r in report.results} == {Status.SKIP}
    assert report.exit_code == EXIT_UNSUPPORTED


def test_base64_clarification_vectors_catch_strict_and_lenient_decoders() -> None:
    only = [
        "v2.open_stream.edge.",
        "v2.open_stream.negative.record 1 base64",
        "v2.open_stream.stream-ok",
    ]
    strict = _statuses("strict-base64", only=only)
    lenient = _statuses("unpadded-base64", only=only)
    edge = next(k for k in strict if ".edge." in k)
    unpadded = next(k for k in strict if "without its '=' padding" in k)
    assert strict[edge] is Status.FAIL and strict[unpadded] is Status.PASS
    assert lenient[edge] is Status.PASS and lenient[unpadded] is Status.FAIL
    assert strict["v2.open_stream.stream-ok"] is lenient["v2.open_stream.stream-ok"] is Status.PASS


def test_unparseable_answers_exit_30() -> None:
    for batch in (False, True):
        kw: dict[str, object] = {
            "only": ["v1.open_response", "v2.parse_header.stream"],
            "batch": batch,
        }
        report = run_vectors([*BROKEN, "garbage"], vectors=VECTORS, **kw)  # type: ignore[arg-type]
        assert report.results and all(r.status is Status.FAIL for r in report.results)
        assert all(r.malformed and "malformed answer" in r.detail for r in report.results)
        assert report.exit_code == EXIT_MALFORMED
    done = subprocess.run(
        [sys.executable, "-m", "pqe2ee.cli", "conformance", "vectors", "--json", "--vectors",
         str(VECTORS), "--only", "v1.open_response.0", "--", *BROKEN, "garbage"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == EXIT_MALFORMED, done.stderr[-1000:]
    assert json.loads(done.stdout)["results"][0]["malformed"] is True
