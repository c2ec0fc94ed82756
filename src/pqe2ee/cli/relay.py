"""``pqe2ee relay``: the control plane (discovery, nonces, forwarding sealed bytes)."""

from __future__ import annotations

import logging
from typing import Any

import click

from pqe2ee.cli import _options as opt

__all__ = ["relay_cmd"]


@opt.command("relay")
@opt.env_option(
    "--instance",
    "instances",
    env="INSTANCES",
    multiple=True,
    metavar="URL",
    help="Base URL of a `pqe2ee instance` (repeatable; env: comma- or space-separated).",
)
@opt.env_option(
    "--api-key",
    "api_keys",
    env="API_KEY",
    legacy=("PQE2EE_API_KEYS",),
    multiple=True,
    metavar="KEY",
    help="API key clients must send as 'Authorization: Bearer KEY' (repeatable; env: comma- "
    "or space-separated, which keeps keys out of the process list).",
)
@click.option(
    "--no-auth",
    is_flag=True,
    help="Run an OPEN relay that accepts requests without an API key (required when no "
    "key is given; discovery is then rate-limited per client address).",
)
@opt.env_option(
    "--redis",
    "redis_url",
    env="REDIS",
    legacy=("PQE2EE_REDIS_URL",),
    metavar="URL",
    help="Keep nonces and rate limits in Redis (redis://host:6379/0) so several relays "
    "share them. Default: in memory, one process.",
)
@opt.host_option
@opt.port_option(8000)
@opt.count_option(
    "--rate-limit",
    10,
    "RATE_LIMIT",
    "Instance discoveries allowed per API key per minute (429 beyond).",
)
@opt.count_option(
    "--nonces-per-instance",
    10,
    "NONCES_PER_INSTANCE",
    "Single-use nonces handed out per instance per discovery.",
    max=1000,
)
@opt.count_option(
    "--max-instances", 5, "MAX_INSTANCES", "Instances returned per discovery (a random sample)."
)
@opt.max_body_option(64 * 1024 * 1024, "request blob")
@opt.read_timeout_option(
    900.0, "Longest silence (seconds) tolerated from an instance mid-response."
)
@opt.env_option(
    "--tee",
    env="TEE",
    is_flag=True,
    help="Mark models confidential_compute: true in /v1/models. Set it only when every "
    "instance runs in an attested TEE.",
)
@opt.pure_python_option
@opt.tls_options
@opt.file_option(
    "--instance-ca",
    "INSTANCE_CA",
    "CA bundle for https:// instances instead of the system's; an instance's own "
    "self-signed certificate here pins it.",
)
@opt.log_level_option
@opt.log_format_option
def relay_cmd(
    instances: tuple[str, ...],
    api_keys: tuple[str, ...],
    no_auth: bool,
    host: str,
    port: int,
    log_level: str,
    pure_python: bool,
    log_format: str,
    tls_cert: str | None,
    tls_key: str | None,
    **options: Any,
) -> None:
    """Control plane: discovery, single-use nonces, forwarding bytes it cannot read.

    Serves GET /v1/models (chute_id per model), GET /e2e/instances/{chute_id} and
    POST /e2e/invoke on the Chutes wire contract, so Chutes E2EE clients can use it with
    api_base pointed here. Request and response bodies are sealed end to end: the relay
    holds no key that opens them and only streams them through. Also GET /health and
    GET /metrics (Prometheus).

    \b
    Example:
      PQE2EE_RELAY_API_KEY=key1,key2 pqe2ee relay \\
          --instance http://10.0.0.5:8002 --instance http://10.0.0.6:8002

    It refuses to start without an API key unless --no-auth is given.
    """
    from pqe2ee.server.relay import RelayConfig, serve

    urls = opt.split_list(instances)
    keys = tuple(dict.fromkeys(opt.split_list(api_keys)))
    if not urls:
        opt.fail("relay", "give at least one --instance URL")
    for url in urls:
        if (problem := opt.url_problem(url)) is not None:
            opt.fail("relay", f"--instance {url!r} {problem}")
    if not keys and not no_auth:
        opt.fail(
            "relay",
            "no API keys configured. Pass --api-key KEY (or set PQE2EE_RELAY_API_KEY=key1,key2), "
            "or pass --no-auth explicitly to run an open relay.",
        )
    from pqe2ee.cli._logging import configure as configure_logging
    from pqe2ee.cli._preflight import check_ca, check_port, check_redis, check_tls

    with opt.exit_on_error("relay", log_level):
        config = RelayConfig(
            instances=urls, api_keys=keys, no_auth=no_auth, host=host, port=port, **options
        )
        check_port("relay", host, port)
        check_redis("relay", "--redis", config.redis_url)
        check_ca("relay", "--instance-ca", config.instance_ca)
        tls = check_tls("relay", tls_cert, tls_key)
    configure_logging(log_level, log_format)
    if no_auth:
        logging.getLogger("pqe2ee.relay").warning(
            "running WITHOUT authentication (--no-auth): anyone who reaches %s:%d can use it",
            host,
            port,
        )
    opt.quiet_client_logs(log_level)
    with opt.exit_on_error("relay", log_level):
        serve(config, log_level=log_level, pure_python=pure_python, **tls)
