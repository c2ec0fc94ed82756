"""The ``pqe2ee`` command line: proxy, instance, relay, dev-engine, backends.

The CLI needs the ``[server]`` or ``[proxy]`` extra (click, starlette, uvicorn); the core
library does not.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

try:
    import click
except ImportError:  # pragma: no cover - exercised only without the extras
    click = None  # type: ignore[assignment]

F = TypeVar("F", bound=Callable[..., Any])


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
    # Options every server command shares (same names, defaults and environment variables).
    log_level_option = click.option(
        "--log-level",
        default="info",
        show_default=True,
        type=click.Choice(["critical", "error", "warning", "info", "debug"]),
        envvar="PQE2EE_LOG_LEVEL",
    )
    backend_option = click.option(
        "--backend",
        default="auto",
        show_default=True,
        envvar="PQE2EE_BACKEND",
        help="Crypto backend (see `pqe2ee backends`).",
    )
    host_option = click.option(
        "--host", default="127.0.0.1", show_default=True, envvar="PQE2EE_HOST"
    )

    def port_option(default: int) -> Callable[[F], F]:
        return click.option(
            "--port", default=default, show_default=True, type=int, envvar="PQE2EE_PORT"
        )

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

    @cli.command("instance")
    @click.option(
        "--upstream",
        required=True,
        envvar="PQE2EE_UPSTREAM",
        help="Base URL of the OpenAI-compatible engine, without /v1 (http://127.0.0.1:8000).",
    )
    @host_option
    @port_option(8002)
    @click.option(
        "--key-file",
        type=click.Path(dir_okay=True, path_type=str),
        envvar="PQE2EE_KEY_FILE",
        help="Keep the ML-KEM-768 key here (created with mode 0600 if missing; refused if "
        "group/world-accessible). Without it a fresh key is made at every start.",
    )
    @click.option(
        "--allow-path",
        "allow_paths",
        multiple=True,
        envvar="PQE2EE_ALLOW_PATHS",
        help="Engine path reachable through E2E (repeatable; env: space-separated). "
        "Default: /v1/chat/completions and /v1/completions.",
    )
    @click.option(
        "--max-body",
        default=16 * 1024 * 1024,
        show_default=True,
        type=click.IntRange(min=1),
        envvar="PQE2EE_MAX_BODY",
        help="Largest request blob in bytes (larger: 413).",
    )
    @click.option(
        "--max-concurrency",
        default=64,
        show_default=True,
        type=click.IntRange(min=1),
        envvar="PQE2EE_MAX_CONCURRENCY",
        help="Requests in flight before answering 429.",
    )
    @backend_option
    @click.option(
        "--instance-id",
        envvar="PQE2EE_INSTANCE_ID",
        help="Instance id to announce (default: derived from the public key).",
    )
    @click.option(
        "--connect-timeout",
        default=10.0,
        show_default=True,
        type=click.FloatRange(min=0, min_open=True),
        envvar="PQE2EE_CONNECT_TIMEOUT",
        help="Seconds to connect to the engine.",
    )
    @click.option(
        "--read-timeout",
        default=600.0,
        show_default=True,
        type=click.FloatRange(min=0, min_open=True),
        envvar="PQE2EE_READ_TIMEOUT",
        help="Seconds to wait for each read from the engine.",
    )
    @click.option(
        "--continuous-usage/--no-continuous-usage",
        default=True,
        show_default=True,
        envvar="PQE2EE_CONTINUOUS_USAGE",
        help="Force continuous_usage_stats on streams, as Chutes does (per-chunk token counts "
        "then travel in plaintext usage events); --no-continuous-usage leaks only totals.",
    )
    @click.option(
        "--upstream-api-key",
        envvar="PQE2EE_UPSTREAM_API_KEY",
        help="Bearer token for the engine (e.g. vLLM --api-key); prefer the env variable.",
    )
    @click.option(
        "--v2/--no-v2",
        "v2",
        default=True,
        show_default=True,
        envvar="PQE2EE_V2",
        help="Serve wire profile v2 (spec/v2.md) next to v1 on /e2e/invoke; --no-v2 serves v1 "
        "only.",
    )
    @click.option(
        "--v2-only",
        is_flag=True,
        envvar="PQE2EE_V2_ONLY",
        help="Refuse v1 requests (426, code v1_disabled); only v2 is opened.",
    )
    @click.option(
        "--v2-key-file",
        type=click.Path(dir_okay=True, path_type=str),
        envvar="PQE2EE_V2_KEY_FILE",
        help="Keep the v2 X-Wing key here (its own file; same 0600 rules as --key-file). Such "
        "a key is not rotated. Without it a fresh key is made at start and rotated.",
    )
    @click.option(
        "--v2-key-lifetime",
        default=3600.0,
        show_default=True,
        type=click.FloatRange(min=60, max=86400),
        envvar="PQE2EE_V2_KEY_LIFETIME",
        help="Seconds a generated v2 key stays current (it is then accepted one more lifetime "
        "as the previous key, and erased).",
    )
    @click.option(
        "--chute-id",
        envvar="PQE2EE_CHUTE_ID",
        help="The chute this instance serves (UUID), checked against v2 requests. Default: one "
        "chute per model, named as pqe2ee relay names them.",
    )
    @click.option(
        "--redis",
        "redis_url",
        envvar="PQE2EE_REPLAY_REDIS_URL",
        metavar="URL",
        help="Keep the v2 replay cache in Redis (redis://host:6379/0; use maxmemory-policy "
        "noeviction) so several processes serving one key share it. Default: in memory.",
    )
    @log_level_option
    def instance_cmd(
        upstream: str,
        host: str,
        port: int,
        key_file: str | None,
        allow_paths: tuple[str, ...],
        max_body: int,
        max_concurrency: int,
        backend: str,
        instance_id: str | None,
        connect_timeout: float,
        read_timeout: float,
        continuous_usage: bool,
        upstream_api_key: str | None,
        v2: bool,
        v2_only: bool,
        v2_key_file: str | None,
        v2_key_lifetime: float,
        chute_id: str | None,
        redis_url: str | None,
        log_level: str,
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
        from pqe2ee.errors import PQE2EEError
        from pqe2ee.server.instance import DEFAULT_ALLOW_PATHS, InstanceConfig, serve

        try:
            config = InstanceConfig(
                upstream=upstream,
                host=host,
                port=port,
                key_file=key_file,
                allow_paths=allow_paths or DEFAULT_ALLOW_PATHS,
                max_body=max_body,
                max_concurrency=max_concurrency,
                backend=backend,
                instance_id=instance_id,
                upstream_connect_timeout=connect_timeout,
                upstream_read_timeout=read_timeout,
                continuous_usage=continuous_usage,
                upstream_api_key=upstream_api_key,
                v2=v2,
                v2_only=v2_only,
                v2_key_file=v2_key_file,
                v2_key_lifetime=v2_key_lifetime,
                chute_id=chute_id,
                redis_url=redis_url,
            )
            serve(config, log_level=log_level)
        except PQE2EEError as exc:
            click.echo(f"pqe2ee instance: {exc.message}", err=True)
            sys.exit(2)

    @cli.command("relay")
    @click.option(
        "--instance",
        "instances",
        multiple=True,
        envvar="PQE2EE_INSTANCES",
        metavar="URL",
        help="Base URL of a `pqe2ee instance` (repeatable; env: comma- or space-separated).",
    )
    @click.option(
        "--api-key",
        "api_keys",
        multiple=True,
        metavar="KEY",
        help="API key clients must send as 'Authorization: Bearer KEY' (repeatable). Also read "
        "from PQE2EE_API_KEYS (comma-separated), which keeps keys out of the process list.",
    )
    @click.option(
        "--no-auth",
        is_flag=True,
        help="Run an OPEN relay that accepts requests without an API key (required when no "
        "key is given; discovery is then rate-limited per client address).",
    )
    @click.option(
        "--redis",
        "redis_url",
        envvar="PQE2EE_REDIS_URL",
        metavar="URL",
        help="Keep nonces and rate limits in Redis (redis://host:6379/0) so several relays "
        "share them. Default: in memory, one process.",
    )
    @host_option
    @port_option(8000)
    @click.option(
        "--rate-limit",
        default=10,
        show_default=True,
        type=click.IntRange(min=1),
        envvar="PQE2EE_RATE_LIMIT",
        help="Instance discoveries allowed per API key per minute (429 beyond).",
    )
    @click.option(
        "--nonces-per-instance",
        default=10,
        show_default=True,
        type=click.IntRange(min=1, max=1000),
        envvar="PQE2EE_NONCES_PER_INSTANCE",
        help="Single-use nonces handed out per instance per discovery.",
    )
    @click.option(
        "--max-instances",
        default=5,
        show_default=True,
        type=click.IntRange(min=1),
        envvar="PQE2EE_MAX_INSTANCES",
        help="Instances returned per discovery (a random sample).",
    )
    @click.option(
        "--max-body",
        default=64 * 1024 * 1024,
        show_default=True,
        type=click.IntRange(min=1),
        envvar="PQE2EE_MAX_BODY",
        help="Largest request blob in bytes (larger: 413).",
    )
    @click.option(
        "--read-timeout",
        default=900.0,
        show_default=True,
        type=click.FloatRange(min=0, min_open=True),
        envvar="PQE2EE_READ_TIMEOUT",
        help="Longest silence (seconds) tolerated from an instance mid-response.",
    )
    @click.option(
        "--tee",
        is_flag=True,
        envvar="PQE2EE_TEE",
        help="Mark models confidential_compute: true in /v1/models. Set it only when every "
        "instance runs in an attested TEE.",
    )
    @log_level_option
    def relay_cmd(
        instances: tuple[str, ...],
        api_keys: tuple[str, ...],
        no_auth: bool,
        redis_url: str | None,
        host: str,
        port: int,
        rate_limit: int,
        nonces_per_instance: int,
        max_instances: int,
        max_body: int,
        read_timeout: float,
        tee: bool,
        log_level: str,
    ) -> None:
        """Control plane: discovery, single-use nonces, forwarding bytes it cannot read.

        Serves GET /v1/models (chute_id per model), GET /e2e/instances/{chute_id} and
        POST /e2e/invoke on the Chutes wire contract, so Chutes E2EE clients can use it with
        api_base pointed here. Request and response bodies are sealed end to end: the relay
        holds no key that opens them and only streams them through. Also GET /health and
        GET /metrics (Prometheus).

        \b
        Example:
          PQE2EE_API_KEYS=key1,key2 pqe2ee relay \\
              --instance http://10.0.0.5:8002 --instance http://10.0.0.6:8002

        It refuses to start without an API key unless --no-auth is given.
        """
        import logging
        import os

        from pqe2ee.errors import PQE2EEError
        from pqe2ee.server.relay import RelayConfig, api_keys_from_env, serve

        urls = tuple(u for item in instances for u in item.replace(",", " ").split() if u)
        keys = tuple(dict.fromkeys((*api_keys, *api_keys_from_env(os.environ))))
        if not urls:
            click.echo("pqe2ee relay: give at least one --instance URL", err=True)
            sys.exit(2)
        if not keys and not no_auth:
            click.echo(
                "pqe2ee relay: no API keys configured. Pass --api-key KEY (or set "
                "PQE2EE_API_KEYS=key1,key2), or pass --no-auth explicitly to run an open relay.",
                err=True,
            )
            sys.exit(2)
        try:
            config = RelayConfig(
                instances=urls,
                api_keys=keys,
                no_auth=no_auth,
                redis_url=redis_url,
                host=host,
                port=port,
                rate_limit=rate_limit,
                nonces_per_instance=nonces_per_instance,
                max_instances=max_instances,
                max_body=max_body,
                read_timeout=read_timeout,
                tee=tee,
            )
        except PQE2EEError as exc:
            click.echo(f"pqe2ee relay: {exc.message}", err=True)
            sys.exit(2)
        if not logging.getLogger().handlers:
            logging.basicConfig(
                level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
        if no_auth:
            logging.getLogger("pqe2ee.relay").warning(
                "running WITHOUT authentication (--no-auth): anyone who reaches %s:%d can use it",
                host,
                port,
            )
        serve(config, log_level=log_level)

    @cli.command("proxy")
    @host_option
    @port_option(8787)
    @click.option(
        "--api-base",
        default="https://api.chutes.ai",
        show_default=True,
        envvar="PQE2EE_API_BASE",
        metavar="URL",
        help="Relay (control plane) for discovery and encrypted invocations.",
    )
    @click.option(
        "--models-base",
        default="https://llm.chutes.ai",
        show_default=True,
        envvar="PQE2EE_MODELS_BASE",
        metavar="URL",
        help="Where the model list is read (plaintext GET /v1/models).",
    )
    @click.option(
        "--api-key",
        envvar="PQE2EE_API_KEY",
        metavar="KEY",
        help="Key for callers that send none of their own (prefer the env variable: it keeps "
        "the key out of the process list).",
    )
    @backend_option
    @click.option(
        "--max-body",
        default=32 * 1024 * 1024,
        show_default=True,
        type=click.IntRange(min=1),
        envvar="PQE2EE_MAX_BODY",
        help="Largest request body in bytes (larger: 413).",
    )
    @click.option(
        "--max-keys",
        default=64,
        show_default=True,
        type=click.IntRange(min=1),
        envvar="PQE2EE_MAX_KEYS",
        help="API keys with a live upstream transport (least recently used closed first).",
    )
    @click.option(
        "--key-idle-ttl",
        default=300.0,
        show_default=True,
        type=click.FloatRange(min=0, min_open=True),
        envvar="PQE2EE_KEY_IDLE_TTL",
        help="Seconds before an unused key's transport is closed.",
    )
    @click.option(
        "--read-timeout",
        default=900.0,
        show_default=True,
        type=click.FloatRange(min=0, min_open=True),
        envvar="PQE2EE_READ_TIMEOUT",
        help="Longest silence (seconds) tolerated from upstream mid-response.",
    )
    @click.option(
        "--min-version",
        default="1",
        show_default=True,
        type=click.Choice(["1", "2"]),
        envvar="PQE2EE_MIN_VERSION",
        help="Lowest wire profile accepted. 2 refuses any chute that does not offer v2 "
        "(downgrade_refused, before anything is sent): the setting when you run your own "
        "pqe2ee instances and relay. 1 accepts v1 for chutes that never offered v2.",
    )
    @click.option(
        "--no-prefer-v2",
        "no_prefer_v2",
        is_flag=True,
        default=False,
        envvar="PQE2EE_NO_PREFER_V2",
        help="Speak v1 only, even to chutes that offer v2 (no pinning). Not with --min-version 2.",
    )
    @log_level_option
    def proxy_cmd(
        host: str,
        port: int,
        api_base: str,
        models_base: str,
        api_key: str | None,
        backend: str,
        max_body: int,
        max_keys: int,
        key_idle_ttl: float,
        read_timeout: float,
        min_version: str,
        no_prefer_v2: bool,
        log_level: str,
    ) -> None:
        """Local OpenAI / Responses / Anthropic endpoint that end-to-end encrypts every call.

        Point your tools at http://HOST:PORT (OpenAI SDK and Codex: base URL .../v1; Anthropic
        SDK and Claude Code: base URL http://HOST:PORT). Endpoints:

        \b
          POST /v1/chat/completions, /v1/completions   forwarded as they are, encrypted
          POST /v1/responses                           OpenAI Responses, via Chat Completions
          POST /v1/messages                            Anthropic Messages, via Chat Completions
          POST /v1/messages/count_tokens               a local estimate, not a tokenizer count
          GET  /v1/models                              plaintext passthrough from --models-base
          GET  /health, /metrics                       local status, Prometheus counters

        What is encrypted: every model call - prompts, images, tool definitions and results,
        and every reply, streamed or not - is sealed on this machine to a fresh ML-KEM-768 key
        of the instance that runs the model, and opened only there.

        Wire profile: v2 (X-Wing, hybrid ML-KEM-768 + X25519) wherever a chute's instances
        offer it - it also binds the route (path, stream flag, chute, instance) into the
        encryption, stops replays at the instance, and authenticates stream order, the end of
        every answer, the engine's status and errors, and the usage the relay bills. A chute
        seen with v2 is pinned: if the relay later offers it without v2 the call fails
        (downgrade_suspected) instead of falling back. Chutes that never offered v2 get v1
        (logged). Running your own instances? Use --min-version 2: v1 is then never sent.

        What goes in plaintext: the model listing (GET /v1/models), which carries no user
        data. Between this proxy and your tools traffic is plain HTTP: keep --host on
        loopback.

        What the relay sees: your API key, the model's chute id, the instance id, a one-time
        nonce, the endpoint path, whether the call streams, body sizes and timing (and, with
        Chutes instances, per-chunk token counts in plaintext usage events) - never a prompt or
        a completion.

        The API key is the caller's own (Authorization: Bearer KEY or x-api-key: KEY) when it
        sends one, else --api-key / PQE2EE_API_KEY; without either a call gets a 401. Logs hold
        method, path, status, sizes and durations only.

        \b
        Example:
          PQE2EE_API_KEY=cpk_... pqe2ee proxy
          OPENAI_BASE_URL=http://127.0.0.1:8787/v1 codex
          ANTHROPIC_BASE_URL=http://127.0.0.1:8787 claude
        """
        from pqe2ee.errors import PQE2EEError
        from pqe2ee.proxy.app import ProxyConfig, serve

        try:
            config = ProxyConfig(
                api_base=api_base,
                models_base=models_base,
                api_key=api_key or None,
                backend=backend,
                host=host,
                port=port,
                max_body=max_body,
                max_keys=max_keys,
                key_idle_ttl=key_idle_ttl,
                read_timeout=read_timeout,
                min_version=int(min_version),
                prefer_v2=not no_prefer_v2,
            )
            serve(config, log_level=log_level)
        except PQE2EEError as exc:
            click.echo(f"pqe2ee proxy: {exc.message}", err=True)
            sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
