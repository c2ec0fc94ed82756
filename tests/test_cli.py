"""The ``pqe2ee`` command line as a whole: its commands, the option conventions they share
(``PQE2EE_*`` environment variables, defaults shown in ``--help``), and the exit code 2 for a
refused configuration. Per-command behaviour is tested beside the server it starts
(test_instance.py, test_relay.py, test_proxy.py, test_v2_*.py)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import click
import pytest
from click.testing import CliRunner

from pqe2ee import cli as cli_package
from pqe2ee.cli import cli, main

COMMANDS = ["backends", "dev-engine", "instance", "proxy", "relay"]
# Options that deliberately read no PQE2EE_<NAME> variable: keys come from PQE2EE_API_KEYS (a
# list) in the relay, and --no-auth must be typed.
NO_ENV = {("relay", "api_keys"), ("relay", "no_auth")}


def _options() -> list[tuple[str, click.Option]]:
    return [
        (name, param)
        for name, command in sorted(cli.commands.items())
        for param in command.params
        if isinstance(param, click.Option) and param.name != "help"
    ]


def test_every_command_is_registered_and_listed_in_the_group_help() -> None:
    assert sorted(cli.commands) == COMMANDS
    text = CliRunner().invoke(cli, ["--help"]).output
    for name in COMMANDS:
        assert f"\n  {name}" in text
        assert CliRunner().invoke(cli, [name, "-h"]).exit_code == 0


@pytest.mark.parametrize(("command", "option"), _options(), ids=lambda v: getattr(v, "name", v))
def test_option_conventions(command: str, option: click.Option) -> None:
    if (command, option.name) in NO_ENV:
        assert option.envvar is None
        return
    flag = option.opts[0].lstrip("-").replace("-", "_").upper()
    assert option.envvar == f"PQE2EE_{flag}" or option.envvar in {
        "PQE2EE_ALLOW_PATHS",
        "PQE2EE_INSTANCES",
        "PQE2EE_PROXY_ALLOW_HOSTS",  # lists, named for the proxy (issue 16)
        "PQE2EE_PROXY_ALLOW_ORIGINS",
        "PQE2EE_REDIS_URL",
        "PQE2EE_REPLAY_REDIS_URL",
    }
    if not option.is_flag and isinstance(option.default, (int, float, str)):
        assert option.show_default, option.name


def test_environment_variable_reaches_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def serve(host: str, port: int, *, log_level: str) -> None:
        seen.update(host=host, port=port, log_level=log_level)

    import pqe2ee.testing.dev_engine

    monkeypatch.setattr(pqe2ee.testing.dev_engine, "serve", serve)
    env = {"PQE2EE_PORT": "9123", "PQE2EE_LOG_LEVEL": "debug"}
    result = CliRunner().invoke(cli, ["dev-engine"], env=env)
    assert result.exit_code == 0, result.output
    assert seen == {"host": "127.0.0.1", "port": 9123, "log_level": "debug"}


def test_refused_configuration_exits_2_with_the_command_name() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["relay"], env={"PQE2EE_API_KEYS": "k"})
    assert result.exit_code == 2
    assert "pqe2ee relay: give at least one --instance URL" in result.output
    result = runner.invoke(cli, ["proxy", "--api-base", "ftp://nowhere"])
    assert result.exit_code == 2
    assert result.output.startswith("pqe2ee proxy: ")
    assert "Traceback" not in result.output


def test_main_and_module_entry_points() -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    done = subprocess.run(
        [sys.executable, "-m", "pqe2ee.cli", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and "pqe2ee, version" in done.stdout
    assert cli_package.__all__ == ["cli", "main"]


def test_main_without_click(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli_package, "click", None)
    assert main(["--help"]) == 2
    assert "pip install 'pqe2ee[server,proxy]'" in capsys.readouterr().err


def test_backends_lists_every_backend_with_what_works_and_why_not() -> None:
    from pqe2ee.backends import BACKENDS, unavailable

    result = CliRunner().invoke(cli, ["backends"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == list(BACKENDS)
    for name, line in zip(BACKENDS, lines, strict=False):
        why = unavailable(name)
        if why is None:
            assert line.split(None, 1)[1].startswith("available (ML-KEM-768")
        else:  # the reason enum's words, then the message
            assert f"unavailable: {why.reason.value}: {why.message}" in line
    assert lines[-1].startswith("auto KEM: ") and "auto X-Wing: " in lines[-1]
