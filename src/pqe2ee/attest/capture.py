"""Saved evidence captures and collateral directories (file I/O; the rest of attest is pure).

A capture directory (the layout of ``pqe2ee attest fetch`` and of the shared fixtures) holds
``manifest.json`` (``nonce_hex``, ``captured_at``), ``discovery.body``, ``evidence.body`` and
Intel collateral answers as ``<name>.body`` + ``<name>.meta.json`` (request ``url`` and response
``headers``, each a list of values). Collateral files are recognised by their URL, so any
directory of such answers (``--collateral-dir``) can be merged in.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pqe2ee._json import json_decode
from pqe2ee.attest.collateral import Collateral, collateral_from_answer
from pqe2ee.attest.gate import INTEL_PCS_URL, AttestMode, AttestOptions
from pqe2ee.attest.nras import NRAS_JWKS_URL, NRAS_URL
from pqe2ee.attest.policy import GpuMode, Policy
from pqe2ee.attest.verify import EvidenceBundle, parse_evidence
from pqe2ee.errors import AttestationError, ErrorCode

__all__ = [
    "Capture",
    "attest_options",
    "fetch_capture",
    "load_capture",
    "load_collateral_dir",
    "load_policy",
    "save_answer",
]

_MAX_FILE = 16 << 20


def _read(path: Path) -> bytes:
    try:
        if path.stat().st_size > _MAX_FILE:
            raise AttestationError(
                f"{path.name}: too large", code=ErrorCode.ATTEST_EVIDENCE_MALFORMED
            )
        return path.read_bytes()
    except OSError as exc:
        raise AttestationError(
            f"{path.name}: {exc.strerror or type(exc).__name__}",
            code=ErrorCode.ATTEST_EVIDENCE_MISSING,
        ) from None


def _answer(meta_path: Path) -> Collateral:
    try:
        meta = json_decode(_read(meta_path))
        url, headers = meta["url"], meta.get("headers", {})
        if not isinstance(url, str) or not isinstance(headers, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise AttestationError(
            f"{meta_path.name}: not a capture meta file", code=ErrorCode.ATTEST_COLLATERAL_MISSING
        ) from None
    body_path = meta_path.with_name(meta_path.name.removesuffix(".meta.json") + ".body")
    found = collateral_from_answer(url, headers, _read(body_path))
    return Collateral(
        found.tcb_infos, found.qe_identities, found.pck_crls, found.root_ca_crl, (body_path.name,)
    )


def save_answer(
    directory: Path, name: str, url: str, status: int, headers: dict[str, list[str]], body: bytes
) -> None:
    """Write one HTTP answer as ``<name>.body`` + ``<name>.meta.json`` (the capture layout)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.body").write_bytes(body)
    meta = {"method": "GET", "url": url, "status": status, "headers": headers}
    (directory / f"{name}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_collateral_dir(directory: Path) -> Collateral:
    """Every collateral answer in ``directory`` (``*.meta.json`` + ``*.body``), merged."""
    collateral = Collateral()
    for meta_path in sorted(directory.glob("*.meta.json")):
        collateral = collateral.merged(_answer(meta_path))
    return collateral


@dataclass(frozen=True)
class Capture:
    """A saved capture: our nonce, when it was taken, discovery and evidence, collateral."""

    nonce_hex: str
    captured_at: datetime
    instances: dict[str, str]  # instance_id -> e2e_pubkey, in discovery order
    evidence: EvidenceBundle
    collateral: Collateral
    #: instance_id -> e2e_v2.pk for rows that carry an ``e2e_v2`` object (spec/v2.md §8.3)
    v2_keys: dict[str, str] = field(default_factory=dict)


def load_capture(directory: Path) -> Capture:
    """Read a capture directory; typed errors for missing or malformed parts."""
    try:
        manifest = json_decode(_read(directory / "manifest.json"))
        nonce_hex = manifest["nonce_hex"]
        captured_at = datetime.fromisoformat(manifest["captured_at"].replace("Z", "+00:00"))
        if captured_at.tzinfo is None or not isinstance(nonce_hex, str):
            raise TypeError
        bytes.fromhex(nonce_hex)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise AttestationError(
            "manifest.json lacks nonce_hex / captured_at", code=ErrorCode.ATTEST_EVIDENCE_MALFORMED
        ) from None
    try:
        discovery = json_decode(_read(directory / "discovery.body"))
        instances = {i["instance_id"]: i["e2e_pubkey"] for i in discovery["instances"]}
        v2_keys = {
            i["instance_id"]: i["e2e_v2"]["pk"]
            for i in discovery["instances"]
            if isinstance(i.get("e2e_v2"), dict) and isinstance(i["e2e_v2"].get("pk"), str)
        }
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in instances.items()):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise AttestationError(
            "discovery.body is not a discovery answer", code=ErrorCode.ATTEST_EVIDENCE_MALFORMED
        ) from None
    evidence = parse_evidence(_read(directory / "evidence.body"))
    return Capture(
        nonce_hex, captured_at, instances, evidence, load_collateral_dir(directory), v2_keys
    )


