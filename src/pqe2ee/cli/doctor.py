"""``pqe2ee doctor``: is this machine ready to run ``pqe2ee proxy`` (or an SDK) against a relay?

It reads the proxy's settings (``--api-base``, ``--models-base``, ``--api-key``: the same
``PQE2EE_PROXY_*`` variables and ``[proxy]`` keys are meant to be shared) and checks, in order:

* Python and package versions (core and extras);
* each crypto backend: loads or why not, and one ML-KEM-768 round trip's speed;
* the models host: reachable, TLS verified, a model list that parses;
* attestation available or not: the ``[attest]`` extra (dcap-qvl) importable;
* the relay: reachable, TLS verified, the API key accepted by discovery, instances and nonces
  handed out, profile v2 offered or not, and whether it serves TEE evidence for the chute
  (``GET /chutes/{chute}/evidence``, one fresh nonce; the evidence is not verified here, the
  proxy verifies every instance before sending it a prompt);
* Redis, when ``--redis`` is given: a Redis URL that answers PING.

Each check is one PASS / WARN / FAIL line (INFO for facts), naming the piece and the reason;
``--json`` prints the same as one document. The exit code is the worst result: 0 for PASS,
1 for WARN, 2 for FAIL. Discovery spends one of the key's discoveries (10 a minute on Chutes)
and one batch of nonces, and one evidence request; nothing is encrypted or sent to a model. Keys never appear in the
output (only whether one was given).
"""

from __future__ import annotations

import enum
import importlib.metadata
import ipaddress
import json
import platform
import socket
import ssl
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import click

from pqe2ee.cli import _options as opt

__all__ = ["Check", "Status", "doctor_cmd", "run_checks"]

PACKAGES = (
    "cryptography",
    "msgspec",
    "anyio",
    "httpx2",
    "click",
    "starlette",
    "uvicorn",
    "redis",
    "pycryptodome",
    "pqcrypto",
    "liboqs-python",
)


class Status(enum.IntEnum):
    INFO = 0
    PASS = 1
    WARN = 2
    FAIL = 3


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str


EXIT_BY_WORST = {Status.INFO: 0, Status.PASS: 0, Status.WARN: 1, Status.FAIL: 2}


def _versions() -> list[Check]:
    found, missing = [], []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    py_ok = sys.version_info >= (3, 11)
    try:
        own = importlib.metadata.version("pqe2ee")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        own = "(not installed; from source)"
    return [
        Check(
            "python",
            Status.PASS if py_ok else Status.FAIL,
            f"{platform.python_implementation()} {platform.python_version()}"
            + ("" if py_ok else " (pqe2ee needs 3.11 or later)"),
        ),
        Check(
            "pqe2ee",
            Status.INFO,
            f"{own}; {', '.join(found)}"
            + (f"; not installed: {', '.join(missing)}" if missing else ""),
        ),
    ]


def _kem_speed(name: str) -> str:
    from pqe2ee.backends import get_kem

    kem = get_kem(name)
    key = kem.generate()
    rounds, start = 0, time.perf_counter()
    while rounds < 3 or time.perf_counter() - start < 0.05:
        ciphertext, _ = kem.encapsulate(key.public_key)
        key.decapsulate(ciphertext)
        rounds += 1
    per = (time.perf_counter() - start) / rounds
    key.wipe()
    return f"{per * 1e6:.0f} µs per ML-KEM-768 encapsulate+decapsulate"


