"""``pqe2ee attest``: verify a saved TEE evidence capture (and capture one from a live API).

``pqe2ee attest verify --capture DIR`` re-verifies, offline, a capture laid out like
``../shared/attestation/chutes/<name>/`` at its capture time (or ``--at``), and prints one
verdict per discovered instance (``--json`` for the machine form). Exit 0 when the run
completed, whatever the verdicts; 2 when the capture, policy or verifier is unusable.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click

from pqe2ee.cli._options import env_option, exit_on_error, fail

__all__ = ["attest_cmd"]

_DIR = click.Path(exists=True, file_okay=False, dir_okay=True, path_type=Path)


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        fail("attest verify", f"--at {value!r} is not an ISO 8601 time")
    if when.tzinfo is None:
        fail("attest verify", "--at needs a time zone (e.g. 2026-05-20T02:18:19Z)")
    return when


@click.group("attest")
def attest_cmd() -> None:
    """Verify TEE evidence (Intel TDX + NVIDIA GPUs) bound to instance keys."""


@attest_cmd.command("verify")
@env_option(
    "--capture",
    "capture_dir",
    env="CAPTURE",
    type=_DIR,
    required=True,
    help="Capture directory (manifest.json, discovery.body, evidence.body, intel-*).",
)
@env_option(
    "--collateral-dir",
    env="COLLATERAL_DIR",
    type=_DIR,
    multiple=True,
    help="More Intel collateral answers (*.body + *.meta.json); repeatable.",
)
@env_option(
    "--at",
    env="AT",
    default=None,
    help="Verification time, ISO 8601 with zone [default: the capture time].",
)
@env_option(
    "--policy",
    "policy_file",
    env="POLICY",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Policy JSON (allowed_tcb_statuses, measurements, gpu, ...).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
def verify_cmd(
    capture_dir: Path,
    collateral_dir: tuple[Path, ...],
    at: str | None,
    policy_file: Path | None,
    as_json: bool,
) -> None:
    """Verify a saved capture: one verdict per discovered instance."""
    from pqe2ee.attest import Policy, verify_evidence
    from pqe2ee.attest.capture import load_capture, load_collateral_dir, load_policy

    when = _when(at)
    with exit_on_error("attest verify"):
        policy = load_policy(policy_file) if policy_file is not None else Policy()
        capture = load_capture(capture_dir)
        collateral = capture.collateral
        for extra in collateral_dir:
            collateral = collateral.merged(load_collateral_dir(extra))
        now = (when or capture.captured_at).timestamp()
        verdicts = verify_evidence(
            capture.instances,
            capture.evidence,
            capture.nonce_hex,
            collateral,
            policy,
            now,
            v2_keys=capture.v2_keys,
        )
    unmatched = sorted(set(capture.evidence.entries) - set(capture.instances))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "capture": capture_dir.name,
                    "verified_at": datetime.fromtimestamp(now, UTC).isoformat(),
                    "instances": [v.to_json() for v in verdicts],
                    "evidence_without_discovery": unmatched,
                },
                indent=2,
            )
        )
        return
    trusted = sum(v.trusted for v in verdicts)
    click.echo(
        f"capture {capture_dir.name}: {len(verdicts)} instances, {trusted} trusted, "
        f"{len(verdicts) - trusted} rejected (at {(when or capture.captured_at).isoformat()})"
    )
    for v in verdicts:
        word = "trusted " if v.trusted else "rejected"
        why = ", ".join(r.value for r in v.reasons) or (
            "measurements not pinned" if not v.measurements_pinned else "measurements pinned"
        )
        click.echo(
            f"  {v.instance_id}  {word}  tcb={v.tcb_status or '-'}  fmspc={v.fmspc or '-'}"
            f"  gpus={v.gpus_ok}/{v.gpus_checked}  {why}"
        )
    for instance_id in unmatched:
        click.echo(f"  {instance_id}  (evidence only, not in discovery: not a candidate)")


@attest_cmd.command("fetch")
@env_option("--chute", env="CHUTE", required=True, help="Chute id (UUID).")
@env_option(
    "--out",
    env="OUT",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory to write the capture to (created).",
)
@env_option(
    "--api-base",
    env="API_BASE",
    default="https://api.chutes.ai",
    metavar="URL",
    help="Relay serving discovery and evidence.",
)
@env_option("--api-key", env="API_KEY", metavar="KEY", help="Bearer key for the relay.")
@env_option(
    "--attest-pcs-url",
    env="ATTEST_PCS_URL",
    default="https://api.trustedservices.intel.com",
    metavar="URL",
    help="Intel PCS (or a PCCS) for the collateral.",
)
@env_option(
    "--root-ca-crl-url",
    env="ROOT_CA_CRL_URL",
    default="https://certificates.trustedservices.intel.com/IntelSGXRootCA.der",
    metavar="URL",
    help="Intel SGX root CA CRL.",
)
def fetch_cmd(
    chute: str,
    out: Path,
    api_base: str,
    api_key: str | None,
    attest_pcs_url: str,
    root_ca_crl_url: str,
) -> None:
    """Capture a chute's discovery, evidence (fresh nonce) and Intel collateral into OUT, in
    the layout `attest verify --capture` reads, then verify it."""
    from pqe2ee.attest.capture import fetch_capture

    with exit_on_error("attest fetch"):
        fetch_capture(
            out,
            chute=chute,
            api_base=api_base.rstrip("/"),
            api_key=api_key,
            pcs_url=attest_pcs_url.rstrip("/"),
            root_ca_crl_url=root_ca_crl_url,
        )
    click.echo(f"captured chute {chute} into {out}")
    ctx = click.get_current_context()
    ctx.invoke(
        verify_cmd, capture_dir=out, collateral_dir=(), at=None, policy_file=None, as_json=False
    )
