"""The ``pqe2ee`` command line as a whole: its commands, the option conventions they share
(``PQE2EE_*`` environment variables, defaults shown in ``--help``), and the exit code 2 for a
refused configuration. Per-command behaviour is tested beside the server it starts
(test_instance.py, test_relay.py, test_proxy.py, test_v2_*.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from pqe2ee import cli as cli_package
from pqe2ee.cli import cli, main

COMMANDS = [
    "attest",
    "backends",
    "conformance",
    "dev-engine",
    "doctor",
    "instance",
    "proxy",
    "relay",
]
# Options that deliberately read no environment variable: --no-auth must be typed.
NO_ENV = {("relay", "no_auth")}
# Settings meant to be shared by every command: PQE2EE_<NAME> after the command's own name.
SHARED = {"log_level", "log_format", "backend"}


def _options() -> list[tuple[str, click.Option]]:
    return [
        (name, param)
        for name, command in sorted(cli.commands.items())
        for param in command.params
        if isinstance(param, click.Option) and param.name not in ("help", "config")
    ]


def test_every_command_is_registered_and_listed_in_the_group_help() -> None:
    assert sorted(cli.commands) == COMMANDS
    text = CliRunner().invoke(cli, ["--help"]).output
    for name in COMMANDS:
        assert f"\n  {name}" in text
        assert CliRunner().invoke(cli, [name, "-h"]).exit_code == 0


@pytest.mark.parametrize(("command", "option"), _options(), ids=lambda v: getattr(v, "name", v))
def test_option_conventions(command: str, option: click.Option) -> None:
    """Each option reads PQE2EE_<COMMAND>_<FLAG> (plural for lists; the doctor reads the
    proxy's), shows it in --help, and shows its default."""
    if (command, option.name) in NO_ENV:
        assert option.envvar is None
        return
    scope = getattr(option, "scope", None) or command
    prefix = "PQE2EE_" + scope.upper().replace("-", "_") + "_"
    flag = option.opts[0].lstrip("-").replace("-", "_").upper()
    own = [prefix + flag, prefix + flag + "S"]
    if option.name in SHARED:
        assert option.envvar in ([own[0], "PQE2EE_" + flag],)
    elif option.name == "redis_url":
        assert option.envvar == prefix + "REDIS"
    else:
        assert option.envvar in own
    assert option.show_envvar
    if not option.is_flag and isinstance(option.default, (int, float, str)):
        assert option.show_default, option.name
    help_text = " ".join(CliRunner().invoke(cli, [command, "--help"]).output.split())
    envvar = option.envvar[0] if isinstance(option.envvar, list) else option.envvar
    assert f"env var: {envvar}" in help_text


def test_environment_variables_are_per_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """PQE2EE_DEV_ENGINE_PORT moves the dev-engine only; the shared PQE2EE_LOG_LEVEL reaches
    it; the old shared PQE2EE_PORT still works, with a deprecation line."""
    seen: list[dict[str, Any]] = []

    def serve(
        host: str,
        port: int,
        *,
        log_level: str,
        max_model_len: int,
        reasoning_field: str,
        delay: float,
    ) -> None:
        seen.append(
            {
                "host": host,
                "port": port,
                "log_level": log_level,
                "max_model_len": max_model_len,
                "delay": delay,
            }
        )

    import pqe2ee.testing.dev_engine

    monkeypatch.setattr(pqe2ee.testing.dev_engine, "serve", serve)
    runner = CliRunner()
    env = {"PQE2EE_DEV_ENGINE_PORT": "0", "PQE2EE_LOG_LEVEL": "debug", "PQE2EE_PROXY_PORT": "1"}
    result = runner.invoke(cli, ["dev-engine"], env=env)
    assert result.exit_code == 0, result.output
    assert seen.pop() == {
        "host": "127.0.0.1",
        "port": 0,
        "log_level": "debug",
        "max_model_len": 32768,
        "delay": 0.0,
    }
    result = runner.invoke(cli, ["dev-engine"], env={"PQE2EE_DEV_ENGINE_MAX_MODEL_LEN": "99"})
    assert result.exit_code == 0, result.output
    assert seen.pop()["max_model_len"] == 99
    result = runner.invoke(cli, ["dev-engine", "--delay", "0.002"])
    assert result.exit_code == 0, result.output
    assert seen.pop()["delay"] == 0.002
    result = runner.invoke(cli, ["dev-engine", "--delay", "-1"])
    assert result.exit_code != 0 and "--delay" in result.output
    env = {"PQE2EE_DEV_ENGINE_LOG_LEVEL": "warning", "PQE2EE_LOG_LEVEL": "debug"}
    result = runner.invoke(cli, ["dev-engine", "--port", "0"], env=env)
    assert seen.pop()["log_level"] == "warning"
    result = runner.invoke(cli, ["dev-engine"], env={"PQE2EE_PORT": "0"})
    assert result.exit_code == 0, result.output
    assert seen.pop()["port"] == 0
    assert "pqe2ee dev-engine: PQE2EE_PORT is deprecated, use PQE2EE_DEV_ENGINE_PORT" in (
        result.stderr
    )


def test_refused_configuration_exits_2_with_the_command_name() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["relay"], env={"PQE2EE_RELAY_API_KEY": "k"})
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


