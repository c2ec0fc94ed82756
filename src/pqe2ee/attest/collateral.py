"""Intel DCAP collateral as Intel signed it (pure: bytes in, values out; no fetching).

``tcb_info`` and ``qe_identity`` must reach the verifier as the **exact raw text** of the
``tcbInfo`` / ``enclaveIdentity`` members of Intel's answers: re-serialising can break Intel's
signature. :func:`raw_members` cuts those spans out of the body without re-encoding them.
Collateral is per FMSPC (TCB info) and per PCK CA (CRL); :meth:`Collateral.select` picks the
pieces valid at the verification time, so an expired or not-yet-issued answer is never used.
"""

from __future__ import annotations

import functools
import json
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from cryptography import x509

from pqe2ee._json import MAX_JSON_DEPTH, json_too_deep
from pqe2ee.errors import AttestationError, ErrorCode

__all__ = [
    "Collateral",
    "QeIdentity",
    "SelectedCollateral",
    "TcbInfo",
    "collateral_from_answer",
    "collateral_urls",
    "qe_identity_from_pcs",
    "raw_members",
    "tcb_info_from_pcs",
    "unquote_chain",
]

#: Response headers of Intel PCS that carry the issuer chains (URL-encoded PEM).
TCB_INFO_CHAIN_HEADER = "tcb-info-issuer-chain"
QE_IDENTITY_CHAIN_HEADER = "sgx-enclave-identity-issuer-chain"
PCK_CRL_CHAIN_HEADER = "sgx-pck-crl-issuer-chain"

_MAX_COLLATERAL = 1 << 20


def _bad(message: str) -> AttestationError:
    return AttestationError(message, code=ErrorCode.ATTEST_COLLATERAL_MISSING)


