"""``pqe2ee doctor`` against a real loopback stack (dev-engine -> instance -> relay) and broken
variants of it: each mistake is named on a FAIL or WARN line, and the exit code follows the
worst line (0 pass, 1 warn, 2 fail)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pqe2ee.cli import cli
from relay_support import KEY_A, serve_stack


@pytest.fixture(scope="module")
def relay() -> Iterator[str]:
    with serve_stack(1, api_keys=(KEY_A,), rate_limit=1000) as st:
        yield st.relay


@pytest.fixture(scope="module")
def v1_relay() -> Iterator[str]:
    with serve_stack(1, api_keys=(KEY_A,), rate_limit=1000, instance_kw={"v2": False}) as st:
        yield st.relay


@pytest.fixture(scope="module")
def tee_relay() -> Iterator[str]:
    """A relay over one instance whose quotes the test-only signer makes (GET /evidence)."""
    from attest_stack import serve_tee_stack

    with serve_tee_stack(api_keys=(KEY_A,), rate_limit=1000) as st:
        yield st.relay


def without_dcap_qvl(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without the [attest] extra: ``import dcap_qvl`` raises ImportError."""
    monkeypatch.setitem(sys.modules, "dcap_qvl", None)


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def doctor(relay: str, *args: str, models: str | None = None, key: str | None = KEY_A) -> Any:
    argv = ["doctor", "--skip-backends", "--json", "--api-base", relay, "--timeout", "5"]
    if "--port" not in args:
        argv += ["--port", "0"]
    argv += ["--models-base", models or relay, *args]
    if key is not None:
        argv += ["--api-key", key]
    result = CliRunner().invoke(cli, argv, env={"PQE2EE_PROXY_API_KEY": ""})
    doc = json.loads(result.stdout)
    lines = {c["name"]: (c["status"], c["detail"]) for c in doc["checks"]}
    return result.exit_code, doc["worst"], lines


def test_a_healthy_stack_passes(relay: str) -> None:
    code, worst, lines = doctor(relay)
    assert (code, worst) == (0, "PASS"), lines
    assert lines["relay key"] == ("PASS", f"{relay} accepted the API key")
    assert lines["discovery"][0] == "PASS" and "1 instances" in lines["discovery"][1]
    assert lines["v2"] == ("PASS", "1 of 1 instances offer profile v2")
    assert lines["attestation"][0] == "PASS" and "dcap-qvl" in lines["attestation"][1]
    assert lines["evidence"] == (
        "INFO",
        "'dev-echo': the relay serves no TEE evidence (404): its instances are not attested "
        "(the proxy's --attest auto sends to them with a warning; require refuses)",
    )
    assert lines["models"][0] == "PASS"
    assert KEY_A not in json.dumps(lines)


def test_a_relay_serving_evidence_passes(tee_relay: str) -> None:
    code, worst, lines = doctor(tee_relay)
    assert (code, worst) == (0, "PASS"), lines
    assert lines["evidence"] == (
        "PASS",
        "'dev-echo': evidence for 1 of 1 discovered instances; not verified here "
        "(the proxy verifies each instance before sending)",
    )


