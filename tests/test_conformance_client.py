"""``pqe2ee conformance client``: our own client passes every case through its adapter; the
published ``chutes-e2ee`` client's known weaknesses come out as named FAILs (not crashes); two
deliberately broken clients of ours (errors swallowed; retries off) are caught case by case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pqe2ee.conformance.model import EXIT_FAIL, EXIT_OK, Status
from pqe2ee.conformance.runner import run_client

ROOT = Path(__file__).resolve().parent.parent
OURS = [sys.executable, "-m", "pqe2ee.conformance.adapter"]
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"
REF = [str(REF_PYTHON), str(ROOT / "examples" / "conformance" / "chutes_e2ee_adapter.py")]


def _statuses(cmd: list[str], **kw: object) -> tuple[dict[str, Status], int]:
    report = run_client(cmd, **kw)  # type: ignore[arg-type]
    assert report.error is None
    return {r.id: r.status for r in report.results}, report.exit_code


def test_our_client_passes_both_profiles() -> None:
    statuses, code = _statuses(OURS)
    # v1 records carry no sequence number, so reordering is checkable in v2 only; a v1-only
    # relay never offers v2, so there is no pin to break
    skipped = {"v1.stream.reordered", "v1.downgrade.pinned"}
    assert {k for k, s in statuses.items() if s is not Status.PASS} == skipped
    assert all(statuses[k] is Status.SKIP for k in skipped)
    assert code == EXIT_OK
    assert len(statuses) == 42


def test_broken_client_swallowing_errors_is_caught() -> None:
    cmd = [sys.executable, str(ROOT / "tests" / "broken_client_adapter.py")]
    statuses, code = _statuses(cmd, profile="v2")
    caught = {k for k, s in statuses.items() if s is Status.FAIL}
    assert caught == {
        "v2.stream.truncated",
        "v2.stream.duplicated",
        "v2.stream.reordered",
        "v2.stream.tampered",
        "v2.single.tampered",
        "v2.discovery.rate_limited",
        "v2.discovery.expired_nonces",
        "v2.discovery.expires_at_soon",
        "v2.downgrade.pinned",
    }
    assert code == EXIT_FAIL


def test_broken_client_without_retries_is_caught() -> None:
    statuses, _ = _statuses([*OURS, "--max-attempts", "1"], profile="v1", only=["v1.retry"])
    assert statuses == {
        "v1.retry.spent_nonce": Status.FAIL,
        "v1.retry.gone_410": Status.FAIL,
        "v1.retry.busy_429": Status.FAIL,
        "v1.retry.key_502": Status.FAIL,
    }


BROKEN = [sys.executable, str(ROOT / "tests" / "broken_client_kinds.py")]


def test_client_assuming_one_event_per_record_is_caught() -> None:
    only = ["v1.stream.inner", "v2.stream.inner", "v1.stream", "v2.stream"]
    statuses, _ = _statuses([*BROKEN, "record-is-event"], only=only)
    assert statuses["v1.stream"] is Status.PASS and statuses["v2.stream"] is Status.PASS
    for case in ("stream.inner_split", "stream.inner_merged"):
        for profile in ("v1", "v2"):
            assert statuses[f"{profile}.{case}"] is Status.FAIL, (profile, case)


@pytest.mark.parametrize(
    ("kind", "caught", "passed"),
    [
        ("ignore-expires-at", "discovery.expires_at_soon", "discovery.expires_at_past"),
        ("trust-expires-at", "discovery.expires_at_past", "discovery.expires_at_soon"),
    ],
)
def test_clients_with_wrong_expiry_clocks_are_caught(kind: str, caught: str, passed: str) -> None:
    statuses, code = _statuses([*BROKEN, kind], profile="v2", only=["v2.discovery.expires"])
    assert statuses == {f"v2.{caught}": Status.FAIL, f"v2.{passed}": Status.PASS}
    assert code == EXIT_FAIL


def test_client_forgetting_pins_is_caught() -> None:
    statuses, _ = _statuses([*BROKEN, "forget-pins"], profile="v2", only=["v2.downgrade"])
    assert statuses == {"v2.downgrade.pinned": Status.FAIL}


def test_declared_capabilities_skip_what_the_adapter_does_not_do(tmp_path: Path) -> None:
    script = tmp_path / "no_stream_adapter.py"
    script.write_text(
        "import sys\n"
        "if sys.argv[1:] == ['--capabilities']:\n"
        '    print(\'{"profiles": ["v1"], "streaming": false}\'); sys.exit(0)\n'
        "from pqe2ee.conformance.adapter import main\n"
        "sys.exit(main(sys.argv[1:] + ['--no-v2']))\n"
    )
    report = run_client([sys.executable, str(script)], only=["v1.single", "v1.stream", "v2.single"])
    statuses = {r.id: r.status for r in report.results}
    assert statuses["v1.single"] is Status.PASS
    assert statuses["v1.stream"] is Status.SKIP and statuses["v2.single"] is Status.SKIP
    assert report.capabilities["declared"] == {"profiles": ["v1"], "streaming": False}


def test_a_hanging_client_is_a_fail_not_a_hang() -> None:
    cmd = [sys.executable, "-c", "import time; time.sleep(30)"]
    statuses, code = _statuses(cmd, profile="v1", only=["v1.single"], timeout=1.0)
    assert statuses == {"v1.single": Status.FAIL, "v1.single.tampered": Status.FAIL}
    assert code == EXIT_FAIL


@pytest.mark.interop
@pytest.mark.skipif(not REF_PYTHON.exists(), reason=".venv-ref is built by make test")
def test_published_client_weaknesses_are_named_fails(tmp_path: Path) -> None:
    md = tmp_path / "ref.md"
    done = subprocess.run(
        [sys.executable, "-m", "pqe2ee.cli", "conformance", "client", "--profile", "v1",
         "--json", "--markdown", str(md), "--", *REF],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert done.returncode == EXIT_FAIL, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    statuses = {r["id"]: r["status"] for r in doc["results"]}
    assert "ERROR" not in statuses.values()
    fails = {k for k, s in statuses.items() if s == "FAIL"}
    assert fails == {
        "v1.stream.truncated",  # exits 0 with the text it has
        "v1.stream.duplicated",  # prints the duplicated record's text twice or not at all
        "v1.retry.spent_nonce",  # retries nothing (SPEC §11)
        "v1.retry.gone_410",
        "v1.retry.busy_429",
        "v1.retry.key_502",
        "v1.stream.inner_split",  # decodes each record alone: a split line is a JSONDecodeError
        "v1.discovery.expires_at_soon",  # ignores nonce_expires_at
    }
    assert statuses["v1.downgrade.pinned"] == "SKIP"  # declares no multi_call
    for case in ("v1.single", "v1.stream", "v1.stream.split", "v1.stream.tampered",
                 "v1.stream.inner_merged", "v1.discovery.expires_at_past"):  # fmt: skip
        assert statuses[case] == "PASS", case
    assert doc["capabilities"]["profiles_spoken"] == ["v1"]
    assert doc["capabilities"]["declared"] == {"profiles": ["v1"], "streaming": True}
    assert "| FAIL | `v1.retry.gone_410` | SPEC §11 |" in md.read_text()


def test_an_adapter_that_cannot_start_is_a_runner_error() -> None:
    report = run_client(["/nonexistent/adapter"])
    assert report.exit_code == 1 and report.results == []
    assert report.error is not None and "cannot run the adapter" in report.error
