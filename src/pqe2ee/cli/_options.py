"""What the commands share: option builders, one environment-variable scheme, one exit path.

Every option that takes a value reads ``PQE2EE_<NAME>`` from the environment and shows its
default in ``--help``; the builders below fix those two habits in one place, so a command module
lists only what is its own (name, default, help). A configuration the library refuses
(:class:`~pqe2ee.errors.PQE2EEError`) stops a command with exit code 2 through
:func:`exit_on_error`, the same code click uses for a bad option.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import click

from pqe2ee.errors import PQE2EEError

__all__ = [
    "backend_option",
    "count_option",
    "env_option",
    "exit_on_error",
    "fail",
    "host_option",
    "log_level_option",
    "max_body_option",
    "port_option",
    "pure_python_option",
    "read_timeout_option",
    "seconds_option",
]

F = TypeVar("F", bound=Callable[..., Any])

#: The exit code for a refused configuration (click uses it for usage errors too).
EXIT_CONFIG: int = 2


def env_option(*decls: str, env: str, **kwargs: Any) -> Callable[[F], F]:
    """``click.option`` reading ``PQE2EE_<env>``; a given ``default`` is shown in ``--help``."""
    if "default" in kwargs and not kwargs.get("is_flag"):
        kwargs.setdefault("show_default", True)
    return click.option(*decls, envvar=f"PQE2EE_{env}", **kwargs)


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
    return env_option("--port", env="PORT", default=default, type=int)


host_option = env_option("--host", env="HOST", default="127.0.0.1")
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
    default="info",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
backend_option = env_option(
    "--backend", env="BACKEND", default="auto", help="Crypto backend (see `pqe2ee backends`)."
)


def fail(command: str, message: str) -> NoReturn:
    """Print ``pqe2ee <command>: <message>`` on stderr and exit with :data:`EXIT_CONFIG`."""
    click.echo(f"pqe2ee {command}: {message}", err=True)
    sys.exit(EXIT_CONFIG)


@contextlib.contextmanager
def exit_on_error(command: str) -> Iterator[None]:
    """Turn a :class:`~pqe2ee.errors.PQE2EEError` into :func:`fail` (its message, exit code 2)."""
    try:
        yield
    except PQE2EEError as exc:
        fail(command, exc.message)
