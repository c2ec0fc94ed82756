"""``pqe2ee dev-engine``: the deterministic stand-in engine for demos and tests."""

from __future__ import annotations

import click

from pqe2ee.cli import _options as opt

__all__ = ["dev_engine_cmd"]


@opt.command("dev-engine")
@opt.host_option
@opt.port_option(8001)
@opt.count_option(
    "--max-model-len",
    32768,
    "MAX_MODEL_LEN",
    "Context (in words) a prompt plus max_tokens must fit (agent CLIs such as Claude Code "
    "ask for 32000 output tokens: give them 1000000).",
)
@opt.env_option(
    "--reasoning-field",
    env="REASONING_FIELD",
    type=click.Choice(["reasoning_content", "reasoning"]),
    default="reasoning_content",
    help="Name of the reasoning field in replies: vLLM 0.10's, or vLLM >= 0.11's.",
)
@opt.seconds_option(
    "--delay",
    0.0,
    "DELAY",
    "Seconds before every generated chunk: paces a stream as a model's tokens are (0: all at once).",
    min=0,
    max=60,
)
@opt.log_level_option
@opt.log_format_option
def dev_engine_cmd(
    host: str,
    port: int,
    max_model_len: int,
    reasoning_field: str,
    delay: float,
    log_level: str,
    log_format: str,
) -> None:
    """A small deterministic OpenAI-compatible engine (a test stand-in, never a model).

    It echoes prompts, emits tool calls and reasoning_content, and streams with vLLM's SSE
    shape, so the demo and the tests run without a GPU.
    """
    from pqe2ee.cli._logging import configure as configure_logging
    from pqe2ee.cli._preflight import check_port
    from pqe2ee.testing.dev_engine import serve

    with opt.exit_on_error("dev-engine", log_level):
        check_port("dev-engine", host, port)
        configure_logging(log_level, log_format)
        serve(
            host,
            port,
            log_level=log_level,
            max_model_len=max_model_len,
            reasoning_field=reasoning_field,
            delay=delay,
        )
