"""``--config FILE``: the same settings as the flags, from a TOML file.

One table per command, keys spelled as the long flags without dashes in front::

    [proxy]
    port = 8787
    api-base = "https://api.chutes.ai"

    [relay]
    instance = ["http://10.0.0.5:8002", "http://10.0.0.6:8002"]
    redis = "redis://127.0.0.1:6379/0"

A flag on the command line wins over the environment, which wins over the file, which wins
over the default. A missing file, invalid TOML, an unknown key or a table that is not one
is refused with exit code 2 naming the file (and the key). ``pqe2ee <command> --help`` lists
the keys; boolean pairs (``--v2/--no-v2``) take ``true``/``false`` under the first name.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

__all__ = ["config_keys", "config_option", "load_config"]

F = TypeVar("F", bound=Callable[..., Any])


def config_keys(command: click.Command) -> dict[str, str]:
    """``{key in the file: parameter name}`` for every option of ``command`` but ``--config``."""
    keys: dict[str, str] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in (None, "help", "config"):
            continue
        long = [o for o in param.opts if o.startswith("--")]
        if long:
            keys[long[0][2:]] = param.name
    return keys


def load_config(path: Path, command: click.Command) -> dict[str, Any]:
    """The ``[command]`` table of ``path`` as click default-map entries; raises
    :class:`click.BadParameter` naming the file, and the key, for anything refused."""
    name = command.name or ""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise click.BadParameter(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path}: not valid TOML ({exc})") from None
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise click.BadParameter(f"{path}: [{name}] must be a table")
    keys = config_keys(command)
    defaults: dict[str, Any] = {}
    for key, value in table.items():
        param = keys.get(key.replace("_", "-"))
        if param is None:
            raise click.BadParameter(
                f"{path}: [{name}] has an unknown key {key!r} (known: {', '.join(sorted(keys))})"
            )
        defaults[param] = value
    return defaults


def _apply(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.default_map = {**(ctx.default_map or {}), **load_config(Path(value), ctx.command)}


def config_option(f: F) -> F:
    """Add the eager ``--config FILE`` option (env ``PQE2EE_CONFIG``) to a command function."""
    return click.option(
        "--config",
        envvar="PQE2EE_CONFIG",
        show_envvar=True,
        is_eager=True,
        expose_value=False,
        callback=_apply,
        metavar="FILE",
        help="TOML file with this command's settings in a [table] named after it "
        "(flags and environment win over it).",
    )(f)