def test_attestation_unavailable_without_dcap_qvl(
    relay: str, tee_relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_dcap_qvl(monkeypatch)
    code, worst, lines = doctor(relay)
    assert (code, worst) == (1, "WARN"), lines
    status, detail = lines["attestation"]
    assert status == "WARN" and "pip install 'pqe2ee[attest]'" in detail
    assert lines["evidence"][0] == "INFO"  # that chute serves none: nothing to verify
    # a chute that serves evidence cannot be called at all without it: a failure
    code, worst, lines = doctor(tee_relay)
    assert (code, worst) == (2, "FAIL"), lines
    status, detail = lines["evidence"]
    assert status == "FAIL" and detail.endswith(
        "but dcap-qvl is missing: calls fail with attest_unavailable"
    )


def test_attestation_without_a_key_is_only_the_local_check(
    relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, lines = doctor(relay, key=None)
    assert lines["attestation"][0] == "PASS" and "evidence" not in lines
    without_dcap_qvl(monkeypatch)
    _, _, lines = doctor(relay, key=None)
    assert lines["attestation"][0] == "WARN" and "evidence" not in lines


def test_a_wrong_key_is_named(relay: str) -> None:
    code, worst, lines = doctor(relay, key="not-the-key")
    assert (code, worst) == (2, "FAIL")
    assert lines["relay key"] == ("FAIL", f"{relay} refused the API key (401)")
    assert "not-the-key" not in json.dumps(lines)


def test_a_dead_relay_is_named(relay: str) -> None:
    dead = dead_url()
    code, _, lines = doctor(dead, models=relay)
    assert code == 2
    assert lines["relay"][0] == "FAIL" and f"cannot reach {dead}/" in lines["relay"][1]
    assert lines["models"][0] == "PASS"


def test_a_dead_models_host_is_named(relay: str) -> None:
    dead = dead_url()
    code, _, lines = doctor(relay, models=dead)
    assert code == 2
    assert lines["models"][0] == "FAIL" and f"cannot reach {dead}/v1/models" in lines["models"][1]


def test_an_unknown_model_is_named(relay: str) -> None:
    code, _, lines = doctor(relay, "--model", "no/such-model")
    assert code == 2 and lines["models"] == ("FAIL", "no model 'no/such-model' listed")


def test_no_key_warns(relay: str) -> None:
    code, worst, lines = doctor(relay, key=None)
    assert (code, worst) == (1, "WARN")
    assert lines["relay key"][0] == "WARN" and "PQE2EE_PROXY_API_KEY" in lines["relay key"][1]


def test_v1_only_instances_warn(v1_relay: str) -> None:
    code, _, lines = doctor(v1_relay)
    assert code == 1
    assert lines["v2"][0] == "WARN" and lines["v2"][1].startswith("0 of 1 instances")


def test_redis_is_checked_when_given(relay: str, tmp_path: Path) -> None:
    from test_relay_redis import redis_server

    code, _, lines = doctor(relay, "--redis", "localhost:6379")
    assert code == 2 and "not a Redis URL" in lines["redis"][1]
    code, _, lines = doctor(relay, "--redis", "redis://:secret@127.0.0.1:1/0")
    assert code == 2 and lines["redis"][0] == "FAIL" and "secret" not in lines["redis"][1]
    with redis_server(tmp_path) as url:
        code, _, lines = doctor(relay, "--redis", url)
    assert code == 0 and lines["redis"] == ("PASS", f"{url}: answers PING")


def test_plain_text_output_and_backends_through_the_binary(relay: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pqe2ee.cli", "doctor", "--api-base", relay,
         "--models-base", relay, "--api-key", KEY_A],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("PASS  python")
    assert any(
        line.startswith("PASS  backend pyca") and "µs per ML-KEM-768" in line for line in lines
    )
    assert any(line.startswith("PASS  backend auto") for line in lines)
    assert all(line.split()[0] in {"PASS", "INFO"} for line in lines), done.stdout


def test_a_bad_url_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["doctor", "--api-base", "api.chutes.ai"])
    assert result.exit_code == 2
    assert "'api.chutes.ai' is not an http:// or https:// URL" in result.stderr


def test_the_proxy_port_busy_free_or_already_a_proxy(relay: str) -> None:
    from pqe2ee.proxy.app import ProxyConfig, create_app
    from servers import run_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = str(sock.getsockname()[1])
        code, _, lines = doctor(relay, "--port", busy)
    assert code == 2
    assert lines["proxy port"] == (
        "FAIL",
        f"--port {busy}: cannot listen on 127.0.0.1:{busy} (Address already in use): "
        "another program holds it",
    )
    code, _, lines = doctor(relay, "--port", busy)  # released
    assert code == 0 and lines["proxy port"][0] == "PASS"
    with run_app(create_app(ProxyConfig(api_base=relay, models_base=relay))) as url:
        port = url.rsplit(":", 1)[1]
        code, _, lines = doctor(relay, "--port", port)
    assert code == 0
    assert lines["proxy port"] == (
        "INFO",
        f"a pqe2ee server already answers on 127.0.0.1:{port} (ready)",
    )
