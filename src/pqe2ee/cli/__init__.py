"""The ``pqe2ee`` command line: proxy, instance, relay, dev-engine, backends, attest.

One module per command (:mod:`~pqe2ee.cli.proxy`, :mod:`~pqe2ee.cli.instance`,
:mod:`~pqe2ee.cli.relay`, :mod:`~pqe2ee.cli.dev_engine`, :mod:`~pqe2ee.cli.backends`,
:mod:`~pqe2ee.cli.doctor`, :mod:`~pqe2ee.cli.attest`, :mod:`~pqe2ee.cli.conformance`); the
options and the exit path they share live in :mod:`pqe2ee.cli._options`. Each command imports
the server or proxy it starts only when it runs, so ``pqe2ee --help`` stays fast.

The CLI needs the ``[server]`` or ``[proxy]`` extra (click, starlette, uvicorn); the core
library does not. Without click, :func:`main` says which extra to install and returns 2.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["cli", "main"]

try:
    import click
except ImportError:  # pragma: no cover - exercised only without the extras
    click = None  # type: ignore[assignment]


def _missing_extra() -> int:
    sys.stderr.write(
        "pqe2ee: the command line needs an extra: pip install 'pqe2ee[server,proxy]'\n"
    )
    return 2


def main(argv: list[str] | None = None) -> Any:
    if click is None:
        return _missing_extra()
    return cli.main(args=argv, prog_name="pqe2ee")


if click is not None:
    from pqe2ee.cli._options import OneLineErrors
    from pqe2ee.cli.attest import attest_cmd
    from pqe2ee.cli.backends import backends_cmd
    from pqe2ee.cli.conformance import conformance_cmd
    from pqe2ee.cli.dev_engine import dev_engine_cmd
    from pqe2ee.cli.doctor import doctor_cmd
    from pqe2ee.cli.instance import instance_cmd
    from pqe2ee.cli.proxy import proxy_cmd
    from pqe2ee.cli.relay import relay_cmd

    @click.group(
        cls=OneLineErrors,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )
    @click.version_option(package_name="pqe2ee")
    def cli() -> None:
        """Post-quantum end-to-end encrypted inference (Chutes E2EE v1 wire format).

        \b
        proxy       local OpenAI / Responses / Anthropic endpoint that encrypts every call
        instance    decrypting front of an OpenAI-compatible engine (vLLM, llama.cpp, Ollama)
        relay       control plane: discovery, nonces, forwarding bytes it cannot read
        dev-engine  a deterministic stand-in engine for demos and tests (not a model)
        backends    list the crypto backends that work on this machine
        doctor      check this machine, the relay and the API key before running the proxy
        attest      verify TEE evidence (a saved capture) bound to instance keys
        conformance check another implementation (server, client) against the spec
        """

    for _command in (
        backends_cmd,
        dev_engine_cmd,
        doctor_cmd,
        instance_cmd,
        relay_cmd,
        proxy_cmd,
        attest_cmd,
        conformance_cmd,
    ):
        cli.add_command(_command)