def _backends() -> list[Check]:
    from pqe2ee.backends import BACKENDS, get_kem, unavailable
    from pqe2ee.errors import BackendError

    checks = []
    for name in BACKENDS:
        why = unavailable(name)
        if why is not None:
            checks.append(Check(f"backend {name}", Status.INFO, f"unavailable: {why}"))
            continue
        try:
            checks.append(Check(f"backend {name}", Status.PASS, _kem_speed(name)))
        except Exception as exc:  # a backend that loads but fails to run is a real problem
            checks.append(Check(f"backend {name}", Status.FAIL, f"{type(exc).__name__}: {exc}"))
    try:
        checks.append(Check("backend auto", Status.PASS, f"picks {get_kem('auto').name}"))
    except BackendError as exc:
        checks.append(Check("backend auto", Status.FAIL, f"no ML-KEM-768 backend: {exc}"))
    return checks


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls(url: str, timeout: float) -> Check | None:
    """For an https URL, a handshake with the default (system) trust store; for plain HTTP
    to a host off loopback, a warning. None for plain HTTP on loopback."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "http":
        if _is_loopback(host):
            return None
        return Check("", Status.WARN, "plain HTTP off loopback: API key and metadata in clear")
    port = parts.port or 443
    context = ssl.create_default_context()
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            return Check("", Status.PASS, f"TLS verified ({tls.version()})")
    except ssl.SSLCertVerificationError as exc:
        return Check("", Status.FAIL, f"TLS certificate refused: {exc.verify_message}")
    except (ssl.SSLError, OSError) as exc:
        return Check("", Status.FAIL, f"TLS handshake failed: {type(exc).__name__}: {exc}")


def _get(client: Any, url: str, **kw: Any) -> tuple[Any | None, str]:
    import httpx2

    try:
        return client.get(url, **kw), ""
    except httpx2.HTTPError as exc:
        return None, f"cannot reach {url}: {type(exc).__name__}: {exc or 'no answer'}"


def _host_checks(label: str, base: str, timeout: float) -> list[Check]:
    tls = _tls(base, timeout)
    if tls is None:
        return []
    return [Check(f"{label} tls", tls.status, f"{base}: {tls.detail}")]


def _upstreams(
    api_base: str, models_base: str, api_key: str | None, model: str | None, timeout: float
) -> list[Check]:
    import httpx2

    from pqe2ee.errors import PQE2EEError
    from pqe2ee.protocol.clocks import Monotonic
    from pqe2ee.protocol.discovery import looks_like_uuid, parse_discovery, parse_models
    from pqe2ee.protocol.v2.negotiation import DISCOVERY_FIELD, parse_v2_offer

    checks = _host_checks("models", models_base, timeout)
    chute: str | None = model if model and looks_like_uuid(model) else None
    with httpx2.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        answer, problem = _get(client, f"{models_base}/v1/models")
        if answer is None:
            checks.append(Check("models", Status.FAIL, problem))
        elif answer.status_code != 200:
            checks.append(
                Check(
                    "models", Status.FAIL, f"{models_base}/v1/models answered {answer.status_code}"
                )
            )
        else:
            try:
                mapping = parse_models(answer.content)
            except PQE2EEError as exc:
                checks.append(
                    Check("models", Status.FAIL, f"{models_base}/v1/models: {exc.message}")
                )
                mapping = {}
            else:
                checks.append(
                    Check(
                        "models",
                        Status.PASS,
                        f"{models_base}: {len(mapping)} models with a chute id",
                    )
                )
            if model and chute is None:
                chute = mapping.get(model)
                if chute is None:
                    checks.append(Check("models", Status.FAIL, f"no model {model!r} listed"))
            elif chute is None and mapping:
                model, chute = next(iter(mapping.items()))
        checks += _host_checks("relay", api_base, timeout)
        answer, problem = _get(client, f"{api_base}/")
        if answer is None:
            return [*checks, Check("relay", Status.FAIL, problem)]
        checks.append(Check("relay", Status.PASS, f"{api_base} answers HTTP"))
        if not api_key:
            checks.append(
                Check(
                    "relay key",
                    Status.WARN,
                    "no API key (--api-key / PQE2EE_PROXY_API_KEY): callers must "
                    "send their own; discovery not checked",
                )
            )
            return checks
        if chute is None:
            checks.append(Check("relay", Status.WARN, "no chute to discover (no model listed)"))
            return checks
        url = f"{api_base}/e2e/instances/{chute}"
        answer, problem = _get(client, url, headers={"Authorization": f"Bearer {api_key}"})
    if answer is None:
        return [*checks, Check("relay", Status.FAIL, problem)]
    if answer.status_code in (401, 403):
        return [
            *checks,
            Check(
                "relay key", Status.FAIL, f"{api_base} refused the API key ({answer.status_code})"
            ),
        ]
    if answer.status_code != 200:
        return [
            *checks,
            Check(
                "relay",
                Status.FAIL,
                f"discovery for {model!r} at {api_base} answered {answer.status_code}",
            ),
        ]
    checks.append(Check("relay key", Status.PASS, f"{api_base} accepted the API key"))
    now = time.time()
    try:
        found = parse_discovery(answer.content, Monotonic(now))  # Unix time, no wall
    except PQE2EEError as exc:
        return [*checks, Check("discovery", Status.FAIL, f"{api_base}: {exc.message}")]
    nonces = sum(len(i.nonces) for i in found.instances)
    checks.append(
        Check(
            "discovery",
            Status.PASS if found.instances else Status.FAIL,
            f"{model!r}: {len(found.instances)} instances, {nonces} nonces"
            + (f", {found.skipped} malformed rows skipped" if found.skipped else ""),
        )
    )
    offers = 0
    for info in found.instances:
        try:
            offers += parse_v2_offer(info.extra, now) is not None
        except PQE2EEError as exc:
            checks.append(
                Check(
                    "v2",
                    Status.FAIL,
                    f"instance {info.instance_id}: bad {DISCOVERY_FIELD}: {exc.message}",
                )
            )
    if found.instances:
        checks.append(
            Check(
                "v2",
                Status.PASS if offers == len(found.instances) else Status.WARN,
                f"{offers} of {len(found.instances)} instances offer profile v2"
                + ("" if offers else " (v1 only: use --min-version 1, the proxy's default)"),
            )
        )
        ids = [i.instance_id for i in found.instances]
        checks.append(_evidence(api_base, chute, model, api_key, ids, timeout))
    return checks


def _attest_available() -> list[Check]:
    """Can this machine verify TDX evidence at all (the ``[attest]`` extra: dcap-qvl)?"""
    from pqe2ee.attest.tdx import load_qvl
    from pqe2ee.errors import AttestationError

    try:
        load_qvl()
    except AttestationError:
        return [
            Check(
                "attestation",
                Status.WARN,
                "unavailable: dcap-qvl is not importable (pip install 'pqe2ee[attest]'); "
                "a chute that serves evidence is refused (attest_unavailable) unless the proxy "
                "runs with --attest off",
            )
        ]
    try:
        version = importlib.metadata.version("dcap-qvl")
    except importlib.metadata.PackageNotFoundError:  # importable without metadata
        version = "(version unknown)"
    return [Check("attestation", Status.PASS, f"available: dcap-qvl {version}")]


def _evidence(
    api_base: str, chute: str, model: str | None, api_key: str, ids: list[str], timeout: float
) -> Check:
    """Does the relay serve TEE evidence for ``chute`` (one request, a fresh nonce)? Only the
    answer's shape and which discovered instances it covers are checked here."""
    import httpx2

    from pqe2ee.attest.tdx import load_qvl
    from pqe2ee.attest.verify import new_nonce, parse_evidence
    from pqe2ee.errors import AttestationError

    url = f"{api_base}/chutes/{chute}/evidence"
    with httpx2.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        answer, problem = _get(
            client,
            url,
            params={"nonce": new_nonce()},
            headers={"Authorization": f"Bearer {api_key}"},
        )
    if answer is None:
        return Check("evidence", Status.WARN, problem)
    status = answer.status_code
    unattested = (
        f"{model!r}: the relay serves no TEE evidence ({{why}}): its instances are not "
        "attested (the proxy's --attest auto sends to them with a warning; require refuses)"
    )
    if status == 404:
        return Check("evidence", Status.INFO, unattested.format(why="404"))
    if status in (401, 403):
        return Check("evidence", Status.FAIL, f"{url} refused the API key ({status})")
    if status != 200:
        return Check("evidence", Status.WARN, f"{url} answered {status}")
    try:
        bundle = parse_evidence(answer.content)
    except AttestationError as exc:
        return Check(
            "evidence",
            Status.FAIL,
            f"{url}: {exc.message} (the proxy refuses this chute: {exc.code.value})",
        )
    if not bundle.entries and not bundle.failed:
        return Check("evidence", Status.INFO, unattested.format(why="an empty list"))
    covered = sum(i in bundle.entries and i not in bundle.failed for i in ids)
    detail = (
        f"{model!r}: evidence for {covered} of {len(ids)} discovered instances"
        + (f", {len(bundle.failed)} failed" if bundle.failed else "")
        + "; not verified here (the proxy verifies each instance before sending)"
    )
    try:
        load_qvl()
    except AttestationError:
        return Check(
            "evidence",
            Status.FAIL,
            detail + "; but dcap-qvl is missing: calls fail with attest_unavailable",
        )
    if covered < len(ids):
        return Check("evidence", Status.WARN, detail + "; instances without evidence get no prompt")
    return Check("evidence", Status.PASS, detail)


