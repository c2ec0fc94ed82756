"""``pqe2ee instance``: the decrypting front of an OpenAI-compatible engine."""

from __future__ import annotations

from typing import Any

import click

from pqe2ee.cli import _options as opt

__all__ = ["instance_cmd"]

_KEY_PATH = click.Path(dir_okay=True, path_type=str)


@opt.command("instance")
@opt.env_option(
    "--upstream",
    env="UPSTREAM",
    required=True,
    type=opt.URL,
    help="Base URL of the OpenAI-compatible engine, without /v1 (http://127.0.0.1:8000).",
)
@opt.host_option
@opt.port_option(8002)
@opt.env_option(
    "--key-file",
    env="KEY_FILE",
    type=_KEY_PATH,
    help="Keep the ML-KEM-768 key here (created with mode 0600 if missing; refused if "
    "group/world-accessible, owned by another user, a symlink, or in a directory others "
    "may write). Without it a fresh key is made at every start.",
)
@opt.env_option(
    "--allow-path",
    "allow_paths",
    env="ALLOW_PATHS",
    multiple=True,
    help="Engine path reachable through E2E (repeatable; env: space-separated). "
    "Default: /v1/chat/completions and /v1/completions.",
)
@opt.max_body_option(16 * 1024 * 1024, "request blob")
@opt.count_option(
    "--max-concurrency", 64, "MAX_CONCURRENCY", "Requests in flight before answering 429."
)
@opt.backend_option
@opt.env_option(
    "--instance-id",
    env="INSTANCE_ID",
    help="Instance id to announce (default: derived from the public key).",
)
@opt.seconds_option(
    "--connect-timeout",
    10.0,
    "CONNECT_TIMEOUT",
    "Seconds to connect to the engine.",
    name="upstream_connect_timeout",
)
@opt.read_timeout_option(
    600.0, "Seconds to wait for each read from the engine.", name="upstream_read_timeout"
)
@opt.env_option(
    "--continuous-usage/--no-continuous-usage",
    env="CONTINUOUS_USAGE",
    default=True,
    help="Force continuous_usage_stats on streams, as Chutes does (per-chunk token counts "
    "then travel in plaintext usage events); --no-continuous-usage leaks only totals.",
)
@opt.env_option(
    "--upstream-api-key",
    env="UPSTREAM_API_KEY",
    help="Bearer token for the engine (e.g. vLLM --api-key); prefer the env variable.",
)
@opt.env_option(
    "--v2/--no-v2",
    "v2",
    env="V2",
    default=True,
    help="Serve wire profile v2 (spec/v2.md) next to v1 on /e2e/invoke; --no-v2 serves v1 only.",
)
@opt.env_option(
    "--v2-only",
    env="V2_ONLY",
    is_flag=True,
    help="Refuse v1 requests (426, code v1_disabled); only v2 is opened.",
)
@opt.env_option(
    "--v2-key-file",
    env="V2_KEY_FILE",
    type=_KEY_PATH,
    help="Keep the v2 X-Wing key here (its own file; same 0600 rules as --key-file). Such "
    "a key is not rotated. Without it a fresh key is made at start and rotated.",
)
@opt.env_option(
    "--allow-key-symlink",
    env="ALLOW_KEY_SYMLINK",
    is_flag=True,
    default=False,
    help="Follow a symbolic link at --key-file / --v2-key-file (Kubernetes secret mounts); "
    "refused by default. The link's target must still be private and owned by this user.",
)
@opt.seconds_option(
    "--v2-key-lifetime",
    3600.0,
    "V2_KEY_LIFETIME",
    "Seconds a generated v2 key stays current (it is then accepted one more lifetime "
    "as the previous key, and erased).",
    min=60,
    max=86400,
)
@opt.env_option(
    "--chute-id",
    env="CHUTE_ID",
    help="The chute this instance serves (UUID), checked against v2 requests. Default: one "
    "chute per model, named as pqe2ee relay names them.",
)
@opt.env_option(
    "--redis",
    "redis_url",
    env="REDIS",
    legacy=("PQE2EE_REPLAY_REDIS_URL",),
    metavar="URL",
    help="Keep the v2 replay cache in Redis (redis://host:6379/0; use maxmemory-policy "
    "noeviction) so several processes serving one key share it. Default: in memory.",
)
@opt.env_option(
    "--tee",
    env="TEE",
    type=click.Choice(["tdx"]),
    default=None,
    help="Serve TEE evidence at GET /evidence?nonce= (tdx: quotes from Linux configfs-tsm), "
    "binding the caller's nonce and this instance's keys (SPEC.md §18, spec/v2.md §8.3).",
)
@opt.env_option(
    "--tsm-path",
    env="TSM_PATH",
    default="/sys/kernel/config/tsm/report",
    help="The configfs-tsm report directory (with --tee tdx).",
)
@opt.pure_python_option
@opt.tls_options
@opt.log_level_option
@opt.log_format_option
def instance_cmd(
    allow_paths: tuple[str, ...],
    log_level: str,
    log_format: str,
    pure_python: bool,
    tls_cert: str | None,
    tls_key: str | None,
    **options: Any,
) -> None:
    """Decrypting front of an OpenAI-compatible engine (vLLM, llama.cpp, Ollama).

    Runs next to the engine, ideally inside a TEE. It holds an ML-KEM-768 key (v1) and an
    X-Wing key (v2), publishes them at GET /e2e/info, and on POST /e2e/invoke opens the
    request blob the relay forwards (v1 or v2, told apart by the blob), sends the plaintext
    JSON to UPSTREAM and seals the reply (a blob, or an SSE stream of encrypted records) to
    the caller's one-time key. The relay never sees plaintext. Engine errors are sealed
    (v1: with the engine's status; v2: status, errors and usage inside authenticated
    records). v2 requests are also checked against the relay's routing headers, a 120 s
    clock window and a replay cache.

    \b
    Example:
      pqe2ee instance --upstream http://127.0.0.1:8000 --key-file /secrets/instance.key \\
          --v2-key-file /secrets/instance-v2.key --redis redis://127.0.0.1:6379/0

    A bad key file, backend or option stops it with exit code 2.
    """
    from pqe2ee.cli._logging import configure as configure_logging
    from pqe2ee.cli._preflight import check_port, check_redis, check_tls
    from pqe2ee.server.instance import DEFAULT_ALLOW_PATHS, InstanceConfig, serve

    with opt.exit_on_error("instance", log_level):
        config = InstanceConfig(allow_paths=allow_paths or DEFAULT_ALLOW_PATHS, **options)
        check_redis("instance", "--redis", config.redis_url)
        tls = check_tls("instance", tls_cert, tls_key)
        configure_logging(log_level, log_format)
        opt.quiet_client_logs(log_level)

        def before_bind() -> None:  # after the key files: their mistakes are named first
            check_port("instance", config.host, config.port)

        serve(
            config,
            log_level=log_level,
            pure_python=pure_python,
            before_bind=before_bind,
            **tls,
        )
