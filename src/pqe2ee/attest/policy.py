"""Attestation policy and verdict values (pure data, no I/O).

A :class:`Policy` says what a verifier accepts; a :class:`Verdict` says, per instance, what was
checked and why it was rejected (stable :class:`~pqe2ee.errors.ErrorCode` reasons owned by
:class:`~pqe2ee.errors.AttestationError`), never just a bool.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pqe2ee.errors import AttestationError, ErrorCode

__all__ = ["Check", "GpuMode", "MeasurementSet", "Measurements", "Policy", "Verdict"]

_MEASUREMENT_FIELDS = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")


class GpuMode(enum.StrEnum):
    """How GPU evidence is checked: ``verify`` (offline SPDM signature, chain pinned to the
    NVIDIA Device Identity CA, requester nonce), ``nras`` (online: NVIDIA's NRAS is sent the
    evidence with H and its ES384 tokens are checked against NVIDIA's JWKS; opt-in), ``off``."""

    VERIFY = "verify"
    NRAS = "nras"
    OFF = "off"


@dataclass(frozen=True)
class Measurements:
    """The TD's measurement registers, lowercase hex (48 bytes each)."""

    mrtd: str
    rtmr0: str
    rtmr1: str
    rtmr2: str
    rtmr3: str

    def as_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in _MEASUREMENT_FIELDS}


@dataclass(frozen=True)
class MeasurementSet:
    """One allowlist entry: each named register must equal its value; a register left
    ``None`` is not pinned by this entry."""

    mrtd: str | None = None
    rtmr0: str | None = None
    rtmr1: str | None = None
    rtmr2: str | None = None
    rtmr3: str | None = None

    def matches(self, m: Measurements) -> bool:
        wanted = {name: getattr(self, name) for name in _MEASUREMENT_FIELDS}
        return all(v is None or v.lower() == getattr(m, k) for k, v in wanted.items())


@dataclass(frozen=True)
class Policy:
    """What the verifier accepts.

    ``allowed_tcb_statuses``: dcap-qvl TCB statuses accepted (default ``UpToDate`` only);
    ``allow_debug``: accept debug TDs (never in production); ``measurements``: allowlist of
    MRTD/RTMR sets, ``None`` = not pinned (the verdict says so); ``gpu``: :class:`GpuMode`;
    ``max_age``: seconds a verdict may be reused for the same (chute, instance, key);
    ``require_cert_binding``: ``report_data[32:64]`` must hash the entry certificate's SPKI.
    """

    allowed_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    allow_debug: bool = False
    measurements: tuple[MeasurementSet, ...] | None = None
    gpu: GpuMode = GpuMode.VERIFY
    max_age: float = 3600.0
    require_cert_binding: bool = True

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Policy:
        """A policy from a JSON object (``pqe2ee attest verify --policy FILE``). Unknown keys
        or wrong types raise :class:`AttestationError` ``attest_unavailable`` (the policy
        cannot be used, so nothing can be verified)."""
        known = {
            "allowed_tcb_statuses",
            "allow_debug",
            "measurements",
            "gpu",
            "max_age",
            "require_cert_binding",
        }
        unknown = set(doc) - known
        if unknown:
            raise _bad_policy(f"unknown policy keys: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        try:
            if "allowed_tcb_statuses" in doc:
                statuses = doc["allowed_tcb_statuses"]
                if not isinstance(statuses, list) or not all(isinstance(s, str) for s in statuses):
                    raise _bad_policy("allowed_tcb_statuses must be a list of strings")
                kwargs["allowed_tcb_statuses"] = frozenset(statuses)
            for key in ("allow_debug", "require_cert_binding"):
                if key in doc:
                    if not isinstance(doc[key], bool):
                        raise _bad_policy(f"{key} must be a boolean")
                    kwargs[key] = doc[key]
            if "gpu" in doc:
                kwargs["gpu"] = GpuMode(doc["gpu"])
            if "max_age" in doc:
                age = doc["max_age"]
                if isinstance(age, bool) or not isinstance(age, int | float) or age < 0:
                    raise _bad_policy("max_age must be a non-negative number")
                kwargs["max_age"] = float(age)
            if doc.get("measurements") is not None:
                entries = doc["measurements"]
                if not isinstance(entries, list):
                    raise _bad_policy("measurements must be a list of objects")
                sets = []
                for entry in entries:
                    if not isinstance(entry, dict) or set(entry) - set(_MEASUREMENT_FIELDS):
                        raise _bad_policy(f"a measurement set has keys of {_MEASUREMENT_FIELDS}")
                    if not all(isinstance(v, str) for v in entry.values()):
                        raise _bad_policy("measurement values are hex strings")
                    sets.append(MeasurementSet(**entry))
                kwargs["measurements"] = tuple(sets)
        except ValueError as exc:  # GpuMode(...)
            raise _bad_policy(str(exc)) from None
        return cls(**kwargs)


def _bad_policy(message: str) -> AttestationError:
    return AttestationError(f"policy: {message}", code=ErrorCode.ATTEST_UNAVAILABLE)


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``name`` (``quote``, ``tcb_status``, ``debug``, ``nonce_binding``,
    ...), ``ok``, the reason ``code`` when it failed, and a short ``detail``."""

    name: str
    ok: bool
    code: ErrorCode | None = None
    detail: str = ""


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one instance's evidence.

    ``trusted`` is true only when every check passed; ``reasons`` lists the failed checks'
    codes (stable, in check order). ``measurements_pinned`` is false when the policy had no
    allowlist: the TD is genuine and bound to the key, but which image it runs was not checked.
    """

    instance_id: str
    trusted: bool
    reasons: tuple[ErrorCode, ...]
    checks: tuple[Check, ...]
    verified_at: float
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    fmspc: str | None = None
    measurements: Measurements | None = None
    measurements_pinned: bool = False
    gpus_checked: int = 0
    gpus_ok: int = 0
    notes: tuple[str, ...] = field(default=())
    #: True when the quote was checked to bind the instance's v2 key as well (spec/v2.md §8.3).
    v2_bound: bool = False

    @classmethod
    def from_checks(
        cls, instance_id: str, checks: list[Check], verified_at: float, **info: Any
    ) -> Verdict:
        reasons: list[ErrorCode] = []
        for check in checks:
            if not check.ok and check.code is not None and check.code not in reasons:
                reasons.append(check.code)
        return cls(
            instance_id=instance_id,
            trusted=not reasons and bool(checks),
            reasons=tuple(reasons),
            checks=tuple(checks),
            verified_at=verified_at,
            **info,
        )

    def to_json(self) -> dict[str, Any]:
        """The ``pqe2ee attest verify --json`` shape of this verdict."""
        return {
            "instance_id": self.instance_id,
            "verdict": "trusted" if self.trusted else "rejected",
            "reasons": [r.value for r in self.reasons],
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "fmspc": self.fmspc,
            "measurements": self.measurements.as_dict() if self.measurements else {},
            "measurements_pinned": self.measurements_pinned,
            "gpus": {"checked": self.gpus_checked, "ok": self.gpus_ok},
            "checks": [
                {
                    "name": c.name,
                    "ok": c.ok,
                    "code": c.code.value if c.code else None,
                    "detail": c.detail,
                }
                for c in self.checks
            ],
            "notes": list(self.notes),
            "v2_bound": self.v2_bound,
        }