def _listen(host: str, port: int) -> list[Check]:
    """Can ``pqe2ee proxy`` listen where it is configured to - or is one there already?"""
    import httpx2

    from pqe2ee.cli._preflight import port_problem

    if port == 0:
        return []
    problem = port_problem(host, port)
    if problem is None:
        return [Check("proxy port", Status.PASS, f"{host}:{port} is free for pqe2ee proxy")]
    if "--port" not in problem:
        return [Check("proxy port", Status.FAIL, problem)]
    try:
        answer = httpx2.get(f"http://{host}:{port}/ready", timeout=2, trust_env=False)
        running = answer.status_code in (200, 503) and "checks" in answer.json()
    except (httpx2.HTTPError, ValueError):
        running = False
    if running:
        state = "ready" if answer.status_code == 200 else "not ready"
        return [
            Check(
                "proxy port",
                Status.INFO,
                f"a pqe2ee server already answers on {host}:{port} ({state})",
            )
        ]
    return [Check("proxy port", Status.FAIL, f"{problem}: another program holds it")]


def _redis(url: str | None) -> list[Check]:
    if url is None:
        return []
    from pqe2ee.cli._preflight import redact, redis_problem

    problem = redis_problem(url)
    return [
        Check(
            "redis",
            Status.FAIL if problem else Status.PASS,
            f"{redact(url)}: {problem or 'answers PING'}",
        )
    ]


