"""TLS for the network-facing servers: ``pqe2ee instance --tls-cert/--tls-key`` (the real
binary) serves HTTPS; the relay reaches it only with ``instance_ca`` (``--instance-ca``) naming
a CA bundle - here the instance's own self-signed certificate, which pins it; mistakes in the
files are one line and exit 2; ``pqe2ee doctor`` names an untrusted certificate."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

import pqe2ee
from pqe2ee.server import relay
from pqe2ee.testing import dev_engine
from relay_support import KEY_A
from servers import run_app
from test_transport_anyio import _self_signed

PQE2EE = [sys.executable, "-m", "pqe2ee.cli"]


def self_signed(directory: Path, name: str = "server") -> tuple[str, str]:
    """A throwaway certificate for 127.0.0.1 in its own folder (cert file, key file)."""
    folder = directory / name
    folder.mkdir()
    cert, key = _self_signed(folder)
    key.chmod(0o600)
    return str(cert), str(key)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def tls_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(https URL of a real `pqe2ee instance --tls-cert ...`, its certificate)."""
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    with run_app(dev_engine.create_app()) as engine:
        port = free_port()
        proc = subprocess.Popen(
            [*PQE2EE, "instance", "--upstream", engine, "--port", str(port),
             "--tls-cert", cert, "--tls-key", key, "--log-level", "warning"],
            env={k: v for k, v in os.environ.items() if not k.startswith("PQE2EE_")},
        )  # fmt: skip
        url = f"https://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, "instance exited"
                try:
                    if (
                        httpx2.get(
                            url + "/health",
                            verify=ssl.create_default_context(cafile=cert),
                            timeout=2,
                        ).status_code
                        == 200
                    ):
                        break
                except httpx2.HTTPError:
                    assert time.monotonic() < deadline, "instance did not start"
                    time.sleep(0.2)
            yield url, cert
        finally:
            proc.terminate()
            proc.wait(timeout=15)


def test_instance_serves_https_and_not_plain_http(tls_instance: tuple[str, str]) -> None:
    url, cert = tls_instance
    assert (
        httpx2.get(
            url + "/e2e/info", verify=ssl.create_default_context(cafile=cert), timeout=5
        ).status_code
        == 200
    )
    with pytest.raises(httpx2.HTTPError):
        httpx2.get(url.replace("https://", "http://") + "/health", timeout=5)
    with pytest.raises(httpx2.ConnectError):  # not trusted by the system store
        httpx2.get(url + "/health", timeout=5)


def test_relay_reaches_a_tls_instance_only_with_its_ca(tls_instance: tuple[str, str]) -> None:
    url, cert = tls_instance
    pinned = relay.RelayConfig(instances=(url,), api_keys=(KEY_A,), instance_ca=cert)
    with run_app(relay.create_app(pinned)) as relay_url:
        assert httpx2.get(relay_url + "/ready", timeout=10).status_code == 200
        transport = pqe2ee.E2EETransport(api_key=KEY_A, api_base=relay_url, models_base=relay_url)
        with httpx2.Client(transport=transport, base_url=relay_url, timeout=30) as client:
            body = {"model": "dev-echo", "messages": [{"role": "user", "content": "over TLS"}]}
            reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "Echo: over TLS"
    system_store = relay.RelayConfig(instances=(url,), api_keys=(KEY_A,), startup_wait=0)
    with run_app(relay.create_app(system_store)) as relay_url:
        ready = httpx2.get(relay_url + "/ready", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["checks"][url] == {"ok": False, "reason": "ConnectError"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PQE2EE_")}
    return subprocess.run(
        [*PQE2EE, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_tls_file_mistakes_are_one_line_exit_2(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "a")
    other_cert, _ = self_signed(tmp_path, "b")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    instance = ["instance", "--upstream", "http://127.0.0.1:9"]
    relay_args = ["relay", "--instance", "https://127.0.0.1:9", "--no-auth"]
    cases = [
        ([*instance, "--tls-cert", cert], "--tls-cert and --tls-key go together"),
        ([*instance, "--tls-cert", other_cert, "--tls-key", key], "not a matching PEM pair"),
        ([*relay_args, "--tls-cert", str(tmp_path / "none.crt"), "--tls-key", key], "No such file"),
        ([*relay_args, "--instance-ca", str(garbage)], "--instance-ca"),
    ]
    for args, needle in cases:
        done = run(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_doctor_names_an_untrusted_certificate(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pqe2ee.cli import cli

    cert, key = self_signed(tmp_path)
    app = relay.create_app(relay.RelayConfig(instances=("http://127.0.0.1:9",), no_auth=True))
    with run_app(app, ssl_certfile=cert, ssl_keyfile=key, startup_timeout=20) as url:
        https = url.replace("http://", "https://")
        result = CliRunner().invoke(
            cli, ["doctor", "--skip-backends", "--api-base", https, "--models-base", https]
        )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if " tls " in f" {line} "]
    assert any(
        line.startswith("FAIL  relay tls") and "TLS certificate refused" in line for line in lines
    ), result.output
