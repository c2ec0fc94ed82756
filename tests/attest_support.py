"""Shared helpers for the attestation tests: the real captures in ../shared/attestation."""

from __future__ import annotations

import os
from pathlib import Path

from pqe2ee.attest.capture import Capture, load_capture, load_collateral_dir
from pqe2ee.attest.collateral import Collateral


def attestation_dir() -> Path:
    """PQE2EE_ATTESTATION, else attestation/ beside PQE2EE_VECTORS, else ../shared/attestation."""
    override = os.environ.get("PQE2EE_ATTESTATION")
    if override:
        path = Path(override)
    elif os.environ.get("PQE2EE_VECTORS"):
        path = Path(os.environ["PQE2EE_VECTORS"]).parent / "attestation"
    else:
        path = Path(__file__).resolve().parents[2] / "shared" / "attestation"
    if not (path / "chutes").is_dir():
        raise RuntimeError(
            f"attestation fixtures not found at {path} (set PQE2EE_ATTESTATION to the "
            "shared/attestation folder)"
        )
    return path


ATTESTATION = attestation_dir()
CAPTURES = sorted(p for p in (ATTESTATION / "chutes").iterdir() if p.is_dir())
EXTRA = ATTESTATION / "intel-tcb-info-extra"

# instance id -> FMSPC, per capture (established on the captures; the b0c06f hosts need EXTRA)
EXPECTED_FMSPC: dict[str, dict[str, str]] = {
    "glm-5-tee-2026-05-20": {
        "9034c7a4-1d18-4628-8ccf-2ce3fd289768": "90c06f000000",
        "1da9c33a-2eea-40c3-a304-a9a0ddf384e0": "b0c06f000000",
        "209295db-9c2b-41df-866a-6b48a98d59dd": "90c06f000000",
        "07e308a1-2dc7-4e93-a652-c59311fb1f05": "b0c06f000000",
    },
}


def capture(name: str) -> Capture:
    return load_capture(ATTESTATION / "chutes" / name)


def full_collateral(cap: Capture) -> Collateral:
    return cap.collateral.merged(load_collateral_dir(EXTRA))
