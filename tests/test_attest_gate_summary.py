"""``AttestationGate.summary()`` (what the proxy's status page shows per chute): the state
follows the newest verdict per instance, instances named in the evidence but not verified yet
are pending, a chute without evidence is unattested with the reason, and a verified chute that
later serves none is still shown as pinned."""

from __future__ import annotations

import pytest

from pqe2ee.attest.gate import AttestMode, AttestOptions
from pqe2ee.attest.policy import Check, Verdict
from pqe2ee.attest.verify import EvidenceBundle
from pqe2ee.errors import AttestationError, ErrorCode

KEY = "a2V5"


def verdict(instance: str, ok: bool, at: float) -> Verdict:
    code = None if ok else ErrorCode.ATTEST_DEBUG
    return Verdict.from_checks(instance, [Check("debug", ok, code)], at, tcb_status="UpToDate")


def test_states_per_chute() -> None:
    gate = AttestOptions(mode=AttestMode.AUTO).gate
    assert gate.summary() == {}
    bundle = EvidenceBundle({"i1": {}, "i2": {}}, frozenset({"i3"}))
    gate.store_evidence("c-trusted", "00" * 32, bundle, 100.0)
    got = gate.summary()["c-trusted"]
    assert got.state == "not yet" and got.pending == ("i1", "i2", "i3")

    gate.record("c-trusted", KEY, verdict("i1", False, 100.0), None)
    got = gate.summary()["c-trusted"]
    assert got.state == "rejected" and got.pending == ("i2", "i3") and not got.pinned
    gate.record("c-trusted", KEY, verdict("i2", True, 101.0), expires=150.0)
    got = gate.summary()["c-trusted"]
    assert got.state == "trusted" and got.pinned and got.pending == ("i3",)
    assert [(v.instance_id, v.trusted, until) for v, until in got.verdicts] == [
        ("i1", False, 100.0 + 3600.0),
        ("i2", True, 150.0),  # the collateral's expiry comes first
    ]
    # the newest verdict per instance wins (a later key of i1, now trusted)
    gate.record("c-trusted", "b3RoZXI=", verdict("i1", True, 200.0), None)
    assert [v.trusted for v, _ in gate.summary()["c-trusted"].verdicts] == [True, True]

    assert gate.unattested("c-plain", "answered 404 for its evidence")
    got = gate.summary()["c-plain"]
    assert (got.state, got.why, got.verdicts) == ("unattested", "answered 404 for its evidence", ())

    with pytest.raises(AttestationError) as err:  # a verified chute now without evidence
        gate.unattested("c-trusted", "answered 404 for its evidence")
    assert err.value.code is ErrorCode.ATTEST_DOWNGRADE
    assert gate.summary()["c-trusted"].state == "trusted"
