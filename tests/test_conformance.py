"""``pqe2ee conformance server``: our own stack passes every case; a relay of ours broken on
purpose (:class:`pqe2ee.conformance.hostile.HostileRelay`) is caught, fault by fault, by the
case that cites the broken rule; the real CLI prints JSON / Markdown with the documented exit
codes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqe2ee.conformance.hostile import Mode
from pqe2ee.conformance.loopback import OwnStack, own_stack
from pqe2ee.conformance.model import EXIT_ERROR, EXIT_FAIL, EXIT_OK, EXIT_UNSUPPORTED, Status
from pqe2ee.conformance.runner import run_server
from pqe2ee.conformance.server_cases import SERVER_CASES


@pytest.fixture(scope="module")
def stack() -> Iterator[OwnStack]:
    with own_stack() as st:
        yield st


def _run(st: OwnStack, mode: Mode, **kw: str) -> dict[str, Status]:
    st.hostile.set_mode(mode)
    report = run_server(st.relay, api_key=st.api_key, model=st.model, **kw)
    assert report.error is None
    return {r.id: r.status for r in report.results}


def test_our_stack_passes_every_case(stack: OwnStack) -> None:
    st = stack
    st.hostile.set_mode(Mode.FAITHFUL)
    report = run_server(st.relay, api_key=st.api_key, model=st.model)
    assert [r.id for r in report.results] == [c.id for c in SERVER_CASES]
    bad = [(r.id, r.status, r.detail) for r in report.results if r.status is not Status.PASS]
    assert bad == []
    assert report.exit_code == EXIT_OK
    assert report.capabilities["v2_offers"] == 2
    # every case names the section it checks
    assert all(c.section.startswith(("SPEC §", "v2 §")) for c in SERVER_CASES)
    # the probe stays far below the relay's discovery limit of 10 a minute
    assert report.capabilities["discoveries"] <= 6, report.capabilities


# Each fault of the broken relay, and the cases that must catch it (at least these must FAIL).
BROKEN: dict[Mode, set[str]] = {
    Mode.TAMPER_BLOB: {"v1.client.single", "v1.wire.blob", "v2.client.single", "v2.wire.single"},
    Mode.TRUNCATE: {"v1.client.stream", "v1.wire.stream", "v2.client.stream", "v2.wire.stream"},
    Mode.ACCEPT_SPENT_NONCE: {"v1.nonce.single_use", "v1.nonce.other_instance"},
    Mode.IGNORE_STREAM_FLAG: {"v1.stream_mismatch"},
    Mode.OPEN_PATHS: {"v1.path_allowlist", "v2.route_binding"},
    Mode.PLAIN_ERRORS: {"v1.error_shape"},
    Mode.TAMPER_IS_500: {"v1.tampered_blob", "v1.short_blob"},
    Mode.DUPLICATE_NONCES: {"discovery.document"},
    Mode.BAD_OFFER: {"v2.offer"},
    Mode.DUPLICATE_RECORD: {"v1.wire.stream", "v2.wire.stream", "v2.client.stream"},
    Mode.REORDER_RECORDS: {"v2.wire.stream", "v2.client.stream"},
    Mode.TAMPER_RECORD: {"v1.wire.stream", "v2.wire.stream", "v1.client.stream"},
    Mode.DISCOVERY_429: {"discovery.document"},
}


@pytest.mark.parametrize("mode", list(BROKEN), ids=lambda m: m.value)
def test_each_fault_of_a_broken_relay_is_detected(stack: OwnStack, mode: Mode) -> None:
    statuses = _run(stack, mode)
    missed = {case for case in BROKEN[mode] if statuses[case] is not Status.FAIL}
    assert not missed, f"{mode.value} went unnoticed by {sorted(missed)}"
    assert Status.ERROR not in statuses.values()


@pytest.mark.parametrize("mode", [Mode.SPLIT, Mode.COALESCE, Mode.INTERLEAVE_USAGE])
def test_valid_reframing_is_not_a_failure(stack: OwnStack, mode: Mode) -> None:
    statuses = _run(stack, mode)
    assert set(statuses.values()) == {Status.PASS}, statuses


def test_hidden_v2_is_skip_under_both_and_unsupported_under_v2(stack: OwnStack) -> None:
    statuses = _run(stack, Mode.HIDE_V2)
    assert {s for k, s in statuses.items() if k.startswith("v2.")} == {Status.SKIP}
    stack.hostile.set_mode(Mode.HIDE_V2)
    report = run_server(
        stack.relay, api_key=stack.api_key, model=stack.model, profile="v2", only=["v2."]
    )
    assert report.exit_code == EXIT_UNSUPPORTED


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pqe2ee.cli", "conformance", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_cli_json_markdown_and_exit_codes(stack: OwnStack, tmp_path: Path) -> None:
    stack.hostile.set_mode(Mode.FAITHFUL)
    md = tmp_path / "report.md"
    done = _cli("server", stack.relay, "--api-key", stack.api_key, "--json", "--markdown", str(md))
    assert done.returncode == EXIT_OK, done.stderr
    doc = json.loads(done.stdout)
    assert doc["exit_code"] == 0 and doc["counts"]["PASS"] == len(SERVER_CASES)
    assert {r["section"] for r in doc["results"]} >= {"SPEC §10.3", "v2 §4.3"}
    text = md.read_text()
    assert "| PASS | `v1.nonce.single_use` | SPEC §10.3 |" in text

    stack.hostile.set_mode(Mode.ACCEPT_SPENT_NONCE)
    done = _cli("server", stack.relay, "--api-key", stack.api_key, "--only", "v1.nonce")
    assert done.returncode == EXIT_FAIL
    assert "FAIL  v1.nonce.single_use" in done.stdout and "Traceback" not in done.stderr


def test_cli_unreachable_target_is_a_runner_error() -> None:
    done = _cli("server", "http://127.0.0.1:9", "--api-key", "k")
    assert done.returncode == EXIT_ERROR
    assert "cannot reach" in done.stdout and "Traceback" not in done.stderr
