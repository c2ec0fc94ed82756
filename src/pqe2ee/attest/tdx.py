"""Intel TDX quote checks: dcap-qvl's verification (signature, PCK chain to Intel's root, CRLs,
TCB info, QE identity) plus our own checks of the parsed quote (version, TEE type, debug bit,
measurements). Pure: quote bytes, collateral, time and policy in; :class:`Check` values out.

dcap-qvl is the ``[attest]`` extra; without it :func:`load_qvl` raises ``attest_unavailable``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pqe2ee.attest.collateral import Collateral, SelectedCollateral
from pqe2ee.attest.policy import Check, Measurements, Policy
from pqe2ee.errors import AttestationError, ErrorCode

__all__ = ["TDX_TEE_TYPE", "ParsedQuote", "check_quote", "load_qvl", "parse_quote"]

TDX_TEE_TYPE = 0x81
_QUOTE_VERSIONS = (4, 5)
_MAX_QUOTE = 64 * 1024


def load_qvl() -> ModuleType:
    """The dcap_qvl module, or ``attest_unavailable``."""
    try:
        return importlib.import_module("dcap_qvl")
    except ImportError:
        raise AttestationError(
            "TDX verification needs dcap-qvl: pip install 'pqe2ee[attest]'",
            code=ErrorCode.ATTEST_UNAVAILABLE,
        ) from None


@dataclass(frozen=True)
class ParsedQuote:
    """What our own checks read from a quote (dcap-qvl parses it)."""

    version: int
    tee_type: int
    td_attributes: bytes
    report_data: bytes
    measurements: Measurements
    fmspc: str
    ca: str

    @property
    def debug(self) -> bool:
        """TD attributes bit 0 (TUD.DEBUG)."""
        return bool(self.td_attributes[0] & 1)


def parse_quote(raw: bytes, qvl: ModuleType | None = None) -> ParsedQuote:
    """Parse a TDX quote; ``attest_evidence_malformed`` when it is not one."""
    qvl = qvl or load_qvl()
    if len(raw) > _MAX_QUOTE:
        raise AttestationError(
            f"quote of {len(raw)} bytes", code=ErrorCode.ATTEST_EVIDENCE_MALFORMED
        )
    try:
        quote: Any = qvl.parse_quote(raw)
        report = quote.report
        header = quote.header
        if not quote.is_tdx():
            raise ValueError("not a TDX quote")
        return ParsedQuote(
            version=int(header.version),
            tee_type=int(header.tee_type),
            td_attributes=bytes(report.td_attributes),
            report_data=bytes(report.report_data),
            measurements=Measurements(
                mrtd=bytes(report.mr_td).hex(),
                rtmr0=bytes(report.rt_mr0).hex(),
                rtmr1=bytes(report.rt_mr1).hex(),
                rtmr2=bytes(report.rt_mr2).hex(),
                rtmr3=bytes(report.rt_mr3).hex(),
            ),
            fmspc=str(quote.fmspc()).lower(),
            ca=str(quote.ca()).lower(),
        )
    except (ValueError, AttributeError, TypeError) as exc:
        raise AttestationError(
            f"quote: {str(exc)[:100]}", code=ErrorCode.ATTEST_EVIDENCE_MALFORMED
        ) from None


@dataclass(frozen=True)
class QuoteResult:
    checks: list[Check]
    tcb_status: str | None
    advisory_ids: tuple[str, ...]
    collateral_expires: float | None


def check_quote(
    raw: bytes,
    quote: ParsedQuote,
    collateral: Collateral,
    policy: Policy,
    now: float,
    qvl: ModuleType | None = None,
    root_ca_der: bytes | None = None,
) -> QuoteResult:
    """dcap-qvl verification and our own header/attribute/measurement checks.

    ``root_ca_der`` replaces Intel's root only for the test signer (tests); production callers
    never pass it.
    """
    qvl = qvl or load_qvl()
    checks = [
        Check(
            "quote_version",
            quote.version in _QUOTE_VERSIONS,
            None if quote.version in _QUOTE_VERSIONS else ErrorCode.ATTEST_QUOTE_VERSION,
            f"version {quote.version}",
        ),
        Check(
            "tee_type",
            quote.tee_type == TDX_TEE_TYPE,
            None if quote.tee_type == TDX_TEE_TYPE else ErrorCode.ATTEST_TEE_TYPE,
            f"0x{quote.tee_type:02x}",
        ),
    ]
    debug_ok = policy.allow_debug or not quote.debug
    checks.append(
        Check(
            "debug",
            debug_ok,
            None if debug_ok else ErrorCode.ATTEST_DEBUG,
            f"td_attributes {quote.td_attributes.hex()}",
        )
    )
    selected = collateral.select(quote.fmspc, quote.ca, now)
    status: str | None = None
    advisories: tuple[str, ...] = ()
    if selected is None:
        checks.append(
            Check(
                "collateral",
                False,
                ErrorCode.ATTEST_COLLATERAL_MISSING,
                f"no collateral valid now for FMSPC {quote.fmspc} / {quote.ca}",
            )
        )
    else:
        checks.append(Check("collateral", True, detail=f"FMSPC {quote.fmspc}"))
        try:
            report = _verify(qvl, raw, selected, int(now), root_ca_der)
        except ValueError as exc:
            checks.append(Check("quote", False, ErrorCode.ATTEST_QUOTE_INVALID, str(exc)[:160]))
        else:
            status = str(report.status)
            advisories = tuple(str(a) for a in report.advisory_ids)
            checks.append(Check("quote", True, detail="dcap-qvl"))
            ok = status in policy.allowed_tcb_statuses
            checks.append(
                Check("tcb_status", ok, None if ok else ErrorCode.ATTEST_TCB_STATUS, status)
            )
    if policy.measurements is not None:
        pinned = any(entry.matches(quote.measurements) for entry in policy.measurements)
        checks.append(
            Check(
                "measurements",
                pinned,
                None if pinned else ErrorCode.ATTEST_MEASUREMENT,
                "on the allowlist" if pinned else "not on the allowlist",
            )
        )
    return QuoteResult(
        checks, status, advisories, selected.expires if selected is not None else None
    )


def _verify(
    qvl: ModuleType, raw: bytes, sel: SelectedCollateral, now: int, root_ca_der: bytes | None
) -> Any:
    coll = qvl.QuoteCollateralV3(
        sel.pck_crl_issuer_chain,
        sel.root_ca_crl,
        sel.pck_crl,
        sel.tcb_info.issuer_chain,
        sel.tcb_info.raw,
        sel.tcb_info.signature,
        sel.qe_identity.issuer_chain,
        sel.qe_identity.raw,
        sel.qe_identity.signature,
    )
    if root_ca_der is not None:
        return qvl.verify_with_root_ca(raw, coll, root_ca_der, now)
    return qvl.verify(raw, coll, now)
