"""``pqe2ee attest verify`` on the shared captures: the real CLI, its JSON and human output, and
the exit code 2 for an unusable capture or policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from attest_support import CAPTURES, EXPECTED_FMSPC, EXTRA
from pqe2ee.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def _verify(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["attest", "verify", *args])
    return result.exit_code, result.stdout, result.stderr


def test_real_cli_json_every_capture_every_instance_trusted() -> None:
    for capture in CAPTURES:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pqe2ee.cli",
                "attest",
                "verify",
                "--capture",
                str(capture),
                "--collateral-dir",
                str(EXTRA),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["instances"], capture.name
        for inst in doc["instances"]:
            assert (inst["verdict"], inst["reasons"], inst["tcb_status"]) == (
                "trusted",
                [],
                "UpToDate",
            )
            assert inst["gpus"] == {"checked": 8, "ok": 8}


def test_without_extra_collateral_the_other_fmspc_is_rejected() -> None:
    name = "glm-5-tee-2026-05-20"
    code, out, _ = _verify("--capture", str(CAPTURES[0].parent / name), "--json")
    assert code == 0
    got = {
        i["instance_id"]: (i["verdict"], i["reasons"], i["fmspc"])
        for i in json.loads(out)["instances"]
    }
    want = {
        iid: ("trusted", [], f)
        if f == "90c06f000000"
        else ("rejected", ["attest_collateral_missing"], f)
        for iid, f in EXPECTED_FMSPC[name].items()
    }
    assert got == want


def test_human_report_and_at() -> None:
    capture = str(CAPTURES[-1])
    code, out, _ = _verify("--capture", capture, "--collateral-dir", str(EXTRA))
    assert code == 0
    assert "2 instances, 2 trusted, 0 rejected" in out
    assert "measurements not pinned" in out
    code, out, _ = _verify(
        "--capture", capture, "--collateral-dir", str(EXTRA), "--at", "2027-01-01T00:00:00Z"
    )
    assert code == 0 and "0 trusted, 2 rejected" in out and "attest_collateral_missing" in out


def test_policy_file(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"measurements": [{"mrtd": "00" * 48}], "gpu": "off"}))
    code, out, _ = _verify(
        "--capture",
        str(CAPTURES[-1]),
        "--collateral-dir",
        str(EXTRA),
        "--policy",
        str(policy),
        "--json",
    )
    assert code == 0
    for inst in json.loads(out)["instances"]:
        assert inst["reasons"] == ["attest_measurement"] and inst["gpus"]["checked"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--at", "yesterday"], "not an ISO 8601 time"),
        (["--at", "2026-05-20T00:00:00"], "time zone"),
        (["--policy", "POLICY"], "unknown policy keys"),
        (["--capture", "EMPTY"], "manifest.json"),
    ],
)
def test_unusable_input_exits_2(tmp_path: Path, args: list[str], message: str) -> None:
    policy = tmp_path / "p.json"
    policy.write_text('{"colour": "blue"}')
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(policy) if a == "POLICY" else str(empty) if a == "EMPTY" else a for a in args]
    if "--capture" not in args:
        args = ["--capture", str(CAPTURES[0]), *args]
    code, _, err = _verify(*args)
    assert code == 2
    assert message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attest-policy", "POLICY"], "unknown policy keys"),
        (["--attest-collateral-dir", "EMPTYMETA"], "not a capture meta file"),
    ],
)
def test_proxy_refuses_an_unusable_attestation_setup(
    tmp_path: Path, args: list[str], message: str
) -> None:
    policy = tmp_path / "p.json"
    policy.write_text('{"colour": "blue"}')
    broken = tmp_path / "collateral"
    broken.mkdir()
    (broken / "x.meta.json").write_text("[]")
    args = [str(policy) if a == "POLICY" else str(broken) if a == "EMPTYMETA" else a for a in args]
    result = CliRunner().invoke(cli, ["proxy", "--port", "0", *args])
    assert result.exit_code == 2
    assert message in result.stderr


def test_instance_tee_without_configfs_answers_503(tmp_path: Path) -> None:
    # Outside a TDX guest the configfs-tsm directory is an ordinary one: no quote appears, and
    # /evidence says so (503) instead of serving anything unbound.
    import httpx2

    from pqe2ee.server import instance
    from pqe2ee.testing import dev_engine
    from servers import run_app

    with run_app(dev_engine.create_app()) as engine:
        config = instance.InstanceConfig(upstream=engine, tee="tdx", tsm_path=str(tmp_path))
        with run_app(instance.create_app(config)) as inst:
            r = httpx2.get(inst + "/evidence", params={"nonce": "ab" * 32}, timeout=10)
    assert r.status_code == 503
    assert r.json() == {"detail": "evidence unavailable"}
