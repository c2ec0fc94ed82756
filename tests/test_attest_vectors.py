"""spec/vectors/attestation.json (spec/v2.md §8.3, SPEC.md §18.2): recomputed independently
from the spec text with hashlib and by pqe2ee's binding function (which the instance's evidence
endpoint uses too), and the Chutes vector against the real quote it was taken from."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from attest_support import capture
from pqe2ee.attest import nonce_binding
from pqe2ee.attest.tdx import parse_quote

VECTORS = json.loads(
    (Path(__file__).resolve().parents[1] / "spec" / "vectors" / "attestation.json").read_text()
)["vectors"]


@pytest.mark.parametrize("vec", VECTORS, ids=lambda v: v["name"])
def test_vector(vec: dict[str, Any]) -> None:
    text = vec["nonce_hex"] + vec["e2e_pubkey"]
    if vec["e2e_v2_pk"] is not None:
        text += "," + vec["e2e_v2_pk"]
    independent = (
        hashlib.sha256(text.encode("ascii")).digest()
        + hashlib.sha256(bytes.fromhex(vec["spki_der_hex"])).digest()
    )
    assert independent.hex() == vec["report_data_hex"]
    ours = nonce_binding(vec["nonce_hex"], vec["e2e_pubkey"], vec["e2e_v2_pk"])
    assert ours == bytes.fromhex(vec["report_data_hex"])[:32]


def test_the_two_forms_differ() -> None:
    v2, v1 = VECTORS[1], VECTORS[2]
    assert v2["e2e_pubkey"] == v1["e2e_pubkey"] and v2["report_data_hex"] != v1["report_data_hex"]


def test_chutes_vector_is_the_real_quote() -> None:
    vec = VECTORS[0]
    cap = capture("glm-5-tee-2026-06-29")
    assert cap.nonce_hex == vec["nonce_hex"]
    found = [
        e for i, e in cap.evidence.entries.items() if cap.instances.get(i) == vec["e2e_pubkey"]
    ]
    assert len(found) == 1
    quote = parse_quote(base64.b64decode(str(found[0]["quote"])))
    assert quote.report_data.hex() == vec["report_data_hex"]
