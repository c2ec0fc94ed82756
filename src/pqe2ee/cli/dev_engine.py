"""``pqe2ee dev-engine``: the deterministic stand-in engine for demos and tests."""

from __future__ import annotations

import click

from pqe2ee.cli._options import host_option, log_level_option, port_option

__all__ = ["dev_engine_cmd"]


@click.command("dev-engine")
@host_option
@port_option(8001)
@log_level_option
def dev_engine_cmd(host: str, port: int, log_level: str) -> None:
    """A small deterministic OpenAI-compatible engine (a test stand-in, never a model).

    It echoes prompts, emits tool calls and reasoning_content, and streams with vLLM's SSE
    shape, so the demo and the tests run without a GPU.
    """
    from pqe2ee.server.dev_engine import serve

    serve(host, port, log_level=log_level)
