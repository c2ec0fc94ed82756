"""Attested E2EE: verify an instance's TEE evidence before a prompt is sealed to its key.

Sans-IO: parsing, binding, policy and verdicts are pure functions of bytes, time and policy
(:mod:`~pqe2ee.attest.verify`, :mod:`~pqe2ee.attest.tdx`, :mod:`~pqe2ee.attest.gpu`,
:mod:`~pqe2ee.attest.collateral`); fetching evidence and collateral is the transports' job, and
reading a saved capture is :mod:`~pqe2ee.attest.capture`. TDX quotes are verified with
``dcap-qvl`` (extra ``[attest]``); GPU SPDM evidence with ``cryptography``.
"""

from __future__ import annotations

from pqe2ee.attest.collateral import Collateral, QeIdentity, TcbInfo
from pqe2ee.attest.policy import Check, GpuMode, Measurements, MeasurementSet, Policy, Verdict
from pqe2ee.attest.verify import (
    EvidenceBundle,
    new_nonce,
    nonce_binding,
    parse_evidence,
    verify_evidence,
    verify_instance,
)

__all__ = [
    "Check",
    "Collateral",
    "EvidenceBundle",
    "GpuMode",
    "MeasurementSet",
    "Measurements",
    "Policy",
    "QeIdentity",
    "TcbInfo",
    "Verdict",
    "new_nonce",
    "nonce_binding",
    "parse_evidence",
    "verify_evidence",
    "verify_instance",
]
