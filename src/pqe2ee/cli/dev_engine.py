"""``pqe2ee dev-engine``: the deterministic stand-in engine for demos and tests."""

from __future__ import annotations

import click

from pqe2ee.cli import _options as opt

__all__ = ["dev_engine_cmd"]


@click.command("dev-engine")
@opt.host_option
@opt.port_option(8001)
@opt.count_option(
    "--max-model-len",
    32768,
    "MAX_MODEL_LEN",
    "Context (in words) a prompt plus max_tokens must fit (agent CLIs such as Claude Code "
    "ask for 32000 output tokens: give them 1000000).",
)
@opt.log_level_option
def dev_engine_cmd(host: str, port: int, max_model_len: int, log_level: str) -> None:
    """A small deterministic OpenAI-compatible engine (a test stand-in, never a model).

    It echoes prompts, emits tool calls and reasoning_content, and streams with vLLM's SSE
    shape, so the demo and the tests run without a GPU.
    """
    from pqe2ee.testing.dev_engine import serve

    serve(host, port, log_level=log_level, max_model_len=max_model_len)