def run_checks(
    *,
    api_base: str,
    models_base: str,
    api_key: str | None = None,
    model: str | None = None,
    redis_url: str | None = None,
    timeout: float = 10.0,
    backends: bool = True,
    host: str | None = None,
    port: int | None = None,
) -> list[Check]:
    """Every check, in the order printed."""
    api_base, models_base = api_base.rstrip("/"), models_base.rstrip("/")
    steps: list[Callable[[], list[Check]]] = [_versions]
    if backends:
        steps.append(_backends)
    steps.append(_attest_available)
    steps.append(lambda: _upstreams(api_base, models_base, api_key, model, timeout))
    steps.append(lambda: _redis(redis_url))
    if host is not None and port is not None:
        steps.append(lambda: _listen(host, port))
    return [check for step in steps for check in step()]


_MODEL_HELP = "Model (or chute id) to discover. Default: the first one listed."
_REDIS_HELP = "Also check this Redis (the relay's or instance's --redis)."


@opt.command("doctor")
@opt.upstream_options("proxy", "to test (prefer the env variable)")
@opt.env_option("--model", env="MODEL", legacy=(), metavar="NAME", help=_MODEL_HELP)
@opt.env_option("--redis", "redis_url", env="REDIS", legacy=(), metavar="URL", help=_REDIS_HELP)
@opt.env_option(
    "--timeout",
    env="TIMEOUT",
    legacy=(),
    default=10.0,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds allowed per network check.",
)
@opt.env_option(
    "--host",
    env="HOST",
    scope="proxy",
    default="127.0.0.1",
    help="Where the proxy will listen (checked: free, or a proxy already there).",
)
@opt.env_option(
    "--port",
    env="PORT",
    scope="proxy",
    default=8787,
    type=click.IntRange(0, 65535),
    help="The proxy's port.",
)
@opt.env_option(
    "--json",
    "as_json",
    env="JSON",
    legacy=(),
    is_flag=True,
    help="One JSON document instead of lines.",
)
@opt.env_option(
    "--skip-backends",
    env="SKIP_BACKENDS",
    legacy=(),
    is_flag=True,
    help="Do not load and time the crypto backends.",
)
def doctor_cmd(as_json: bool, skip_backends: bool, **options: Any) -> None:
    """Check Python, packages, crypto backends, attestation (dcap-qvl), the relay and models
    hosts (reachable, TLS, key accepted, discovery, v2 offered, TEE evidence served), and Redis
    when given.

    One PASS / WARN / FAIL line per check (INFO: facts); exit code 0 (all pass), 1 (a
    warning) or 2 (a failure). Spends one discovery of the key's budget.
    """
    checks = run_checks(backends=not skip_backends, **options)
    worst = max((c.status for c in checks), default=Status.PASS)
    if as_json:
        doc = {
            "worst": worst.name,
            "checks": [{**asdict(c), "status": c.status.name} for c in checks],
        }
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            click.echo(f"{c.status.name:4}  {c.name:{width}}  {c.detail}")
    sys.exit(EXIT_BY_WORST[worst])
