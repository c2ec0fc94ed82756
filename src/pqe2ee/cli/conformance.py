"""``pqe2ee conformance``: check another implementation against the spec, one role at a time."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pqe2ee.cli import _options as opt

__all__ = ["conformance_cmd"]


def _report_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")(
        f
    )
    f = click.option(
        "--markdown",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Also write the report as Markdown to this file.",
    )(f)
    f = click.option(
        "--only", multiple=True, metavar="PREFIX", help="Run only cases whose id starts so."
    )(f)
    return click.option(
        "--profile",
        type=click.Choice(["v1", "v2", "both"]),
        default="both",
        show_default=True,
        help="Wire profiles to check (v2 cases SKIP where v2 is not offered).",
    )(f)


def _finish(report: Any, as_json: bool, markdown: Path | None) -> None:
    if markdown is not None:
        markdown.write_text(report.to_markdown(), encoding="utf-8")
    if as_json:
        click.echo(report.to_json())
    else:
        click.echo(report.to_text())
    sys.exit(report.exit_code)


@click.group("conformance")
def conformance_cmd() -> None:
    """Check another implementation against SPEC.md / spec/v2.md.

    \b
    Exit codes: 0 every case passed · 10 a case FAILed · 20 nothing applied (all skipped)
    · 30 the target's answers could not be parsed · 1 runner error.
    See docs/conformance.md for the cases and the adapter contract.
    """


@conformance_cmd.command("server")
@click.argument("url")
@opt.env_option("--api-key", env="API_KEY", help="API key for the relay (Bearer).")
@opt.env_option("--model", env="MODEL", default="dev-echo", help="Model to call.")
@opt.env_option(
    "--models-base", env="MODELS_BASE", help="Where /v1/models is served (default: URL)."
)
@_report_options
def server_cmd(
    url: str,
    api_key: str | None,
    model: str,
    models_base: str | None,
    profile: str,
    only: tuple[str, ...],
    as_json: bool,
    markdown: Path | None,
) -> None:
    """Check the relay at URL (and the instances behind it) on the wire."""
    from pqe2ee.conformance.runner import run_server

    with opt.exit_on_error("conformance"):
        report = run_server(
            url, api_key=api_key, model=model, profile=profile, models_base=models_base, only=only
        )
    _finish(report, as_json, markdown)


@conformance_cmd.command(
    "client", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@opt.seconds_option("--timeout", 60.0, "CONFORMANCE_TIMEOUT", "Time limit of one adapter run.")
@_report_options
def client_cmd(
    command: tuple[str, ...],
    timeout: float,
    profile: str,
    only: tuple[str, ...],
    as_json: bool,
    markdown: Path | None,
) -> None:
    """Check a client through its adapter COMMAND (after `--`), once per case.

    The runner starts a relay of its own on loopback (instances and a stand-in engine behind
    it) and runs `COMMAND --base-url URL --api-key K --model M --prompt P [--stream]`; the
    adapter prints the decrypted text and exits 0, or exits non-zero on an error. With
    --profile v1 the relay offers no v2; with v2 it does (cases SKIP if the client stays on v1).
    """
    from pqe2ee.conformance.runner import run_client

    # uvicorn's peers hang up mid-answer on purpose here; asyncio would log each one
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    report = run_client(command, profile=profile, only=only, timeout=timeout)
    _finish(report, as_json, markdown)


@conformance_cmd.command(
    "vectors", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@opt.env_option(
    "--vectors",
    env="CONFORMANCE_VECTORS",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder with v1.json and v2.json (default: spec/vectors).",
)
@opt.seconds_option("--timeout", 30.0, "CONFORMANCE_TIMEOUT", "Time limit of one adapter run.")
@click.option(
    "--batch",
    is_flag=True,
    help="Run the adapter once as `COMMAND --batch`: JSON lines in, one answer line each.",
)
@_report_options
def vectors_cmd(
    command: tuple[str, ...],
    vectors: Path | None,
    timeout: float,
    batch: bool,
    profile: str,
    only: tuple[str, ...],
    as_json: bool,
    markdown: Path | None,
) -> None:
    """Check a sealer/opener through its adapter COMMAND (after `--`) with the golden vectors.

    One JSON object on the adapter's stdin per case, one on its stdout; exit 0 accepted, 10
    rejected, 20 unsupported op, 30 malformed input (docs/conformance.md).
    """
    from pqe2ee.conformance.runner import run_vectors

    report = run_vectors(
        command, profile=profile, only=only, vectors=vectors, timeout=timeout, batch=batch
    )
    _finish(report, as_json, markdown)