def load_policy(path: Path) -> Policy:
    """A :class:`Policy` from a JSON file; ``attest_unavailable`` when it cannot be used."""
    try:
        doc = json_decode(path.read_bytes())
    except (OSError, ValueError):
        raise AttestationError(
            f"policy {path.name} is not a readable JSON file", code=ErrorCode.ATTEST_UNAVAILABLE
        ) from None
    if not isinstance(doc, dict):
        raise AttestationError(
            "the policy must be a JSON object", code=ErrorCode.ATTEST_UNAVAILABLE
        )
    return Policy.from_dict(doc)


def attest_options(
    mode: str,
    *,
    policy: Path | None = None,
    collateral_dirs: tuple[Path, ...] = (),
    pcs_url: str | None = INTEL_PCS_URL,
    cache_dir: Path | None = None,
    gpu: str | None = None,
    nras_url: str = NRAS_URL,
    nras_jwks_url: str = NRAS_JWKS_URL,
) -> AttestOptions:
    """:class:`AttestOptions` from command-line style values (files read here). ``gpu``
    (``verify``/``nras``/``off``) overrides the policy file's GPU mode."""
    try:
        chosen = AttestMode(mode)
    except ValueError:
        raise AttestationError(
            f"attest mode {mode!r} is not auto, require or off", code=ErrorCode.ATTEST_UNAVAILABLE
        ) from None
    collateral = Collateral()
    for directory in collateral_dirs:
        collateral = collateral.merged(load_collateral_dir(directory))
    chosen_policy = load_policy(policy) if policy is not None else Policy()
    if gpu is not None:
        try:
            chosen_policy = dataclasses.replace(chosen_policy, gpu=GpuMode(gpu))
        except ValueError:
            raise AttestationError(
                f"GPU mode {gpu!r} is not verify, nras or off", code=ErrorCode.ATTEST_UNAVAILABLE
            ) from None
    return AttestOptions(
        mode=chosen,
        policy=chosen_policy,
        collateral=collateral,
        pcs_url=pcs_url.rstrip("/") if pcs_url else None,
        cache_dir=cache_dir,
        nras_url=nras_url,
        nras_jwks_url=nras_jwks_url,
    )


def fetch_capture(
    out: Path,
    *,
    chute: str,
    api_base: str,
    api_key: str | None,
    pcs_url: str,
    root_ca_crl_url: str,
    timeout: float = 60.0,
) -> None:
    """Capture a chute's discovery and evidence (fresh nonce) and the Intel collateral its
    quotes need into ``out`` (the layout of :func:`load_capture`). Needs httpx2."""
    import base64
    from datetime import UTC

    import httpx2

    from pqe2ee.attest.collateral import collateral_urls
    from pqe2ee.attest.tdx import parse_quote
    from pqe2ee.attest.verify import new_nonce

    nonce_hex = new_nonce()
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def get(client: httpx2.Client, name: str, url: str, headers: dict[str, str]) -> bytes:
        try:
            response = client.get(url, headers=headers)
        except httpx2.HTTPError as exc:
            raise AttestationError(
                f"{name}: {type(exc).__name__}", code=ErrorCode.ATTEST_EVIDENCE_MISSING
            ) from None
        multi: dict[str, list[str]] = {}
        for key, value in response.headers.multi_items():
            multi.setdefault(key, []).append(value)
        save_answer(out, name, url, response.status_code, multi, response.content)
        if response.status_code != 200:
            raise AttestationError(
                f"{name}: answered {response.status_code}", code=ErrorCode.ATTEST_EVIDENCE_MISSING
            )
        return response.content

    with httpx2.Client(timeout=timeout) as client:
        get(client, "discovery", f"{api_base}/e2e/instances/{chute}", auth)
        captured_at = datetime.now(UTC)
        body = get(
            client, "evidence", f"{api_base}/chutes/{chute}/evidence?nonce={nonce_hex}", auth
        )
        wanted: set[tuple[str, str]] = set()
        for entry in parse_evidence(body).entries.values():
            try:
                quote = parse_quote(base64.b64decode(str(entry.get("quote")), validate=True))
            except (ValueError, AttestationError):
                continue
            wanted.add((quote.fmspc, quote.ca))
        for i, (fmspc, ca) in enumerate(sorted(wanted)):
            for name, url in collateral_urls(pcs_url, fmspc, ca).items():
                suffix = "" if i == 0 else f"-{fmspc}-{ca}"
                get(client, name + suffix, url, {})
        get(client, "intel-root-ca-crl", root_ca_crl_url, {})
    manifest = {
        "nonce_hex": nonce_hex,
        "captured_at": captured_at.isoformat(),
        "chute_id": chute,
        "api_base": api_base,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
