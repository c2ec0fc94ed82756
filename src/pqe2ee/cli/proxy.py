"""``pqe2ee proxy``: the local endpoint that end-to-end encrypts every model call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pqe2ee.cli import _options as opt

__all__ = ["proxy_cmd"]


@opt.command("proxy")
@opt.host_option
@opt.port_option(8787)
@opt.env_option(
    "--upstream",
    env="UPSTREAM",
    metavar="URL",
    type=opt.URL,
    help="One base URL for everything (your own relay): model calls, discovery and the "
    "model list. Without it: Chutes (api.chutes.ai, llm.chutes.ai).",
)
@opt.env_option(
    "--api-base",
    env="API_BASE",
    metavar="URL",
    type=opt.URL,
    help="Relay (control plane) for discovery and encrypted invocations "
    "[default: --upstream, else https://api.chutes.ai].",
)
@opt.env_option(
    "--models-base",
    env="MODELS_BASE",
    metavar="URL",
    type=opt.URL,
    help="Where the model list is read (plaintext GET /v1/models) "
    "[default: --upstream, else --api-base, else https://llm.chutes.ai].",
)
@opt.env_option(
    "--api-key",
    env="API_KEY",
    metavar="KEY",
    help="Key for callers that send none of their own (prefer the env variable: it keeps "
    "the key out of the process list).",
)
@opt.backend_option
@opt.max_body_option(32 * 1024 * 1024, "request body")
@opt.count_option(
    "--max-keys",
    64,
    "MAX_KEYS",
    "API keys with a live upstream transport (least recently used closed first).",
)
@opt.seconds_option(
    "--key-idle-ttl", 300.0, "KEY_IDLE_TTL", "Seconds before an unused key's transport is closed."
)
@opt.read_timeout_option(900.0, "Longest silence (seconds) tolerated from upstream mid-response.")
@opt.seconds_option(
    "--deadline",
    1800.0,
    "DEADLINE",
    "Longest time (seconds) one model call may take in all, a streamed reply included; past "
    "it the call ends with a 504 / the dialect's error event (deadline_exceeded).",
)
@opt.env_option(
    "--min-version",
    env="MIN_VERSION",
    default="1",
    type=click.Choice(["1", "2"]),
    help="Lowest wire profile accepted. 2 refuses any chute that does not offer v2 "
    "(downgrade_refused, before anything is sent): the setting when you run your own "
    "pqe2ee instances and relay. 1 accepts v1 for chutes that never offered v2.",
)
@opt.env_option(
    "--no-prefer-v2",
    "no_prefer_v2",
    env="NO_PREFER_V2",
    is_flag=True,
    default=False,
    help="Speak v1 only, even to chutes that offer v2 (no pinning). Not with --min-version 2.",
)
@opt.env_option(
    "--attest",
    env="ATTEST",
    default="auto",
    type=click.Choice(["auto", "require", "off"]),
    help="TEE attestation of instance keys before a prompt is sealed: auto verifies every "
    "chute that serves evidence or is listed as confidential compute (fail closed; once "
    "verified or listed, always), require refuses any chute it cannot verify, off skips it.",
)
@opt.env_option(
    "--attest-policy",
    env="ATTEST_POLICY",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Attestation policy JSON (allowed_tcb_statuses, measurements allowlist, gpu, max_age).",
)
@opt.env_option(
    "--attest-collateral-dir",
    env="ATTEST_COLLATERAL_DIR",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    multiple=True,
    help="Intel collateral answers at hand (*.body + *.meta.json); repeatable.",
)
@opt.env_option(
    "--attest-pcs-url",
    env="ATTEST_PCS_URL",
    default="https://api.trustedservices.intel.com",
    metavar="URL",
    help="Intel PCS (or a PCCS) for collateral not at hand; empty: offline only.",
)
@opt.env_option(
    "--attest-cache-dir",
    env="ATTEST_CACHE_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep fetched Intel collateral here and reuse it (offline) until its nextUpdate.",
)
@opt.env_option(
    "--attest-gpu",
    env="ATTEST_GPU",
    type=click.Choice(["verify", "nras", "off"]),
    default=None,
    help="GPU evidence check (overrides the policy file): verify (offline SPDM, default), "
    "nras (online: NVIDIA's NRAS, tokens checked against its JWKS), off.",
)
@opt.env_option(
    "--attest-nras-url",
    env="ATTEST_NRAS_URL",
    default="https://nras.attestation.nvidia.com/v3/attest/gpu",
    metavar="URL",
    help="NRAS GPU attestation endpoint (--attest-gpu nras).",
)
@opt.env_option(
    "--attest-nras-jwks-url",
    env="ATTEST_NRAS_JWKS_URL",
    default="https://nras.attestation.nvidia.com/.well-known/jwks.json",
    metavar="URL",
    help="JWKS whose keys must sign NRAS's tokens (cached an hour).",
)
@opt.pure_python_option
@opt.env_option(
    "--hosted-tools",
    env="HOSTED_TOOLS",
    default="drop",
    type=click.Choice(["drop", "refuse"]),
    help="Responses hosted tools the engine cannot run (web_search, ...): left out of the "
    "call with a logged warning, or refused with a 400.",
)
@opt.env_option(
    "--model-map",
    "model_map",
    env="MODEL_MAP",
    multiple=True,
    metavar="PATTERN=MODEL",
    help="Send calls for models matching PATTERN (shell-style, e.g. 'claude-*') as MODEL; "
    "first match wins; repeatable (env: space-separated).",
)
@opt.env_option(
    "--allow-host",
    "allow_hosts",
    env="ALLOW_HOSTS",
    multiple=True,
    metavar="HOST",
    help="Also answer requests whose Host is HOST (repeatable; env: space-separated). By "
    "default only loopback names and the --host address: a DNS-rebinding web page is refused.",
)
@opt.env_option(
    "--allow-origin",
    "allow_origins",
    env="ALLOW_ORIGINS",
    multiple=True,
    metavar="ORIGIN",
    help="Let web pages of ORIGIN (scheme://host[:port]) call the proxy, with CORS answers "
    "(repeatable; env: space-separated). By default every request from a web page is refused.",
)
@opt.log_level_option
@opt.log_format_option
def proxy_cmd(
    api_key: str | None,
    min_version: str,
    no_prefer_v2: bool,
    log_level: str,
    attest: str,
    attest_policy: Path | None,
    attest_collateral_dir: tuple[Path, ...],
    attest_pcs_url: str,
    attest_cache_dir: Path | None,
    attest_gpu: str | None,
    attest_nras_url: str,
    attest_nras_jwks_url: str,
    pure_python: bool,
    upstream: str | None,
    api_base: str | None,
    models_base: str | None,
    model_map: tuple[str, ...],
    log_format: str,
    **options: Any,
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

    Attestation (--attest auto, the default): before the first prompt to a chute that
    serves TEE evidence, the instance's key is checked against an Intel TDX quote (dcap-qvl,
    extra [attest]) and its GPUs' SPDM evidence, for a fresh nonce; an instance that fails
    never gets a prompt, and with none left the call fails with attest_failed. Chutes without
    evidence are used unattested (one warning) unless verified before or listed as
    confidential compute in /v1/models (attest_downgrade).

    What goes in plaintext: the model listing (GET /v1/models), which carries no user
    data. Between this proxy and your tools traffic is plain HTTP: keep --host on
    loopback.

    What the relay sees: your API key, the model's chute id, the instance id, a one-time
    nonce, the endpoint path, whether the call streams, body sizes and timing (and, with
    Chutes instances, per-chunk token counts in plaintext usage events) - never a prompt or
    a completion.

    The API key is the caller's own (Authorization: Bearer KEY or x-api-key: KEY) when it
    sends one, else --api-key / PQE2EE_PROXY_API_KEY; without either a call gets a 401. Logs hold
    method, path, status, sizes and durations only.

    \b
    Example:
      PQE2EE_PROXY_API_KEY=cpk_... pqe2ee proxy
      ANTHROPIC_BASE_URL=http://127.0.0.1:8787 claude --model MODEL
      codex exec -c model_provider=pqe2ee -c model=MODEL \\
        -c 'model_providers.pqe2ee={name="pqe2ee",base_url="http://127.0.0.1:8787/v1",wire_api="responses",env_key="CHUTES_API_KEY"}' ...
    """
    from pqe2ee.attest.capture import attest_options
    from pqe2ee.cli._logging import configure as configure_logging
    from pqe2ee.cli._preflight import check_port
    from pqe2ee.proxy.app import ProxyConfig, serve

    pairs: list[tuple[str, str]] = []
    for entry in model_map:
        pattern, sep, target = entry.partition("=")
        if not sep or not pattern.strip() or not target.strip():
            raise click.BadParameter(f"{entry!r}: expected PATTERN=MODEL", param_hint="--model-map")
        pairs.append((pattern.strip(), target.strip()))
    api_base = api_base or upstream
    models_base = models_base or upstream or api_base
    if api_base:
        options["api_base"] = api_base
    if models_base:
        options["models_base"] = models_base
    with opt.exit_on_error("proxy", log_level):
        attestation = attest_options(
            attest,
            policy=attest_policy,
            collateral_dirs=attest_collateral_dir,
            pcs_url=attest_pcs_url or None,
            cache_dir=attest_cache_dir,
            gpu=attest_gpu,
            nras_url=attest_nras_url,
            nras_jwks_url=attest_nras_jwks_url,
        )
        config = ProxyConfig(
            attest=attestation,
            model_map=tuple(pairs),
            api_key=api_key or None,
            min_version=int(min_version),
            prefer_v2=not no_prefer_v2,
            **options,
        )
        check_port("proxy", config.host, config.port)
        configure_logging(log_level, log_format)
        serve(config, log_level=log_level, pure_python=pure_python)