def test_backends_names_the_library_and_version_each_backend_loaded() -> None:
    from importlib import metadata

    from pqe2ee.backends import BACKENDS, unavailable

    lines = CliRunner().invoke(cli, ["backends"]).output.splitlines()
    expected = {
        "pyca": f"via cryptography {metadata.version('cryptography')} (OpenSSL ",
        "pycryptodome": f"via pycryptodome {metadata.version('pycryptodome')}",
        "pqcrypto": f"via pqcrypto {metadata.version('pqcrypto')}",
        "liboqs": f"(liboqs-python {metadata.version('liboqs-python')})",
    }
    for name, line in zip(BACKENDS, lines, strict=False):
        if unavailable(name) is not None:
            assert " via " not in line
            continue
        assert expected[name] in line
        if name == "liboqs":  # the C library's own version and the file it came from
            from pqe2ee.backends.liboqs import liboqs_path, liboqs_version

            assert f"via liboqs {liboqs_version()} at {liboqs_path()} " in line
            assert re.fullmatch(r"\d+\.\d+\.\d+.*", liboqs_version())
            path = Path(liboqs_path())  # a bare soname when the system loader found it
            assert path.is_file() or not path.is_absolute()


def test_readme_configuration_table_matches_the_commands() -> None:
    """README.md holds exactly the table scripts/gen_cli_table.py makes from the commands."""
    from pathlib import Path

    from pqe2ee.cli._table import BEGIN, END, markdown

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    assert readme[start:end] == markdown(cli), "run: python scripts/gen_cli_table.py"
    for name, command in cli.commands.items():
        if any(isinstance(p, click.Option) and p.name != "help" for p in command.params):
            assert f"`pqe2ee {name}`" in readme[start:end]


@pytest.mark.parametrize("unit", ["pqe2ee-instance.service", "pqe2ee-relay.service"])
def test_systemd_examples_use_only_real_flags_and_variables(unit: str) -> None:
    """examples/systemd/*.service: the ExecStart line parses with the command's own options,
    and every PQE2EE_ variable it sets is one the command reads."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "examples" / "systemd" / unit).read_text()
    joined = text.replace("\\\n", " ")
    exec_line = next(line for line in joined.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_line.split("=", 1)[1])
    assert argv[0].endswith("/pqe2ee")
    command = cli.commands[argv[1]]
    ctx = command.make_context(argv[1], argv[2:], resilient_parsing=False)
    assert ctx.params  # parsed: every flag exists and every value converts
    known = {
        name
        for param in command.params
        if isinstance(param, click.Option) and param.envvar
        for name in ([param.envvar] if isinstance(param.envvar, str) else param.envvar)
    }
    for word in joined.split():
        if word.startswith("Environment=PQE2EE_"):
            assert word.split("=")[1] in known, word
