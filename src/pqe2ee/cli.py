"""The ``pqe2ee`` command line: proxy, instance, relay, dev-engine, backends.

The CLI needs the ``[server]`` or ``[proxy]`` extra (click, starlette, uvicorn); the core
library does not.
"""

from __future__ import annotations

import sys
from typing import Any

try:
    import click
except ImportError:  # pragma: no cover - exercised only without the extras
    click = None  # type: ignore[assignment]


def _missing_extra() -> int:
    sys.stderr.write("pqe2ee: the command line needs an extra: pip install 'pqe2ee[server,proxy]'\n")
    return 2


def main(argv: list[str] | None = None) -> Any:
    if click is None:
        return _missing_extra()
    return cli.main(args=argv, prog_name="pqe2ee")


if click is not None:

    @click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.version_option(package_name="pqe2ee")
    def cli() -> None:
        """Post-quantum end-to-end encrypted inference (Chutes E2EE v1 wire format).

        \b
        proxy       local OpenAI / Responses / Anthropic endpoint that encrypts every call
        instance    decrypting front of an OpenAI-compatible engine (vLLM, llama.cpp, Ollama)
        relay       control plane: discovery, nonces, forwarding bytes it cannot read
        dev-engine  a deterministic stand-in engine for demos and tests (not a model)
        backends    list the crypto backends that work on this machine
        """

    @cli.command("backends")
    def backends_cmd() -> None:
        """List crypto backends and whether each works here."""
        from pqe2ee.backends import _REGISTRY, get_aead, get_kem, unavailable_reason

        for name in _REGISTRY:
            reason = unavailable_reason(name)
            click.echo(f"{name:14} {'available' if reason is None else 'unavailable: ' + reason}")
        click.echo(f"auto KEM: {get_kem('auto').name}   auto AEAD: {get_aead('auto').name}")

    @cli.command("dev-engine")
    @click.option("--host", default="127.0.0.1", show_default=True, envvar="PQE2EE_HOST")
    @click.option("--port", default=8001, show_default=True, type=int, envvar="PQE2EE_PORT")
    def dev_engine_cmd(host: str, port: int) -> None:
        """A small deterministic OpenAI-compatible engine (a test stand-in, never a model).

        It echoes prompts, emits tool calls and reasoning_content, and streams with vLLM's SSE
        shape, so the demo and the tests run without a GPU.
        """
        from pqe2ee.server.dev_engine import serve

        serve(host, port)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