def raw_members(body: bytes) -> dict[str, tuple[str, object]]:
    """The top-level members of a JSON object: name -> (exact source text, decoded value)."""
    if len(body) > _MAX_COLLATERAL:
        raise _bad(f"collateral document of {len(body)} bytes")
    if json_too_deep(body):  # raw_decode below has no depth bound of its own
        raise _bad(f"collateral document nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        text = body.decode("utf-8")
        decoder = json.JSONDecoder()
        ws = " \t\r\n"
        i = len(text) - len(text.lstrip(ws))
        if text[i : i + 1] != "{":
            raise ValueError("not an object")
        i += 1
        out: dict[str, tuple[str, object]] = {}
        while True:
            while text[i] in ws:
                i += 1
            if text[i] == "}":
                return out
            if out:
                if text[i] != ",":
                    raise ValueError("expected ,")
                i += 1
                while text[i] in ws:
                    i += 1
            name, i = decoder.raw_decode(text, i)
            while text[i] in ws:
                i += 1
            if not isinstance(name, str) or text[i] != ":":
                raise ValueError("expected name:")
            i += 1
            while text[i] in ws:
                i += 1
            start = i
            value, i = decoder.raw_decode(text, i)
            out[name] = (text[start:i], value)
    except (UnicodeDecodeError, ValueError, IndexError) as exc:
        raise _bad(f"collateral is not a JSON object ({type(exc).__name__})") from None


def unquote_chain(header_value: str) -> str:
    """An issuer-chain header as Intel sends it (URL-encoded PEM) -> PEM text."""
    pem = urllib.parse.unquote(header_value)
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise _bad("issuer chain header holds no PEM certificate")
    return pem


def _when(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise _bad(f"{what} is not a date string")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _bad(f"{what} is not an ISO 8601 date") from None
    if when.tzinfo is None:
        raise _bad(f"{what} has no time zone")
    return when


@dataclass(frozen=True, kw_only=True)
class _SignedDocument:
    """An Intel-signed JSON member: its exact text, signature (raw r||s), issuer chain (PEM)
    and validity window."""

    raw: str
    signature: bytes
    issuer_chain: str
    issue_date: datetime
    next_update: datetime

    def valid_at(self, now: float) -> bool:
        return self.issue_date.timestamp() <= now < self.next_update.timestamp()


@dataclass(frozen=True, kw_only=True)
class TcbInfo(_SignedDocument):
    """Intel's signed TDX TCB info for one FMSPC."""

    fmspc: str


@dataclass(frozen=True, kw_only=True)
class QeIdentity(_SignedDocument):
    """Intel's signed TD quoting enclave identity."""


def _signed(body: bytes, member: str) -> tuple[str, dict[str, object], bytes]:
    members = raw_members(body)
    if member not in members or "signature" not in members:
        raise _bad(f"collateral lacks {member!r} or 'signature'")
    raw, value = members[member]
    signature = members["signature"][1]
    if not isinstance(value, dict) or not isinstance(signature, str):
        raise _bad(f"collateral {member!r} has the wrong shape")
    try:
        return raw, value, bytes.fromhex(signature)
    except ValueError:
        raise _bad("collateral signature is not hex") from None


def _document(
    body: bytes, member: str, issuer_chain_header: str
) -> tuple[dict[str, Any], dict[str, object]]:
    """The :class:`_SignedDocument` fields of an Intel answer, and the decoded member."""
    raw, value, signature = _signed(body, member)
    fields = {
        "raw": raw,
        "signature": signature,
        "issuer_chain": unquote_chain(issuer_chain_header),
        "issue_date": _when(value.get("issueDate"), f"{member}.issueDate"),
        "next_update": _when(value.get("nextUpdate"), f"{member}.nextUpdate"),
    }
    return fields, value


def tcb_info_from_pcs(body: bytes, issuer_chain_header: str) -> TcbInfo:
    """Intel PCS ``tdx/certification/v4/tcb?fmspc=`` answer -> :class:`TcbInfo`."""
    fields, value = _document(body, "tcbInfo", issuer_chain_header)
    fmspc = value.get("fmspc")
    if not isinstance(fmspc, str) or len(fmspc) != 12:
        raise _bad("tcbInfo has no 12-hex-digit fmspc")
    return TcbInfo(fmspc=fmspc.lower(), **fields)


def qe_identity_from_pcs(body: bytes, issuer_chain_header: str) -> QeIdentity:
    """Intel PCS ``tdx/certification/v4/qe/identity`` answer -> :class:`QeIdentity`."""
    return QeIdentity(**_document(body, "enclaveIdentity", issuer_chain_header)[0])


@dataclass(frozen=True)
class SelectedCollateral:
    """The pieces one quote is verified with (the fields of dcap-qvl's QuoteCollateralV3)."""

    tcb_info: TcbInfo
    qe_identity: QeIdentity
    pck_crl: bytes
    pck_crl_issuer_chain: str
    root_ca_crl: bytes

    @property
    def expires(self) -> float:
        """The earliest nextUpdate: a verdict built on this collateral ends there."""
        return min(self.tcb_info.next_update, self.qe_identity.next_update).timestamp()


@dataclass(frozen=True)
class Collateral:
    """Every collateral answer at hand: TCB infos (any FMSPC, any date), QE identities, the
    PCK CRLs by CA type (``platform``, ``processor``) with their issuer chains, the root CA CRL."""

    tcb_infos: tuple[TcbInfo, ...] = ()
    qe_identities: tuple[QeIdentity, ...] = ()
    pck_crls: tuple[tuple[str, bytes, str], ...] = ()  # (ca, DER CRL, issuer chain PEM)
    root_ca_crl: bytes | None = None
    sources: tuple[str, ...] = field(default=(), compare=False)

    def merged(self, other: Collateral) -> Collateral:
        return replace(
            self,
            tcb_infos=self.tcb_infos + other.tcb_infos,
            qe_identities=self.qe_identities + other.qe_identities,
            pck_crls=self.pck_crls + other.pck_crls,
            root_ca_crl=_newer_crl(self.root_ca_crl, other.root_ca_crl),
            sources=self.sources + other.sources,
        )

    def with_tcb_infos(self, infos: Iterable[TcbInfo]) -> Collateral:
        return replace(self, tcb_infos=self.tcb_infos + tuple(infos))

    def select(self, fmspc: str, ca: str, now: float) -> SelectedCollateral | None:
        """The newest pieces valid at ``now`` for this FMSPC and PCK CA, or ``None``."""
        fmspc = fmspc.lower()
        tcbs = [t for t in self.tcb_infos if t.fmspc == fmspc and t.valid_at(now)]
        qes = [q for q in self.qe_identities if q.valid_at(now)]
        crls = [
            (crl, chain)
            for kind, crl, chain in self.pck_crls
            if kind == ca.lower() and crl_valid_at(crl, now)
        ]
        root = self.root_ca_crl
        if not tcbs or not qes or not crls or root is None or not crl_valid_at(root, now):
            return None
        tcb = max(tcbs, key=lambda t: t.issue_date)
        qe = max(qes, key=lambda q: q.issue_date)
        crl, chain = crls[-1]
        return SelectedCollateral(tcb, qe, crl, chain, root)

    def root_crl_valid(self, now: float) -> bool:
        return self.root_ca_crl is not None and crl_valid_at(self.root_ca_crl, now)

    def fmspcs(self) -> frozenset[str]:
        return frozenset(t.fmspc for t in self.tcb_infos)


@functools.lru_cache(maxsize=64)
def _crl_window(der: bytes) -> tuple[float, float] | None:
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError:
        return None
    if crl.next_update_utc is None:
        return None
    return crl.last_update_utc.timestamp(), crl.next_update_utc.timestamp()


def crl_valid_at(der: bytes, now: float) -> bool:
    """A DER CRL whose thisUpdate..nextUpdate window holds ``now`` (unparsable: not valid)."""
    window = _crl_window(der)
    return window is not None and window[0] <= now < window[1]


def _newer_crl(a: bytes | None, b: bytes | None) -> bytes | None:
    if a is None or b is None:
        return a if b is None else b
    wa, wb = _crl_window(a), _crl_window(b)
    return b if wb is not None and (wa is None or wb[1] > wa[1]) else a


def _header(headers: Mapping[str, object], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            if isinstance(value, list) and value and isinstance(value[0], str):
                return value[0]
            if isinstance(value, str):
                return value
    raise AttestationError(f"missing header {name}", code=ErrorCode.ATTEST_COLLATERAL_MISSING)


def collateral_from_answer(url: str, headers: Mapping[str, object], body: bytes) -> Collateral:
    """One Intel PCS / certificates answer -> :class:`Collateral` (empty if not collateral)."""
    parsed = urllib.parse.urlsplit(url)
    path, query = parsed.path, urllib.parse.parse_qs(parsed.query)
    if path.endswith("/tcb"):
        return Collateral(
            tcb_infos=(tcb_info_from_pcs(body, _header(headers, TCB_INFO_CHAIN_HEADER)),)
        )
    if path.endswith("/qe/identity"):
        qe = qe_identity_from_pcs(body, _header(headers, QE_IDENTITY_CHAIN_HEADER))
        return Collateral(qe_identities=(qe,))
    if path.endswith("/pckcrl"):
        ca = query.get("ca", ["platform"])[0].lower()
        chain = unquote_chain(_header(headers, PCK_CRL_CHAIN_HEADER))
        return Collateral(pck_crls=((ca, body, chain),))
    if path.endswith("RootCA.der") or path.endswith("/rootcacrl"):
        return Collateral(root_ca_crl=body)
    return Collateral()


def collateral_urls(pcs_url: str, fmspc: str, ca: str) -> dict[str, str]:
    """Intel PCS (or PCCS) URLs of the collateral one quote needs, by capture file name."""
    return {
        "intel-tcb-info": f"{pcs_url}/tdx/certification/v4/tcb?fmspc={fmspc}",
        "intel-qe-identity": f"{pcs_url}/tdx/certification/v4/qe/identity",
        "intel-pck-crl": f"{pcs_url}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der",
    }
