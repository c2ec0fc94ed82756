"""What the commands share: option builders, one environment-variable scheme, one exit path.

Every option that takes a value reads an environment variable named after its command,
``PQE2EE_<COMMAND>_<NAME>`` (``PQE2EE_PROXY_PORT``, ``PQE2EE_RELAY_PORT``), so setting one
command's port never moves another. Only settings meant to be shared fall back to one name
for every command: ``PQE2EE_LOG_LEVEL``, ``PQE2EE_LOG_FORMAT``, ``PQE2EE_BACKEND`` and
``PQE2EE_CONFIG`` (the TOML file, one ``[command]`` table each). The names of the first
release (``PQE2EE_PORT``, ``PQE2EE_API_KEYS``, ...) are still read, with a deprecation line.
``--help`` shows each option's variable and default.

Option modules declare options with :func:`env_option` and the builders below, and the command
itself with :func:`command`, which names the variables after the command. A configuration the
library refuses (:class:`~pqe2ee.errors.PQE2EEError`) stops a command with exit code 2 through
:func:`exit_on_error`, the same code a bad option gets.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TypeVar

import click

from pqe2ee.errors import PQE2EEError

__all__ = [
    "URL",
    "EnvOption",
    "OneLineErrors",
    "backend_option",
    "command",
    "count_option",
    "env_option",
    "exit_on_error",
    "fail",
    "file_option",
    "host_option",
    "log_format_option",
    "log_level_option",
    "max_body_option",
    "port_option",
    "pure_python_option",
    "quiet_client_logs",
    "read_timeout_option",
    "seconds_option",
    "split_list",
    "tls_options",
    "upstream_options",
    "url_problem",
]

F = TypeVar("F", bound=Callable[..., Any])

#: The exit code for a refused configuration (click uses it for usage errors too).
EXIT_CONFIG: int = 2
#: Exit code of an unexpected failure (its traceback only with ``--log-level debug``).
EXIT_CRASH: int = 1
ENV_PREFIX = "PQE2EE_"


def env_prefix(command_name: str) -> str:
    """``dev-engine`` -> ``PQE2EE_DEV_ENGINE_``."""
    return f"{ENV_PREFIX}{command_name.upper().replace('-', '_')}_"


class EnvOption(click.Option):
    """A ``click.Option`` whose environment variable :func:`command` names after its command.

    ``env`` is the name's tail; ``shared`` adds the command-independent ``PQE2EE_<env>`` as a
    fallback (settings meant to be shared); ``scope`` names another command's variables (the
    doctor reads the proxy's); ``legacy`` are old names still read, each with a deprecation
    line on stderr (default: ``PQE2EE_<env>``, the first release's shared name).
    """

    def __init__(
        self,
        *decls: Any,
        env: str,
        shared: bool = False,
        scope: str | None = None,
        legacy: tuple[str, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("show_envvar", True)
        super().__init__(*decls, **kwargs)
        self.env = env
        self.shared = shared
        self.scope = scope
        self.legacy: tuple[str, ...] = (
            legacy if legacy is not None else () if shared else (shared_env(env),)
        )

    def name_envvars(self, command_name: str) -> None:
        own = env_prefix(self.scope or command_name) + self.env
        self.envvar = [own, shared_env(self.env)] if self.shared else own

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        value = super().resolve_envvar_value(ctx)
        if value is not None:
            return value
        for old in self.legacy:
            if os.environ.get(old):
                current = self.envvar[0] if isinstance(self.envvar, list) else self.envvar
                click.echo(f"pqe2ee {ctx.info_name}: {old} is deprecated, use {current}", err=True)
                return os.environ[old]
        return None


def shared_env(tail: str) -> str:
    """The command-independent name, ``PQE2EE_<tail>``."""
    return ENV_PREFIX + tail


def env_option(*decls: str, env: str, **kwargs: Any) -> Callable[[F], F]:
    """``click.option`` reading ``PQE2EE_<COMMAND>_<env>`` (see :class:`EnvOption`); a given
    ``default`` is shown in ``--help``."""
    if "default" in kwargs and not kwargs.get("is_flag"):
        kwargs.setdefault("show_default", True)
    return click.option(*decls, cls=EnvOption, env=env, **kwargs)


def command(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:
    """``click.command(name)`` that names every :class:`EnvOption`'s variables after ``name``
    and adds ``--config FILE`` (a TOML file, ``[name]`` table; see :mod:`pqe2ee.cli._config`)."""
    from pqe2ee.cli._config import config_option

    def decorate(f: Callable[..., Any]) -> click.Command:
        make: Callable[[Callable[..., Any]], click.Command] = click.command(name, **kwargs)
        cmd = make(config_option(f))
        for param in cmd.params:
            if isinstance(param, EnvOption):
                param.name_envvars(name)
        return cmd

    return decorate


def count_option(
    flag: str, default: int, env: str, help: str, *, max: int | None = None
) -> Callable[[F], F]:
    """A positive integer (counts, sizes, limits)."""
    return env_option(
        flag, env=env, default=default, type=click.IntRange(min=1, max=max), help=help
    )


def seconds_option(
    flag: str,
    default: float,
    env: str,
    help: str,
    *,
    min: float = 0,
    max: float | None = None,
    name: str | None = None,
) -> Callable[[F], F]:
    """A duration in seconds; strictly positive unless ``min`` is given. ``name`` renames the
    parameter (to the configuration field it fills)."""
    kind = (
        click.FloatRange(min=0, min_open=True)
        if min == 0 and max is None
        else click.FloatRange(min=min, max=max)
    )
    decls = (flag,) if name is None else (flag, name)
    return env_option(*decls, env=env, default=default, type=kind, help=help)


def max_body_option(default: int, what: str) -> Callable[[F], F]:
    """``--max-body``: the largest ``what`` accepted, in bytes."""
    return count_option(
        "--max-body", default, "MAX_BODY", f"Largest {what} in bytes (larger: 413)."
    )


def read_timeout_option(default: float, help: str, *, name: str | None = None) -> Callable[[F], F]:
    return seconds_option("--read-timeout", default, "READ_TIMEOUT", help, name=name)


def port_option(default: int) -> Callable[[F], F]:
    return env_option(
        "--port",
        env="PORT",
        default=default,
        type=click.IntRange(0, 65535),
        help="TCP port to listen on (0: any free port).",
    )


host_option = env_option(
    "--host",
    env="HOST",
    default="127.0.0.1",
    help="Address to listen on (keep it on loopback unless a firewall or TLS stands in front).",
)
pure_python_option = env_option(
    "--pure-python",
    env="PURE_PYTHON",
    is_flag=True,
    default=False,
    help="Serve on asyncio + h11 instead of uvloop + httptools (installed by the extras).",
)
log_level_option = env_option(
    "--log-level",
    env="LOG_LEVEL",
    shared=True,
    default="info",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    help="Least severe log line written; debug also shows tracebacks of start-up failures.",
)
log_format_option = env_option(
    "--log-format",
    env="LOG_FORMAT",
    shared=True,
    default="text",
    type=click.Choice(["text", "json"]),
    help="text: one line per event; json: one JSON object per line (time, level, logger, "
    "message). uvicorn's lines included.",
)
backend_option = env_option(
    "--backend",
    env="BACKEND",
    shared=True,
    default="auto",
    help="Crypto backend (see `pqe2ee backends`).",
)


def url_problem(value: str) -> str | None:
    """Why ``value`` is no http(s) base URL with a host, or None."""
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https"):
        return "is not an http:// or https:// URL"
    if not parts.hostname:
        return "has no host"
    return None


class HttpUrl(click.ParamType[str]):
    """An ``http://`` or ``https://`` URL with a host (refused naming the value)."""

    name = "url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        problem = url_problem(str(value))
        if problem is not None:
            self.fail(f"{value!r} {problem}", param, ctx)
        return str(value)


URL = HttpUrl()


class OneLineErrors(click.Group):
    """A group whose usage errors (bad flag, bad value) are one line on stderr and exit code 2:
    ``pqe2ee proxy: Invalid value for '--port': 'x' is not a valid integer range. (see
    pqe2ee proxy --help)`` instead of click's usage block."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        run = functools.partial(super().main, args, prog_name, complete_var, **extra)
        if not standalone_mode:
            return run(standalone_mode=False)
        try:
            rv: Any = run(standalone_mode=False)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(EXIT_CONFIG)
        except click.ClickException as exc:
            ctx = exc.ctx if isinstance(exc, click.UsageError) else None
            where = f"pqe2ee {ctx.info_name}" if ctx is not None and ctx.parent else "pqe2ee"
            message = " ".join(exc.format_message().split())
            click.echo(f"{where}: {message} (see {where} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def quiet_client_logs(log_level: str) -> None:
    """Below debug, httpx2's line per outgoing request (each health probe of an instance, each
    engine call) is dropped: the servers log what matters themselves, once."""
    if log_level != "debug":
        logging.getLogger("httpx2").setLevel(logging.WARNING)


def split_list(values: tuple[str, ...]) -> tuple[str, ...]:
    """Repeated values, each possibly a comma- or space-separated list (from the environment)."""
    return tuple(v for item in values for v in item.replace(",", " ").split() if v)


def file_option(flag: str, env: str, help: str) -> Callable[[F], F]:
    """A path to an existing-or-not file (checked by the command), new in this release."""
    return env_option(
        flag, env=env, legacy=(), type=click.Path(dir_okay=False), metavar="FILE", help=help
    )


def tls_options(f: F) -> F:
    """``--tls-cert`` / ``--tls-key``: serve HTTPS with this PEM certificate (chain) and key."""
    f = file_option("--tls-key", "TLS_KEY", "PEM private key for --tls-cert (keep it 0600).")(f)
    return file_option(
        "--tls-cert",
        "TLS_CERT",
        "Serve HTTPS with this PEM certificate (chain). Default: plain HTTP.",
    )(f)


def upstream_options(scope: str | None, what: str) -> Callable[[F], F]:
    """The proxy's ``--api-base``, ``--models-base`` and ``--api-key`` (``scope="proxy"``:
    another command reading the proxy's variables); ``what`` ends the key's help."""

    def decorate(f: F) -> F:
        f = env_option("--api-key", env="API_KEY", scope=scope, metavar="KEY", help=f"Key {what}.")(
            f
        )
        urls = (
            ("--models-base", "MODELS_BASE", "https://llm.chutes.ai",
             "Where the model list is read (plaintext GET /v1/models)."),
            ("--api-base", "API_BASE", "https://api.chutes.ai",
             "Relay (control plane) for discovery and encrypted invocations."),
        )  # fmt: skip
        for flag, env, default, help in urls:
            f = env_option(
                flag, env=env, scope=scope, default=default, metavar="URL", type=URL, help=help
            )(f)
        return f

    return decorate


def fail(command: str, message: str) -> NoReturn:
    """Print ``pqe2ee <command>: <message>`` on stderr and exit with :data:`EXIT_CONFIG`."""
    click.echo(f"pqe2ee {command}: {message}", err=True)
    sys.exit(EXIT_CONFIG)


@contextlib.contextmanager
def exit_on_error(command: str, log_level: str = "info") -> Iterator[None]:
    """Turn a :class:`~pqe2ee.errors.PQE2EEError` into :func:`fail` (its message, exit code 2),
    and any other exception into one line and exit code 1 - its traceback only at
    ``log_level`` debug."""
    try:
        yield
    except PQE2EEError as exc:
        fail(command, exc.message)
    except (KeyboardInterrupt, SystemExit, click.exceptions.Exit, click.ClickException):
        raise
    except Exception as exc:
        if log_level == "debug":
            raise
        click.echo(
            f"pqe2ee {command}: {type(exc).__name__}: {exc} (--log-level debug shows where)",
            err=True,
        )
        sys.exit(EXIT_CRASH)
