"""Start-up mistakes through the real ``pqe2ee`` binary: each is one line on stderr naming the
option and the value, exit code 2, before anything is served, and no traceback. Also the TOML
configuration file (``--config`` / ``PQE2EE_CONFIG``) and its precedence."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pqe2ee.cli import cli

PQE2EE = [sys.executable, "-m", "pqe2ee.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PQE2EE_")}
    return subprocess.run(
        [*PQE2EE, *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_line(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


INSTANCE = ["instance", "--upstream", "http://127.0.0.1:9"]
RELAY = ["relay", "--instance", "http://127.0.0.1:9", "--no-auth"]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["proxy", "--port", "x"], ["pqe2ee proxy:", "'--port'", "'x'"]),
        (["proxy", "--bogus"], ["pqe2ee proxy:", "--bogus"]),
        (
            ["proxy", "--api-base", "ftp://relay"],
            ["pqe2ee proxy:", "--api-base", "'ftp://relay' is not"],
        ),
        (
            ["relay", "--instance", "nope", "--no-auth"],
            ["pqe2ee relay:", "--instance 'nope' is not"],
        ),
        ([*INSTANCE[:2], "localhost:8000"], ["pqe2ee instance:", "--upstream", "localhost:8000"]),
        ([*RELAY, "--redis", "localhost:6379"], ["--redis localhost:6379", "not a Redis URL"]),
        ([*INSTANCE, "--redis", "localhost:6379"], ["pqe2ee instance:", "--redis localhost"]),
        ([*RELAY, "--redis", "redis://:hunter2@127.0.0.1:1/0"], ["no answer from Redis"]),
        (["dev-engine", "--host", "no-such-host.invalid"], ["--host no-such-host.invalid"]),
    ],
)
def test_start_up_mistakes_are_one_line_and_exit_2(args: list[str], needles: list[str]) -> None:
    line = one_line(run(*args), *needles)
    assert "hunter2" not in line


@pytest.mark.parametrize("command", ["proxy", "relay", "instance", "dev-engine"])
def test_a_busy_port_is_found_before_serving(command: str, busy_port: int) -> None:
    extra = {"relay": RELAY[1:], "instance": INSTANCE[1:]}.get(command, [])
    done = run(command, *extra, "--port", str(busy_port))
    one_line(done, f"pqe2ee {command}:", f"--port {busy_port}", "cannot listen", "in use")


def test_unexpected_failures_are_one_line_unless_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    import pqe2ee.testing.dev_engine

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(pqe2ee.testing.dev_engine, "serve", boom)
    result = CliRunner().invoke(cli, ["dev-engine", "--port", "0"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "pqe2ee dev-engine: RuntimeError: engine exploded (--log-level debug shows where)"
    )
    result = CliRunner().invoke(cli, ["dev-engine", "--port", "0", "--log-level", "debug"])
    assert isinstance(result.exception, RuntimeError)


def test_config_file_fills_options_below_env_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pqe2ee.server.relay as relay_mod

    seen: list[Any] = []
    monkeypatch.setattr(relay_mod, "serve", lambda config, log_level, **_: seen.append(config))
    path = tmp_path / "pqe2ee.toml"
    port = free_port()
    path.write_text(
        "[relay]\n"
        'instance = ["http://10.0.0.5:8002", "http://10.0.0.6:8002"]\n'
        'api-key = ["k1"]\n'
        "rate_limit = 7\n"
        f"port = {port}\n"
        "tee = true\n"
        "[proxy]\n"
        "port = 1\n"
    )
    runner = CliRunner()
    result = runner.invoke(cli, ["relay", "--config", str(path)])
    assert result.exit_code == 0, result.output
    config = seen.pop()
    assert config.instances == ("http://10.0.0.5:8002", "http://10.0.0.6:8002")
    assert (config.api_keys, config.rate_limit, config.port, config.tee) == (("k1",), 7, port, True)
    env = {"PQE2EE_CONFIG": str(path), "PQE2EE_RELAY_RATE_LIMIT": "8"}
    result = runner.invoke(cli, ["relay", "--max-instances", "2"], env=env)
    assert result.exit_code == 0, result.output
    config = seen.pop()
    assert (config.rate_limit, config.max_instances) == (8, 2)
    result = runner.invoke(cli, ["relay", "--config", str(path), "--rate-limit", "9"], env=env)
    assert seen.pop().rate_limit == 9


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[relay\n", "not valid TOML"),
        ("relay = 3\n", "[relay] must be a table"),
        ("[relay]\nwhat = 1\n", "unknown key 'what'"),
        ("[relay]\nrate-limit = 'many'\n", "'--rate-limit'"),
    ],
)
def test_config_file_mistakes_name_the_file(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    line = one_line(run("relay", "--config", str(path)), "pqe2ee relay:", needle)
    if "rate" not in needle:
        assert str(path) in line
    one_line(run("relay", "--config", str(tmp_path / "missing.toml")), "missing.toml")


def test_old_variable_names_still_work_with_a_deprecation_line() -> None:
    done = run("relay", "--instance", "nope", env={"PQE2EE_API_KEYS": "k1,k2"})
    assert "PQE2EE_API_KEYS is deprecated, use PQE2EE_RELAY_API_KEY" in done.stderr
    assert "no API keys" not in done.stderr  # the keys were read
