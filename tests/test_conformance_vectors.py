"""``pqe2ee conformance vectors``: pqe2ee's own sealer/opener passes every golden vector both
ways (it opens the vectors; pqe2ee opens what it seals); broken sealers/openers of ours are
caught; the real CLI gives the documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pqe2ee.conformance.model import EXIT_OK, EXIT_UNSUPPORTED, Status
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
